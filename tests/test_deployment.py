"""fedgpt as a real Flower deployment on loopback: SuperLink, two SuperNodes, `flwr run .`, then sampling.

fedgpt.bench.loopback starts every process with a marker in its environment, which Flower's own children
(SuperExec, ServerApp and ClientApp processes) inherit: teardown finds and stops all of them, and the test
fails if any is left.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from fedgpt.bench.loopback import Deployment, marked_pids
from fedgpt.fed.run_config import config_from_run_config

# seconds for `flwr run --stream`; 2 rounds take ~60-100 s on 2 busy cores (a fresh ClientApp process per
# message)
RUN_TIMEOUT = 240


def test_run_config_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, opts = config_from_run_config(
        {
            "config": "configs/tiny.yaml",
            "overrides": "fed.rounds=3 train.out_dir=out/x",
            "resume": False,
            "client-threads": 1,
        },
        app_dir=REPO,
    )
    assert cfg.fed.rounds == 3 and opts == {"resume": False, "overwrite": False, "client_threads": 1}
    assert cfg.train.out_dir == str(tmp_path / "out" / "x")
    assert cfg.data.data_dir == str(tmp_path / "data")
    assert cfg.data.input_file == ""  # empty still means "download Tiny Shakespeare"


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path / "flwr")
    try:
        yield dep
    finally:
        left = dep.stop()
        assert not left, f"processes left after teardown: {left}"


def app_copy(tmp_path: Path, name: str, serverapp: str | None = None, clientapp: str | None = None) -> Path:
    """fedgpt's app with a test module of tests/ as its ServerApp or ClientApp, bundled by `flwr run` like the
    repository's own."""
    app = tmp_path / name
    (app / "configs").mkdir(parents=True)
    for f in ("server_app.py", "client_app.py", "configs/tiny.yaml"):
        shutil.copyfile(REPO / f, app / f)
    pyproject = (REPO / "pyproject.toml").read_text()
    for key, module in (("serverapp", serverapp), ("clientapp", clientapp)):
        if module:
            shutil.copyfile(REPO / "tests" / f"{module}.py", app / f"{module}.py")
            own = f'{key} = "{key.replace("app", "_app")}:app"'
            assert own in pyproject
            pyproject = pyproject.replace(own, f'{key} = "{module}:app"')
    (app / "pyproject.toml").write_text(pyproject)
    return app


def workers_of(dep: Deployment) -> list[int]:
    """The pids of the deployment's warm trainers (fedgpt.fed.worker)."""
    return [
        p for p in marked_pids(dep.marker) if b"fedgpt.fed.worker" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]


@pytest.mark.slow
def test_flwr_run_on_a_superlink_with_two_supernodes(deployment: Deployment, data_dir: Path, tmp_path: Path):
    # Each SuperNode keeps its clients' optimizer state in a folder of its own, and its warm trainer (one
    # process per node and run) beside it; each message is a new ClientApp process that relays to it.
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    deployment.start_federation(data_dir, supernodes=2, state_dirs=nodes)
    out = tmp_path / "out"
    overrides = (
        f"fed.num_clients=2 fed.rounds=2 fed.node_timeout=90 train.out_dir={out} data.data_dir={data_dir}"
    )
    # 1 thread: 3 processes share the cores
    run_config = f"config='configs/tiny.yaml' client-threads=1 overrides='{overrides}'"

    t0 = time.monotonic()
    res = deployment.flwr(
        ["run", ".", "loopback", "--stream", "--run-config", run_config], timeout=RUN_TIMEOUT, cwd=REPO
    )
    took = time.monotonic() - t0
    context = (
        f"flwr run exited {res.returncode} after {took:.0f} s\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n"
        f"{deployment.logs()}"
    )
    assert res.returncode == 0, context
    match = re.search(r"Successfully started run (\d+)", res.stdout)
    assert match, context

    # --stream returns once the run has finished; the SuperLink says how.
    ls = deployment.flwr(
        ["ls", "loopback", "--run-id", match.group(1), "--format", "json"], timeout=60, cwd=tmp_path
    )
    assert ls.returncode == 0, ls.stdout + ls.stderr
    assert json.loads(ls.stdout)["runs"][0]["status"] == "finished:completed", ls.stdout + "\n" + context

    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], context
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in rows[1:]), rows
    assert rows[2]["val_loss"] < rows[0]["val_loss"], rows
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()

    # Round 2 of each node went on from its round-1 state, kept on that node only (the bitwise check of the
    # restored moments is tests/test_fed_optimization.py's, on the same code), by one warm trainer a node.
    assert rows[2]["clients_state_resumed"] == 2 and not (out / "client_state").exists(), rows
    for partition, node in enumerate(nodes):
        (run_dir,) = [d for d in node.iterdir() if d.name != "workers"]
        assert (run_dir / f"partition-{partition}" / "round-1.pt").is_file()
        assert len(list((node / "workers").glob("*.sock"))) == 1
    trainers = workers_of(deployment)
    assert len(trainers) == 2, context

    # Stopping the SuperNodes leaves no process behind: the trainers end on their own.
    for name, proc in deployment.procs.items():
        if name.startswith("supernode"):
            proc.terminate()
            proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while workers_of(deployment) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers_of(deployment), "warm trainers outlived their SuperNodes"

    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgpt.sample",
            "--checkpoint",
            str(out / "best.pt"),
            "--max-new-tokens",
            "20",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr
    text = sample.stdout.split("-" * 40)[0]
    assert len(text.strip()) > 0, sample.stdout


def run_tiny(dep: Deployment, out: Path, data_dir: Path, clients: int, rounds: int, *overrides: str):
    """`flwr run .` of configs/tiny.yaml on the deployment; its result, rounds.jsonl rows and the logs to
    show when an assertion fails. The run must succeed."""
    extra = " ".join(overrides)
    opts = f"fed.num_clients={clients} fed.rounds={rounds} fed.node_timeout=90 train.out_dir={out}"
    run_config = (
        f"config='configs/tiny.yaml' client-threads=1 overrides='{opts} data.data_dir={data_dir} {extra}'"
    )
    res = dep.flwr(
        ["run", ".", "loopback", "--stream", "--run-config", run_config], timeout=RUN_TIMEOUT, cwd=REPO
    )
    context = f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{dep.logs()}"
    assert res.returncode == 0, context
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return res, rows, context


@pytest.mark.slow
def test_three_supernodes_train_on_their_own_plays(
    deployment: Deployment, data_dir: Path, tmp_path: Path, monkeypatch
):
    # Each node holds one play of Tiny Shakespeare and a data folder of its own: none holds the others' text.
    # The server holds the corpus only for its central validation split and the char vocabulary. Their
    # updates are summed under SecAgg+ (four message stages a round, each a fresh ClientApp process on a node,
    # the protocol's state kept in the node's context), weighted by the size of each node's play. Every node
    # requires SecAgg+ (its own setting): a curious server that sends plain train messages gets none of it.
    from fedgpt.fed.plays import play_texts

    probes = tmp_path / "probe"
    probes.mkdir()
    monkeypatch.setenv("FEDGPT_TEST_PROBE_DIR", str(probes))  # the ServerApp processes inherit it
    plays = play_texts((data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"))
    nodes = [tmp_path / f"node{i}" for i in range(3)]
    for i, node in enumerate(nodes):
        (node / "data").mkdir(parents=True)
        (node / "play.txt").write_text(plays[(0, 3, 7)[i]], encoding="utf-8")  # Coriolanus, R&J, the Shrew
    configs = [
        f"input-file='{node / 'play.txt'}' data-dir='{node / 'data'}' require-secagg=true" for node in nodes
    ]
    deployment.start_federation(data_dir, supernodes=3, node_configs=configs)

    curious = app_copy(tmp_path, "curious", serverapp="curious_server_app")
    overrides = f"fed.num_clients=3 fed.node_timeout=90 train.out_dir={tmp_path / 'curious_out'}"
    run_config = f"config='configs/tiny.yaml' overrides='{overrides} data.data_dir={data_dir}'"
    res = deployment.flwr(
        ["run", ".", "loopback", "--stream", "--run-config", run_config], timeout=RUN_TIMEOUT, cwd=curious
    )
    assert res.returncode == 0 and (probes / "replies.json").is_file(), (
        res.stdout + res.stderr + deployment.logs()
    )
    replies = json.loads((probes / "replies.json").read_text())
    assert len(replies) == 3 and all(
        r["arrays"] == 0 and "requires SecAgg+" in r["error"] for r in replies
    ), replies

    res, rows, context = run_tiny(deployment, tmp_path / "out", data_dir, 3, 1, "secagg.enabled=true")
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_ok"] == 3, context
    # every node trained on all of its play (char tokens: one per character), and the server was told so
    sizes = ", ".join(f"{i}: {len(plays[p]):,}" for i, p in enumerate((0, 3, 7)))
    assert f"nodes with their own data (partition: train tokens): {sizes}" in res.stdout, context
    assert res.stdout.count("Secure aggregation completed") == 1, context
    for node in nodes:  # each node's folder holds its own encoded play and nothing of the corpus
        assert [p.name.startswith("node-") for p in (node / "data").iterdir()] == [True], list(
            (node / "data").iterdir()
        )


def doc_blocks(section: str) -> list[str]:
    """The ```bash blocks of a docs/deployment.md section, in order."""
    text = (REPO / "docs" / "deployment.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.S)


@pytest.mark.slow
def test_tls_with_supernode_auth_trains_and_refuses_an_unregistered_node(data_dir: Path, tmp_path: Path):
    # Certificates and node keys exactly as docs/deployment.md makes them (its first two blocks), and a third
    # key that is never registered.
    secure = tmp_path / "secure"
    certs, keys = doc_blocks("TLS and SuperNode authentication")[:2]
    for block in (certs, keys, 'ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f $D/keys/supernode2\n'):
        res = subprocess.run(
            ["bash", "-ec", block],
            env={"D": str(secure), "PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, f"{block}\n{res.stdout}{res.stderr}"
    dep = Deployment(tmp_path / "flwr", secure=secure)
    try:
        dep.start_federation(data_dir, supernodes=2)
        intruder = dep.start_supernode(2, f"partition-id=0 num-partitions=2 data-dir='{data_dir}'")
        _, rows, context = run_tiny(dep, tmp_path / "out", data_dir, 2, 1)
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_ok"] == 2, context
        # the unregistered node was refused and is gone; it never joined the run
        intruder.wait(timeout=60)
        log = (tmp_path / "flwr" / "supernode2.log").read_text(errors="replace")
        assert intruder.returncode != 0 and "Failed to activate SuperNode" in log, log[-3000:]
    finally:
        left = dep.stop()
        assert not left, f"processes left after teardown: {left}"
