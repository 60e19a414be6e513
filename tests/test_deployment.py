"""fedgpt as a real Flower deployment on loopback: SuperLink, two SuperNodes, `flwr run .`, then sampling.

Every process is started with a marker in its environment, which Flower's own children (SuperExec, ServerApp and
ClientApp processes) inherit: teardown finds and stops all of them, and the test fails if any is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedgpt.server import config_from_run_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live next to this Python
MARKER = "FEDGPT_DEPLOYMENT_TEST"
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
RUN_TIMEOUT = 240  # seconds for `flwr run --stream`; 2 rounds take ~60-100 s on 2 busy cores (a fresh ClientApp process per message)


def test_run_config_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, opts = config_from_run_config({"config": "configs/tiny.yaml", "overrides": "fed.rounds=3 train.out_dir=out/x",
                                        "resume": False, "client-threads": 1}, app_dir=REPO)
    assert cfg.fed.rounds == 3 and opts == {"resume": False, "client_threads": 1}
    assert cfg.train.out_dir == str(tmp_path / "out" / "x")
    assert cfg.data.data_dir == str(tmp_path / "data")
    assert cfg.data.input_file == ""  # empty still means "download Tiny Shakespeare"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment holds this test's marker (zombies have no environment)."""
    needle = f"{MARKER}={marker}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


class Deployment:
    """Processes of one loopback deployment, each with its own FLWR_HOME and working directory under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.marker = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, home: Path) -> dict[str, str]:
        return {**os.environ, **QUIET, "FLWR_HOME": str(home), MARKER: self.marker, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        home = self.root / name
        home.mkdir(parents=True)
        log = (self.root / f"{name}.log").open("wb")
        # Not the repository as working directory: deployed apps must not depend on it.
        self.procs[name] = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=home, env=self.env(home), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self.procs[name]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (last 3000 chars)\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self, grace: float = 15.0) -> list[int]:
        """Terminate every process, then kill what is left after `grace` seconds; returns the pids still alive."""
        for p in reversed(self.procs.values()):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        # SuperExecs leave when their parent does; ServerApp / ClientApp processes end with their run.
        while (left := marked_pids(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            t = time.monotonic()
            while (left := marked_pids(self.marker)) and time.monotonic() - t < 5:
                time.sleep(0.2)
        return left


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"process exited with {proc.returncode} before listening on {port}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path / "flwr")
    try:
        yield dep
    finally:
        left = dep.stop()
        assert not left, f"processes left after teardown: {left}"


@pytest.mark.slow
def test_flwr_run_on_a_superlink_with_two_supernodes(deployment: Deployment, data_dir: Path, tmp_path: Path):
    link_port, *node_ports = free_ports(3)
    link = deployment.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                                          "--disable-runtime-dependency-installation"])
    wait_for_port(link_port, link, timeout=60)
    for pid, port in enumerate(node_ports):
        # TOML-style values: a quoted string for the path (absolute: the app runs from $FLWR_HOME/apps/...).
        deployment.start(f"supernode{pid}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                             "--host", "127.0.0.1", "--port", str(port),
                                             "--node-config", f"partition-id={pid} num-partitions=2 data-dir='{data_dir}'"])
    cli_home = tmp_path / "flwr" / "cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(f'[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    out = tmp_path / "out"
    overrides = f"fed.num_clients=2 fed.rounds=2 fed.node_timeout=90 train.out_dir={out} data.data_dir={data_dir}"
    run_config = f"config='configs/tiny.yaml' client-threads=1 overrides='{overrides}'"  # 1 thread: 3 processes share the cores

    t0 = time.monotonic()
    res = subprocess.run([str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config", run_config], cwd=REPO,
                         env=deployment.env(cli_home), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    took = time.monotonic() - t0
    context = f"flwr run exited {res.returncode} after {took:.0f} s\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{deployment.logs()}"
    assert res.returncode == 0, context
    match = re.search(r"Successfully started run (\d+)", res.stdout)
    assert match, context

    # --stream returns once the run has finished; the SuperLink says how.
    ls = subprocess.run([str(BIN / "flwr"), "ls", "test", "--run-id", match.group(1), "--format", "json"], cwd=tmp_path,
                        env=deployment.env(cli_home), capture_output=True, text=True, timeout=60)
    assert ls.returncode == 0, ls.stdout + ls.stderr
    assert json.loads(ls.stdout)["runs"][0]["status"] == "finished:completed", ls.stdout + "\n" + context

    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], context
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in rows[1:]), rows
    assert rows[2]["val_loss"] < rows[0]["val_loss"], rows
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()

    sample = subprocess.run([sys.executable, "-m", "fedgpt.sample", "--checkpoint", str(out / "best.pt"), "--max-new-tokens", "20"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr
    text = sample.stdout.split("-" * 40)[0]
    assert len(text.strip()) > 0, sample.stdout
