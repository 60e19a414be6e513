"""Bad updates are refused, counted, and never averaged.

Hand-built train replies (NaN, inf, an array of another shape or dtype, a record of another format or block, a
weight that is not a finite number above 0) reach the server's aggregation beside one good reply: the global
model moves by the good update alone (FedAvg of one reply is that reply; under DP its clipped update over the
expected cohort), and each bad one is refused and logged by node. On fedgpt's own server and clients
(tests/in_process_grid.py), a node that sends NaN every round is counted in rounds.jsonl while the rounds go
on.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, train_instruction
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from in_process_grid import InProcessGrid

from fedgpt.config import load_config
from fedgpt.fed.rounds import read_rounds
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.wire import CODES, FLAT, HEADER, SCALES

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def tiny_run(data_dir, out, *overrides: str, lines=None) -> FederatedRun:
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={out}", *overrides])
    run = FederatedRun(cfg, log=lines.append if lines is not None else print)
    run.nodes.admit({n: n - 1 for n in range(1, 9)})
    return run


def reply(node: int, arrays: ArrayRecord, weight: float = 10) -> Message:
    metrics = {"num-examples": weight, "train-tokens": 10, "train-loss": 2.0, "train-seconds": 1.0}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=train_instruction(node))


def with_array(record: ArrayRecord, name: str, value: torch.Tensor) -> ArrayRecord:
    arrays = {k: torch.from_numpy(record[k].numpy().copy()) for k in record}
    return ArrayRecord({**arrays, name: value})


def bad_replies(run: FederatedRun, sent: ArrayRecord, update: torch.Tensor) -> dict[int, Message]:
    """Node 1's reply is good; nodes 2 on are each bad in one way."""
    up = lambda u: run.exchange.uplink(u, sent)[0]
    nan, inf = update.clone(), update.clone()
    nan[7], inf[-1] = math.nan, -math.inf
    good = up(update)
    return {
        1: reply(1, good),
        2: reply(2, up(nan)),
        3: reply(3, up(inf)),
        4: reply(4, with_array(good, FLAT, torch.cat([update, update[:3]]))),  # the header says n values
        5: reply(5, with_array(good, FLAT, update.double())),  # float64 where float32 was sent
        6: reply(6, with_array(good, FLAT, update.view(-1, 1))),  # (n, 1), not (n,)
        7: reply(7, good, weight=math.nan),  # a weight that would make the average NaN
        8: reply(8, good, weight=-5.0),
    }


@pytest.mark.parametrize("dp", [False, True])
def test_bad_updates_are_refused_before_anything_is_averaged_or_clipped(data_dir, tmp_path, dp):
    extra = ["--fed.weighting=uniform", "--dp.noise_multiplier=1e-9", "--dp.clipping_norm=0.1"] if dp else []
    lines = []
    run = tiny_run(data_dir, tmp_path, "--fed.num_clients=8", "--dp.delta=1e-3", *extra, lines=lines)
    before = run.exchange.flatten(run.global_state)
    sent = run.exchange.downlink(run.global_state, base_id=7)
    torch.manual_seed(0)
    update = 1e-2 * torch.randn(run.exchange.size)
    replies = bad_replies(run, sent, update)
    if dp:
        run.dp.charge()
    ok, _ = run.aggregate(1, list(replies.values()), sent, run.exchange)
    assert [r.metadata.src_node_id for r in ok] == [1] and run.refused == 7
    step = run.exchange.flatten(run.global_state) - before
    assert bool(torch.isfinite(step).all())
    if dp:  # the good update clipped to 0.1, over the expected cohort of 8 (noise of std 1e-10 / 8)
        expected = update * (0.1 / float(update.norm())) / 8
        assert float(update.norm()) > 1 and torch.allclose(step, expected, atol=1e-6)
    else:  # FedAvg of one reply: its update
        assert torch.allclose(step, update, atol=1e-7)
    for node in range(2, 9):
        assert any(f"update of node {node} refused" in line for line in lines), node
    said = "\n".join(lines)
    assert "NaN or inf" in said and "flat: ('float64'" in said and "num-examples=nan" in said


def test_a_quantized_update_of_another_block_or_dtype_is_refused(data_dir, tmp_path):
    lines = []
    run = tiny_run(data_dir, tmp_path, "--fed.uplink=int8", lines=lines)
    sent = run.exchange.downlink(run.global_state, base_id=3)
    update = 1e-2 * torch.randn(run.exchange.size)
    good = run.exchange.uplink(update, sent)[0]
    header = torch.from_numpy(good[HEADER].numpy().copy())
    header[2] = 16  # blocks of 16: as many scales as that takes, so only the block differs
    n = run.exchange.size
    reblocked = with_array(with_array(good, HEADER, header), SCALES, torch.ones(-(-n // 16)))
    replies = [
        reply(1, good),
        reply(2, with_array(good, CODES, torch.from_numpy(good[CODES].numpy()).to(torch.int16))),
        reply(3, reblocked),
        reply(4, with_array(good, SCALES, torch.full_like(torch.from_numpy(good[SCALES].numpy()), math.inf))),
    ]
    ok, _ = run.aggregate(1, replies, sent, run.exchange)
    assert [r.metadata.src_node_id for r in ok] == [1] and run.refused == 3
    assert bool(torch.isfinite(run.exchange.flatten(run.global_state)).all())


def test_a_node_that_sends_nan_every_round_is_refused_and_counted_while_the_rounds_go_on(data_dir, tmp_path):
    def poison(kind, node, msg):
        if kind == "train" and node == 102:
            arrays = msg.content["arrays"]
            flat = torch.from_numpy(arrays[FLAT].numpy().copy())
            flat[::2] = math.nan
            msg.content["arrays"] = with_array(arrays, FLAT, flat)
        return msg

    out = tmp_path / "run"
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={out}"])
    lines = []
    run = FederatedRun(cfg, log=lines.append)
    run.open_folder()
    run.run(InProcessGrid(3, data_dir, tamper=poison))
    rows = read_rounds(out / "rounds.jsonl")
    assert [(r.clients_ok, r.clients_failed, r.clients_refused) for r in rows[1:]] == [(2, 0, 1), (2, 0, 1)]
    assert all(math.isfinite(r.val_loss) for r in rows)
    assert sum("update of node 102 refused" in line for line in lines) == 2
    assert any("2 ok 0 failed 1 refused" in line for line in lines)
