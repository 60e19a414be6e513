"""The DP ledger is a ledger, and a DP run publishes only what it covers.

On fedgpt's real server and clients, in this process (tests/in_process_grid.py: only Flower's transport is
left out, so that a fault lands at an exact point of a round): the ledger on disk counts every round whose
messages left the server, whatever crashes after the send; a resume goes on with that ledger and may raise
dp.target_epsilon, never switch DP off, fall below what was spent, or turn DP on over rounds run in the clear;
train.init_from a DP checkpoint records the base's privacy; rounds.jsonl, the log and the checkpoints of a DP
run hold none of the cohort's figures. Epsilons are checked against dp-accounting's own RDP accountant.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, copy_run_folder
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import MessageType
from in_process_grid import InProcessGrid

from fedgpt.bench.experiments import federated_figures
from fedgpt.checkpoint import load_checkpoint
from fedgpt.config import load_config
from fedgpt.fed.privacy import DPState
from fedgpt.fed.rounds import read_rounds
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.wire import decode

pytestmark = pytest.mark.usefixtures("serverapp_identity")

DP = ["--fed.weighting=uniform", "--dp.clipping_norm=1.0", "--dp.delta=1e-3"]


def config(data_dir: Path, out: Path, *overrides: str):
    return load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={out}", *overrides])


def run(data_dir: Path, out: Path, *overrides: str, resume: bool = False, grid=None, lines=None, cls=None):
    """A tiny federation (3 clients) on fedgpt's own server and clients; the grid it ran on."""
    say = lines.append if lines is not None else lambda s: None
    fed = (cls or FederatedRun)(config(data_dir, out, *overrides), resume=resume, log=say)
    fed.open_folder()
    grid = grid or InProcessGrid(3, data_dir)
    fed.run(grid)
    return grid


def rdp_epsilon(noise: list[float], delta: float = 1e-3, q: float = 1.0) -> float:
    """dp-accounting itself: one Poisson-sampled Gaussian release per entry, composed one by one."""
    acc = RdpAccountant()
    for z in noise:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)))
    return acc.get_epsilon(delta)


def ledger_of(out: Path) -> list:
    return DPState.from_json(load_checkpoint(out / "last.pt")["extra"]["dp"]).ledger.groups


def test_a_resume_may_raise_the_target_but_never_switch_dp_off_or_fall_below_what_was_spent(
    data_dir, tmp_path
):
    out = tmp_path / "dp"
    run(data_dir, out, *DP, "--dp.target_epsilon=8")  # 2 rounds spend the budget
    [[_, z, n]] = ledger_of(out)
    assert n == 2 and rdp_epsilon([z, z]) == pytest.approx(8.0, abs=0.01)
    # The case: a resume with dp.target_epsilon=0 ran a round in the clear and dropped the ledger.
    with pytest.raises(
        ValueError, match=r"its 2 round\(s\) spent epsilon 7\.99\d* at delta 0\.001.*cannot switch DP off"
    ):
        FederatedRun(config(data_dir, out, *DP, "--dp.target_epsilon=0", "--fed.rounds=3"), resume=True)
    with pytest.raises(
        ValueError, match=r"dp.target_epsilon=5 is below what this run already spent.*=8 or more"
    ):
        FederatedRun(config(data_dir, out, *DP, "--dp.target_epsilon=5", "--fed.rounds=3"), resume=True)
    # Raised, it pays for a third round, and the whole run stays within it.
    run(data_dir, out, *DP, "--dp.target_epsilon=9", "--fed.rounds=3", resume=True)
    [[_, z1, n1], [_, z2, n2]] = ledger_of(out)
    assert (z1, n1, n2) == (z, 2, 1)
    rows = read_rounds(out / "rounds.jsonl")
    assert [r.round for r in rows] == [0, 1, 2, 3]
    assert [r.dp_epsilon for r in rows[1:]] == pytest.approx(
        [rdp_epsilon([z]), rdp_epsilon([z, z]), rdp_epsilon([z, z, z2])], rel=1e-6
    )
    assert 8.99 < rows[3].dp_epsilon <= 9.0


def test_a_resume_cannot_turn_dp_on_over_rounds_run_in_the_clear(data_dir, tmp_path):
    out = tmp_path / "plain"
    run(data_dir, out, "--fed.weighting=uniform", "--dp.delta=1e-3", "--fed.rounds=1")
    with pytest.raises(ValueError, match="written without DP: its rounds released their models in the clear"):
        FederatedRun(config(data_dir, out, *DP, "--dp.target_epsilon=8", "--fed.rounds=2"), resume=True)
    # and a new run in a folder whose ledger counts releases is told to resume it or to start apart
    dp = tmp_path / "dp"
    run(data_dir, dp, *DP, "--dp.target_epsilon=8", "--fed.rounds=1")
    with pytest.raises(ValueError, match=r"holds the privacy ledger of a DP run \(1 round\(s\) released\)"):
        FederatedRun(config(data_dir, dp, *DP, "--dp.target_epsilon=8", "--fed.rounds=1"))


class KillingGrid(InProcessGrid):
    """A grid that, as each train message batch leaves, copies the run folder as a kill at that instant would
    leave it, notes which global models have left the server so far, and raises after push `crash_at`."""

    def __init__(self, data_dir: Path, out: Path, crash_at: int | None = None):
        super().__init__(3, data_dir)
        self.out, self.crash_at, self.kills, self.models = out, crash_at, [], []

    def push_messages(self, messages):
        messages = list(messages)
        trains = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if trains:  # the messages have left: what is on disk now is all a kill would leave
            rnd = int(trains[0].content["config"]["work.round"])
            model = decode(trains[0].content["arrays"])
            if not any(torch.equal(model, m) for m in self.models):
                self.models.append(model)
            folder = self.out.parent / f"kill-{len(self.kills)}"
            copy_run_folder(self.out, folder)
            self.kills.append((folder, rnd, len(self.models) - 1))  # the initial model is no release
        ids = super().push_messages(messages)
        if self.crash_at is not None and len(self.kills) == self.crash_at:
            raise ConnectionError("the server died after the send")
        return ids


def counted(folder: Path) -> int:
    """The releases the folder's privacy records count: its ledger file, or last.pt's copy, whichever more."""
    counts = [0]
    if (folder / "dp_ledger.json").is_file():
        counts.append(DPState.from_json((folder / "dp_ledger.json").read_text()).ledger.rounds)
    if (folder / "last.pt").is_file():
        counts.append(DPState.from_json(load_checkpoint(folder / "last.pt")["extra"].get("dp")).ledger.rounds)
    return max(counts)


class RecorderDies(FederatedRun):
    """A run whose checkpoint writer fails (a full disk, a killed thread) when it records round 2."""

    def finish_round(self, snap, row):
        if snap.round == 2:
            raise OSError("No space left on device")
        return super().finish_round(snap, row)


@pytest.mark.parametrize("crash", ["send 2", "send 3", "recorder"])
def test_the_ledger_on_disk_counts_every_round_whose_messages_left(data_dir, tmp_path, crash):
    out = tmp_path / "run"
    dp = [*DP, "--dp.target_epsilon=20", "--fed.rounds=4"]
    grid = KillingGrid(data_dir, out, crash_at=int(crash[-1]) if crash.startswith("send") else None)
    with pytest.raises(OSError, match="No space left" if crash == "recorder" else "the server died"):
        run(data_dir, out, *dp, grid=grid, cls=RecorderDies if crash == "recorder" else None)
    assert grid.kills
    for folder, rnd, models_left in grid.kills:
        # a round counts once its clients are sent their work: then, all the models that left are paid for
        assert counted(folder) >= rnd >= models_left, (folder.name, counted(folder), rnd, models_left)
    assert counted(out) >= len(grid.kills) >= len(grid.models) - 1
    if crash == "recorder":  # last.pt is round 1's, but round 3's messages left: the resume counts 3
        assert load_checkpoint(out / "last.pt")["round"] == 1 and counted(out) == 3
        resumed = FederatedRun(config(data_dir, out, *dp), resume=True, log=lambda s: None)
        assert resumed.round == 1 and resumed.dp.state.ledger.rounds == 3
        # ... and the 3 rounds it redoes are paid for again: 6 releases within the target
        resumed.open_folder()
        resumed.run(InProcessGrid(3, data_dir))
        groups = ledger_of(out)
        noise = [z for _, z, n in groups for _ in range(n)]
        assert len(noise) == 6 and rdp_epsilon(noise) <= 20.0


def test_init_from_a_dp_checkpoint_records_the_base_privacy_in_run_json(data_dir, tmp_path):
    base = tmp_path / "base"
    run(data_dir, base, *DP, "--dp.target_epsilon=6")
    [[_, z, _]] = ledger_of(base)
    lines = []
    run(data_dir, tmp_path / "tuned", "--fed.rounds=1", f"--train.init_from={base / 'last.pt'}", lines=lines)
    info = json.loads((tmp_path / "tuned" / "run.json").read_text())["init_from_privacy"]
    assert info["dp"] and info["delta"] == 1e-3 and info["rounds"] == 2
    assert info["epsilon"] == pytest.approx(rdp_epsilon([z, z]), rel=1e-6) and info["epsilon_pld"] <= 6.0
    assert any("trained under DP, epsilon 6.000" in line for line in lines)
    # a base trained without DP says so
    run(data_dir, tmp_path / "again", "--fed.rounds=1", f"--train.init_from={tmp_path / 'tuned' / 'last.pt'}")
    info = json.loads((tmp_path / "again" / "run.json").read_text())["init_from_privacy"]
    assert info["dp"] is False and info["init_from_privacy"]["rounds"] == 2  # and what its own base spent


# What a DP run's rows may hold (README, Privacy): the released model's central evaluation, the schedule's
# learning rate, the accountant's figures. Written out here, not read from fedgpt.
COVERED = {
    "round",
    "val_loss",
    "val_accuracy",
    "best_val_loss",
    "lr",
    "dp_epsilon",
    "dp_epsilon_pld",
    "dp_clipping_norm",
    "eval_s",
}


def test_a_dp_run_publishes_no_figure_of_its_cohort(data_dir, tmp_path):
    lines = []
    # q = 0.34 of 3 clients: rounds of one client, whose loss was the round's train loss
    run(
        data_dir,
        tmp_path / "dp",
        *DP,
        "--dp.noise_multiplier=1",
        "--fed.fraction_train=0.34",
        "--fed.rounds=3",
        lines=lines,
    )
    rows = [json.loads(line) for line in (tmp_path / "dp" / "rounds.jsonl").read_text().splitlines()]
    for row in rows:
        assert {k for k, v in row.items() if v not in (None, 0)} <= COVERED, row
    assert all(row["dp_epsilon"] > 0 and row["val_loss"] > 0 for row in rows[1:])
    round_lines = [line for line in lines if line.startswith("round ") and "|" in line]
    assert len(round_lines) == 4 and not any("train" in s or "clients" in s or "MB" in s for s in round_lines)
    assert load_checkpoint(tmp_path / "dp" / "last.pt")["extra"]["tokens"] == 0
    # the results tooling still finds the run's rounds and epsilon, and no bytes per client
    figures = federated_figures(tmp_path / "dp")
    assert (figures["rounds"], figures["epsilon"], figures["mb_per_client"]) == (
        3,
        rows[-1]["dp_epsilon"],
        None,
    )
    # the same run without DP publishes them: the check above can see them
    run(data_dir, tmp_path / "plain", "--fed.fraction_train=0.34", "--fed.rounds=3")
    plain = read_rounds(tmp_path / "plain" / "rounds.jsonl")
    assert all(r.clients_ok and r.train_loss is not None for r in plain[1:])


def test_a_dp_round_too_small_for_secagg_releases_its_noise_and_says_nothing(data_dir, tmp_path):
    # One client sampled: SecAgg+ is not run for it. A model that stayed put would tell that the round sampled
    # fewer than two; the round releases its noise alone instead (z C / expected cohort a value), and no line
    # says how many were sampled.
    flags = [*DP, "--dp.clipping=client", "--dp.noise_multiplier=1", "--secagg.enabled=true"]
    lines = []
    fed = FederatedRun(config(data_dir, tmp_path / "run", *flags, "--fed.rounds=1"), log=lines.append)
    fed.dp.sample = lambda nodes: nodes[:1]  # the draw that happened: one of three
    before = fed.exchange.flatten(fed.global_state)
    fed.open_folder()
    fed.run(InProcessGrid(3, data_dir))
    step = fed.exchange.flatten(load_checkpoint(tmp_path / "run" / "last.pt")["model"]) - before
    assert float(step.std()) == pytest.approx(1.0 * 1.0 / 3, rel=0.05)  # noise of std z C / (q N)
    assert not any("sampled" in line or "SecAgg+" in line for line in lines)
    assert ledger_of(tmp_path / "run")[0][2] == 1
