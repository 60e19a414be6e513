"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), done by fedgpt around any strategy.

    dp = ClientDP.for_run(cfg, saved, rnd, resume, overwrite)  # None without DP; noise for the rounds left
    nodes = dp.sample(nodes)                     # each node trains with probability q = fed.fraction_train
    dp.charge()                                  # the round in the ledger, on disk, before anything is sent
    mean = dp.mean_of_updates(updates, size)     # each clipped to C, summed, + Gaussian noise, / q x clients
    mean = dp.mean_of_sum(total, size)           # SecAgg+: the clients clipped, the server sees only the sum
    row = publish(row, dp.state.to_json(), cfg.dp.delta)  # the accountant's figures, and only what it covers

Each round, every client is sampled independently with probability q (Poisson sampling); each update (the
client's trained weights minus the global model it received) is clipped to L2 norm C, by the server on
receipt or by the client before it sends; the server sums them, adds Gaussian noise of std z x C, and
divides by the expected cohort q x N (a fixed denominator: the noise is calibrated to it, whoever answers).
The strategy (FedAvg, FedProx, DiLoCo, FedAdam, ...) then steps on that noised mean: its server step is
post-processing. With adaptive clipping (Andrew et al. 2021) C follows a quantile of the clients' update norms
through a noised count of the updates left unclipped; the two Gaussian queries on one sample compose into one
of noise multiplier z (what the accountant sees), so the update's own noise is a little larger than z.

Randomness: which clients train and the noise are drawn from the operating system's entropy (`secrets`), a
fresh 128-bit seed per release, never from train.seed or anything else a participant knows. A DP run is
therefore not bit-reproducible; --resume continues its ledger and its clipping norm exactly.

Accounting: every round is one Poisson-sampled Gaussian release, PoissonSampledDpEvent(q, GaussianDpEvent(z)),
and the ledger lists them all, resumes included. A round is charged (and the ledger written to the run
folder's dp_ledger.json, atomically) before any of its messages leaves the server, so the ledger on disk never
counts fewer releases than the models that left; a crash can leave it ahead of last.pt, and a resume counts
it. Epsilon is dp-accounting's RDP accountant's, cross-checked by its PLD accountant (tighter).
dp.target_epsilon holds for the whole run: the noise of the rounds left is the smallest whose RDP epsilon,
added to what the ledger holds, stays within the target; when none does, the run is refused before any round.
A round counts in the ledger once its clients are sent their work, whatever comes back; a round whose sum
holds no update (nobody sampled, SecAgg+ halted) still releases its noise.

A resume continues the ledger: it may raise dp.target_epsilon, never switch DP off or set the target below
what is spent, and it cannot turn DP on over rounds that ran without it (resumed_state).

Published: under DP a round's row keeps only what the accountant covers (PUBLISHED): the released model's
central evaluation, the schedule's learning rate, and the accountant's own figures. Cohort sizes, the clients'
losses, bytes and timings are left out (public_row).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedgpt.config import Config
from fedgpt.files import atomic_write_bytes

if TYPE_CHECKING:
    from dp_accounting import dp_event

    from fedgpt.fed.rounds import RoundRow

# dp-accounting drops RDP orders that do not converge and says so on absl's logger, once per order and call.
logging.getLogger("absl").setLevel(logging.ERROR)

# The largest noise multiplier calibration looks at: a target that needs more is refused (noise of 100 x the
# clipping norm on the sum would need cohorts of hundreds of thousands to learn, and RDP epsilons this small
# underflow).
MAX_NOISE = 100.0


@dataclass
class Ledger:
    """Every release so far, as runs of equal releases: [[q, z, count], ...]."""

    groups: list[list[float]] = field(default_factory=list)

    def add(self, q: float, z: float, count: int = 1) -> None:
        if self.groups and self.groups[-1][:2] == [q, z]:
            self.groups[-1][2] += count
        else:
            self.groups.append([q, z, count])

    @property
    def rounds(self) -> int:
        return int(sum(n for _, _, n in self.groups))

    def plus(self, q: float, z: float, count: int) -> Ledger:
        out = Ledger([list(g) for g in self.groups])
        if count > 0:
            out.add(q, z, count)
        return out

    def event(self) -> dp_event.DpEvent:
        from dp_accounting import dp_event  # scipy with it: 1.3 s of every server's start, DP or not

        return dp_event.ComposedDpEvent(
            [
                dp_event.SelfComposedDpEvent(
                    dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), int(n)
                )
                for q, z, n in self.groups
            ]
        )


def epsilon(ledger: Ledger, delta: float, accountant: str = "rdp") -> float:
    """The epsilon at `delta` of the ledger's releases, by dp-accounting's RDP or PLD accountant."""
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    if not ledger.groups:
        return 0.0
    acc = RdpAccountant() if accountant == "rdp" else PLDAccountant()
    acc.compose(ledger.event())
    return float(acc.get_epsilon(delta))


# Above this RDP epsilon the PLD figure is not computed: there is no privacy left to cross-check, and PLD's
# discretization of such a loss distribution takes minutes, or more memory than exists (noise 1e-3).
PLD_MAX_EPSILON = 100.0


def epsilons(ledger: Ledger, delta: float) -> tuple[float, float | None]:
    """(RDP, PLD) epsilon of the ledger at `delta`; PLD is None above PLD_MAX_EPSILON."""
    rdp = epsilon(ledger, delta, "rdp")
    return rdp, (epsilon(ledger, delta, "pld") if rdp <= PLD_MAX_EPSILON else None)


def calibrate(ledger: Ledger, q: float, rounds: int, target: float, delta: float) -> float:
    """The smallest noise multiplier (to 0.01%) whose `rounds` more releases at sampling rate q keep the
    ledger's RDP epsilon within `target`; ValueError when none up to MAX_NOISE does."""
    spent = lambda z: epsilon(ledger.plus(q, z, rounds), delta)
    if rounds <= 0 or spent(MAX_NOISE) > target:
        if ledger.rounds:
            raise ValueError(
                f"dp.target_epsilon={target:g} is spent: the {ledger.rounds} rounds already run spent "
                f"{epsilon(ledger, delta):.4f} of it (delta {delta:g}), too little is left for {rounds} "
                "more: "
                "keep fed.rounds, or raise dp.target_epsilon (a resume may)"
            )
        raise ValueError(
            f"dp.target_epsilon={target:g} is out of reach at delta {delta:g}: noise {MAX_NOISE:g} on "
            f"{rounds} round(s) at sampling rate {q:g} spends {spent(MAX_NOISE):.3g}: raise "
            "dp.target_epsilon, or lower fed.rounds or fed.fraction_train"
        )
    lo, hi = 0.0, 0.5
    while spent(hi) > target:
        lo, hi = hi, hi * 2
    # epsilon falls as the noise grows: bisect for the smallest noise within the target
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= target else (mid, hi)
    return hi


@dataclass
class DPState:
    """What a DP run carries from round to round and across resumes (dp_ledger.json, and last.pt's copy)."""

    ledger: Ledger = field(default_factory=Ledger)
    clipping_norm: float | None = None  # the current one (adaptive clipping moves it); None: dp.clipping_norm
    noise_multiplier: float | None = None  # the z the rounds so far were released at

    def to_json(self) -> str:
        return json.dumps(
            {
                "ledger": self.ledger.groups,
                "clipping_norm": self.clipping_norm,
                "noise_multiplier": self.noise_multiplier,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> DPState:
        if not text:
            return cls()
        # an older run's state may hold rounds_dropped too: those rounds are in its ledger already
        d = json.loads(text)
        return cls(Ledger(d["ledger"]), d["clipping_norm"], d["noise_multiplier"])


LEDGER_FILE = "dp_ledger.json"


class LedgerFile:
    """A run folder's dp_ledger.json: the DP state as of the newest round charged, written before that round's
    first message leaves (ClientDP.charge)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LEDGER_FILE

    def read(self) -> DPState | None:
        """The state on disk; None where there is none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return DPState.from_json(text)
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{self.path} is not a privacy ledger fedgpt wrote: restore it from a backup; without it the "
                "run's spent privacy is unknown (start a new run in a new train.out_dir)"
            ) from None

    def write(self, state: DPState) -> None:
        atomic_write_bytes(self.path, state.to_json().encode())


def resumed_state(cfg: Config, saved: str | None, on_disk: DPState | None) -> DPState:
    """The DP state a resume goes on with: the ledger on disk (charged before each round's sends, so ahead of
    last.pt after a crash) or last.pt's (`saved`, None where last.pt is of a run without DP), whichever counts
    more rounds. ValueError for a resume that would switch DP off, set dp.target_epsilon below what is already
    spent, or turn DP on over rounds run without it."""
    dp = cfg.dp
    states = [s for s in (DPState.from_json(saved) if saved else None, on_disk) if s is not None]
    state = max(states, key=lambda s: s.ledger.rounds, default=DPState())
    if saved is None and dp.enabled:
        raise ValueError(
            "this run's last.pt was written without DP: its rounds released their models in the clear, and a "
            "resume cannot make them private. Resume it without DP (dp.target_epsilon=0), or start a DP run "
            "from round 0 in a new train.out_dir"
        )
    if not state.ledger.rounds:
        return state
    spent = epsilon(state.ledger, dp.delta)
    least = math.ceil(spent * 100) / 100  # the smallest target (to 0.01) that what was spent fits in
    if not dp.enabled:
        raise ValueError(
            f"this run is under DP: its {state.ledger.rounds} round(s) spent epsilon {spent:.4f} at delta "
            f"{dp.delta:g}, and a resume cannot switch DP off: pass the run's dp.target_epsilon (or a higher "
            "one, to pay for more rounds), or start a run without DP in a new train.out_dir"
        )
    if 0 < dp.target_epsilon < spent:
        raise ValueError(
            f"dp.target_epsilon={dp.target_epsilon:g} is below what this run already spent: its "
            f"{state.ledger.rounds} round(s) spent epsilon {spent:.4f} at delta {dp.delta:g}; a resume may "
            f"raise the target, never lower it below that: pass --dp.target_epsilon={least:g} or more"
        )
    return state


def clip_update(update: torch.Tensor, norm: float, length: float) -> tuple[torch.Tensor, float]:
    """The client's half of dp.clipping=client: its update clipped to L2 norm `norm` (the one the server's
    work order names), and 1.0 if it was within it, else 0.0 (adaptive clipping's count, summed under
    SecAgg+'s mask, or sent to a server that sees the update anyway). `length`: the update's L2 norm."""
    return (update * min(1.0, norm / length) if length > 0 else update), float(length <= norm)


def gaussian(n: int, std: float) -> torch.Tensor:
    """n draws of N(0, std^2), from a generator seeded afresh with 128 bits of the OS's entropy."""
    rng = np.random.default_rng(secrets.randbits(128))
    return torch.from_numpy(rng.standard_normal(n)).float().mul_(std)


class ClientDP:
    """The DP of one run: its sampler, its noise and clipping, its ledger, what its rounds publish. The
    server calls only this (for_run, describe, sample, charge, client_clipping_norm, mean_of_updates /
    mean_of_sum / mean_of_nothing, state) and publish(): another mechanism is another class with these.

    start_round: the round the run goes on from (a resume's last.pt; default: as many as the ledger holds),
    so that rounds the ledger counts beyond it, redone now, are paid for twice. path: where charge() writes
    the ledger (None: it stays in memory)."""

    def __init__(
        self,
        cfg: Config,
        state: DPState,
        log=print,
        start_round: int | None = None,
        path: LedgerFile | None = None,
    ):
        dp, f = cfg.dp, cfg.fed
        self.cfg, self.state, self.log, self.path = cfg, state, log, path
        self.q = f.fraction_train
        self.expected = self.q * f.num_clients  # the fixed denominator of the mean
        if state.clipping_norm is None:
            state.clipping_norm = dp.clipping_norm
        self.left = left = f.rounds - (state.ledger.rounds if start_round is None else start_round)
        z = dp.noise_multiplier
        if dp.target_epsilon > 0:
            kept = state.noise_multiplier  # a resume without added rounds keeps the noise it started with
            if kept is None or epsilon(state.ledger.plus(self.q, kept, left), dp.delta) > dp.target_epsilon:
                kept = calibrate(state.ledger, self.q, left, dp.target_epsilon, dp.delta)
            z = kept
        state.noise_multiplier = z
        self.count_std = (dp.count_noise or self.expected / 20) if dp.adaptive_clipping else math.inf
        if z >= self.count_std:
            raise ValueError(
                f"dp.count_noise={self.count_std:g} must exceed the noise multiplier {z:.4g}: adaptive "
                "clipping spends part of the budget on the clipped count; raise dp.count_noise, or sample "
                "more clients"
            )
        # Two Gaussian queries on one sample (the updates, sensitivity C; the unclipped count, sensitivity 1)
        # are one Gaussian query of multiplier (z_update^-2 + count_std^-2)^-1/2 = z.
        self.update_noise = (z**-2 - self.count_std**-2) ** -0.5

    @classmethod
    def for_run(
        cls,
        cfg: Config,
        saved: str | None,
        start_round: int,
        resume: bool,
        overwrite: bool,
        log=print,
    ) -> ClientDP | None:
        """The DP of a run about to start in cfg.train.out_dir (None without DP); reads, writes nothing.

        A resume goes on with the ledger there, or last.pt's (`saved`), whichever counts more, by the rules of
        resumed_state (checked with DP on or off); a new run is refused where the folder's ledger counts
        releases, unless it overwrites the folder."""
        ledger = LedgerFile(cfg.train.out_dir)
        if resume:
            state = resumed_state(cfg, saved, ledger.read())
        else:
            state = DPState()
            old = None if overwrite else ledger.read()
            if old is not None and old.ledger.rounds:
                raise ValueError(
                    f"train.out_dir={cfg.train.out_dir} holds the privacy ledger of a DP run "
                    f"({old.ledger.rounds} round(s) released): --resume to go on with it, or --overwrite or "
                    "a new train.out_dir for a new run (whose epsilon leaves that run's out: the README says "
                    "when the two compose)"
                )
        return cls(cfg, state, log, start_round, ledger) if cfg.dp.enabled else None

    def start_ledger(self) -> None:
        """Write a new run's (empty) ledger, over any a folder's earlier run left."""
        if self.path is not None:
            self.path.write(self.state)

    @property
    def clipping_norm(self) -> float:
        return float(self.state.clipping_norm)

    @property
    def client_clipping_norm(self) -> float | None:
        """The norm the clients clip their updates to (work.WorkOrder), with dp.clipping=client; else None."""
        return self.clipping_norm if self.cfg.dp.clipping == "client" else None

    def describe(self) -> str:
        """The run's DP in one log line: its sampling, noise and clipping, and the epsilon it will have
        spent."""
        dp, f = self.cfg.dp, self.cfg.fed
        final = self.state.ledger.plus(self.q, self.state.noise_multiplier, self.left)
        clip = "adaptive from" if dp.adaptive_clipping else "clipped to"
        return (
            f"dp: Poisson sampling q={self.q:g} (expected {self.expected:g} clients a round), noise "
            f"multiplier {self.state.noise_multiplier:.4g}, updates {clip} {self.clipping_norm:g} "
            f"({dp.clipping}); "
            f"epsilon after {f.rounds} rounds: {epsilon(final, dp.delta):.3f} (RDP) at delta {dp.delta:g}"
        )

    def sample(self, nodes: list[int]) -> list[int]:
        """Each node independently with probability q, drawn from the OS's entropy."""
        if self.q >= 1:
            return list(nodes)
        rng = secrets.SystemRandom()
        return [n for n in nodes if rng.random() < self.q]

    def charge(self) -> None:
        """Count this round's release in the ledger and, with a path, write the ledger there (atomically)
        before returning: call it before any of the round's messages is sent."""
        self.state.ledger.add(self.q, self.state.noise_multiplier)
        if self.path is not None:
            self.path.write(self.state)

    def clip(self, updates: list[torch.Tensor]) -> tuple[torch.Tensor | None, int]:
        """The sum of the updates, each clipped to the clipping norm, and how many were within it. An update
        that is not finite is a ValueError (clipping inf gives NaN): wire.Exchange.apply refuses it first."""
        total, unclipped, c = None, 0, self.clipping_norm
        for u in updates:
            norm = float(u.norm())
            if not math.isfinite(norm):
                raise ValueError("an update holds NaN or inf: it must be refused before clipping")
            unclipped += norm <= c
            scaled = u * min(1.0, c / norm) if norm > 0 else u
            total = scaled.clone() if total is None else total.add_(scaled)
        return total, unclipped

    def mean_of_updates(
        self, updates: list[torch.Tensor], size: int, reported: list | None = None
    ) -> torch.Tensor:
        """The round's noised mean of the clients' updates (flat, `size` values each; finite: refused
        before). With dp.clipping=client they came clipped, and `reported` holds each client's word on whether
        its update was within the norm (1) or not (anything else); the server's clipping is then a no-op."""
        total, unclipped = self.clip(updates)
        if self.cfg.dp.clipping == "client":
            unclipped = sum(v == 1 for v in reported or [])
        return self.release(total, size, unclipped)

    def mean_of_sum(self, total: torch.Tensor, size: int) -> torch.Tensor:
        """The round's noised mean from SecAgg+'s sum of the clients' clipped updates, each with its 0/1
        unclipped count appended (`size` + 1 values)."""
        return self.release(total[:-1], size, float(total[-1]))

    def mean_of_nothing(self, size: int) -> torch.Tensor:
        """The noised mean of a round with no update to sum (none sampled, or SecAgg+ short or halted)."""
        return self.release(None, size, 0)

    def release(self, total: torch.Tensor | None, size: int, unclipped: float) -> torch.Tensor:
        """The noised mean update of a round: (sum of clipped updates, or of none + noise) / expected cohort;
        then the adaptive clipping step on the noised count of unclipped updates. The round was charged before
        its messages were sent (charge)."""
        c = self.clipping_norm
        total = torch.zeros(size) if total is None else total
        mean = (total + gaussian(size, self.update_noise * c)) / self.expected
        if self.cfg.dp.adaptive_clipping:
            # Andrew et al.: geometric update towards the target quantile of unclipped updates
            share = (unclipped + float(gaussian(1, self.count_std))) / self.expected
            self.state.clipping_norm = c * math.exp(
                -self.cfg.dp.clip_lr * (share - self.cfg.dp.target_quantile)
            )
        return mean


def base_privacy(init_from: str) -> dict | None:
    """What a train.init_from fedgpt checkpoint spent of its own clients' privacy (recorded in the new run's
    run.json): its ledger (the one beside it, dp_ledger.json, where that counts more) and both epsilons at its
    delta, and what its own base spent; {"dp": False} for a checkpoint trained without DP; None for scratch or
    Hugging Face weights."""
    if init_from == "scratch" or init_from.startswith("hf:"):
        return None
    path = Path(init_from)
    # build_model has read and checked it; the weights are mapped, not read again
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    try:
        base_of_base = json.loads((path.parent / "run.json").read_text()).get("init_from_privacy")
    except (OSError, ValueError, AttributeError):
        base_of_base = None
    saved = ckpt.get("extra", {}).get("dp")
    out: dict = {"checkpoint": str(path.resolve()), "dp": saved is not None}
    if saved is not None:
        beside = LedgerFile(path.parent).read() if path.name == "last.pt" else None
        state = max(
            [s for s in (DPState.from_json(saved), beside) if s is not None], key=lambda s: s.ledger.rounds
        )
        delta = float(ckpt["config"]["dp"]["delta"])
        rdp, pld = epsilons(state.ledger, delta)
        out.update(
            delta=delta, epsilon=rdp, epsilon_pld=pld, rounds=state.ledger.rounds, ledger=state.ledger.groups
        )
    if base_of_base is not None:
        out["init_from_privacy"] = base_of_base
    return out


def describe_base(info: dict) -> str:
    """One log line on a train.init_from checkpoint's privacy."""
    if not info["dp"]:
        return (
            f"train.init_from {info['checkpoint']}: trained without DP; if that was on private data, this "
            "run's epsilon does not cover it"
        )
    return (
        f"train.init_from {info['checkpoint']}: trained under DP, epsilon {info['epsilon']:.3f} (RDP) at "
        f"delta {info['delta']:g} over {info['rounds']} rounds (in run.json): on the same clients' data it "
        "composes with this run's epsilon"
    )


# What of a round's row (fedgpt.fed.rounds.RoundRow) a DP run publishes (rounds.jsonl, the log line): the
# released model's central evaluation (on the server's own validation text), the learning rate (the public
# schedule's), and the accountant's figures. Everything else is of the clients that were sampled (how many,
# their losses, bytes, timings, client state) and is left out: one sampled client's loss would be its own.
PUBLISHED = (
    "round",
    "val_loss",
    "val_accuracy",
    "best_val_loss",
    "lr",
    "dp_epsilon",
    "dp_epsilon_pld",
    "dp_clipping_norm",
    "eval_s",
)


def public_row(row: RoundRow) -> RoundRow:
    """The row with only the PUBLISHED fields; the others None."""
    return dataclasses.replace(
        row, **{f.name: None for f in dataclasses.fields(row) if f.name not in PUBLISHED}
    )


def publish(row: RoundRow, saved: str, delta: float) -> RoundRow:
    """A DP round's row as the run publishes it: both accountants' epsilon over the ledger of `saved` (a
    DPState as the round left it) at `delta`, the clipping norm, and nothing the accountant does not cover."""
    state = DPState.from_json(saved)
    row.dp_epsilon, row.dp_epsilon_pld = epsilons(state.ledger, delta)
    row.dp_clipping_norm = state.clipping_norm
    return public_row(row)
