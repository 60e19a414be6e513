"""Federation on real Flower and Ray with the tiny model: aggregation, wire format, FedProx, failing clients,
resume after a kill, and bad input. Simulations run in this process (simulate.main / simulate.simulate) or
as
`python simulate.py` subprocesses where exit codes, stderr or a kill are under test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, backend_config, fit_in_process, simulate, train_instruction
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from test_strategies import Grid

from fedgpt.checkpoint import load_checkpoint
from fedgpt.config import load_config
from fedgpt.fed import simulation
from fedgpt.fed.rounds import RoundRow
from fedgpt.fed.server import FederatedRun
from fedgpt.rundir import claim_run_dir
from simulate import main as simulate_main

ENV = dict(os.environ)  # conftest keeps Flower offline and quiet in this process and its children
ROUND_FIELDS = {
    "round",
    "val_loss",
    "train_loss",
    "clients_ok",
    "clients_failed",
    "bytes_sent",
    "bytes_received",
    "round_s",
}


def tiny_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), f"--data.data_dir={data_dir}", f"--train.out_dir={out_dir}", *extra]


def tiny_run(data_dir: Path, out_dir: Path, *overrides: str) -> FederatedRun:
    return FederatedRun(
        load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={out_dir}", *overrides]),
        log=print,
    )


def rounds(out_dir: Path) -> list[dict]:
    """rows of rounds.jsonl; a line still being written is left out."""
    path = out_dir / "rounds.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a `python simulate.py` started with start_new_session=True and its Ray
    daemons)."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True, check=True
    ).stdout
    return [
        int(pid)
        for pid, s, stat in (line.split()[:3] for line in out.splitlines())
        if int(s) == sid and not stat.startswith("Z")
    ]


def kill_session(sid: int, grace: float = 10.0) -> list[int]:
    """SIGKILL what is left of session `sid`; returns the pids that outlived `grace` seconds."""
    deadline = time.monotonic() + grace
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return session_pids(sid)


pytestmark = pytest.mark.usefixtures("no_ray_left")


@pytest.fixture(scope="module")
def fedavg_out(data_dir, tmp_path_factory) -> Path:
    """A 3-client, 2-round FedAvg simulation of the tiny model through `simulate.main`."""
    out = tmp_path_factory.mktemp("fedavg")
    summary = simulate_main(tiny_args(data_dir, out))
    assert summary["rounds"] == 2
    return out


# --- aggregation and wire format, no simulation
# --------------------------------------------------------------------


def train_reply(node: int, arrays: ArrayRecord, tokens: int, loss: float) -> Message:
    """A client's train reply as it reaches the ServerApp."""
    metrics = MetricRecord(
        {
            "num-examples": tokens,
            "train-tokens": tokens,
            "train-loss": loss,
            "train-seconds": 1.0,
            "train-start": 0.0,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=train_instruction(node))


def test_fedavg_is_token_weighted_mean(data_dir, tmp_path):
    run = tiny_run(data_dir, tmp_path)
    ex, start = run.exchange, run.exchange.flatten(run.global_state)
    sent = ex.downlink(run.global_state, base_id=1)
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(ex.size, generator=g) for _ in range(3)]
    tokens = [128, 384, 1024]
    replies = [
        train_reply(n, ex.uplink(u, sent)[0], t, 4.0) for n, u, t in zip((11, 12, 13), updates, tokens)
    ]
    failed = Message(
        Error(code=0, reason="Traceback ...\nRuntimeError: out of memory"), reply_to=train_instruction(14)
    )
    run.nodes.admit({11: 2, 12: 0, 13: 1, 14: 3})
    received = sum(r.content["arrays"].count_bytes() for r in replies)

    ok, nbytes = run.aggregate(1, [replies[2], failed, replies[0], replies[1]], sent, run.exchange)

    assert len(ok) == 3 and nbytes == received
    assert [r.metadata.src_node_id for r in ok] == [12, 13, 11]  # by partition id, whatever the arrival order
    expected = start + sum(t * u for t, u in zip(tokens, updates)) / sum(tokens)
    torch.testing.assert_close(ex.flatten(run.global_state), expected, rtol=1e-6, atol=1e-6)
    assert all(v.dtype == torch.float32 for v in run.global_state.values())
    assert torch.equal(run.global_state["lm_head.weight"], run.global_state["transformer.wte.weight"])
    # Another arrival order gives the same bits: the sums run in partition order.
    first, run.global_state = run.global_state, ex.unflatten(start)
    replies = [
        train_reply(n, ex.uplink(u, sent)[0], t, 4.0) for n, u, t in zip((11, 12, 13), updates, tokens)
    ]
    run.aggregate(1, [replies[1], replies[0], replies[2]], sent, run.exchange)
    assert all(torch.equal(first[k], run.global_state[k]) for k in first)


def test_aggregate_keeps_global_model_when_all_clients_fail(data_dir, tmp_path):
    run = tiny_run(data_dir, tmp_path)
    before = {k: v.clone() for k, v in run.global_state.items()}
    failed = [Message(Error(code=0, reason="boom"), reply_to=train_instruction(n)) for n in (1, 2)]
    assert run.aggregate(1, failed, run.exchange.downlink(before, base_id=1), run.exchange) == ([], 0)
    assert all(torch.equal(before[k], run.global_state[k]) for k in before)


def test_diloco_stays_put_when_clients_change_nothing_over_an_fp16_downlink(
    data_dir, tmp_path, serverapp_identity
):
    # Clients that train from the fp16-rounded weights and change nothing send a zero update; the global model
    # (and DiLoCo's momentum) must not move. Taking their weights for their work, it moved by the rounding.
    run = tiny_run(data_dir, tmp_path, "--fed.downlink=fp16", "--fed.strategy=diloco")
    before = {k: v.clone() for k, v in run.global_state.items()}
    run.nodes.admit({1: 0, 2: 1, 3: 2})
    for rnd in (1, 2):
        run.strategy.configure_train(
            rnd, run.exchange.per_tensor(run.global_state), ConfigRecord(), Grid([1, 2, 3])
        )
        sent = run.exchange.downlink(run.global_state, base_id=rnd)
        received = run.exchange.read_downlink(sent)
        assert any(not torch.equal(received[k], before[k]) for k in before)  # the downlink is rounded
        zero = run.exchange.difference(received, received)
        replies = [train_reply(n, run.exchange.uplink(zero, sent)[0], 10, 4.0) for n in (1, 2, 3)]
        run.aggregate(rnd, replies, sent, run.exchange)
    # FedAvg's float sum of three equal weights may differ from them in the last bit; the downlink's rounding
    # is thousands of times that (2^-11 of a weight)
    moved = max(float((before[k] - run.global_state[k]).abs().max()) for k in before)
    rounding = max(float((received[k] - before[k]).abs().max()) for k in before)
    assert moved < 1e-3 * rounding, (moved, rounding)


def test_a_clients_round_with_dropout_does_not_depend_on_the_process_random_state(data_dir, tmp_path):
    """A client's dropout masks are seeded by its partition and the round (fedgpt.fed.client.round_batches),
    so a resumed run's clients, in processes whose random state is anything, train as an uninterrupted run's
    did. With dropout the masks decide the update."""
    run = tiny_run(data_dir, tmp_path, "--model.dropout=0.2", "--fed.client_optimizer=reset")
    torch.manual_seed(1)
    first = fit_in_process(run, rnd=1)
    torch.manual_seed(2)
    assert torch.equal(fit_in_process(run, rnd=1), first)


def test_round_is_evaluated_and_saved_as_it_ended(data_dir, tmp_path):
    # finish_round runs while the next round trains: it must score and save its snapshot, not the run as it is
    # now.
    run = tiny_run(data_dir, tmp_path)
    snap = run.snapshot()
    expected = run.evaluator.evaluate(snap.state)["loss"]
    run.global_state = {
        k: torch.zeros_like(v) for k, v in run.global_state.items()
    }  # the next round's aggregate
    run.round, run.tokens = 1, 999

    row = run.finish_round(snap, RoundRow(0))

    assert row.val_loss == expected and rounds(tmp_path) == [row.as_dict()]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["round"], ckpt["val_loss"], ckpt["extra"]["tokens"]) == (0, expected, 0)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in snap.state.items())


# --- simulations
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_simulation_trains_and_writes_run(fedavg_out):
    rows = rounds(fedavg_out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["val_loss"] < rows[0]["val_loss"]
    for r in rows[1:]:
        assert ROUND_FIELDS <= set(r), ROUND_FIELDS - set(r)
        assert (r["clients_ok"], r["clients_failed"]) == (3, 0)
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["round_s"] > 0
    for name in ("last.pt", "best.pt", "loss.png", "partition.json"):
        assert (fedavg_out / name).is_file(), name
    assert load_checkpoint(fedavg_out / "last.pt")["round"] == 2
    assert json.loads((fedavg_out / "partition.json").read_text())["num_clients"] == 3
    # once round 2 is checkpointed, each client keeps only its round-2 state: what a resume needs
    (states,) = (fedavg_out / "client_state").iterdir()
    assert sorted(p.name for p in states.iterdir()) == [f"partition-{i}" for i in range(3)]
    assert all([f.name for f in p.iterdir()] == ["round-2.pt"] for p in states.iterdir())
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgpt.sample",
            "--checkpoint",
            str(fedavg_out / "best.pt"),
            "--max-new-tokens",
            "20",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip(), "fedgpt.sample printed nothing"


@pytest.mark.slow
def test_overlapped_evaluation_matches_a_run_that_ends_there(fedavg_out, data_dir, tmp_path):
    # In the 2-round run, round 1 was evaluated while round 2 trained; a 1-round run evaluates it with nothing
    # beside. Its clients' learning-rate schedule must be the 2-round run's (2 rounds x 5 local steps).
    simulate_main(tiny_args(data_dir, tmp_path, "--rounds", "1", "--train.lr_decay_steps=10"))
    one, two = rounds(tmp_path), rounds(fedavg_out)
    assert [r["val_loss"] for r in one] == [r["val_loss"] for r in two[:2]]
    assert load_checkpoint(tmp_path / "last.pt")["val_loss"] == one[1]["val_loss"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own CPU priority is Linux's")
def test_central_evaluation_yields_the_cpu_and_the_round_loop_keeps_it(data_dir, tmp_path):
    # A ServerApp sharing cores with SuperNodes or Ray's actors evaluates at a lower priority (nice +10), so
    # that the clients' work goes first; the thread that drives the rounds keeps the process's priority.
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: dict[str, set[int]] = {"loop": set(), "evaluation": set()}

    class Recording(FederatedRun):
        def run_round(self, grid, rnd):
            seen["loop"].add(nice())
            return super().run_round(grid, rnd)

        def finish_round(self, snap, row):
            seen["evaluation"].add(nice())
            return super().finish_round(snap, row)

    base = os.getpriority(os.PRIO_PROCESS, 0)
    simulate(data_dir, tmp_path, "client_app", "--fed.rounds=2", run_class=Recording)
    assert seen == {"loop": {base}, "evaluation": {min(19, base + 10)}}
    assert nice() == base  # this thread (and so the next simulation's) untouched


@pytest.mark.slow
def test_node_with_another_corpus_fails_preflight(data_dir, small_corpus, tmp_path, monkeypatch):
    import client_app

    # the nodes' own settings (as a SuperNode's --node-config corpus-file would): another text than the run's
    monkeypatch.setenv("FEDGPT_NODE_CORPUS_FILE", str(small_corpus))  # Ray's workers inherit it
    monkeypatch.setenv("FEDGPT_NODE_DATA_DIR", str(small_corpus.parent))
    out = tmp_path / "run"
    with pytest.raises(
        RuntimeError, match=r"pre-flight check failed: .*corpus and tokenizer .* differ from the server's"
    ):
        simulation.simulate(tiny_run(data_dir, out), client_app.app, 3, backend_config())
    assert rounds(out) == [] and not (out / "last.pt").exists()


@pytest.mark.slow
def test_too_few_nodes_fail_clearly(data_dir, tmp_path):
    import client_app

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="only 2 of 3 nodes connected after 5 s"):
        simulation.simulate(
            tiny_run(data_dir, tmp_path, "--fed.node_timeout=5"), client_app.app, 2, backend_config()
        )
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_resume_after_kill_ends_as_an_uninterrupted_run(data_dir, tmp_path):
    # DiLoCo with kept client state: the strategy's momentum and every client's AdamW state come back too.
    # The runs start a Ray of their own (ENV has no RAY_ADDRESS) beside the session's cluster (conftest),
    # as two runs on one machine do: none may join the other's Ray.
    assert "RAY_ADDRESS" not in ENV and os.environ.get("RAY_ADDRESS")
    out = tmp_path / "run"
    cmd = [sys.executable, "simulate.py", *tiny_args(data_dir, out, "--fed.rounds=4", "--strategy", "diloco")]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while not any(r["round"] >= 2 for r in rounds(out)):
            assert proc.poll() is None, (
                "the run ended before round 2:\n" + (tmp_path / "killed.log").read_text()[-3000:]
            )
            assert time.monotonic() < deadline, "no round 2 after 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: Ray's daemons and actors too
        proc.wait(timeout=30)
    finally:
        left = kill_session(proc.pid)
    assert not left, f"processes of the killed run still alive: {left}"
    # A round's row is written just before its checkpoint: k >= 1.
    k = load_checkpoint(out / "last.pt")["round"]
    assert 1 <= k < 4, f"last.pt is from round {k}: killed too late to test a resume"
    before = (out / "rounds.jsonl").read_text()

    # Another model config: one clear line, before any round, nothing written (on the session's cluster: the
    # refusal needs no Ray of its own).
    bad = subprocess.run(
        [*cmd, "--resume", "--model.n_embd=64"],
        cwd=REPO,
        env={**ENV, "RAY_ADDRESS": os.environ["RAY_ADDRESS"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: ")
    assert "was written with another config" in bad.stderr and "model.n_embd: 32 -> 64" in bad.stderr
    assert "Traceback" not in bad.stderr and "run_simulation" not in bad.stdout + bad.stderr
    assert (out / "rounds.jsonl").read_text() == before

    proc = subprocess.Popen(
        [*cmd, "--resume"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        left = kill_session(proc.pid)
    assert proc.returncode == 0, output[-3000:]
    assert f"resumed from {out / 'last.pt'} at round {k}" in output
    assert [r["round"] for r in rounds(out)] == list(range(5))
    assert load_checkpoint(out / "last.pt")["round"] == 4
    assert not left, f"Ray processes left after a finished run: {left}"

    # the uninterrupted run joins the session's cluster: no Ray start of its own
    straight = tmp_path / "straight"
    res = subprocess.run(
        [
            sys.executable,
            "simulate.py",
            *tiny_args(data_dir, straight, "--fed.rounds=4", "--strategy", "diloco"),
        ],
        cwd=REPO,
        env={**ENV, "RAY_ADDRESS": os.environ["RAY_ADDRESS"]},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert [r["val_loss"] for r in rounds(out)] == [r["val_loss"] for r in rounds(straight)]
    resumed, uninterrupted = load_checkpoint(out / "last.pt"), load_checkpoint(straight / "last.pt")
    assert all(torch.equal(resumed["model"][k], v) for k, v in uninterrupted["model"].items())
    momentum = uninterrupted["extra"]["strategy"]["buffer"]
    assert all(torch.equal(resumed["extra"]["strategy"]["buffer"][k], v) for k, v in momentum.items())


# --- bad input: `python simulate.py` fails with one line before any round
# ------------------------------------------------

BAD_INPUT = {
    "strategy flag": (["--strategy", "foo"], "argument --strategy: invalid choice: 'foo'"),
    "strategy key": (["--fed.strategy=foo"], "fed.strategy: 'foo' is not one of"),
    "partition": (["--fed.partition=foo"], "fed.partition: 'foo' is not one of"),
    "too many clients": (
        ["--num-clients", "600000"],
        "600000 clients need at least 2 tokens each, and the train split has 1,003,854",
    ),
    "negative mu": (["--mu", "-1"], "fed.proximal_mu: must be >= 0"),
    "non-numeric mu": (["--fed.proximal_mu=abc"], "fed.proximal_mu: expected float, got str 'abc'"),
    "folder of another run": ([], "holds a local_train run"),
    "context no data fills": (["--model.block_size=999999"], "model.block_size=999999 is longer than"),
}


def test_bad_input_fails_before_any_round(data_dir, tmp_path):
    """Every BAD_INPUT case at once (each spends its seconds importing torch and flwr), in one test: as
    parametrized cases they shared a module fixture that the suite's test processes each ran again."""
    taken = tmp_path / "folder_of_another_run"  # a local trainer's run of the same config already holds it
    claim_run_dir(
        taken,
        "local_train",
        load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={taken}"]).to_dict(),
        resume=False,
        overwrite=False,
    )
    t0 = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "simulate.py", *tiny_args(data_dir, tmp_path / name.replace(" ", "_"), *args)],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in BAD_INPUT.items()
    }
    wrong = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        lines = stderr.strip().splitlines() or [""]
        if case == "strategy flag":  # argparse: usage, then the error
            shape = lines[-1].startswith("python simulate.py: error: ")
        else:
            shape = lines == [lines[-1]] and lines[-1].startswith("error: ")
        if not (
            proc.returncode != 0
            and "Traceback" not in stderr
            and BAD_INPUT[case][1] in lines[-1]
            and shape
            # before the simulation: run_simulation warns as it starts, the ServerApp logs while it waits
            and "run_simulation" not in stderr
            and "waiting for nodes" not in stdout
        ):
            wrong[case] = (proc.returncode, stderr[-1500:])
    assert not wrong, wrong
    assert time.monotonic() - t0 < 120
