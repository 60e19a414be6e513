"""Talking to the nodes through Flower's Grid: waiting for them, one request/reply exchange, and the nodes in
partition order (who they are and whether they are admitted is fedgpt.fed.membership's)."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid


def wait_for_nodes(grid: Grid, needed: int, timeout: float, log: Callable[[str], None] = print) -> list[int]:
    """Block until `needed` nodes are connected (Flower samples from those connected *before* waiting)."""
    t0 = time.monotonic()
    last = -1
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(
                f"only {len(nodes)} of {needed} nodes connected after {timeout:.0f} s: start more "
                "SuperNodes, or lower fed.num_clients / fed.min_clients, or raise fed.node_timeout"
            )
        if len(nodes) != last:
            log(f"waiting for nodes: {len(nodes)}/{needed} connected")
            last = len(nodes)
        time.sleep(0.2)
    return nodes


def send_and_receive(
    grid: Grid,
    msgs: list[Message],
    timeout: float,
    poll_s: float = 0.1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Message]:
    """Send `msgs` and collect their replies until all are in or `timeout` passes; `progress(answered,
    total)` every PROGRESS_S seconds while they come in.

    Grid.send_and_receive, except that it polls every `poll_s`: Flower's deployment grid sleeps 3 s between
    pulls.
    """
    pending = set(grid.push_messages(msgs))
    now = time.monotonic()
    end, replies, said = now + timeout, [], now
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= end:
            break
        if progress is not None and time.monotonic() - said >= PROGRESS_S:
            progress(len(replies), len(msgs))
            said = time.monotonic()
        time.sleep(poll_s)
    return replies


PROGRESS_S = 5.0  # seconds between progress lines of a long exchange (a pre-flight of thousands of nodes)


def error_reason(msg: Message) -> str:
    """The last line of a client's error (Flower sends the whole traceback)."""
    reason = (msg.error.reason or "").strip().splitlines()
    return reason[-1] if reason else f"error code {msg.error.code}"


class PartitionOrderedGrid:
    """A Grid whose get_node_ids lists nodes by the partition they serve (with `only`: just those nodes);
    everything else is the grid's."""

    def __init__(self, grid: Grid, partition_of: dict[int, int], only: list[int] | None = None):
        self._grid, self._partition_of, self._only = grid, partition_of, only

    def get_node_ids(self) -> list[int]:
        nodes = self._grid.get_node_ids() if self._only is None else self._only
        return sorted(nodes, key=lambda n: (self._partition_of.get(n, -1), n))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
