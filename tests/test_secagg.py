"""Secure aggregation (secagg.*): Flower's SecAgg+ under fedgpt's round loop, on real Ray.

The server must learn the clients' mean update and nothing of any one update: every reply the ServerApp
receives is recorded below the round loop, where nothing of fedgpt's can hide it.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, simulate
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedgpt.checkpoint import load_checkpoint
from fedgpt.config import load_config
from fedgpt.fed.rounds import read_rounds
from fedgpt.fed.secagg_server import max_weight
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.wire import decode

pytestmark = pytest.mark.usefixtures("no_ray_left")  # Ray, started by the slow tests, ends with the module


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
        SEEN[name] = [{k: self.global_state[k].clone() for k in self.exchange.names}, self, []]
        return super().run(RecordingGrid(grid, SEEN[name][2]))


def train_replies(seen: list) -> list:
    return [
        m
        for m in seen
        if not m.has_error() and "metrics" in m.content and "num-examples" in m.content["metrics"]
    ]


@pytest.mark.slow
def test_the_server_sees_only_the_mean_and_it_is_fedavgs(data_dir, tmp_path, monkeypatch):
    one = "--fed.rounds=1"
    simulate(data_dir, tmp_path / "plain", "client_app", one, run_class=RecordingRun)
    simulate(
        data_dir, tmp_path / "secure", "client_app", one, "--secagg.enabled=true", run_class=RecordingRun
    )
    init, plain_run, plain = SEEN["plain"]
    _, secure_run, secure = SEEN["secure"]
    partition_of, partition_of_secure = plain_run.nodes.partition_of, secure_run.nodes.partition_of
    plain, secure = train_replies(plain), train_replies(secure)
    assert len(plain) == len(secure) == 3

    # Without SecAgg+ each client's update reaches the server, there to read.
    updates = {partition_of[r.metadata.src_node_id]: decode(r.content["arrays"]).numpy() for r in plain}
    assert all(np.abs(u).max() > 1e-3 for u in updates.values())

    # With it, no reply holds an array, and what each client sent (its masked vector) is uncorrelated with
    # its update; unmasked, the quantized update would correlate with it almost perfectly.
    for r in secure:
        assert all(a.count_bytes() == 0 for a in r.content.array_records.values())
        # and no metric of one client in the clear (loss, tokens, seconds, lr): only the weight SecAgg+ uses
        assert dict(r.content["metrics"]) == {"num-examples": int(r.content["metrics"]["num-examples"])}
        masked = r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in masked])[1:]  # [0]: its weight
        update = updates[partition_of_secure[r.metadata.src_node_id]]
        assert len(vector) == len(update)
        assert abs(np.corrcoef(vector.astype(np.float64), update)[0, 1]) < 0.05

    # What crossed the wire, as rounds.jsonl counts it for the comm bench: fp32 weights down to each client;
    # up, SecAgg+'s masked int64 values and the weight, with its keys and key shares (a few kB a client)
    n, (row,) = len(update), read_rounds(tmp_path / "secure" / "rounds.jsonl")[1:]
    header, keys = 256, 8192
    assert 4 * n <= row.bytes_sent / 3 <= 4 * n + header + keys
    assert 8 * (n + 1) <= row.bytes_received / 3 <= 8 * (n + 1) + header + keys

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


def node(**config):
    """The Context of node 7, with this node config."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def train_message(configs: dict | None = None):
    """A train message to node 7 with fedgpt's arrays and config, and SecAgg+'s stage record if given."""
    from conftest import train_instruction
    from flwr.app import ArrayRecord, ConfigRecord

    msg = train_instruction(7)
    msg.content["arrays"] = ArrayRecord({"w": torch.ones(3)})
    msg.content["config"] = ConfigRecord({"server-round": 1})
    if configs is not None:
        msg.content[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    return msg


def through_mod(msg, context):
    """The ClientApp's mod on `msg`; whether the handler behind it ran."""
    from fedgpt.fed.secagg import secure_aggregation

    ran = []

    def fit(m, c):
        ran.append(m)
        return m  # never reached when the node refuses

    try:
        secure_aggregation(msg, context, fit)
    except PermissionError as e:
        return str(e), ran
    return None, ran


SETUP = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2}
SETUP.update({Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1.0})


@pytest.mark.parametrize(
    "configs, needle",
    [
        (None, r"requires SecAgg\+ .* refuses a plain train message"),
        ({**SETUP, Key.SAMPLE_NUMBER: 1}, "among 2 or more clients"),  # alone: its "sum" is its update
        ({**SETUP, Key.THRESHOLD: 1}, "threshold of 2 or more"),  # one share would give its secrets away
        ({Key.STAGE: Stage.SHARE_KEYS, "7": [b"a", b"b"]}, r"among 2 or more clients \(got 1\)"),
        (  # both secrets of node 8: its self-mask from the active list, its pairwise key from the dead one
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [7, 8], Key.DEAD_NODE_ID_LIST: [8]},
            "both secrets of a node",
        ),
        (  # this node answered, yet is said to have dropped out
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [8, 9], Key.DEAD_NODE_ID_LIST: [7]},
            "this node's own key",
        ),
    ],
)
def test_a_node_that_requires_secagg_refuses_what_a_curious_server_sends(configs, needle):
    reason, ran = through_mod(train_message(configs), node(**{"require-secagg": True}))
    assert reason is not None and __import__("re").search(needle, reason), reason
    assert not ran  # nothing trained, nothing to send


def test_the_floor_is_the_nodes_own_and_lets_the_protocol_and_queries_through(monkeypatch):
    from conftest import train_instruction
    from flwr.app import MessageType

    # Without the setting (node config or the SuperNode's environment), plain train messages go through.
    reason, ran = through_mod(train_message(), node())
    assert reason is None and len(ran) == 1
    monkeypatch.setenv("FEDGPT_NODE_REQUIRE_SECAGG", "true")
    reason, ran = through_mod(train_message(), node())
    assert "refuses a plain train message" in reason and not ran
    # An honest setup stage reaches Flower's SecAgg+ (which answers with its public keys), and a query (the
    # pre-flight: no update in it) reaches the handler; an evaluation does not (tests/test_secagg_roster.py).
    from fedgpt.fed.secagg import secure_aggregation

    reply = secure_aggregation(train_message(SETUP), node(**{"require-secagg": True}), lambda m, c: m)
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
    query = train_instruction(7)
    query.metadata.message_type = MessageType.QUERY
    reason, ran = through_mod(query, node(**{"require-secagg": True}))
    assert reason is None and ran


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["--fed.uplink=int8"], "leave fed.uplink at fp32"),
        (["--fed.uplink=sparse"], "leave fed.uplink at fp32"),  # masks need dense vectors
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
def test_clients_clip_then_secagg_sums_then_the_server_adds_noise_and_moves_the_norm(data_dir, tmp_path):
    # Clients clip to C far below their updates' length; the count of unclipped updates (0 here) travels
    # masked inside each update; the server adds noise to the sum and steps the adaptive norm on the count.
    norm, z, count_noise = 1e-3, 0.2, 0.25
    out = tmp_path / "dp"
    flags = [
        "--dp.clipping=client",
        f"--dp.clipping_norm={norm}",
        f"--dp.noise_multiplier={z}",
        "--dp.delta=1e-3",
    ]
    flags += ["--dp.adaptive_clipping=true", f"--dp.count_noise={count_noise}"]
    flags += ["--fed.weighting=uniform", "--secagg.enabled=true"]
    simulate(data_dir, out, "client_app", "--fed.rounds=1", *flags)
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'init'}"])
    init = FederatedRun(cfg, log=lambda s: None)  # the initial global model every run of this config has
    keys = init.exchange.names
    end = load_checkpoint(out / "last.pt")["model"]
    step = float(torch.cat([(end[k].float() - init.global_state[k]).ravel() for k in keys]).norm())
    values = sum(init.global_state[k].numel() for k in keys)
    # The update's share of the noise: the two queries (std z_u C on the sum, count_noise on the count)
    # compose into one of multiplier z; over the 3 expected clients. Its norm dwarfs the clipped mean (<= C).
    z_update = (z**-2 - count_noise**-2) ** -0.5
    noise = z_update * norm / 3 * values**0.5
    assert noise > 10 * norm and step == pytest.approx(noise, rel=0.03)
    # No update was within C: the norm grows by exp(0.2 x (0.5 - count / 3)), the count's noise 0.25 / 3 in
    # the share (a count of 3, all unclipped, would shrink it by as much).
    row = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()][-1]
    assert 0 < row["dp_epsilon_pld"] <= row["dp_epsilon"]
    assert 0.03 < math.log(row["dp_clipping_norm"] / norm) < 0.17


@pytest.mark.slow
def test_nodes_that_require_secagg_refuse_a_plain_train_message_in_simulation(
    data_dir, tmp_path, monkeypatch
):
    import ray
    from curious_server_app import PlainTrainRun

    if ray.is_initialized():  # the nodes' setting is in the environment Ray's workers start with
        ray.shutdown()
    monkeypatch.setenv("FEDGPT_NODE_REQUIRE_SECAGG", "true")
    replies = {}

    class Curious(PlainTrainRun):
        def run(self, grid):
            # fedgpt's own server finds out in its pre-flight, before any round ...
            with pytest.raises(RuntimeError, match="require SecAgg\\+ .* run with secagg.enabled=true"):
                FederatedRun.run(self, grid)
            # ... and a server that goes on regardless gets nothing
            replies["got"] = super().run(grid)
            return {}

    try:
        simulate(data_dir, tmp_path / "curious", "client_app", "--fed.rounds=1", run_class=Curious)
        assert len(replies["got"]) == 3
        for r in replies["got"]:
            assert r["arrays"] == 0 and "requires SecAgg+" in r["error"], r
    finally:
        ray.shutdown()


def test_the_weight_bound_counts_every_micro_batch(data_dir, tmp_path):
    # SecAgg+ scales each update by weight / max_weight; a ratio above 1 can wrap the protocol's modulus. With
    # fed.weighting=trained and 2 micro-batches a step, a client's weight is the tokens its trainer counted.
    import numpy as np

    from fedgpt.data import Batches
    from fedgpt.model import GPT
    from fedgpt.train import Trainer

    overrides = ["--fed.weighting=trained", "--train.grad_accum_steps=2", "--secagg.enabled=true"]
    cfg = load_config(TINY, [*overrides, f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path}"])
    run = FederatedRun(cfg, log=lambda s: None)
    run.nodes.admit({1: 0}, {1: 10_000})
    trainer = Trainer(GPT(cfg.model), cfg.train, torch.device("cpu"), log=None)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, 10_000)
    trained = trainer.train_steps(
        Batches(tokens, cfg.model.block_size, cfg.train.batch_size), cfg.fed.local_steps
    )
    assert (
        max_weight(run.cfg, run.nodes.train_tokens) == trained["tokens"]
    )  # the largest weight is exactly what a full round trains
