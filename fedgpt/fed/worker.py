"""A node's warm trainer: one long-lived process per node and run that answers the ClientApp's messages.

    python -m fedgpt.fed.worker --socket /state/workers/node-7-run-3.sock --watch-pid 1234
    python -m fedgpt.fed.worker --stop /state/workers/node-7-run-3.sock

fedgpt.fed.relay starts it with the first message of a run on the node (it can also be started by hand, beside
flower-supernode, for those who supervise it), and hands it every message after: the pre-flight query, each
round's training, client evaluation. It keeps what a per-message process would rebuild every time: torch, the
model and its optimizer, the node's data and partition, the compiled graph and (on a GPU) the CUDA context;
the weights arrive with every message, and the client state between rounds stays in its files
(fedgpt.fed.client_state), so a worker that is killed loses nothing a new one cannot read back.

It ends when the process it watches (its SuperNode) is gone, after --idle-timeout seconds without a message,
or when asked (--stop). Its socket lives in a folder only its user may enter (fedgpt.fed.relay.check_private);
torch's compile caches live beside it (compile-cache/), so that a restarted worker does not compile from
scratch. Requests are answered one at a time, in the order they arrive.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from fedgpt.fed.node_policy import NodeError, NodePolicy, public_error
from fedgpt.fed.relay import (
    KINDS,
    check_private,
    from_bytes,
    proc_stat,
    read_frame,
    send_frame,
    to_bytes,
    unix_path,
)

POLL_S = 1.0  # seconds between checks of the watched process and the idle time


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    stat = proc_stat(pid)
    return stat is None or stat[0] != "Z"  # no /proc (macOS): os.kill's answer


def answer(conn: socket.socket) -> bool:
    """Answer one request on `conn`; False if it asked the worker to stop."""
    header, payload = read_frame(conn)
    if header.get("kind") == "stop":
        send_frame(conn, {"ok": True})
        return False
    try:
        if header.get("kind") not in KINDS:
            raise ValueError(f"unknown request {header.get('kind')!r}")
        from fedgpt.fed import client  # torch: imported once, by the first request

        with NodePolicy.guard(header["kind"]):  # the full error in this worker's log, its kind to the server
            reply = client.handle(header["kind"], from_bytes(payload), header["node_config"])
        send_frame(conn, {"ok": True}, to_bytes(reply))
    except Exception as e:  # the relay turns it into the message's error reply
        traceback.print_exc()
        text = str(e) if isinstance(e, NodeError) else public_error("the request", e)
        send_frame(conn, {"ok": False, "error": text})
    return True


def serve(socket_path: Path, watch_pid: int | None, idle_timeout: float) -> None:
    check_private(socket_path.parent)
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with unix_path(socket_path) as name:
        server.bind(name)
    os.chmod(socket_path, 0o600)
    server.listen(16)
    server.settimeout(POLL_S)
    print(f"fedgpt worker {os.getpid()} listening on {socket_path}", flush=True)
    last, running = time.monotonic(), True
    try:
        while running:
            if watch_pid and not alive(watch_pid):
                print(f"process {watch_pid} is gone: ending", flush=True)
                break
            if time.monotonic() - last > idle_timeout:
                print(f"no message for {idle_timeout:.0f} s: ending", flush=True)
                break
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    running = answer(conn)
                except (ConnectionError, OSError) as e:  # the relay went away mid-request
                    print(f"request dropped: {e}", flush=True)
            last = time.monotonic()
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)


def stop(socket_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, unix_path(socket_path) as name:
        sock.connect(name)
        send_frame(sock, {"kind": "stop"})
        read_frame(sock)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedgpt.fed.worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", type=Path, help="where to listen (a folder only this user may enter)")
    p.add_argument("--watch-pid", type=int, default=0, help="end when this process (the SuperNode) is gone")
    p.add_argument(
        "--idle-timeout", type=float, default=1800.0, help="end after this many seconds without a message"
    )
    p.add_argument("--stop", type=Path, metavar="SOCKET", help="ask the worker listening there to end")
    a = p.parse_args(argv)
    if a.stop:
        stop(a.stop)
        return
    if a.socket is None:
        p.error("give --socket (or --stop)")
    # torch's compile caches beside the socket (FX graphs and AOTAutograd): a restarted worker reuses them
    cache = a.socket.parent / "compile-cache"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    serve(a.socket, a.watch_pid or None, a.idle_timeout)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, PermissionError, OSError) as e:
        sys.exit(f"error: {e}")
