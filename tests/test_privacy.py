"""Differential privacy and stragglers.

Without a simulation: epsilon with Poisson amplification from both accountants against dp-accounting
composed by hand and against published figures; the noise found for a target epsilon, and a budget that holds
when a run adds rounds; clipping, summing and the fixed denominator against a hand-computed mean; the noise's
standard deviation; noise and sampling that nobody who knows the run's seeds can replay; adaptive clipping's
step and its accounting; the settings DP refuses. On real Flower and Ray: two DP runs of one config end apart,
epsilon of both accountants in rounds.jsonl, a failed client does not drop the round, a resume continues the
ledger and keeps a target epsilon when rounds are added, clients that clip keep the global step within the
clipping norm, and stragglers.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import TINY, fit_in_process, simulate
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedgpt.checkpoint import load_checkpoint
from fedgpt.config import load_config
from fedgpt.fed import privacy
from fedgpt.fed.privacy import ClientDP, DPState, Ledger
from fedgpt.fed.rounds import read_rounds
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.work import straggler_steps

DP = ["--fed.weighting=uniform", "--dp.clipping_norm=1.0", "--dp.delta=1e-3"]

pytestmark = pytest.mark.usefixtures("no_ray_left")  # Ray, started by the slow tests, ends with the module


def reference(q: float, z: float, rounds: int, delta: float, accountant) -> float:
    """dp-accounting itself: `rounds` Poisson-sampled Gaussian releases composed one by one."""
    acc = accountant()
    for _ in range(rounds):
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "q,z,rounds,delta", [(0.1, 1.0, 20, 1e-4), (0.02, 0.7, 30, 1e-5), (1.0, 3.0, 5, 1e-3)]
)
def test_epsilon_of_both_accountants_is_dp_accountings(q, z, rounds, delta):
    ledger = Ledger()
    for _ in range(rounds):
        ledger.add(q, z)
    rdp, pld = privacy.epsilons(ledger, delta)
    assert rdp == pytest.approx(reference(q, z, rounds, delta, RdpAccountant), rel=1e-6)
    # PLD composed one release at a time is slow: the same events, self-composed
    acc = PLDAccountant()
    acc.compose(
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    )
    assert pld == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    assert pld <= rdp


def test_epsilon_matches_the_published_figures_and_composes_runs_of_other_noise():
    # ../shared/notes/privacy.md: 1,000 clients, delta 1e-4, noise 1.0, 200 rounds at q = 0.1: 9.74 and 8.61
    ledger = Ledger([[0.1, 1.0, 200]])
    rdp, pld = privacy.epsilons(ledger, 1e-4)
    assert rdp == pytest.approx(9.74, abs=0.01) and pld == pytest.approx(8.61, abs=0.01)
    # a resumed run that changed its noise: two runs of releases, in order
    ledger = Ledger()
    for z in [1.0] * 7 + [1.6] * 5:
        ledger.add(0.05, z)
    assert ledger.groups == [[0.05, 1.0, 7], [0.05, 1.6, 5]]
    acc = RdpAccountant()
    for z in [1.0] * 7 + [1.6] * 5:
        acc.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(z)))
    assert privacy.epsilon(ledger, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


@pytest.mark.parametrize("target,q", [(8.0, 1.0), (1.0, 0.1)])
def test_target_epsilon_finds_the_smallest_noise_that_meets_it(target, q):
    z = privacy.calibrate(Ledger(), q, 10, target, 1e-5)
    assert reference(q, z, 10, 1e-5, RdpAccountant) <= target
    assert reference(q, z * 0.999, 10, 1e-5, RdpAccountant) > target  # any less noise spends more


def test_rounds_added_on_resume_stay_within_the_target_or_are_refused():
    # The case: target 8 over 10 rounds, resumed to 20 (it spent 10.2 when the noise was re-derived).
    # The first 10 rounds spend the budget: 10 more are refused, unless the resume raises the target, and then
    # they get the noise that keeps the whole run within it.
    cfg = load_config(TINY, [*DP, "--dp.target_epsilon=8", "--fed.rounds=10"])
    first = ClientDP(cfg, DPState(), log=lambda s: None)
    z10 = first.state.noise_multiplier
    for _ in range(10):
        first.charge()
        first.release(None, 4, 0)
    cfg.fed.rounds = 20
    with pytest.raises(
        ValueError, match=r"dp.target_epsilon=8 is spent: the 10 rounds already run spent 7.99"
    ):
        ClientDP(cfg, DPState.from_json(first.state.to_json()), log=lambda s: None)
    cfg.dp.target_epsilon = 10.0
    resumed = ClientDP(cfg, DPState.from_json(first.state.to_json()), log=lambda s: None)
    assert resumed.state.noise_multiplier > z10
    for _ in range(10):
        resumed.charge()
        resumed.release(None, 4, 0)
    acc = RdpAccountant()
    for z in [z10] * 10 + [resumed.state.noise_multiplier] * 10:
        acc.compose(dp_event.GaussianDpEvent(z))
    assert 9.99 < acc.get_epsilon(1e-3) <= 10.0
    # A resume without added rounds keeps the noise it started with.
    cfg.fed.rounds, cfg.dp.target_epsilon = 10, 8.0
    partial = DPState.from_json(first.state.to_json())
    partial.ledger = Ledger([[1.0, z10, 6]])  # killed after round 6
    assert ClientDP(cfg, partial, log=lambda s: None).state.noise_multiplier == z10


def dp_of(*overrides: str) -> ClientDP:
    return ClientDP(load_config(TINY, [*DP, *overrides]), DPState(), log=lambda s: None)


def test_server_clips_each_update_sums_and_divides_by_the_expected_cohort():
    torch.manual_seed(0)
    directions = [torch.randn(15) for _ in range(3)]
    norms = [0.5, 2.0, 4.0]  # the first is inside the clipping norm, the others are scaled down to 1
    updates = [d / d.norm() * n for d, n in zip(directions, norms)]
    # 8 clients (tiny.yaml has 3) at q = 0.5: 4 expected a round, 3 answered
    dp = dp_of("--dp.noise_multiplier=1e-9", "--fed.num_clients=8", "--fed.fraction_train=0.5")
    total, unclipped = dp.clip([u.clone() for u in updates])
    dp.charge()
    mean = dp.release(total, 15, unclipped)
    clipped = [u * min(1.0, 1.0 / n) for u, n in zip(updates, norms)]
    assert unclipped == 1
    assert torch.allclose(mean, sum(clipped) / 4, atol=1e-7)
    assert dp.state.ledger.groups == [[0.5, 1e-9, 1]]


def test_noise_has_std_noise_multiplier_times_clipping_norm_over_the_expected_cohort():
    dp = dp_of(
        "--dp.noise_multiplier=1.5",
        "--dp.clipping_norm=2.0",
        "--fed.num_clients=8",
        "--fed.fraction_train=0.5",
    )
    noise = dp.release(None, 400_000, 0)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)


def seed_everything(seed: int, rnd: int) -> None:
    """Every generator a participant could seed from what it knows (train.seed travels in the run config and
    sits in every checkpoint), the way fedgpt seeded Flower's noise before."""
    random.seed(seed * 1_000_003 + rnd)
    np.random.seed((seed * 1_000_003 + rnd) % 2**32)
    torch.manual_seed(seed)


def test_nobody_who_knows_the_seeds_replays_the_noise_or_the_sample():
    dp = dp_of(
        "--dp.noise_multiplier=1.0", "--fed.num_clients=1000", "--fed.fraction_train=0.5", "--dp.delta=1e-4"
    )
    torch.manual_seed(1)
    updates = [0.01 * torch.randn(50_000) for _ in range(3)]
    total, unclipped = dp.clip([u.clone() for u in updates])
    truth = total / dp.expected  # the clipped mean, what DP hides
    releases, samples = [], []
    for _ in range(2):
        seed_everything(1337, 1)
        releases.append(dp.release(total.clone(), 50_000, unclipped))
        samples.append(dp.sample(list(range(1000))))
    assert not torch.equal(releases[0], releases[1])
    assert samples[0] != samples[1]  # equal with probability 2^-1000
    assert 400 < len(samples[0]) < 600
    # The old attack: regenerate numpy's draws from the seed and subtract them. What is left is no closer to
    # the clipped mean than the release itself.
    std = dp.update_noise * dp.clipping_norm / dp.expected
    seed_everything(1337, 1)
    replayed = torch.from_numpy(np.random.normal(0, std, 50_000)).float()
    miss, noise = float((releases[0] - replayed - truth).norm()), float((releases[0] - truth).norm())
    assert noise == pytest.approx(std * 50_000**0.5, rel=0.02)  # the release is the truth plus that noise
    assert miss > 1.3 * noise  # and subtracting the replay adds noise of its own: sqrt(2) x, not 0


def test_adaptive_clipping_moves_the_norm_towards_the_quantile_and_is_accounted_as_one_gaussian():
    norms = [0.5, 1.0, 2.0, 4.0]  # the median is between 1 and 2
    updates = [torch.tensor([n, 0.0]) for n in norms]
    for start, settled in ((0.25, (1.0, 1.0 * math.exp(0.1))), (8.0, (1.0, 2.0))):
        dp = dp_of(
            "--dp.noise_multiplier=1e-6",
            "--dp.adaptive_clipping=true",
            "--dp.count_noise=1e-3",
            f"--dp.clipping_norm={start}",
            "--fed.num_clients=4",
        )
        seen = []
        for _ in range(40):
            total, unclipped = dp.clip([u.clone() for u in updates])
            dp.release(total, 2, unclipped)
            seen.append(dp.clipping_norm)
        # Andrew et al.'s step, exp(-0.2 (share unclipped - 0.5)): none unclipped, or all four
        first = start * math.exp(0.1 if start < 0.5 else -0.1)
        assert seen[0] == pytest.approx(first, rel=1e-3)
        assert settled[0] <= seen[-1] < settled[1] and seen[-1] == pytest.approx(seen[-10], rel=1e-3)
    # The update's noise and the count's compose into the noise multiplier the ledger records.
    dp = dp_of(
        "--dp.noise_multiplier=1.0",
        "--dp.adaptive_clipping=true",
        "--dp.count_noise=3",
        "--fed.num_clients=4",
    )
    two = RdpAccountant()
    two.compose(dp_event.GaussianDpEvent(dp.update_noise))
    two.compose(dp_event.GaussianDpEvent(3.0))
    assert two.get_epsilon(1e-3) == pytest.approx(reference(1.0, 1.0, 1, 1e-3, RdpAccountant), rel=1e-3)
    with pytest.raises(ValueError, match="dp.count_noise=0.2 must exceed the noise multiplier"):
        dp_of("--dp.noise_multiplier=1.0", "--dp.adaptive_clipping=true", "--fed.num_clients=4")


def test_clients_that_clip_are_counted_unclipped_only_when_they_say_exactly_so():
    # dp.clipping=client: the server's clipping is a no-op (the updates came clipped) and the adaptive count
    # is the clients' word, 1 for within the norm; a NaN, a 7 or nothing counts as clipped.
    dp = dp_of(
        "--dp.clipping=client",
        "--dp.noise_multiplier=1e-6",
        "--dp.adaptive_clipping=true",
        "--dp.count_noise=1e-4",
        "--fed.num_clients=4",
    )
    updates = [torch.tensor([0.6, 0.8]) * s for s in (1.0, 0.5, 0.2, 1.0)]  # all within the norm 1
    mean = dp.mean_of_updates(updates, 2, [1, 1.0, math.nan, 7])
    assert torch.allclose(mean, sum(updates) / 4, atol=1e-5)
    # two of four unclipped: C <- 1 x exp(-0.2 x (2/4 - 0.5)) = 1, against exp(-0.2 x (3/4 - 0.5)) for three
    assert dp.clipping_norm == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--fed.strategy=fedmedian", "--fed.weighting=uniform"], "fed.strategy fedmedian"),
        (["--fed.weighting=data"], "fed.weighting=uniform"),
        (["--fed.weighting=uniform", "--dp.clipping=client", "--fed.uplink=int8"], "client clipping"),
        (["--fed.weighting=uniform", "--dp.clipping=client", "--fed.uplink=sparse"], "client clipping"),
        (["--fed.weighting=uniform", "--fed.stragglers=0.5", "--fed.straggler_policy=drop"], "stragglers"),
        (["--fed.weighting=uniform", "--dp.target_epsilon=1"], "not both"),
        (["--fed.weighting=uniform", "--dp.delta=0.5"], "not below 1 / fed.num_clients"),
        (["--fed.weighting=uniform", "--fed.fraction_train=0"], "fed.fraction_train: must be in"),
        (["--fed.weighting=uniform", "--fed.fraction_train=1.5"], "fed.fraction_train: must be in"),
        (["--fed.weighting=uniform", "--fed.client_eval_interval=1"], "accountant does not cover"),
    ],
)
def test_dp_refuses_what_its_noise_is_not_calibrated_for(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(TINY, ["--dp.noise_multiplier=1", *overrides])


def test_an_unreachable_target_is_refused_before_any_round(data_dir, tmp_path):
    cfg = load_config(
        TINY,
        [*DP, "--dp.target_epsilon=1e-6", f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'x'}"],
    )
    with pytest.raises(ValueError, match="dp.target_epsilon=1e-06 is out of reach"):
        FederatedRun(cfg, log=lambda s: None)


def final_weights(out) -> torch.Tensor:
    state = load_checkpoint(out / "last.pt")["model"]
    return torch.cat([v.float().ravel() for k, v in sorted(state.items())])


@pytest.mark.slow
def test_dp_runs_end_apart_record_both_accountants_and_keep_their_budget(
    data_dir, tmp_path, monkeypatch, probe_dir
):
    # 3 clients, each round: one fails in round 2 of the first run (the round goes on with two).
    # Both runs alike but for the noise (a run without DP repeats bitwise).
    dp = [*DP, "--dp.target_epsilon=6", "--dp.clipping_norm=0.05"]
    monkeypatch.setenv("FEDGPT_TEST_FAIL", "1:2")
    simulate(data_dir, tmp_path / "a", "probe_client_app", *dp)
    simulate(data_dir, tmp_path / "b", "probe_client_app", *dp)
    monkeypatch.delenv("FEDGPT_TEST_FAIL")
    a, b = read_rounds(tmp_path / "a" / "rounds.jsonl"), read_rounds(tmp_path / "b" / "rounds.jsonl")
    assert not torch.equal(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    z = load_checkpoint(tmp_path / "b" / "last.pt")["extra"]["dp"]
    z = DPState.from_json(z).noise_multiplier
    for rows in (a, b):
        assert [r.dp_epsilon for r in rows[1:]] == pytest.approx(
            [reference(1.0, z, r, 1e-3, RdpAccountant) for r in (1, 2)], rel=1e-6
        )
        assert all(r.dp_epsilon_pld <= r.dp_epsilon for r in rows[1:])
        assert rows[2].dp_epsilon == pytest.approx(6.0, abs=0.01)
    # the failed client left the round with two: the round counted, and the model moved (how many answered is
    # not published under DP)
    for rows in (a, b):
        assert (rows[2].clients_ok, rows[2].clients_failed) == (None, None)
        assert rows[2].val_loss != rows[1].val_loss
    # A third round added to b: refused while the budget is spent, run once the resume raises it, and the
    # raised target holds for the whole run.
    with pytest.raises(ValueError, match="dp.target_epsilon=6 is spent"):
        simulate(data_dir, tmp_path / "b", "client_app", *dp, "--fed.rounds=3", resume=True)
    dp[-2] = "--dp.target_epsilon=7"
    simulate(data_dir, tmp_path / "b", "client_app", *dp, "--fed.rounds=3", resume=True)
    b = read_rounds(tmp_path / "b" / "rounds.jsonl")
    assert [r.round for r in b] == [0, 1, 2, 3]
    ledger = DPState.from_json(load_checkpoint(tmp_path / "b" / "last.pt")["extra"]["dp"]).ledger.groups
    assert ledger[0] == [1.0, z, 2] and ledger[1][2] == 1 and ledger[1][1] > z
    assert 6.99 < b[3].dp_epsilon <= 7.0


@pytest.mark.slow
def test_clients_that_clip_keep_the_global_step_within_the_clipping_norm(data_dir, tmp_path):
    norm = 1e-3  # far below an unclipped update of the tiny model after 5 AdamW steps
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'init'}"])
    init = FederatedRun(cfg, log=lambda s: None)  # the initial global model every run of this config has
    assert float(fit_in_process(init, rnd=1).norm()) > 10 * norm  # one client's round, unclipped
    clip = [*DP, "--dp.clipping=client", f"--dp.clipping_norm={norm}", "--dp.noise_multiplier=1e-6"]
    simulate(data_dir, tmp_path / "clip", "client_app", "--fed.rounds=1", *clip)
    end = init.exchange.flatten(load_checkpoint(tmp_path / "clip" / "last.pt")["model"])
    step = float((end - init.exchange.flatten(init.global_state)).norm())
    # the sum of 3 updates clipped to `norm` over 3 expected clients, plus noise of std 1e-6 * norm / 3
    assert step <= norm * 1.001


def test_stragglers_get_fewer_steps_or_are_left_out():
    local = 5
    for policy in ("accept", "drop"):
        for rnd in (1, 2):
            steps = straggler_steps(0.67, policy, local, seed=1337, rnd=rnd, clients=3)
            assert len(steps) == 3 and steps.count(local) == 1  # round(0.67 x 3) = 2 stragglers
            stragglers = [s for s in steps if s != local]
            if policy == "drop":  # FedAvg's baseline: the two stragglers are not sent anything
                assert stragglers == [None, None]
            else:  # two of 1 to local_steps - 1 steps
                assert all(1 <= s < local for s in stragglers)
            # drawn from the run's seed and the round: a resumed run gives the same clients the same work
            assert steps == straggler_steps(0.67, policy, local, seed=1337, rnd=rnd, clients=3)
    draws = {tuple(straggler_steps(0.5, "accept", 25, seed=1337, rnd=r, clients=8)) for r in range(1, 11)}
    assert len(draws) > 1  # other rounds, other stragglers
    assert straggler_steps(0.5, "accept", 1, seed=1337, rnd=1, clients=8) == [1] * 8  # nothing to take away


@pytest.mark.slow
def test_stragglers_train_only_their_share(data_dir, tmp_path):
    out = tmp_path / "accept"
    simulate(data_dir, out, "client_app", "--fed.stragglers=0.67", "--fed.straggler_policy=accept")
    rows = read_rounds(out / "rounds.jsonl")
    cfg = load_config(TINY)
    step_tokens = cfg.train.batch_size * cfg.model.block_size
    full = cfg.fed.local_steps * step_tokens  # tokens of a client that runs all its steps
    per_round = [b.tokens - a.tokens for a, b in zip(rows, rows[1:])]
    assert all(r.clients_straggling == 2 and r.clients_ok == 3 for r in rows[1:])
    # two stragglers of 1 to local_steps - 1 steps each: the tokens the clients counted themselves
    assert all(full + 2 * step_tokens <= t <= full + 2 * (full - step_tokens) for t in per_round)
