"""Federated optimization on real Flower and Ray with the tiny model: FedProx, FedAdam and DiLoCo run (the
last two resume exactly), clients keep their optimizer state across rounds (bitwise), a stale state is dropped
and counted, and FedAvg weights clients by their data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, copy_run_folder, simulate
from flwr.app import ArrayRecord

from fedgpt import local_train
from fedgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fedgpt.config import load_config
from fedgpt.config_rules import STRATEGIES
from fedgpt.fed.rounds import read_rounds
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.wire import decode

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_left")]


class KeepsRound2(FederatedRun):
    """A run that copies its folder (checkpoint, rows, client states) as round 2 leaves it to <out>-at2:
    what a run killed in round 3 resumes from."""

    def finish_round(self, snap, row):
        row = super().finish_round(snap, row)
        if row.round == 2:
            out = Path(self.cfg.train.out_dir)
            copy_run_folder(out, out.with_name(out.name + "-at2"))
        return row


# FedAdam's moments resume here, with Muon clients and a sparse uplink (their momentum and residuals too);
# FedYogi's and FedAdagrad's are the same attributes, checkpointed by the same code (their round trip is in
# test_strategies). DiLoCo resumes here with streaming fragments, an int4 uplink and the orthogonalized outer
# step (the outer momentum one fragment at a time, each client's own weights, one residual per fragment);
# plain DiLoCo's momentum buffer (FedAvgM's is the same class), the weights and the clients' state come back
# bit for bit after a real kill in test_federation.py::test_resume_after_kill_ends_as_an_uninterrupted_run.
# FedAvg resumes here with LoRA, trained embedding rows and the head bias (the adapters, rows and bias; the
# base stays the base).
RESUMED = ("fedadam", "diloco", "fedavg-lora-rows")


# Run end to end here: FedProx (its mu reaches the clients through the work order), FedAdam and DiLoCo.
# FedAvg, the default, runs in nearly every other simulation of the suite (its mean by hand below); every
# other strategy is built by the same factory and called by the same configure/aggregate calls as these,
# checked without a simulation in tests/test_strategies.py (FedAvgM is DiLoCo's class, FedYogi's and
# FedAdagrad's state FedAdam's attributes, FedMedian and FedTrimmedAvg against a sorted reference).
END_TO_END = ("fedprox", *RESUMED)
assert {s.split("-")[0] for s in END_TO_END} <= set(STRATEGIES)


@pytest.mark.parametrize("strategy", END_TO_END)
def test_strategies_run_end_to_end_and_resume_exactly(strategy, data_dir, tmp_path):
    out = tmp_path / "run"
    extra = [f"--fed.strategy={strategy.split('-')[0]}"]
    if strategy == "fedprox":
        extra += ["--fed.proximal_mu=0.1"]
    if strategy == "fedadam":  # its clients train with Muon (MuLoCo's inner step), send sparse updates and
        # share their first moments (the server's mean is in the checkpoint)
        extra += ["--train.optimizer=muon", "--fed.uplink=sparse", "--fed.client_optimizer=average"]
    if strategy == "diloco":
        extra += ["--fed.fragments=2", "--fed.uplink=int4", "--fed.outer_orthogonal=true"]
    if strategy == "fedavg-lora-rows":  # from a base of 2 local steps; the rows chosen from the corpus
        corpus = data_dir / "tinyshakespeare" / "input.txt"
        local_train.main(
            ["--config", str(TINY), f"--data.data_dir={data_dir}", "--train.max_steps=2"]
            + [f"--train.out_dir={tmp_path / 'base'}", "--train.eval_interval=2"]
        )
        extra += [f"--train.init_from={tmp_path / 'base' / 'last.pt'}", "--lora.rank=2"]
        extra += ["--lora.embedding_rows=8", f"--lora.rows_from={corpus}", "--lora.head_bias=true"]
    rounds = 3 if strategy in RESUMED else 2
    summary = simulate(data_dir, out, "client_app", f"--fed.rounds={rounds}", *extra, run_class=KeepsRound2)
    assert summary["rounds"] == rounds
    assert all(r.clients_ok == 3 for r in read_rounds(out / "rounds.jsonl")[1:])
    whole = load_checkpoint(out / "last.pt")
    stateful = strategy in ("diloco", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
    if strategy == "fedavg-lora-rows":  # 8 rows of the tied embedding moved, the other rows as the base's
        base = load_checkpoint(tmp_path / "base" / "last.pt")["model"]["transformer.wte.weight"]
        moved = (whole["model"]["transformer.wte.weight"] != base).any(dim=1)
        assert int(moved.sum()) == 8 and torch.equal(
            whole["model"]["lm_head.weight"], whole["model"]["transformer.wte.weight"]
        )
        # the vocabulary bias trained, and the checkpoint is a plain GPT that has one
        assert whole["model_config"]["head_bias"] and whole["model"]["lm_head.bias"].abs().min() > 0
        model_from_checkpoint(whole)
    assert bool(whole["extra"]["strategy"]) == stateful, (
        "a strategy's state is in its checkpoint, or it has none"
    )
    if strategy not in RESUMED:
        return
    # Round 3 again, from the folder round 2 left: the same weights and strategy state, bit for bit.
    at2 = tmp_path / "run-at2"
    simulate(data_dir, at2, "client_app", "--fed.rounds=3", *extra, resume=True)
    rows, resumed = read_rounds(at2 / "rounds.jsonl"), load_checkpoint(at2 / "last.pt")
    assert [r.round for r in rows] == [0, 1, 2, 3] and rows[3].clients_state_resumed == 3
    assert rows[3].val_loss == read_rounds(out / "rounds.jsonl")[3].val_loss
    for k, v in whole["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    for name, state in whole["extra"]["strategy"].items():
        for k, v in (state or {}).items():
            assert torch.equal(resumed["extra"]["strategy"][name][k], v), (name, k)
    assert ("client_moments" in whole["extra"]) == (strategy == "fedadam")
    for k, v in whole["extra"].get("client_moments", {}).items():
        assert torch.equal(resumed["extra"]["client_moments"][k], v), k


def test_clients_resume_exactly_their_own_moments_and_drop_stale_ones(
    data_dir, tmp_path, probe_dir, monkeypatch
):
    monkeypatch.setenv("FEDGPT_TEST_FAIL", "1:2")  # partition 1 fails in round 2
    simulate(data_dir, tmp_path / "run", "probe_client_app", "--fed.rounds=3")
    rows = read_rounds(tmp_path / "run" / "rounds.jsonl")
    assert [
        (r.clients_ok, r.clients_failed, r.clients_state_resumed, r.clients_state_stale) for r in rows[1:]
    ] == [
        (3, 0, 0, 0),  # round 1: nothing saved yet
        (2, 1, 2, 0),  # round 2: partitions 0 and 2 go on from round 1; partition 1 fails
        (
            2 + 1,
            0,
            2,
            1,
        ),  # round 3: partition 1's newest state is round 1's, two rounds old: dropped, counted
    ]
    saved_by_the_store = {}
    for partition in (0, 1, 2):
        for rnd in (1, 2, 3):
            path = probe_dir / f"restored-p{partition}-r{rnd}.pt"
            if path.is_file():
                saved_by_the_store[(partition, rnd)] = torch.load(path, weights_only=True)
    # Round 2 of partition 0 starts from exactly the moments round 1 ended with, as its state file held them.
    for partition, rnd in [(0, 2), (2, 2), (0, 3), (2, 3)]:
        restored = saved_by_the_store[(partition, rnd)]
        ended = torch.load(probe_dir / f"saved-p{partition}-r{rnd - 1}.pt", weights_only=True)
        assert restored["state"].keys() == ended["state"].keys()
        for i, s in ended["state"].items():
            for name in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(restored["state"][i][name], s[name]), (partition, rnd, i, name)
        assert float(ended["state"][0]["step"]) == 5 * (rnd - 1)  # AdamW's step count goes on too
    assert not saved_by_the_store[(1, 3)]["state"]  # the stale state was not loaded: fresh moments


def test_clients_start_each_round_from_the_mean_of_their_first_moments(data_dir, tmp_path, probe_dir):
    # fed.client_optimizer=average, Muon clients: round 2 starts each client's Muon momentum and AdamW first
    # moment at the data-weighted mean of what the three clients ended round 1 with (as their state files hold
    # it), and leaves AdamW's second moment and step count each client's own.
    out = tmp_path / "run"
    overrides = ["--fed.rounds=2", "--train.optimizer=muon", "--fed.client_optimizer=average"]
    simulate(data_dir, out, "probe_client_app", *overrides)
    sizes = json.loads((out / "partition.json").read_text())["tokens"]
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    ended = [torch.load(probe_dir / f"saved-p{p}-r1.pt", weights_only=True) for p in range(3)]
    counted = 0
    for p in range(3):
        restored = torch.load(probe_dir / f"restored-p{p}-r2.pt", weights_only=True)
        for part, key in (("muon", "momentum_buffer"), ("adamw", "exp_avg")):
            assert restored[part]["state"].keys() == ended[p][part]["state"].keys() != set()
            for i, s in restored[part]["state"].items():
                mean = sum(wk * e[part]["state"][i][key].double() for wk, e in zip(w, ended))
                torch.testing.assert_close(s[key].double(), mean, rtol=0, atol=1e-6)
                assert not torch.equal(s[key], ended[p][part]["state"][i][key])  # not its own
                counted += s[key].numel() if p == 0 else 0
        for i, s in restored["adamw"]["state"].items():
            for key in ("exp_avg_sq", "step"):
                assert torch.equal(s[key], ended[p]["adamw"]["state"][i][key]), (p, i, key)
    # The moments travel both ways in fp32, counted: none down in round 1 (there is no mean yet), all after
    # (each array with a header of its own: on the tiny model's many small tensors about 2% more).
    rows = read_rounds(out / "rounds.jsonl")
    model = load_checkpoint(out / "last.pt")["model"]
    n_params = sum(v.numel() for k, v in model.items() if k != "lm_head.weight")  # tied: counted once
    assert counted == n_params  # every weight has a first moment (the tied head once)
    assert rows[2].bytes_sent - rows[1].bytes_sent == pytest.approx(3 * 4 * n_params, rel=0.04)
    assert rows[1].bytes_received == pytest.approx(rows[2].bytes_received, rel=1e-6)
    assert rows[1].bytes_received - rows[1].bytes_sent == pytest.approx(3 * 4 * n_params, rel=0.04)


def test_fedavg_weights_clients_by_their_data(data_dir, tmp_path, probe_dir):
    out = tmp_path / "run"
    simulate(
        data_dir,
        out,
        "probe_client_app",
        "--fed.partition=dirichlet",
        "--fed.dirichlet_alpha=0.1",
        "--fed.rounds=1",
    )
    sizes = json.loads((out / "partition.json").read_text())["tokens"]
    assert max(sizes) > 1.5 * min(sizes), sizes  # a skewed split, or the test proves nothing
    # what each client sent: its update (fp32), against the initial model every run of this config has
    sent = [
        decode(ArrayRecord(torch.load(probe_dir / f"sent-p{p}-r1.pt", weights_only=True))) for p in range(3)
    ]
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'init'}"])
    init = FederatedRun(cfg, log=lambda s: None)
    start = init.exchange.flatten(init.global_state)
    expected = start + sum(n * u for n, u in zip(sizes, sent)) / sum(sizes)  # McMahan et al.: n_k / n
    flat = init.exchange.flatten(load_checkpoint(out / "last.pt")["model"])
    torch.testing.assert_close(flat, expected, rtol=0, atol=1e-6)
    unweighted = start + sum(sent) / 3
    assert (flat - unweighted).abs().max() > 1e-4  # the weights made a difference


def recording(states: dict) -> type:
    """A FederatedRun that keeps each round's global model in `states`, by round."""

    class Recording(FederatedRun):
        def finish_round(self, snap, row):
            states[row.round] = {k: v.clone() for k, v in snap.state.items()}
            return super().finish_round(snap, row)

    return Recording


def fragment_of_by_hand(name: str) -> int:
    """Two fragments of the tiny model (2 blocks): block 1 alone, and everything else."""
    return 1 if name.startswith("transformer.h.1.") else 0


def test_streaming_fragments_sync_one_fragment_a_round_and_clients_keep_the_rest(data_dir, tmp_path):
    # One client and FedAvg: whatever syncs, the client gets its own weights back, so without fragments it
    # trains as if never interrupted. With two fragments, each fragment of the global model must be that run's
    # model as of the round the fragment last synced (round r syncs fragment (r - 1) % 2), and the client must
    # go on from its own weights of the fragment not synced: a client that took the server's stale copy
    # instead would drift from the reference by its whole round of training.
    common = ["--fed.num_clients=1", "--fed.strategy=fedavg", "--fed.rounds=4", "--train.lr_decay_steps=100"]
    plain, streamed = {}, {}
    simulate(data_dir, tmp_path / "plain", "client_app", *common, run_class=recording(plain))
    out = tmp_path / "streamed"
    simulate(data_dir, out, "client_app", *common, "--fed.fragments=2", run_class=recording(streamed))
    for rnd in range(1, 5):
        for k, v in streamed[rnd].items():
            f = fragment_of_by_hand(k)
            synced = max((r for r in range(rnd + 1) if r == 0 or (r - 1) % 2 == f), default=0)
            torch.testing.assert_close(v, plain[synced][k], rtol=0, atol=2e-5, msg=f"round {rnd}, {k}")
            if synced != rnd:  # not this round's fragment: bit for bit what the server held before
                assert torch.equal(v, streamed[rnd - 1][k]), (rnd, k)
    # The bytes: round 1 brings the whole model down, each later message one fragment; every reply one
    # fragment up (fp32, 4 bytes a value), counted by hand from the model's tensors.
    sizes = [0, 0]
    for k, v in plain[0].items():
        if k != "lm_head.weight":  # tied to transformer.wte.weight: it travels once
            sizes[fragment_of_by_hand(k)] += v.numel()
    rows = read_rounds(out / "rounds.jsonl")[1:]
    assert sizes[1] > 0.2 * sum(sizes)  # two real fragments, or the test proves little
    for r in rows:
        down = sum(sizes) if r.round == 1 else sizes[(r.round - 2) % 2]
        assert r.bytes_sent == pytest.approx(4 * down, rel=0.01), r.round
        assert r.bytes_received == pytest.approx(4 * sizes[(r.round - 1) % 2], rel=0.01), r.round
