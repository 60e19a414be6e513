"""Differential privacy and stragglers.

Without a simulation: the accountant's epsilon against dp-accounting's own RDP accountant, the noise
multiplier found for a target epsilon, server-side clipping against a hand-computed clipped mean, the noise's
standard deviation, client-side clipping, and the combinations the config refuses. On real Flower and Ray:
epsilon per round in rounds.jsonl, a run stopped after round 2 and resumed ends exactly as an uninterrupted
one (noise included), clients that clip keep the global model's step within the clipping norm, and
stragglers that train fewer steps or are dropped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from test_fed_optimization import TINY, simulate
from test_strategies import Grid, _config, reply

from fedgpt.checkpoint import load_checkpoint
from fedgpt.config import load_config
from fedgpt.fed import privacy
from fedgpt.fed.client import clip_update
from fedgpt.fed.rounds import read_rounds
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.strategies import make_strategy
from fedgpt.fed.wire import flatten

pytest_plugins = ["test_strategies"]  # its serverapp_identity fixture: Messages outside a ServerApp

DP = ["--fed.weighting=uniform", "--dp.clipping_norm=1.0"]


def reference_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """dp-accounting itself: `releases` Gaussian mechanisms composed, no sampling amplification."""
    acc = RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(noise_multiplier), releases)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma,rounds,delta", [(1.0, 10, 1e-5), (3.0, 50, 1e-6), (0.7, 1, 1e-3)])
def test_epsilon_is_dp_accountings(sigma, rounds, delta):
    cfg = load_config(TINY, [*DP, f"--dp.noise_multiplier={sigma}", f"--dp.delta={delta}"])
    assert privacy.epsilon_after(cfg, sigma, rounds) == pytest.approx(
        reference_epsilon(sigma, rounds, delta), rel=1e-9
    )


@pytest.mark.parametrize("target", [8.0, 1.0])
def test_target_epsilon_finds_the_smallest_noise_that_meets_it(target):
    cfg = load_config(TINY, [*DP, f"--dp.target_epsilon={target}", "--fed.rounds=10"])
    sigma = privacy.noise_multiplier(cfg)
    assert reference_epsilon(sigma, 10, 1e-5) <= target
    assert reference_epsilon(sigma * 0.995, 10, 1e-5) > target  # any less noise spends more than the target


def private_strategy(sigma: float, clipping_norm: float, clipping: str = "server"):
    cfg = load_config(
        TINY,
        [
            "--fed.weighting=uniform",
            f"--dp.noise_multiplier={sigma}",
            f"--dp.clipping_norm={clipping_norm}",
            f"--dp.clipping={clipping}",
        ],
    )
    return privacy.private(make_strategy(cfg.fed), cfg)


def one_round(strategy, global_state: dict, clients: list[dict]) -> dict:
    msgs = list(strategy.configure_train(1, _arrays(global_state), _config(), Grid([1, 2, 3])))
    assert len(msgs) == 3
    agg, _ = strategy.aggregate_train(1, [reply(i + 1, c, 1) for i, c in enumerate(clients)])
    return {k: v.float() for k, v in agg.to_torch_state_dict().items()}


def _arrays(state: dict):
    from flwr.app import ArrayRecord

    return ArrayRecord(state)


def test_server_clips_each_update_then_averages():
    g = {"w": torch.zeros(4, 3), "b": torch.ones(3)}
    torch.manual_seed(0)
    directions = [torch.randn(15) for _ in range(3)]
    norms = [0.5, 2.0, 4.0]  # the first is inside the clipping norm, the others are scaled down to 1
    updates = [d / d.norm() * n for d, n in zip(directions, norms)]
    clients = [{"w": g["w"] + u[:12].view(4, 3), "b": g["b"] + u[12:]} for u in updates]
    got = one_round(private_strategy(1e-6, 1.0), g, clients)
    clipped = [u * min(1.0, 1.0 / n) for u, n in zip(updates, norms)]
    mean = sum(clipped) / 3
    assert torch.allclose(got["w"], g["w"] + mean[:12].view(4, 3), atol=1e-5)
    assert torch.allclose(got["b"], g["b"] + mean[12:], atol=1e-5)


def test_noise_has_std_noise_multiplier_times_clipping_norm_over_clients():
    g = {"w": torch.zeros(200_000)}
    np.random.seed(0)
    # updates of norm 1e-3 (Flower's clipping divides by the norm: an update of exactly zero raises)
    clients = [{"w": 1e-3 * torch.nn.functional.normalize(torch.randn(200_000), dim=0)} for _ in range(3)]
    got = one_round(private_strategy(1.5, 2.0), g, clients)["w"]
    assert float(got.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(got.std()) == pytest.approx(1.5 * 2.0 / 3, rel=0.01)


def test_client_clipping_scales_long_updates_and_keeps_short_ones():
    received = {"a": torch.zeros(3), "tied": torch.zeros(3), "b": torch.ones(2)}
    trained = {
        "a": torch.tensor([3.0, 0.0, 0.0]),
        "tied": torch.tensor([3.0, 0.0, 0.0]),
        "b": torch.tensor([1.0, 5.0]),
    }
    # "tied" is an alias of "a": the update's norm is sqrt(3^2 + 4^2) = 5, counted once
    length = float(flatten(trained, {"tied": "a"}, base=received).norm())
    assert length == pytest.approx(5.0)
    out = clip_update(trained, received, length, 1.0)
    assert torch.allclose(out["a"], torch.tensor([0.6, 0.0, 0.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 1.8]))
    assert torch.equal(out["tied"], out["a"])
    kept = clip_update(trained, received, length, 6.0)
    assert all(torch.equal(kept[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--fed.strategy=diloco", "--fed.weighting=uniform"], "fed.strategy diloco is not supported"),
        (["--fed.weighting=data"], "fed.weighting=uniform"),
        (["--fed.weighting=uniform", "--dp.clipping=client", "--fed.uplink=int8"], "client clipping"),
        (["--fed.weighting=uniform", "--fed.stragglers=0.5", "--fed.straggler_policy=drop"], "stragglers"),
        (["--fed.weighting=uniform", "--dp.target_epsilon=1"], "not both"),
    ],
)
def test_dp_refuses_what_its_noise_is_not_calibrated_for(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(TINY, ["--dp.noise_multiplier=1", *overrides])


class Stop(Exception):
    pass


class StopBeforeRound3(FederatedRun):
    """A run that dies as round 3 starts, after round 2's checkpoint."""

    def run_round(self, grid, rnd):
        if rnd == 3:
            raise Stop
        return super().run_round(grid, rnd)


@pytest.mark.slow
def test_dp_run_records_epsilon_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    sigma = 0.8
    dp = [*DP, f"--dp.noise_multiplier={sigma}", "--fed.rounds=3", "--dp.clipping_norm=0.05"]
    simulate(data_dir, tmp_path / "whole", "client_app", *dp)
    whole = read_rounds(tmp_path / "whole" / "rounds.jsonl")
    assert [r.dp_epsilon for r in whole[1:]] == pytest.approx(
        [reference_epsilon(sigma, r, 1e-5) for r in (1, 2, 3)], rel=1e-9
    )
    assert all(math.isfinite(r.val_loss) for r in whole)
    monkeypatch.setattr("test_fed_optimization.FederatedRun", StopBeforeRound3)
    with pytest.raises(Exception):  # noqa: B017 (Flower may wrap the ServerApp's error)
        simulate(data_dir, tmp_path / "cut", "client_app", *dp)
    monkeypatch.undo()
    simulate(data_dir, tmp_path / "cut", "client_app", *dp, resume=True)
    cut = read_rounds(tmp_path / "cut" / "rounds.jsonl")
    assert [(r.val_loss, r.dp_epsilon) for r in cut] == [(r.val_loss, r.dp_epsilon) for r in whole]


@pytest.mark.slow
def test_clients_that_clip_keep_the_global_step_within_the_clipping_norm(data_dir, tmp_path):
    norm = 1e-3  # far below an unclipped update of the tiny model after 5 AdamW steps
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'init'}"])
    init = FederatedRun(cfg, log=lambda s: None)  # the initial global model every run of this config has
    keys = [k for k in init.global_state if k not in init.aliases]

    def step(name: str, *overrides: str) -> float:
        simulate(data_dir, tmp_path / name, "client_app", "--fed.rounds=1", *overrides)
        end = load_checkpoint(tmp_path / name / "last.pt")["model"]
        return math.sqrt(sum(float((end[k].float() - init.global_state[k]).square().sum()) for k in keys))

    assert step("free") > 10 * norm
    # the mean of 3 updates clipped to `norm`, plus noise of std 1e-6 * norm / 3 per weight
    assert (
        step("clip", *DP, "--dp.clipping=client", f"--dp.clipping_norm={norm}", "--dp.noise_multiplier=1e-6")
        <= norm * 1.001
    )


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["accept", "drop"])
def test_stragglers_train_fewer_steps_or_are_dropped(data_dir, tmp_path, policy):
    out = tmp_path / policy
    simulate(data_dir, out, "client_app", "--fed.stragglers=0.67", f"--fed.straggler_policy={policy}")
    rows = read_rounds(out / "rounds.jsonl")
    cfg = load_config(TINY)
    step_tokens = cfg.train.batch_size * cfg.model.block_size
    full = cfg.fed.local_steps * step_tokens  # tokens of a client that runs all its steps
    per_round = [b.tokens - a.tokens for a, b in zip(rows, rows[1:])]
    rows = rows[1:]
    assert all(r.clients_straggling == 2 for r in rows)
    if policy == "drop":
        assert all(r.clients_ok == 1 for r in rows) and per_round == [full, full]
    else:
        assert all(r.clients_ok == 3 for r in rows)
        # two stragglers of 1 to local_steps - 1 steps each
        assert all(full + 2 * step_tokens <= t <= full + 2 * (full - step_tokens) for t in per_round)
