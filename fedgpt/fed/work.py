"""The work a client is given each round, decided by the server and read by the client in one place.

    order = WorkOrder(round=3, local_steps=25, first_step=50, schedule=Schedule.of(tc, 250), ...)
    msg.content["config"] = ConfigRecord({**run_facts, **order.to_config()})     # server
    order = WorkOrder.from_config(msg.content["config"])                        # client
    straggler_steps(0.5, "accept", 25, seed=1337, rnd=3, clients=8)  # [25, 15, 21, 25, 5, 25, 10, 25]
    straggler_steps(0.5, "drop", 25, seed=1337, rnd=3, clients=8)    # [25, None, None, 25, None, 25, ...]

Everything that varies by client or by round travels here, so that no value is derived twice: the steps
this client runs (fewer for a straggler, drawn here), where in the learning-rate schedule it starts and the
schedule itself (fixed when the run started, so a resume that adds rounds keeps it), the round whose client
state a resume may still need, the norm to clip to under client-side DP, and FedProx's mu (the strategy's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from flwr.app import ConfigRecord

from fedgpt.train import Schedule

PREFIX = "work."


@dataclass(frozen=True)
class WorkOrder:
    round: int
    local_steps: int  # optimizer steps this round (fed.local_steps, fewer for a straggler)
    first_step: int  # the client's position in the schedule: (round - 1) x fed.local_steps
    schedule: Schedule  # the clients' learning-rate schedule over the whole run
    keep_from_round: int  # the newest checkpointed round: client states older than it are not needed
    dp_clipping_norm: float | None = None  # dp.clipping=client: clip the update to this L2 norm
    proximal_mu: float = 0.0  # FedProx: weight of (mu/2)·||w - w_global||^2

    def to_config(self) -> dict:
        s = self.schedule
        out = {
            "round": self.round,
            "local-steps": self.local_steps,
            "first-step": self.first_step,
            "lr-peak": s.peak,
            "lr-floor": s.floor,
            "lr-warmup": s.warmup,
            "lr-decay-steps": s.decay_steps,
            "keep-from-round": self.keep_from_round,
            "proximal-mu": self.proximal_mu,
        }
        if self.dp_clipping_norm is not None:
            out["dp-clipping-norm"] = self.dp_clipping_norm
        return {PREFIX + k: v for k, v in out.items()}

    @classmethod
    def from_config(cls, record: ConfigRecord) -> WorkOrder:
        w = {k[len(PREFIX) :]: v for k, v in record.items() if k.startswith(PREFIX)}
        if "round" not in w:
            raise ValueError(
                "the train message carries no work order: the server runs another fedgpt version"
            )
        schedule = Schedule(
            float(w["lr-peak"]), float(w["lr-floor"]), int(w["lr-warmup"]), int(w["lr-decay-steps"])
        )
        clip = w.get("dp-clipping-norm")
        return cls(
            int(w["round"]),
            int(w["local-steps"]),
            int(w["first-step"]),
            schedule,
            int(w["keep-from-round"]),
            None if clip is None else float(clip),
            float(w["proximal-mu"]),
        )


def straggler_steps(share: float, policy: str, local_steps: int, seed: int, rnd: int, clients: int) -> list:
    """The local steps of each of a round's `clients` sampled clients, in their order: local_steps, except
    for round(share x clients) stragglers drawn from the run's seed and the round. As in Li et al. 2020
    (FedProx, section 5), a straggler gets a budget drawn from 1 to local_steps - 1 (policy "accept"), or
    None: left out of the round (policy "drop"; FedAvg does not wait for it)."""
    k = round(share * clients) if local_steps > 1 else 0
    rng = random.Random(seed * 7_919 + rnd)
    chosen = set(rng.sample(range(clients), k)) if k else set()
    steps = []
    for i in range(clients):
        if i not in chosen:
            steps.append(local_steps)
        else:
            steps.append(rng.randint(1, local_steps - 1) if policy == "accept" else None)
    return steps
