"""Talking to the nodes through Flower's Grid: waiting for them, one request/reply exchange, and the
pre-flight check that every node can serve its partition before round 1."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
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


def exchange(
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


@dataclass
class Nodes:
    """What the pre-flight learned of the nodes: the partition each serves and its train tokens."""

    partition_of: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    train_tokens: dict[int, int] = field(default_factory=dict)  # node id -> its train tokens
    requiring_secagg: list[int] = field(default_factory=list)  # partitions whose nodes refuse plain training

    def partition(self, node: int) -> int:
        return self.partition_of.get(node, -1)


def preflight(
    grid: Grid,
    needed: int,
    num_partitions: int,
    config: dict,
    timeout: float,
    log: Callable[[str], None] = print,
) -> Nodes:
    """Wait for the nodes, then ask each what it will serve (its partition, its data, its privacy floor).

    Data or config problems on any node (another corpus, a wrong num-partitions, a partition served twice)
    fail the run here, before round 1, with every problem in one RuntimeError. One query per node, sampled or
    not (sampling draws from nodes ordered by partition, which makes it reproducible): start-up grows with the
    node count by a ClientApp call each.
    """
    t0 = time.time()
    nodes = wait_for_nodes(grid, needed, timeout, log)
    msgs = [
        Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    said = lambda n, total: log(f"pre-flight: {n:,} of {total:,} nodes answered ({time.time() - t0:.0f} s)")
    replies = exchange(grid, msgs, timeout, progress=said)
    errors = [f"node {r.metadata.src_node_id}: {error_reason(r)}" for r in replies if r.has_error()]
    if len(replies) < len(msgs):
        errors.append(f"{len(msgs) - len(replies)} node(s) did not answer within {timeout:.0f} s")
    answers = {r.metadata.src_node_id: dict(r.content["info"]) for r in replies if not r.has_error()}
    for node, info in answers.items():
        if info["num-partitions"] != num_partitions:
            errors.append(
                f"node {node} has num-partitions={info['num-partitions']} but "
                f"fed.num_clients={num_partitions}"
            )
    ids = [info["partition-id"] for info in answers.values()]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        errors.append(
            f"partition-id {dupes} served by more than one node: give each SuperNode its own partition-id"
        )
    if errors:
        raise RuntimeError("pre-flight check failed: " + "; ".join(errors))
    log(f"pre-flight: {len(answers)} nodes answered in {time.time() - t0:.1f} s")
    own = sorted(
        (int(i["partition-id"]), int(i["train-tokens"])) for i in answers.values() if i.get("own-data")
    )
    if own:  # nodes with data of their own: the partition summary is not theirs
        log(
            "nodes with their own data (partition: train tokens): " + ", ".join(f"{p}: {t:,}" for p, t in own)
        )
    return Nodes(
        {node: int(info["partition-id"]) for node, info in answers.items()},
        {node: int(info["train-tokens"]) for node, info in answers.items()},
        sorted(int(i["partition-id"]) for i in answers.values() if i.get("requires-secagg")),
    )


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
