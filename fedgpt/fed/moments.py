"""fed.client_optimizer=average: the clients' first moments (Muon's momentum, AdamW's exp_avg), averaged by
the server each round like the weights, so that every client starts a round from the federation's momentum
rather than its own.

A client's momentum at batch 1 is a running mean of about 1 / (1 - momentum) of its own windows' gradients;
the mean over 8 clients is one of 8x as many, the direction synchronous data parallelism steps on. Each client
keeps the rest of its state (AdamW's second moment and step count) as fed.client_optimizer=keep does.

    moments = SharedMoments(saved)       # saved: the mean a checkpoint held (resume), or None
    sent = moments.attach(msgs)          # the train messages carry the mean as "moments" (from round 2)
    taken = moments.take(replies)        # off the replies, before the strategy sees them
    received = moments.average(used, taken)  # the weighted mean of those of the replies used: the new mean
    moments.mean                         # name -> fp32 tensor, checkpointed with the run

The moments travel in the clear beside the update, so fedgpt refuses this mode with DP and SecAgg+
(fedgpt.config): they would reveal what the noise and the masks hide.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message

MOMENTS = "moments"  # the record's name, in train messages and their replies


class SharedMoments:
    def __init__(self, mean: dict[str, torch.Tensor] | None = None):
        self.mean = mean

    def attach(self, msgs: list[Message]) -> int:
        """Put the mean into each train message; returns the bytes that adds (0 before any client sent)."""
        if self.mean is None:
            return 0
        record = ArrayRecord(self.mean)  # fp32 already: average() and checkpoints keep it so
        for m in msgs:
            m.content[MOMENTS] = record
        return record.count_bytes() * len(msgs)

    def take(self, replies: list[Message]) -> dict[int, ArrayRecord]:
        """The moments of the replies, by node, taken off them: a Flower strategy aggregates replies that
        hold one ArrayRecord."""
        taken = {}
        for r in replies:
            if not r.has_error() and MOMENTS in r.content:
                taken[r.metadata.src_node_id] = r.content[MOMENTS]
                del r.content[MOMENTS]
        return taken

    def average(self, used: list[Message], taken: dict[int, ArrayRecord]) -> int:
        """The weighted mean (num-examples, as FedAvg's) of the moments of the replies the round used becomes
        the next round's, over the names all of them hold; without any (no client had a state yet) the mean
        stays as it was. Returns the bytes of the moments received."""
        sent = [(r, taken[r.metadata.src_node_id]) for r in used if r.metadata.src_node_id in taken]
        if sent:
            records = [record.to_torch_state_dict() for _, record in sent]
            weights = torch.tensor(
                [float(r.content["metrics"]["num-examples"]) for r, _ in sent], dtype=torch.float64
            )
            weights /= weights.sum()
            names = set.intersection(*(set(rec) for rec in records))
            self.mean = {
                k: sum(w * rec[k].double() for w, rec in zip(weights, records)).float() for k in sorted(names)
            }
        return sum(record.count_bytes() for record in taken.values())
