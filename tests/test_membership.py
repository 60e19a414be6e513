"""Membership that changes during a run (fedgpt.fed.membership), on a real loopback deployment: a SuperLink
and SuperNodes as separate processes, `flwr run .` as a user runs it (and the quorum's end on fedgpt's own
server and clients in this process, tests/in_process_grid.py). A node that dies stalls nothing and is marked
gone; restarted, it is the same client again; a duplicate of a partition and a node of another split
are refused and never trained; a SuperLink killed mid-run is restarted and the run resumed, each round
once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY

from fedgpt.bench.loopback import BIN, Deployment

RUN_TIMEOUT = 480  # seconds for one `flwr run`: a safety net, not a speed check


def node_config(
    i: int, data_dir: Path, state: Path, num_partitions: int = 3, partition: int | None = None
) -> str:
    p = i if partition is None else partition
    return f"partition-id={p} num-partitions={num_partitions} data-dir='{data_dir}' state-dir='{state}'"


def three_nodes(data_dir: Path, root: Path, database: Path | None):
    """A SuperLink (its state in `database`, or in memory) and 3 SuperNodes of their own for one test: the
    tests, mostly waiting on Flower's polls and heartbeats, can run side by side in two test processes."""
    dep = Deployment(root / "flwr", database=database)
    dep.start_superlink()
    for i in range(3):
        dep.start_supernode(i, node_config(i, data_dir.resolve(), root / f"state{i}"))
    try:
        yield dep, root
    finally:
        left = dep.stop(grace=5)  # what is still up then is killed, and must be gone
        assert not left, f"processes left after teardown: {left}"


@pytest.fixture
def deployment(data_dir: Path, tmp_path_factory):
    """The SuperLink's state in memory, Flower's default (in the node-death test 9 CPU-s; on SQLite 28)."""
    yield from three_nodes(data_dir, tmp_path_factory.mktemp("membership"), database=None)


@pytest.fixture
def deployment_on_disk(data_dir: Path, tmp_path_factory):
    """The SuperLink's state on disk, as docs/deployment.md says to run one that may be restarted."""
    root = tmp_path_factory.mktemp("membership")
    yield from three_nodes(data_dir, root, database=root / "superlink.db")


def kill(dep: Deployment, name: str) -> None:
    """SIGKILL a process and all it started in its session (as a machine that loses power)."""
    proc = dep.procs[name]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def run_config(data_dir: Path, out: Path, rounds: int, *extra: str) -> str:
    opts = (
        f"fed.num_clients=3 fed.rounds={rounds} fed.local_steps=5 fed.min_clients=2 fed.node_timeout=90 "
        f"train.out_dir={out} data.data_dir={data_dir} " + " ".join(extra)
    )
    return f"config='configs/tiny.yaml' client-threads=1 overrides='{opts}'"


def start_run(dep: Deployment, config: str, resume: bool = False) -> subprocess.Popen:
    """`flwr run . loopback --stream` in the background, its output in a file."""
    home = dep.cli_home()
    log = (dep.root / f"flwr-run-{time.monotonic_ns()}.log").open("wb")
    args = ["run", ".", "loopback", "--stream", "--run-config", config + (" resume=true" if resume else "")]
    proc = subprocess.Popen(
        [str(BIN / "flwr"), *args], cwd=REPO, env=dep.env(home), stdout=log, stderr=subprocess.STDOUT
    )
    proc.log_path = Path(log.name)
    return proc


def rows(out: Path) -> list[dict]:
    path = out / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(
    done, what: str, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT, poll: float = 0.5
) -> None:
    """Wait for `done()` while the run `proc` goes on; `what` names it in the failure."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(poll)


def wait_for_round(out: Path, rnd: int, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> None:
    wait_until(lambda: any(r["round"] == rnd for r in rows(out)), f"round {rnd}", proc, timeout)


def pulled(dep: Deployment, node: int, kind: str) -> int:
    """How many `kind` messages SuperNode `node` has pulled from the SuperLink, by its own log."""
    return (dep.root / f"supernode{node}.log").read_text(errors="replace").count(f"Receiving: {kind} message")


def finish(proc: subprocess.Popen, dep: Deployment) -> str:
    proc.wait(timeout=RUN_TIMEOUT)
    out = proc.log_path.read_text(errors="replace")
    assert proc.returncode == 0, out[-4000:] + dep.logs()
    return out


@pytest.mark.slow
def test_a_node_dies_comes_back_and_duplicates_and_strangers_are_refused(deployment, data_dir: Path):
    dep, root = deployment
    out = root / "out_membership"
    run = start_run(dep, run_config(data_dir.resolve(), out, 6))
    wait_for_round(out, 1, run)
    kill(dep, "supernode2")
    wait_for_round(out, 3, run)  # round 2 waits for Flower to give up on it; round 3 starts without it
    # node 2 comes back with its own node config (a new Flower node id), beside a second node claiming
    # partition 1 and a node of a 4-way split
    dep.start_supernode(2, node_config(2, data_dir.resolve(), root / "state2"))
    dep.start_supernode(3, node_config(3, data_dir.resolve(), root / "state3", partition=1))
    dep.start_supernode(4, node_config(4, data_dir.resolve(), root / "state4", num_partitions=4, partition=3))
    log = finish(run, dep)
    got = rows(out)
    assert [r["round"] for r in got] == list(range(7)), got
    assert got[3]["round_s"] <= 120, got[3]  # the round after the death did not wait for the dead node
    assert [r["clients_ok"] for r in got[5:]] == [3, 3], [(r["round"], r["clients_ok"]) for r in got]
    assert "is held by node" in log and "a duplicate" in log, log[-4000:]
    assert "num-partitions=4 but the run has fed.num_clients=3" in log, log[-4000:]
    events = [json.loads(line) for line in (out / "membership.jsonl").read_text().splitlines()]
    kinds = [(e["event"], e["partition"]) for e in events if e["round"] > 0]
    assert ("gone", 2) in kinds and ("back", 2) in kinds, events
    assert ("refused", 1) in kinds and ("refused", 3) in kinds, events
    # the refused nodes never trained: their state folders hold no client state
    assert not list((root / "state3").rglob("round-*.pt")) and not list((root / "state4").rglob("round-*.pt"))


@pytest.mark.slow
def test_a_killed_superlink_is_restarted_and_the_run_resumed_without_a_round_lost_or_twice(
    deployment_on_disk, data_dir: Path
):
    dep, root = deployment_on_disk
    out = root / "out_resumed"
    run = start_run(dep, run_config(data_dir.resolve(), out, 3))
    wait_for_round(out, 2, run)
    # Killed in round 3 once every node has pulled its round-3 message. A message still queued in the SQLite
    # state is handed out after the restart, for a run that is gone, and Flower 1.42's SuperNode then missed
    # the next run's pre-flight query for over 90 s (seen once in a CI run): fedgpt went on without the node.
    in_round_3 = lambda: min(pulled(dep, i, "train") for i in range(3)) >= 3
    wait_until(in_round_3, "every node's round-3 message", run, poll=0.1)
    kill(dep, "superlink")  # the ServerApp with it
    run.wait(timeout=60)
    assert max(r["round"] for r in rows(out)) == 2  # round 3 did not end
    dep.start_superlink(restart=True)
    log = finish(start_run(dep, run_config(data_dir.resolve(), out, 3), resume=True), dep)
    got = rows(out)
    assert [r["round"] for r in got] == list(range(4)), [r["round"] for r in got]
    # deterministic here (every client every round, no dropout): the same loss as an uninterrupted run of the
    # same config on fedgpt's own server and clients in this process, one torch thread a client as deployed
    assert got[-1]["val_loss"] == uninterrupted(data_dir, root / "out_uninterrupted", 3), log[-3000:]


def uninterrupted(data_dir: Path, out: Path, rounds: int) -> float:
    """The final val loss of run_config's run, uninterrupted, through tests/in_process_grid.py."""
    import torch
    from conftest import as_serverapp
    from in_process_grid import InProcessGrid

    from fedgpt.config import load_config
    from fedgpt.fed.server import FederatedRun

    opts = run_config(data_dir.resolve(), out, rounds).split("overrides='")[1].rstrip("'").split()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        as_serverapp(mp)
        run = FederatedRun(load_config(TINY, [f"--{o}" for o in opts]), client_threads=1, log=lambda s: None)
        run.open_folder()
        try:
            run.run(InProcessGrid(3, data_dir, state_dir=out.parent / "state_uninterrupted"))
        finally:
            torch.set_num_threads(threads)
    return rows(out)[-1]["val_loss"]


class ShrinkingGrid:
    """tests/in_process_grid.py's nodes, of which only the first `alive` stay listed after round `after`."""

    def __init__(self, data_dir: Path, state: Path, after: int, alive: int):
        from in_process_grid import InProcessGrid

        self.grid, self.after, self.alive = InProcessGrid(3, data_dir, state_dir=state), after, alive
        self.trained: list[int] = []  # the round of every train message sent

    def get_node_ids(self) -> list[int]:
        nodes = self.grid.get_node_ids()
        return nodes[: self.alive] if self.trained and max(self.trained) >= self.after else nodes

    def push_messages(self, messages):
        messages = list(messages)
        self.trained += [
            int(m.content["config"]["work.round"])
            for m in messages
            if "config" in m.content and "work.round" in m.content["config"]
        ]
        return self.grid.push_messages(messages)

    def __getattr__(self, name):
        return getattr(self.grid, name)


@pytest.mark.usefixtures("serverapp_identity")
def test_below_the_quorum_a_run_waits_then_stops_after_its_last_checkpoint_and_resumes(data_dir, tmp_path):
    from fedgpt.checkpoint import load_checkpoint
    from fedgpt.config import load_config
    from fedgpt.fed.server import FederatedRun

    out, lines = tmp_path / "run", []
    args = [f"--data.data_dir={data_dir}", f"--train.out_dir={out}", "--fed.rounds=4", "--fed.min_clients=2"]
    cfg = load_config(TINY, [*args, "--fed.node_timeout=2"])
    run = FederatedRun(cfg, log=lines.append)
    run.open_folder()
    grid = ShrinkingGrid(data_dir, tmp_path / "state", after=2, alive=1)  # 1 of 3 nodes left after round 2
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"round 3: 1 of the 2 nodes a round needs \(fed.min_clients\)"):
        run.run(grid)
    assert time.monotonic() - t0 < 60  # it waited fed.node_timeout, not forever
    assert "round 3: waiting for nodes: 1 of 2 connected" in lines, lines
    assert [r["round"] for r in rows(out)] == [0, 1, 2] and load_checkpoint(out / "last.pt")["round"] == 2
    gone = [json.loads(line) for line in (out / "membership.jsonl").read_text().splitlines()]
    assert sorted(e["partition"] for e in gone if e["event"] == "gone") == [1, 2]
    # the nodes back, the run resumes from last.pt: rounds 3 and 4, each once
    resumed = FederatedRun(load_config(TINY, args), resume=True, log=lines.append)
    resumed.open_folder()
    from in_process_grid import InProcessGrid

    resumed.run(InProcessGrid(3, data_dir, state_dir=tmp_path / "state"))
    assert [r["round"] for r in rows(out)] == [0, 1, 2, 3, 4]
