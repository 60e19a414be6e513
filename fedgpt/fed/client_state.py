"""A client's own state between rounds (its AdamW moments and step count), kept in files on its node.

    store = ClientStateStore(state_dir, run_id, partition_id)
    state, saved_round = store.load(before_round=rnd)     # the newest state saved before this round, or None
    store.save(rnd, {"optimizer": optimizer.state_dict()})
    store.prune(keep_from_round=checkpointed_round)

Why files, and not Flower's context.state: in simulation context.state lives in the simulation's process, so a
killed run loses it and --resume could not continue exactly; in deployment it is pushed back from the
ClientApp's exit handler, which Flower force-exits after 5 s, so a large state (GPT-2's moments: about 1 GB)
can be lost without a word. A file written atomically survives both, and the round in its name lets a resumed
run find the state its checkpoint's round left, however far the killed run got past it.

Layout: <dir>/<run id>/partition-<p>/round-<r>.pt. Files of other runs are never read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedgpt.checkpoint import atomic_save
from fedgpt.fed.node_policy import NodePolicy

if TYPE_CHECKING:
    from fedgpt.config import Config

ROUND_FILE = re.compile(r"round-(\d+)\.pt")


def run_state_dir(cfg: Config) -> Path:
    """Where the clients of a run on this machine keep their state (a simulation's nodes, by their node
    setting): fed.client_state_dir, or <train.out_dir>/client_state; absolute."""
    return Path(cfg.fed.client_state_dir or Path(cfg.train.out_dir) / "client_state").resolve()


class ClientStateStore:
    """The states one partition of one run saved, one file per round."""

    def __init__(self, root: str | Path, run_id: str, partition_id: int):
        # a run id from a message is a name, never a path (fedgpt.fed.node_policy)
        self.dir = Path(root) / NodePolicy.run_id(run_id) / f"partition-{int(partition_id)}"

    def rounds(self) -> list[int]:
        """The rounds with a saved state, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := ROUND_FILE.fullmatch(p.name)))

    def load(self, before_round: int) -> tuple[dict | None, int | None]:
        """The newest state saved in a round before `before_round`, and that round; (None, None) if none."""
        earlier = [r for r in self.rounds() if r < before_round]
        if not earlier:
            return None, None
        return torch.load(
            self.dir / f"round-{earlier[-1]}.pt", map_location="cpu", weights_only=True
        ), earlier[-1]

    def save(self, rnd: int, state: dict) -> None:
        try:
            atomic_save(state, self.dir / f"round-{rnd}.pt")
        except OSError as e:
            raise OSError(
                f"cannot write the client state to {self.dir} ({e.strerror}): give the SuperNode a "
                "writable folder with --node-config \"state-dir='/abs/path'\""
            ) from None

    def prune(self, keep_from_round: int) -> None:
        """Remove what no run can need again: everything older than the newest state at or before
        keep_from_round, the round of the server's last checkpoint (a --resume starts from there)."""
        rounds = self.rounds()
        kept = [r for r in rounds if r <= keep_from_round]
        oldest_needed = kept[-1] if kept else keep_from_round
        for r in rounds:
            if r < oldest_needed:
                (self.dir / f"round-{r}.pt").unlink(missing_ok=True)

    @staticmethod
    def prune_run(root: str | Path, run_id: str, keep_from_round: int) -> None:
        """prune(keep_from_round) for every partition of a run under `root` that this machine holds (a
        simulation's, or a deployment's where the server shares the nodes' disk)."""
        run_dir = Path(root) / run_id
        if run_dir.is_dir():
            for part in run_dir.iterdir():
                if part.name.startswith("partition-"):
                    ClientStateStore(root, run_id, int(part.name.removeprefix("partition-"))).prune(
                        keep_from_round
                    )
