"""What a federated run leaves in its folder, and reads back to resume: rounds.jsonl (one RoundRow per round),
loss.png, last.pt (with the strategy's state) and best.pt, in the checkpoint format of every fedgpt run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedgpt.checkpoint import CheckpointWriter, load_checkpoint
from fedgpt.config import RUN_NEUTRAL, Config, ModelConfig, config_diff
from fedgpt.fed.rounds import RoundRow
from fedgpt.metrics import MetricsLog

# Config keys that may change when a run is resumed: more rounds (and a privacy budget raised to pay for
# them; fedgpt.fed.privacy.resumed_state says how far it may move), and what does not change results.
RESUMABLE = RUN_NEUTRAL | {"fed.rounds", "dp.target_epsilon"}


@dataclass
class Snapshot:
    """The run as a round left it: what that round's checkpoint holds, taken before its evaluation runs."""

    round: int
    state: dict[str, torch.Tensor]  # the global model, fp32
    tokens: int
    strategy: dict  # the strategy's own state (fedgpt.fed.strategies.strategy_state)
    # DP's ledger and clipping norm (fedgpt.fed.privacy.DPState, as JSON): a copy; the run folder's
    # dp_ledger.json, written before each round's messages leave, is the ledger a resume counts
    privacy: str | None = None
    moments: dict[str, torch.Tensor] | None = None  # the clients' mean first moments (fedgpt.fed.moments)


class RunRecorder:
    """Appends round rows, writes checkpoints and log lines, and restores a run from its last.pt.

    run_info holds what stays fixed for the whole run (its id, the length of the clients' learning-rate
    schedule); every last.pt carries it, so a resumed run goes on with the same.
    """

    def __init__(
        self,
        cfg: Config,
        model_config: ModelConfig,
        tokenizer_meta: dict,
        run_info: dict,
        log: Callable[[str], None] = print,
        merge: Callable[[dict], dict] | None = None,
    ):
        self.cfg, self.model_config, self.tokenizer_meta, self.log = cfg, model_config, tokenizer_meta, log
        # LoRA: the state is the adapters; checkpoints hold merge(state), a plain GPT, and the adapters too
        self.run_info, self.merge = run_info, merge
        self.out_dir = Path(cfg.train.out_dir)
        self.metrics = MetricsLog(self.out_dir / "rounds.jsonl", plot=self.out_dir / "loss.png", x="round")
        self.ckpt = CheckpointWriter(self.out_dir)
        self.saved_round = -1  # the round of the newest last.pt

    @property
    def best_val_loss(self) -> float:
        return self.ckpt.best_val_loss

    def start_fresh(self) -> None:
        self.metrics.truncate(-1)

    def read_last(self) -> Snapshot:
        """The snapshot last.pt holds, to resume from (run_info and the best loss are taken from it too)."""
        path = self.out_dir / "last.pt"
        ckpt = load_checkpoint(path)
        if ckpt.get("round") is None:
            raise ValueError(
                f"{path} is not from a federated run (no round): "
                "resume it with python -m fedgpt.local_train --resume"
            )
        diff = config_diff(ckpt["config"], self.cfg.to_dict(), ignore=RESUMABLE)
        if diff:
            raise ValueError(
                f"{path} was written with another config ({'; '.join(diff)}): "
                "use the same config or a new train.out_dir"
            )
        extra = ckpt["extra"]
        self.run_info.update(extra.get("run", {}))
        self.ckpt.best_val_loss, self.saved_round = ckpt["best_val_loss"], ckpt["round"]
        saved = extra["adapters"] if "adapters" in extra else ckpt["model"]
        model = {k: v.float() for k, v in saved.items()}
        strategy, moments = extra.get("strategy", {}), extra.get("client_moments")
        return Snapshot(ckpt["round"], model, extra.get("tokens", 0), strategy, extra.get("dp"), moments)

    def continue_from(self, rnd: int) -> None:
        """Drop the rows after round rnd (the resumed run redoes them)."""
        self.metrics.truncate(rnd)
        self.log(
            f"resumed from {self.out_dir / 'last.pt'} at round {rnd} (best val {self.best_val_loss:.4f})"
        )
        steps = self.cfg.fed.rounds * self.cfg.fed.local_steps
        if not self.cfg.train.lr_decay_steps and steps != self.run_info["schedule_steps"]:
            self.log(
                f"fed.rounds is now {self.cfg.fed.rounds}: the clients' learning-rate schedule keeps its "
                f"{self.run_info['schedule_steps']} steps, and steps past it train at train.min_lr"
            )

    def record(self, snap: Snapshot, row: RoundRow) -> None:
        """A round's row, then its checkpoints (a run killed in between redoes the round, row and all)."""
        row.best_val_loss = min(self.best_val_loss, row.val_loss)
        self.metrics.append(row.as_dict())
        self.ckpt.save(
            row.val_loss,
            model_state=self.merge(snap.state) if self.merge else snap.state,
            model_config=self.model_config,
            tokenizer=self.tokenizer_meta,
            config=self.cfg.to_dict(),
            step=snap.round * self.cfg.fed.local_steps,
            round=snap.round,
            extra={
                "tokens": snap.tokens,
                "strategy": snap.strategy,
                "run": self.run_info,
                **({"dp": snap.privacy} if snap.privacy is not None else {}),
                **({"client_moments": snap.moments} if snap.moments is not None else {}),
                **({"adapters": snap.state} if self.merge else {}),
            },
        )
        self.saved_round = snap.round
        self.log(format_round(row, self.cfg.fed.rounds))


def format_round(row: RoundRow, rounds: int) -> str:
    """One fixed-field log line per round of `rounds`, with the time left at this round's pace; under DP only
    what it publishes (fedgpt.fed.privacy.PUBLISHED)."""
    head = f"round {row.round:3d}/{rounds}"
    if row.round == 0:
        return f"{head} | val {row.val_loss:.4f} | acc {row.val_accuracy:.3f}"
    line = f"{head} | val {row.val_loss:.4f} | acc {row.val_accuracy:.3f}"
    if row.clients_ok is not None:  # a round without DP
        train = f"{row.train_loss:.4f}" if row.train_loss is not None else "-"
        line += (
            f" | train {train} | clients {row.clients_ok} ok {row.clients_failed} failed"
            + (f" {row.clients_refused} refused" if row.clients_refused else "")
            + f" | {row.round_s:.2f} s | sent {row.bytes_sent / 1e6:.2f} MB | "
            f"received {row.bytes_received / 1e6:.2f} MB"
        )
    if row.clients_straggling:
        line += f" | stragglers {row.clients_straggling}"
    if row.dp_epsilon is not None:
        pld = "-" if row.dp_epsilon_pld is None else f"{row.dp_epsilon_pld:.3f}"
        line += f" | epsilon {row.dp_epsilon:.3f} (RDP), {pld} (PLD)"
    if row.clients_state_resumed or row.clients_state_stale:
        line += f" | state resumed {row.clients_state_resumed}, stale {row.clients_state_stale}"
    for name, s in (row.client_eval or {}).items():
        if isinstance(s, dict):  # each client once: mean (10th-90th percentile)
            line += f" | {name} {s['loss']:.4f} ({s['loss_p10']:.3f}-{s['loss_p90']:.3f})"
    if row.round_s is not None and row.round < rounds:
        line += f" | left ~{_duration(row.round_s * (rounds - row.round))}"
    return line


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
