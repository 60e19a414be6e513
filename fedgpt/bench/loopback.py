"""A real Flower deployment on loopback: one SuperLink, N SuperNodes and `flwr run .`, each its own process.

A harness for the deployment tests and `python -m fedgpt.bench deploy`, not deployment code:
docs/deployment.md is the recipe for a real one. Every process is started with a marker in its environment,
which Flower's own children (SuperExec, ServerApp and ClientApp processes) inherit: stop() finds and ends
all of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from fedgpt.bench.common import QUIET

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live next to this Python
MARKER = "FEDGPT_DEPLOYMENT"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def marked_pids(marker: str, command: bytes = b"") -> list[int]:
    """Live processes whose environment holds this marker (zombies have no environment) and whose command
    line holds `command`; a process that ends while it is looked at is not listed."""
    needle = f"{MARKER}={marker}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes() and command in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} before listening on port {port}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


class Deployment:
    """Processes of one loopback deployment, each with its own FLWR_HOME and working folder under `root`.

    With `secure` (a folder holding certs/ca.crt, certs/server.crt, certs/server.key and keys/supernode<i>, as
    docs/deployment.md makes them) the SuperLink serves TLS and authenticates SuperNodes: node i connects with
    keys/supernode<i>, which must be registered (register_supernodes) before it starts.
    """

    def __init__(
        self,
        root: Path,
        secure: Path | None = None,
        env: dict[str, str] | None = None,
        database: Path | None = None,
    ):
        self.root, self.secure, self.extra_env = root, secure, env or {}  # env: added to every process's
        # the SuperLink's state on disk (SQLite): a restarted SuperLink knows its SuperNodes, which go on
        self.database = database
        self.marker = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.link_port: int | None = None

    def link_security(self) -> list[str]:
        if self.secure is None:
            return ["--insecure"]
        certs = self.secure / "certs"
        return [
            *("--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt")),
            *("--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"),
        ]

    def node_security(self, i: int) -> list[str]:
        if self.secure is None:
            return ["--insecure"]
        ca, key = self.secure / "certs" / "ca.crt", self.secure / "keys" / f"supernode{i}"
        return ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]

    def start_superlink(self, timeout: float = 60, restart: bool = False) -> None:
        """Start the SuperLink on a free port, or (restart) on the port it had, where its SuperNodes call."""
        if not restart:
            (self.link_port,) = free_ports(1)
        link = self.start(
            "superlink",
            [
                "flower-superlink",
                *self.link_security(),
                *("--host", "127.0.0.1", "--port", str(self.link_port)),
                *(("--database", str(self.database)) if self.database else ()),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(self.link_port, link, timeout)

    def start_supernode(self, i: int, node_config: str) -> subprocess.Popen:
        (port,) = free_ports(1)
        return self.start(
            f"supernode{i}",
            [
                "flower-supernode",
                *self.node_security(i),
                *("--superlink", f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1", "--port", str(port)),
                *("--node-config", node_config),
            ],
        )

    def register_supernodes(self, nodes: list[int]) -> None:
        """Register the public keys of these SuperNodes with the SuperLink (`flwr supernode register`)."""
        for i in nodes:
            pub = self.secure / "keys" / f"supernode{i}.pub"
            res = self.flwr(["supernode", "register", str(pub), "loopback"], timeout=60, cwd=self.root)
            if res.returncode != 0:
                raise RuntimeError(f"flwr supernode register {pub} failed: {res.stdout}{res.stderr}")

    def env(self, home: Path) -> dict[str, str]:
        return {
            **os.environ,
            **QUIET,
            "FLWR_HOME": str(home),
            MARKER: self.marker,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            **self.extra_env,
        }

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start process `name` (again, after it was killed: same home, its log appended to)."""
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log = (self.root / f"{name}.log").open("ab")
        # Not the repository as working directory: deployed apps must not depend on it.
        self.procs[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=home,
            env=self.env(home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.procs[name]

    def start_federation(
        self,
        data_dir: Path,
        supernodes: int = 2,
        timeout: float = 60,
        state_dirs: list[Path] | None = None,
        node_configs: list[str] | None = None,
    ) -> None:
        """A SuperLink and `supernodes` SuperNodes (partition-id 0..N-1), all reading the corpus under
        `data_dir`; with `state_dirs`, node i keeps its clients' state in state_dirs[i]; node_configs[i] is
        added to node i's --node-config (e.g. "input-file='/abs/own.txt'")."""
        self.start_superlink(timeout)
        if self.secure is not None:
            self.register_supernodes(list(range(supernodes)))
        for i in range(supernodes):
            # TOML-style values: quoted strings for paths (absolute: the app runs from $FLWR_HOME/apps/...).
            node_config = f"partition-id={i} num-partitions={supernodes}"
            if not (node_configs and "data-dir=" in node_configs[i]):  # a node's own data-dir wins
                node_config += f" data-dir='{data_dir.resolve()}'"
            if state_dirs:
                node_config += f" state-dir='{state_dirs[i].resolve()}'"
            if node_configs:
                node_config += " " + node_configs[i]
            self.start_supernode(i, node_config)

    def cli_home(self) -> Path:
        """The `flwr` CLI's FLWR_HOME, its config.toml naming this deployment's SuperLink "loopback"."""
        home = self.root / "cli"
        if not home.is_dir():
            home.mkdir(parents=True)
            security = (
                "insecure = true"
                if self.secure is None
                else f'root-certificates = "{self.secure / "certs" / "ca.crt"}"'
            )
            (home / "config.toml").write_text(
                f'[superlink.loopback]\naddress = "127.0.0.1:{self.link_port}"\n{security}\n'
            )
        return home

    def flwr(self, args: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI in `cwd` (the app directory, for `flwr run .`) against this deployment's
        SuperLink (connection name "loopback")."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=cwd,
            env=self.env(self.cli_home()),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} (last 3000 chars)\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self, grace: float = 15.0) -> list[int]:
        """Terminate every process, then kill what is left after `grace` seconds; returns the pids still
        alive."""
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
