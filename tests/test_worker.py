"""A node's warm trainer (fedgpt.fed.relay, fedgpt.fed.worker): real worker processes over their real socket,
against fedgpt.fed.client in this process. It answers as the client does; killed between rounds or with a
message in flight, the next message starts a new one and the rounds end as an uninterrupted run's; it ends
with the process it watches; it refuses a folder other users may enter; the relay imports no torch."""

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
from conftest import REPO, TINY, fit_in_process

from fedgpt.config import load_config
from fedgpt.fed import client
from fedgpt.fed.relay import WorkerClient
from fedgpt.fed.server import FederatedRun
from fedgpt.fed.worker import alive

pytestmark = pytest.mark.slow  # each worker imports torch and loads the node's data


@pytest.fixture
def supernode():
    """A stand-in for the SuperNode a worker watches."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def tiny_run(data_dir: Path, tmp_path: Path, *overrides: str) -> FederatedRun:
    cfg = load_config(
        TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'run'}", *overrides]
    )
    return FederatedRun(cfg, log=lambda s: None)


def workers(tmp_path: Path) -> Path:
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def worker_pid(folder: Path) -> int:
    """The pid a worker's log says it listens with."""
    for log in folder.glob("*.log"):
        for line in log.read_text().splitlines():
            if line.startswith("fedgpt worker ") and "listening" in line:
                pid = int(line.split()[2])
    return pid


def test_a_killed_worker_is_replaced_and_the_rounds_end_as_an_uninterrupted_run(
    data_dir, tmp_path, supernode
):
    # Clients keep their AdamW state (in files, fedgpt.fed.client_state): a new worker must read it back.
    overrides = ["--fed.client_optimizer=keep", "--fed.rounds=3", "--fed.local_steps=200"]
    reference_run = tiny_run(data_dir, tmp_path / "a", *overrides)
    client._CACHE.clear()
    reference = [fit_in_process(reference_run, rnd) for rnd in (1, 2, 3)]  # in this process, uninterrupted

    run = tiny_run(data_dir, tmp_path / "b", *overrides)
    folder = workers(tmp_path)
    worker = WorkerClient(folder, node_id=1, run_id=1, idle_timeout=120, watch_pid=supernode.pid)
    got = [fit_in_process(run, 1, via=worker)]
    first = worker_pid(folder)
    os.kill(first, signal.SIGKILL)  # between rounds
    got.append(fit_in_process(run, 2, via=worker))
    second = worker_pid(folder)
    assert second != first
    # with round 3 in flight (its 200 steps take a second or more): the relay asks a new worker again
    threading.Timer(0.3, os.kill, (second, signal.SIGKILL)).start()
    got.append(fit_in_process(run, 3, via=worker))
    assert worker_pid(folder) not in (first, second)
    for a, b in zip(got, reference, strict=True):
        assert torch.equal(a, b)


def test_the_worker_ends_with_its_supernode_and_refuses_an_open_folder(data_dir, tmp_path, supernode):
    run = tiny_run(data_dir, tmp_path)
    folder = workers(tmp_path)
    worker = WorkerClient(folder, node_id=2, run_id=1, idle_timeout=120, watch_pid=supernode.pid)
    fit_in_process(run, 1, via=worker)
    pid = worker_pid(folder)
    supernode.kill()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:  # ended (a zombie here: this test is its parent)
        time.sleep(0.1)
    assert not alive(pid), "the worker outlived its SuperNode"
    assert not list(folder.glob("*.sock"))
    # a folder other users may enter is refused, by the relay and by the worker itself
    folder.chmod(0o755)
    with pytest.raises(PermissionError, match="not a private folder"):
        from fedgpt.fed.relay import check_private

        check_private(folder)
    res = subprocess.run(
        [sys.executable, "-m", "fedgpt.fed.worker", "--socket", str(folder / "x.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "not a private folder" in res.stderr and not (folder / "x.sock").exists()


def test_the_relay_refuses_a_state_dir_others_may_write_and_never_follows_a_lock_link(tmp_path):
    from flwr.app import Context, RecordDict

    from fedgpt.fed.relay import worker_folder

    def context(state_dir: Path) -> Context:
        return Context(
            1, 3, {"partition-id": 0, "num-partitions": 3, "state-dir": str(state_dir)}, RecordDict(), {}
        )

    # a state-dir others may write to (they could swap its workers/ for theirs), or that another user owns
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    with pytest.raises(PermissionError, match="not a private folder"):
        worker_folder(context(open_dir))
    assert not (open_dir / "workers").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)  # nobody's (the tests run as root here; elsewhere this raises)
    with pytest.raises(PermissionError, match="not a private folder"):
        worker_folder(context(theirs))
    # a planted link where the relay locks: refused, and the file it points to is left as it was
    folder = worker_folder(context(tmp_path / "mine"))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / "node-3-run-1.lock").symlink_to(victim)
    with pytest.raises(OSError):
        WorkerClient(folder, node_id=3, run_id=1).connect()
    assert victim.read_text() == "keep me"


RELAY = """
import json, sys
sys.argv[0] = "flwr-clientapp"  # as Flower starts a deployment's ClientApp process
from flwr.app import ConfigRecord, Context, RecordDict
import client_app
from fedgpt.fed import relay
facts, state_dir, data_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
node = {"partition-id": 0, "num-partitions": 3, "state-dir": state_dir, "data-dir": data_dir}
context = Context(1, 3, node, RecordDict(), {})
reply = relay.handle("query", RecordDict({"config": ConfigRecord(facts)}), context, run_id=7)
server_side = ["fedgpt.config", "fedgpt.fed.secagg_server", "fedgpt.fed.server", "yaml"]
loaded = {"torch": "torch" in sys.modules, "server side": [m for m in server_side if m in sys.modules]}
print(json.dumps({"info": dict(reply["info"]), **loaded}))
"""


def test_the_relay_answers_a_query_through_the_worker_without_torch(data_dir, tmp_path):
    run = tiny_run(data_dir, tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", RELAY, json.dumps(run.run_facts()), str(tmp_path / "node"), str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["info"]["partition-id"] == 0 and out["info"]["train-tokens"] > 0
    assert out["torch"] is False  # the worker imported it, not the relay
    assert out["server side"] == []  # nor the ServerApp's half of SecAgg+, fedgpt's config or YAML
    (sock,) = (tmp_path / "node" / "workers").glob("node-3-run-7.sock")
    subprocess.run([sys.executable, "-m", "fedgpt.fed.worker", "--stop", str(sock)], check=True, timeout=60)
