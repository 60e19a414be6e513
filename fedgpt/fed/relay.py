"""The ClientApp's side of a node's warm trainer: hand each message to the trainer process on this node.

    content = relay.handle("train", msg.content, context)     # query, train or evaluate

In a deployment Flower starts a fresh ClientApp process for every message and cannot keep one alive (Flower's
own exit handler tells them apart the same way: sys.argv[0] is flwr-clientapp). Importing torch, building the
model, loading the data and compiling it again for every message is most of a round there, so the ClientApp is
a relay that imports neither torch nor fedgpt's training code: it passes the message's content and the node's
config to a long-lived trainer process (fedgpt.fed.worker) over a Unix socket, and returns what it answers. A
simulation's ClientApp runs in a Ray actor that outlives messages: it does the work itself
(fedgpt.fed.client), as it always has. The node setting `trainer` ("worker" or "inline";
fedgpt.fed.node_policy.node_setting) overrides the choice.

One worker per node and run, started by the first message that needs it, in a folder only this user may enter
(inside a state-dir only this user may write to): <the node's state-dir (fedgpt.fed.node_policy)>/workers/
node-<node id>-run-<run id>.sock, with its log beside it and torch's compile caches under compile-cache/. If
the worker dies with a message in flight, the relay starts another and asks once more: the message is the
same, and the client state it needs is in files, so the answer is the one the first would have given.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedgpt.fed.node_policy import NodeError, NodePolicy, node_setting

KINDS = ("query", "train", "evaluate")
START_TIMEOUT = 120.0  # seconds for a new worker to listen (it imports torch and loads the node's data first)
IDLE_TIMEOUT = (
    1800.0  # seconds without a message after which a worker ends (node setting worker-idle-timeout)
)


def in_deployment() -> bool:
    """Whether this process is Flower's per-message ClientApp process."""
    return sys.argv[0].endswith("flwr-clientapp")


def handle(kind: str, content: RecordDict, context: Context, run_id: int) -> RecordDict:
    """The reply content of `kind` for this message: from this node's worker in a deployment (or when the node
    setting trainer=worker), else from fedgpt.fed.client in this process."""
    mode = node_setting(context, "trainer", "worker" if in_deployment() else "inline")
    if mode not in ("worker", "inline"):
        raise ValueError(f"node setting trainer={mode!r}: use worker or inline")
    node_config = dict(context.node_config)
    if mode == "inline":
        from fedgpt.fed import client  # torch, where the process outlives the message

        return client.handle(kind, content, node_config)
    idle = float(node_setting(context, "worker-idle-timeout", IDLE_TIMEOUT))
    return WorkerClient(worker_folder(context), context.node_id, run_id, idle).call(
        kind, content, node_config
    )


def worker_folder(context: Context) -> Path:
    """<the node's state-dir>/workers: created 0700, refused if others may enter it, or if others may write to
    the state-dir it lies in (they could swap it for a folder of theirs)."""
    base = NodePolicy.of(context).state_dir
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(base, others=0o022)
    folder = base / "workers"
    folder.mkdir(mode=0o700, exist_ok=True)
    check_private(folder)
    return folder


def check_private(folder: Path, others: int = 0o077) -> None:
    """Refuse a folder that is a link, that another user owns, or that others may use as the `others` mode
    bits say (by default: enter at all): a node's trainer listens there."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & others:
        raise PermissionError(
            f"{folder} (mode {oct(st.st_mode & 0o777)}, owner {st.st_uid}) is not a private folder of this "
            "user: a node's trainer listens there; chmod 700 it, or give the node another state-dir"
        )


@contextmanager
def unix_path(path: Path):
    """A name for a Unix socket at `path` that fits the 108 bytes AF_UNIX allows: the path itself, or, when it
    is longer, the same file through the folder's open descriptor (/proc/self/fd/N/name, Linux)."""
    if len(str(path)) < 100 or not Path("/proc/self/fd").is_dir():
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def send_frame(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(struct.pack("!IQ", len(head), len(payload)) + head + payload)


def read_frame(sock: socket.socket) -> tuple[dict, bytes]:
    """A header and payload sent by send_frame; ConnectionError if the other side went away first."""
    head_len, payload_len = struct.unpack("!IQ", read_exactly(sock, 12))
    return json.loads(read_exactly(sock, head_len)), read_exactly(sock, payload_len)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def to_bytes(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


class WorkerClient:
    """The relay's connection to the worker of one node and run: started on first use, asked again once if it
    dies with a message in flight."""

    def __init__(
        self,
        folder: Path,
        node_id: int,
        run_id: int,
        idle_timeout: float = IDLE_TIMEOUT,
        watch_pid: int | None = None,
    ):
        self.folder, self.idle_timeout, self.watch_pid = folder, idle_timeout, watch_pid
        self.socket_path = folder / f"node-{node_id}-run-{run_id}.sock"

    def call(self, kind: str, content: RecordDict, node_config: dict) -> RecordDict:
        if kind not in KINDS:
            raise ValueError(f"unknown message kind {kind!r}")
        payload = to_bytes(content)
        for attempt in (1, 2):
            peer = None
            try:
                with self.connect() as sock:
                    peer = peer_pid(sock)
                    send_frame(sock, {"kind": kind, "node_config": node_config}, payload)
                    header, reply = read_frame(sock)
                break
            except (ConnectionError, FileNotFoundError):
                if attempt == 2:
                    raise RuntimeError(
                        f"the node's trainer ({self.socket_path}) went away twice: see its log"
                    ) from None
                # A killed worker closes its connections and its listening socket one after the other: wait
                # until it is gone, or the next connection may reach it as it dies.
                wait_gone(peer, timeout=10)
        if not header.get("ok"):  # the worker sends only what the server may read (NodePolicy.guard)
            raise NodeError(str(header.get("error")))
        return from_bytes(reply)

    def connect(self) -> socket.socket:
        """A connection to the running worker, started first if none answers."""
        sock = self._try_connect()
        if sock is not None:
            return sock
        # One starter at a time. The lock file is never truncated and never a link followed (O_NOFOLLOW): a
        # planted link would not make this process write through it.
        fd = os.open(self.socket_path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            sock = self._try_connect()  # another relay may have started it while this one waited
            if sock is None:
                sock = self._start()
        finally:
            os.close(fd)
        return sock

    def _try_connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with unix_path(self.socket_path) as name:
                sock.connect(name)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None

    def _start(self) -> socket.socket:
        """Start the worker, detached from this short-lived process, watching the SuperNode it serves."""
        self.socket_path.unlink(missing_ok=True)  # a dead worker's
        cmd = [sys.executable, "-m", "fedgpt.fed.worker", "--socket", str(self.socket_path)]
        cmd += [
            "--watch-pid",
            str(self.watch_pid or supernode_pid()),
            "--idle-timeout",
            str(self.idle_timeout),
        ]
        log = open(self.socket_path.with_suffix(".log"), "ab")
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            sock = self._try_connect()
            if sock is not None:
                return sock
            if proc.poll() is not None:
                tail = self.socket_path.with_suffix(".log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the node's trainer exited with {proc.returncode} as it started:\n{tail}")
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(
            f"the node's trainer did not listen on {self.socket_path} within {START_TIMEOUT:.0f} s"
        )


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[
        0
    ]


def wait_gone(pid: int | None, timeout: float) -> None:
    """Until process `pid` has exited (a zombie counts as gone), or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        stat = proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return
        time.sleep(0.02)


def supernode_pid() -> int:
    """The pid of the flower-supernode process above this one (the worker ends when it is gone), else this
    process's parent."""
    pid = os.getpid()
    for _ in range(16):
        stat = proc_stat(pid)
        if stat is None or int(stat[1]) <= 1:  # stat[1]: the parent
            break
        pid = int(stat[1])
        try:
            if b"flower-supernode" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            break
    return os.getppid()


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the process's "(name)": state, parent, process group, session,
    ...; None where there is no such process, or no /proc (macOS)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
