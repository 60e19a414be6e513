"""A federated round as one typed row: what the ServerApp appends to rounds.jsonl, and what the benchmarks and
the results table read back from it.

    rows = read_rounds("out/fed/rounds.jsonl")     # round 0 (the initial model) first
    print(summarize_rounds(rows)["median_round_s"])
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

from fedgpt.metrics import read_jsonl


@dataclass
class RoundRow:
    round: int  # 0: the initial global model, evaluated before any training
    tokens: int = 0  # training tokens of all clients, all rounds so far
    val_loss: float | None = None  # central validation loss of this round's global model
    val_accuracy: float | None = None  # its next-token accuracy there
    best_val_loss: float | None = None
    train_loss: float | None = None  # the clients' training losses this round, weighted by their tokens
    client_val_loss: float | None = None  # on the clients' own validation slices (fed.client_eval_interval)
    client_val_accuracy: float | None = None
    # each client once: mean and spread of the global and each personal model's scores (fedgpt.fed.personal)
    client_eval: dict | None = None
    lr: float | None = None  # the clients' learning rate at the end of the round
    # Under DP a row holds only what the accountant covers (fedgpt.fed.privacy.PUBLISHED): the rest is None.
    clients_ok: int = 0
    clients_failed: int = 0  # sent work, and answered with an error or not at all
    clients_refused: int = 0  # answered with an update the server refused (fedgpt.fed.wire): never averaged
    clients_state_resumed: int = 0  # clients that went on from their own optimizer state (keep mode)
    clients_state_stale: int = 0  # clients whose saved state was older than fed.client_state_max_age: dropped
    update_norm: float | None = None  # median L2 norm of the clients' updates (not reported under DP)
    lora_aggregation_error: float | None = None  # ||mean(BA) - mean(B) mean(A)|| / ||mean(BA)||, LoRA runs
    clients_straggling: int = 0  # clients given fewer local steps this round (fed.stragglers)
    dp_epsilon: float | None = None  # privacy spent so far, at dp.delta (dp on): RDP accountant
    dp_epsilon_pld: float | None = None  # the same, by the PLD accountant (tighter); None above RDP 100
    dp_clipping_norm: float | None = (
        None  # the clipping norm the next round uses (adaptive clipping moves it)
    )
    bytes_sent: int = 0  # weights and configs, server to clients, all messages of the round
    bytes_received: int = 0
    round_s: float | None = None  # send to aggregate, with client evaluation; central runs beside the next
    client_train_s: float | None = None  # the clients' training seconds, summed
    outside_training_share: float | None = None  # of round_s, with as many clients at once as slots
    eval_s: float | None = None  # the central evaluation of this round's model
    elapsed_s: float | None = None  # since launch, when the row was written
    startup_s: float | None = None  # round 1 only: launch to the first client step
    first_step_at: float | None = None  # round 1 only: Unix time of the first client step

    def add_clients(self, metrics: list, round_s: float, slots: int) -> None:
        """The round's figures from its clients' train metrics: their tokens-weighted train loss, learning
        rate, state, update norms and training seconds, with `slots` clients training at once."""
        self.round_s = round(round_s, 3)
        if not metrics or "train-tokens" not in metrics[0]:  # none, or SecAgg+'s: only their weights
            return
        tokens = sum(int(m["train-tokens"]) for m in metrics)
        self.train_loss = sum(float(m["train-loss"]) * int(m["train-tokens"]) for m in metrics) / max(
            1, tokens
        )
        self.lr = float(metrics[0]["train-lr"])
        self.clients_state_resumed = sum(int(m["state-age"]) > 0 for m in metrics)
        self.clients_state_stale = sum(int(m["state-stale"]) for m in metrics)
        norms = [float(m["update-norm"]) for m in metrics if "update-norm" in m]
        self.update_norm = statistics.median(norms) if norms else None
        train_s = [float(m["train-seconds"]) for m in metrics]
        self.client_train_s = round(sum(train_s), 3)
        busy = sum(train_s) / max(1, min(len(train_s), slots))
        if round_s > 0:
            self.outside_training_share = round(max(0.0, 1 - busy / round_s), 4)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RoundRow:
        """A row as written by any fedgpt version: keys it does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_rounds(path: str | Path) -> list[RoundRow]:
    return [RoundRow.from_dict(d) for d in read_jsonl(path)]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize_rounds(rows: list[RoundRow]) -> dict:
    """Final and best loss, start-up and the medians of a run's trained rounds (round 0 is left out)."""
    trained = [r for r in rows if r.round > 0]
    shares = [r.outside_training_share for r in trained if r.outside_training_share is not None]
    return {
        "rounds": len(trained),
        "final_val_loss": trained[-1].val_loss if trained else None,
        "best_val_loss": min((r.val_loss for r in rows if r.val_loss is not None), default=None),
        "startup_s": trained[0].startup_s if trained else None,
        "median_round_s": median([r.round_s for r in trained if r.round_s is not None]),
        "median_outside_training_share": median(shares),
    }
