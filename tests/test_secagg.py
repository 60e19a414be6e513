"""Secure aggregation (secagg.*): Flower's SecAgg+ under fedgpt's round loop, on real Ray.

The server must learn the clients' mean update and nothing of any one update: every reply the ServerApp
receives is recorded below the round loop, where nothing of fedgpt's can hide it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from test_fed_optimization import TINY, simulate

from fedgpt.checkpoint import load_checkpoint
from fedgpt.config import load_config
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.wire import flatten, from_record


class RecordingGrid:
    """The ServerApp's grid, keeping a copy of every reply as it hands it to the server."""

    def __init__(self, grid, seen: list):
        self._grid, self._seen = grid, seen

    def pull_messages(self, ids):
        got = list(self._grid.pull_messages(ids))
        self._seen += [copy.deepcopy(m) for m in got]
        return got

    def send_and_receive(self, messages, *, timeout=None):
        got = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._seen += [copy.deepcopy(m) for m in got]
        return got

    def __getattr__(self, name):
        return getattr(self._grid, name)


SEEN: dict[str, list] = {}


class RecordingRun(FederatedRun):
    """A run whose server-side replies land in SEEN[out_dir name], with its initial global model."""

    def run(self, grid):
        name = self.cfg.train.out_dir.rsplit("/", 1)[-1]
        SEEN[name] = [{k: v.clone() for k, v in self.global_state.items() if k not in self.aliases}, self, []]
        return super().run(RecordingGrid(grid, SEEN[name][2]))


def train_replies(seen: list) -> list:
    return [
        m
        for m in seen
        if not m.has_error() and "metrics" in m.content and "train-loss" in m.content["metrics"]
    ]


@pytest.mark.slow
def test_the_server_sees_only_the_mean_and_it_is_fedavgs(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("test_fed_optimization.FederatedRun", RecordingRun)
    one = "--fed.rounds=1"
    simulate(data_dir, tmp_path / "plain", "client_app", one)
    simulate(data_dir, tmp_path / "secure", "client_app", one, "--secagg.enabled=true")
    init, plain_run, plain = SEEN["plain"]
    _, secure_run, secure = SEEN["secure"]
    partition_of, partition_of_secure = plain_run.partition_of, secure_run.partition_of
    plain, secure = train_replies(plain), train_replies(secure)
    assert len(plain) == len(secure) == 3

    # Without SecAgg+ each client's weights reach the server: its update is there to read.
    updates = {}
    for r in plain:
        state = from_record(r.content["arrays"], {}, like=init)
        updates[partition_of[r.metadata.src_node_id]] = flatten(state, {}, base=init).numpy()
    assert all(np.abs(u).max() > 1e-3 for u in updates.values())

    # With it, no reply holds an array, and what each client sent (its masked vector) is uncorrelated with
    # its update; unmasked, the quantized update would correlate with it almost perfectly.
    for r in secure:
        assert all(a.count_bytes() == 0 for a in r.content.array_records.values())
        masked = r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in masked])[1:]  # [0]: its weight
        update = updates[partition_of_secure[r.metadata.src_node_id]]
        assert len(vector) == len(update)
        assert abs(np.corrcoef(vector.astype(np.float64), update)[0, 1]) < 0.05

    # The mean is FedAvg's (weighted by data) up to SecAgg+'s quantization: stochastic rounding to
    # 2 x clipping_range / quantization_range per client, n clients, over the sum of their weight ratios.
    cfg = load_config(TINY).secagg
    tokens = [int(r.content["metrics"]["num-examples"]) for r in plain]
    ratios = sum(t / max(tokens) for t in tokens)
    tolerance = len(tokens) * 2 * cfg.clipping_range / cfg.quantization_range / ratios + 1e-6
    a = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "secure" / "last.pt")["model"]
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in init)
    assert diff <= tolerance
    moved = max(float((a[k].float() - init[k]).abs().max()) for k in init)
    assert moved > 100 * tolerance  # the round did move the model: the agreement is not trivial


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["--fed.uplink=int8"], "leave fed.uplink at fp32"),
        (["--dp.noise_multiplier=1", "--fed.weighting=uniform"], "use dp.clipping=client"),
        (["--secagg.shares=3", "--secagg.threshold=3"], "threshold < secagg.shares"),
        (["--fed.num_clients=1"], "needs 2 or more clients"),
        (["--fed.num_clients=1024"], "overflow the protocol's 2\\*\\*32 modulus"),
    ],
)
def test_secagg_refuses_what_it_cannot_run_with(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(TINY, ["--secagg.enabled=true", *overrides])


@pytest.mark.slow
def test_clients_clip_then_secagg_sums_then_the_server_adds_noise(data_dir, tmp_path):
    norm, clip_range = 1e-3, 0.01  # updates clipped far below their length; SecAgg+ values in +-0.01
    out = tmp_path / "dp"
    flags = ["--dp.clipping=client", f"--dp.clipping_norm={norm}", "--dp.noise_multiplier=1e-6"]
    flags += ["--fed.weighting=uniform", "--secagg.enabled=true", f"--secagg.clipping_range={clip_range}"]
    simulate(data_dir, out, "client_app", "--fed.rounds=1", *flags)
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'init'}"])
    init = FederatedRun(cfg, log=lambda s: None)  # the initial global model every run of this config has
    keys = [k for k in init.global_state if k not in init.aliases]
    end = load_checkpoint(out / "last.pt")["model"]
    step = float(torch.cat([(end[k].float() - init.global_state[k]).ravel() for k in keys]).norm())
    values = sum(init.global_state[k].numel() for k in keys)
    # the mean of 3 updates clipped to `norm`; SecAgg+'s rounding (3 clients of weight 1) adds at most
    # 2 x clip_range / quantization_range per value
    rounding = 2 * clip_range / cfg.secagg.quantization_range * values**0.5
    assert 0.5 * norm < step <= norm * 1.001 + rounding
    rows = [line for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert '"dp_epsilon": null' not in rows[-1]
