"""fedgpt as a real Flower deployment on loopback: a SuperLink over TLS with SuperNode authentication, three
SuperNodes with their own plays that require SecAgg+, `flwr run .` from a curious and from fedgpt's own
ServerApp (sampling from a checkpoint: tests/test_sample.py and tests/test_lora.py).

fedgpt.bench.loopback starts every process with a marker in its environment, which Flower's own children
(SuperExec, ServerApp and ClientApp processes) inherit: teardown finds and stops all of them, and the module
fails if any is left. A plain deployment (no TLS, no SecAgg+) runs in tests/test_bench_fed.py's deploy bench.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO

from fedgpt.bench.loopback import Deployment, marked_pids
from fedgpt.fed.run_config import config_from_run_config

# seconds for `flwr run --stream`; 2 rounds take ~60-140 s on 2 cores beside the suite's other test process
# (a fresh ClientApp process per message): a safety net, not a speed check
RUN_TIMEOUT = 420


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


def test_the_app_bundle_holds_the_code_and_configs_and_no_run_records():
    # what `flwr run .` uploads and every SuperNode fetches and unpacks, built by the function it calls; the
    # committed records (results/records) would be most of it and count against Flower's 10 MB
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    assert any((REPO / "results" / "records").rglob("*.json*")), "no records: this proves nothing"
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist())
    assert not {n for n in names if n.startswith("results/")}, sorted(names)[:20]
    needed = {"server_app.py", "client_app.py", "fedgpt/fed/server.py", "configs/tiny.yaml"}
    assert needed <= names, needed - names


def workers_of(dep: Deployment) -> list[int]:
    """The pids of the deployment's warm trainers (fedgpt.fed.worker)."""
    return marked_pids(dep.marker, b"fedgpt.fed.worker")


def doc_blocks(section: str) -> list[str]:
    """The ```bash blocks of a docs/deployment.md section, in order."""
    text = (REPO / "docs" / "deployment.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.S)


PLAYS = (0, 3, 7)  # Coriolanus, Romeo and Juliet, the Taming of the Shrew


@dataclass
class Federation:
    dep: Deployment
    root: Path
    nodes: list[Path]  # each node's folder: its play, its data folder, its state (and its trainer's socket)
    plays: list[str]
    probes: Path  # where the curious ServerApp writes what it got


@pytest.fixture(scope="module")
def federation(data_dir: Path, tmp_path_factory) -> Federation:
    """One deployment on loopback shared by this module's tests, set up as docs/deployment.md says: TLS and
    SuperNode authentication with certificates and keys made by the doc's own blocks, three SuperNodes that
    each hold one play of Tiny Shakespeare in a data folder of their own (none holds the others' text; the
    server holds the corpus only for its validation split and the char vocabulary), each keeping its state
    in its own folder and requiring SecAgg+ (the node's own setting)."""
    from fedgpt.fed.plays import play_texts

    root = tmp_path_factory.mktemp("deployment")
    secure = root / "secure"
    certs, keys = doc_blocks("TLS and SuperNode authentication")[:2]
    more = "for i in 2 3; do ssh-keygen -q -t ecdsa -b 384 -N '' -C '' -f $D/keys/supernode$i; done\n"
    for block in (certs, keys, more):  # supernode3's key is never registered
        res = subprocess.run(
            ["bash", "-ec", block],
            env={"D": str(secure), "PATH": "/usr/bin:/bin"},
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, f"{block}\n{res.stdout}{res.stderr}"
    plays = play_texts((data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"))
    nodes = [root / f"node{i}" for i in range(3)]
    configs = []
    for node, play in zip(nodes, PLAYS):
        (node / "data").mkdir(parents=True)
        (node / "play.txt").write_text(plays[play], encoding="utf-8")
        configs.append(f"input-file='{node / 'play.txt'}' data-dir='{node / 'data'}' require-secagg=true")
    probes = root / "probe"
    probes.mkdir()
    dep = Deployment(root / "flwr", secure=secure)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDGPT_TEST_PROBE_DIR", str(probes))  # the ServerApp processes inherit it
        try:
            dep.start_federation(data_dir, supernodes=3, state_dirs=nodes, node_configs=configs)
            yield Federation(dep, root, nodes, [plays[p] for p in PLAYS], probes)
        finally:
            left = dep.stop()
            assert not left, f"processes left after teardown: {left}"


@pytest.mark.slow
def test_a_curious_server_gets_no_plaintext_update(federation: Federation, data_dir: Path):
    # A ServerApp that skips SecAgg+ and sends plain train messages: every node refuses, with no arrays.
    fed = federation
    curious = app_copy(fed.root, "curious", serverapp="curious_server_app")
    overrides = f"fed.num_clients=3 fed.node_timeout=90 train.out_dir={fed.root / 'curious_out'}"
    run_config = f"config='configs/tiny.yaml' overrides='{overrides} data.data_dir={data_dir}'"
    res = fed.dep.flwr(
        ["run", ".", "loopback", "--stream", "--run-config", run_config], timeout=RUN_TIMEOUT, cwd=curious
    )
    assert res.returncode == 0 and (fed.probes / "replies.json").is_file(), (
        res.stdout + res.stderr + fed.dep.logs()
    )
    replies = json.loads((fed.probes / "replies.json").read_text())
    assert len(replies) == 3 and all(
        r["arrays"] == 0 and "requires SecAgg+" in r["error"] for r in replies
    ), replies


@pytest.mark.slow
def test_an_unregistered_node_is_refused(federation: Federation, data_dir: Path):
    fed = federation
    intruder = fed.dep.start_supernode(3, f"partition-id=0 num-partitions=3 data-dir='{data_dir}'")
    intruder.wait(timeout=60)
    log = (fed.dep.root / "supernode3.log").read_text(errors="replace")
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in log, log[-3000:]


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
def test_nodes_train_their_own_plays_under_secagg_with_warm_trainers(federation: Federation, data_dir: Path):
    # Two rounds of `flwr run .` under SecAgg+ (four message stages a round, each a fresh ClientApp process on
    # a node that relays to the node's warm trainer: one process per node and run), the sum weighted by the
    # size of each node's play; the clients train with Muon (MuLoCo's inner step), its momentum kept per node.
    fed, out = federation, federation.root / "out"
    res, rows, context = run_tiny(fed.dep, out, data_dir, 3, 2, "secagg.enabled=true train.optimizer=muon")
    assert [r["round"] for r in rows] == [0, 1, 2], context
    assert all(r["clients_ok"] == 3 and r["clients_failed"] == 0 for r in rows[1:]), rows
    assert rows[2]["val_loss"] < rows[0]["val_loss"], rows
    assert res.stdout.count("Secure aggregation completed") == 2, context
    # every node trained on all of its play (char tokens: one per character), and the server was told so
    sizes = ", ".join(f"{i}: {len(play):,}" for i, play in enumerate(fed.plays))
    assert f"nodes with their own data (partition: train tokens): {sizes}" in res.stdout, context
    reported = json.loads((out / "partition.json").read_text())["nodes"]  # what the nodes hold, not the split
    assert {int(p): n["train_tokens"] for p, n in reported.items()} == dict(enumerate(map(len, fed.plays)))
    for node in fed.nodes:  # each node's folder holds its own encoded play and nothing of the corpus
        assert [p.name.startswith("node-") for p in (node / "data").iterdir()] == [True], list(
            (node / "data").iterdir()
        )

    # Round 2 of each node went on from its round-1 state, kept on that node only (the bitwise check of the
    # restored moments is tests/test_fed_optimization.py's, on the same code), by one warm trainer a node.
    # Under SecAgg+ no client tells the server so (no metric leaves a node in the clear): the nodes' files do.
    assert not (out / "client_state").exists()
    for partition, node in enumerate(fed.nodes):
        (run_dir,) = [d for d in node.iterdir() if d.is_dir() and d.name not in ("workers", "data")]
        state = torch.load(run_dir / f"partition-{partition}" / "round-1.pt", weights_only=True)
        assert set(state["optimizer"]) == {"muon", "adamw"}, state.keys()  # Muon's state went on to round 2
        later = torch.load(run_dir / f"partition-{partition}" / "round-2.pt", weights_only=True)
        steps = {int(s["step"]) for s in later["optimizer"]["adamw"]["state"].values()}
        assert steps == {2 * 5}, steps  # AdamW's step count went on from round 1's 5 local steps
        assert len(list((node / "workers").glob("*.sock"))) == 1
    assert len(workers_of(fed.dep)) == 3, context

    # Stopping the SuperNodes leaves no process behind: the trainers end on their own.
    for name, proc in fed.dep.procs.items():
        if name.startswith("supernode"):
            proc.terminate()
            proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while workers_of(fed.dep) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers_of(fed.dep), "warm trainers outlived their SuperNodes"
