"""Shared fixtures: offline copies of the corpus and the GPT-2 BPE, tiny configs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

# One thread per process: tiny models gain nothing from more, and test processes share the machine's cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
# A SuperNode's SuperExec looks for a message to start a ClientApp for once a second (Flower's one poll that
# can be set, docs/deployment.md): the deployments of the suite look every 0.1 s, as a user may.
os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
# ../shared holds pre-seeded copies of what fedgpt downloads (the build machines are offline).
SHARED = Path(os.environ.get("FEDGPT_SHARED", REPO.parent / "shared"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line(
        "markers", "slow: starts Ray, torchrun or Flower processes, or takes more than ~20 s (README, Test)"
    )
    if "TIKTOKEN_CACHE_DIR" not in os.environ and TIKTOKEN_CACHE.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_GPT = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16}  # the tests' model shape (STYLE.md)


def tiny_gpt(vocab_size: int = 65, seed: int = 0, **fields):
    """The tests' tiny GPT, its weights drawn from `seed`: TINY_GPT over `vocab_size` tokens (65: Tiny
    Shakespeare's characters); `fields` set or change other ModelConfig fields (arch, dropout, bias, ...)."""
    import torch

    from fedgpt.config import ModelConfig
    from fedgpt.model import GPT

    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY_GPT, "vocab_size": vocab_size, **fields}))


@pytest.fixture(scope="session")
def shakespeare_file() -> Path:
    """Path of the Tiny Shakespeare corpus, as the download step would have written it."""
    seeded = REPO / "data" / "tinyshakespeare" / "input.txt"
    if not seeded.is_file():
        if not SHAKESPEARE.is_file():
            pytest.fail(
                f"Tiny Shakespeare not found at {seeded} or {SHAKESPEARE}: run .ci/run or download it"
            )
        seeded.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHAKESPEARE, seeded)
    return seeded


@pytest.fixture(scope="session")
def data_dir(shakespeare_file: Path) -> Path:
    """The repo's data/ directory with the corpus in place (encoded caches are shared between tests)."""
    return shakespeare_file.parent.parent


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A ~20 kB UTF-8 corpus in Shakespeare's speaker format, in a fresh directory."""
    text = (
        SHAKESPEARE.read_text(encoding="utf-8")[:20000]
        if SHAKESPEARE.is_file()
        else "ALICE:\nhello there.\n\nBOB:\nhi.\n\n" * 700
    )
    p = tmp_path / "small.txt"
    p.write_text(text, encoding="utf-8")
    return p


def run_concurrently(
    cmds: dict[str, list[str]], env: dict[str, str], timeout: float = 300
) -> dict[str, subprocess.CompletedProcess]:
    """Run commands at once from the repo root (each is mostly interpreter start-up) and collect their
    results."""
    procs = {
        k: subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, c in cmds.items()
    }
    out = {}
    try:
        for k, p in procs.items():
            stdout, stderr = p.communicate(timeout=timeout)
            out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return out


def copy_run_folder(src: Path, dst: Path) -> None:
    """Copy a run folder while the run goes on, as a kill at that moment would leave it. A recorder thread may
    rename a temp file into place meanwhile (the copy then fails on the vanished file): copy again, a moment
    later, which is as good a moment for a kill."""
    for _ in range(20):
        try:
            shutil.copytree(src, dst)
            return
        except (shutil.Error, FileNotFoundError):
            shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def train_instruction(node: int):
    """A TRAIN message to `node` as the SuperLink stamps it, for replies that reach a strategy as from `node`
    (outside a ServerApp, Message() has no run to take ids from)."""
    import time

    from flwr.app import DEFAULT_TTL, Message, MessageType, Metadata, RecordDict

    meta = Metadata(
        run_id=1,
        message_id=f"train-{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return Message(RecordDict(), metadata=meta)


def backend_config() -> dict:
    """What simulate.py passes on a CPU machine: one CPU per client, as many clients at once as cores."""
    from fedgpt.fed import simulation

    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": simulation.ray_init_args()}


def simulate(
    data_dir: Path,
    out: Path,
    app: str = "client_app",
    *overrides: str,
    resume: bool = False,
    run_class: type | None = None,
) -> dict:
    """A tiny federation (configs/tiny.yaml: 3 clients) in this process, on real Ray, with the ClientApp of
    module `app` and a FederatedRun (or `run_class`, a subclass) as the server; its summary."""
    import importlib

    from fedgpt.config import load_config
    from fedgpt.fed import simulation
    from fedgpt.fed.server import FederatedRun

    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={out}", *overrides])
    run = (run_class or FederatedRun)(cfg, resume=resume, log=print)
    run.open_folder()
    return simulation.simulate(run, importlib.import_module(app).app, cfg.fed.num_clients, backend_config())


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One Ray cluster (`ray start --head`) that every simulation of the session joins through $RAY_ADDRESS,
    as a user's --ray-address would: each run skips Ray's own start (5-20 s on 2 busy cores) but still gets
    its own job, workers and actors. One CPU: a simulation's clients take turns on one actor (each actor
    imports torch, ~3 s of a core, and tiny clients train in milliseconds), and the suite's two test processes
    (pyproject's `-n 3`) each have a Ray of their own. Its processes carry a marker and are stopped when the
    session ends."""
    import socket
    import sys
    import time

    from fedgpt.bench.loopback import MARKER, marked_pids

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    marker = f"ray-{os.getpid()}"
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    start = [*ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1"]
    start += ["--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
    # Ray hands its processes ports from a range (10002-19999 unless told), from its low end: two test
    # processes starting clusters at once took the same port and one aborted. Each gets a range of its own,
    # above the default one, which a test's own local Ray (ray.init) keeps.
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 20000 + 2000 * index
    start += [f"--min-worker-port={low}", f"--max-worker-port={low + 1999}"]
    env = {**os.environ, MARKER: marker}
    res = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        yield os.environ["RAY_ADDRESS"]
    finally:
        del os.environ["RAY_ADDRESS"]
        for pid in marked_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in marked_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # as `ray stop` does: a plain ray.init() on this machine would otherwise try to join the dead cluster
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()


@pytest.fixture(autouse=True)
def _slow_tests_share_one_ray(request):
    """Slow tests (simulations among them) run against the session's Ray cluster."""
    if request.node.get_closest_marker("slow") and not os.environ.get("FEDGPT_TEST_OWN_RAY"):
        request.getfixturevalue("ray_cluster")


@pytest.fixture(scope="module")
def no_ray_left():
    """A module that starts Ray ends it: a failing test must not leave its Ray to the next module."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def probe_dir(tmp_path: Path, monkeypatch) -> Path:
    """Where tests/probe_client_app.py records what clients restore and send ($FEDGPT_TEST_PROBE_DIR, which
    Ray's workers and Flower's processes inherit)."""
    d = tmp_path / "probe"
    d.mkdir()
    monkeypatch.setenv("FEDGPT_TEST_PROBE_DIR", str(d))
    return d


def as_serverapp(mp: pytest.MonkeyPatch) -> None:
    """Give this process the run and node a ServerApp process has (Messages take their ids from it), for tests
    that build the server's messages outside a ServerApp; undone with `mp`."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        mp.setattr(TaskIdentity, name, value)


@pytest.fixture
def serverapp_identity(monkeypatch):
    """as_serverapp for one test."""
    as_serverapp(monkeypatch)


def node_config(run, partition: int = 0, num_partitions: int = 3) -> dict:
    """The node config of a node that serves `run` (a FederatedRun) from this machine: its partition, and its
    own paths (fedgpt.fed.node_policy) set to the run's corpus, base model and client-state folder."""
    d, t = run.cfg.data, run.cfg.train
    node = {"partition-id": partition, "num-partitions": num_partitions, "state-dir": run.state_dir}
    node["data-dir"] = str(Path(d.data_dir).resolve())
    if d.input_file:
        node["corpus-file"] = str(Path(d.input_file).resolve())
    if d.vocab_file:
        node["vocab-file"] = str(Path(d.vocab_file).resolve())
    if t.init_from != "scratch":
        node["init-from"] = str(Path(t.init_from).resolve())
    return node


def fit_in_process(run, rnd: int, partition: int = 0, num_partitions: int = 3, via=None):
    """One client's train round as `run` (a FederatedRun) would send it, handled by fedgpt.fed.client.fit in
    this process (no Ray, no Flower process), or `via` a node's worker (fedgpt.fed.relay.WorkerClient); the
    update it sent back, as the server decodes it."""
    from flwr.app import ConfigRecord, RecordDict

    from fedgpt.fed import client

    node = node_config(run, partition, num_partitions)
    sent = run.exchange.downlink(run.global_state, base_id=rnd)
    config = ConfigRecord({**run.run_facts(), **run.work_order(rnd).to_config()})
    content = RecordDict({"arrays": sent, "config": config})
    reply = via.call("train", content, node) if via is not None else client.fit(content, node)
    state = run.exchange.apply(reply["arrays"], run.global_state, sent, f"client {partition}")
    return run.exchange.difference(state, run.global_state)
