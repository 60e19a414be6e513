"""The server's roster of nodes, kept through a run: who is admitted, who was refused and why, who is gone.

    members = Membership(cfg, facts, log, out_dir / "membership.jsonl")
    members.start(grid)                 # before round 1: wait for fed.min_clients, ask the nodes there
    nodes = members.round_nodes(grid, rnd)   # before each round: the admitted nodes that are connected

A node is learned when it first appears, before round 1 or at any later round: the server asks it what it
holds (the pre-flight query: its partition, its data, its privacy floor) and admits or refuses it. A node is
refused, and never trained, when its num-partitions differs from the run's, when the partition it claims is
held by another admitted node that is still connected (a duplicate), when it requires SecAgg+ and the run
does not use it, or when it cannot answer the query (another corpus, say). A node that leaves (Flower stops
listing it) is marked gone and stalls nothing; a SuperNode that comes back (Flower gives it a new node id; its
node config, and so its partition and its client state on disk, are the same) is recognised as the same
client by its partition. Every change is a line in the log and in <train.out_dir>/membership.jsonl.

A round starts with the admitted nodes that are connected; below fed.min_clients (0: fed.num_clients) the
server waits fed.node_timeout for more, then stops after the last finished round, whose last.pt a --resume
continues from. Simulations larger than LAZY_ABOVE nodes ask a node only when it is first sampled, so that
nothing before round 1 grows with the population (a resumed run then samples other clients than an
uninterrupted one would: simulated nodes get new ids each run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedgpt.config import Config
from fedgpt.fed.grid import error_reason, send_and_receive, wait_for_nodes

LAZY_ABOVE = 1000  # nodes; above it a node is asked what it holds when it is first sampled
POLL_S = 1.0  # seconds between looks at the connected nodes while a round waits for its quorum


@dataclass
class Member:
    node: int
    partition: int
    train_tokens: int
    val_tokens: int
    own_data: bool
    requires_secagg: bool = False
    connected: bool = True


class Membership:
    """The admitted nodes (connected or gone) by node id, the refused ones with their reasons, and the log of
    both. It is what the round loop samples from and what replies are sorted by (`partition_of`)."""

    def __init__(
        self,
        cfg: Config,
        facts: Callable[[], dict],
        log: Callable[[str], None] = print,
        record: Path | None = None,
    ):
        f = cfg.fed
        self.num_partitions, self.secagg, self.facts, self.log = f.num_clients, cfg.secagg.enabled, facts, log
        self.quorum, self.timeout = f.min_clients or f.num_clients, f.node_timeout
        self.client_eval = f.client_eval_interval > 0
        self.record = record
        self.members: dict[int, Member] = {}
        self.refused: dict[int, str] = {}
        self.requiring_secagg: list[
            int
        ] = []  # partitions of nodes that refuse plain training (before round 1)
        self.lazy = False

    # what the round loop reads
    @property
    def partition_of(self) -> dict[int, int]:
        return {n: m.partition for n, m in self.members.items()}

    @property
    def train_tokens(self) -> dict[int, int]:
        return {n: m.train_tokens for n, m in self.members.items()}

    def partition(self, node: int) -> int:
        m = self.members.get(node)
        return m.partition if m is not None else -1

    def connected(self) -> list[int]:
        """The admitted nodes connected now, in partition order."""
        return sorted((n for n, m in self.members.items() if m.connected), key=self.partition)

    def reported(self) -> dict[str, dict]:
        """What each admitted node said it holds, by partition (partition.json's "nodes")."""
        return {
            str(m.partition): {
                "train_tokens": m.train_tokens,
                "val_tokens": m.val_tokens,
                "own_data": m.own_data,
            }
            for m in sorted(self.members.values(), key=lambda m: m.partition)
        }

    def admit(self, partition_of: dict[int, int], train_tokens: dict[int, int] | None = None) -> None:
        """Admit nodes whose answers are known without asking: node id -> partition (and train tokens)."""
        for node, p in partition_of.items():
            tokens = (train_tokens or {}).get(node, 0)
            self.members[node] = Member(node, p, tokens, 0, False)

    # before round 1
    def start(self, grid: Grid) -> None:
        """Wait for fed.min_clients nodes, then ask every node connected (in a simulation of more than
        LAZY_ABOVE nodes: none yet) and admit or refuse each. Raises if fewer than the quorum are admitted,
        naming every refusal."""
        t0 = time.time()
        nodes = wait_for_nodes(grid, self.quorum, self.timeout, self.log)
        self.lazy = len(nodes) > LAZY_ABOVE
        if self.lazy:
            self.log(f"{len(nodes):,} nodes: each is asked what it holds when it is first sampled")
            return
        self.ask(grid, nodes, 0)
        self.log(f"pre-flight: {len(self.members)} nodes admitted in {time.time() - t0:.1f} s")
        own = sorted((m.partition, m.train_tokens) for m in self.members.values() if m.own_data)
        if own:  # nodes with data of their own: the partition summary is not theirs
            self.log(
                "nodes with their own data (partition: train tokens): "
                + ", ".join(f"{p}: {t:,}" for p, t in own)
            )
        if self.requiring_secagg and not self.secagg:
            raise RuntimeError(
                f"the nodes of partitions {self.requiring_secagg} require SecAgg+ (their node config "
                "require-secagg) and refuse plain train messages: run with secagg.enabled=true"
            )
        floor = sorted(m.partition for m in self.members.values() if m.requires_secagg)
        if floor and self.client_eval:
            raise RuntimeError(
                f"the nodes of partitions {floor} require SecAgg+ and refuse evaluate messages (a loss "
                "oracle on their data): set fed.client_eval_interval=0"
            )
        if len(self.members) < self.quorum:
            why = "; ".join(f"node {n}: {reason}" for n, reason in self.refused.items())
            raise RuntimeError(
                f"pre-flight check failed: {len(self.members)} of the {self.quorum} nodes a round needs were "
                f"admitted: {why or 'the others did not answer'}"
            )

    # before every round
    def round_nodes(self, grid: Grid, rnd: int) -> list[int]:
        """The nodes round `rnd` may sample: the admitted nodes connected now (new ones asked first), and in a
        lazy simulation the nodes not asked yet too. Waits up to fed.node_timeout for the quorum, then raises
        a RuntimeError that says how many nodes there were."""
        deadline = time.monotonic() + self.timeout
        said = -1
        while True:
            seen = set(grid.get_node_ids())
            self.update(grid, seen, rnd)
            nodes = self.connected()
            if self.lazy:
                nodes += sorted(n for n in seen if n not in self.members and n not in self.refused)
            if len(nodes) >= self.quorum:
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"round {rnd}: {len(nodes)} of the {self.quorum} nodes a round needs (fed.min_clients) "
                    f"stayed connected for {self.timeout:.0f} s (fed.node_timeout): stopped; start the "
                    "missing SuperNodes and resume (resume=true, or --resume) from last.pt"
                )
            if len(nodes) != said:
                self.log(f"round {rnd}: waiting for nodes: {len(nodes)} of {self.quorum} connected")
                said = len(nodes)
            time.sleep(POLL_S)

    def update(self, grid: Grid, seen: set[int], rnd: int) -> None:
        """Mark admitted nodes that Flower no longer lists as gone (and back if listed again), and ask the new
        ones (unless the simulation is lazy)."""
        for n, m in self.members.items():
            if m.connected and n not in seen:
                m.connected = False
                self.event(rnd, n, "gone", m.partition, "no longer connected")
            elif not m.connected and n in seen:
                m.connected = True
                self.event(rnd, n, "back", m.partition, "connected again")
        new = sorted(n for n in seen if n not in self.members and n not in self.refused)
        if new and not self.lazy:
            self.ask(grid, new, rnd)

    def admit_sampled(self, grid: Grid, nodes: list[int], rnd: int) -> list[int]:
        """In a lazy simulation, ask the sampled nodes not asked yet; the sampled nodes admitted."""
        new = [n for n in nodes if n not in self.members and n not in self.refused]
        if new:
            self.ask(grid, new, rnd)
        return [n for n in nodes if n in self.members]

    def ask(self, grid: Grid, nodes: list[int], rnd: int) -> None:
        """The pre-flight query to `nodes`; admit or refuse each by what it answers."""
        msgs = [
            Message(
                RecordDict({"config": ConfigRecord(self.facts())}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in nodes
        ]
        t0 = time.time()
        said = lambda k, total: self.log(
            f"pre-flight: {k:,} of {total:,} nodes answered ({time.time() - t0:.0f} s)"
        )
        replies = send_and_receive(grid, msgs, self.timeout, progress=said)
        # by the message each answers: Flower's own errors (a node unavailable) come from the SuperLink
        to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        answered = set()
        for r in sorted(replies, key=lambda r: to.get(r.metadata.reply_to_message_id, -1)):
            n = to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            if r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE:
                continue  # a node that died before Flower noticed: not refused, gone when Flower says so
            answered.add(n)
            if r.has_error():
                self.refuse(rnd, n, None, error_reason(r))
            else:
                self.judge(rnd, n, dict(r.content["info"]))
        for n in set(nodes) - answered:  # asked again when next seen: a node may be slow to start
            self.log(f"round {rnd}: node {n} did not answer the pre-flight query within {self.timeout:.0f} s")

    def judge(self, rnd: int, node: int, info: dict) -> None:
        p, n = int(info["partition-id"]), int(info["num-partitions"])
        holder = next((k for k, m in self.members.items() if m.partition == p), None)
        if n != self.num_partitions:
            self.refuse(
                rnd,
                node,
                p,
                f"it has num-partitions={n} but the run has fed.num_clients={self.num_partitions}",
            )
        elif holder is not None and self.members[holder].connected:
            self.refuse(
                rnd, node, p, f"partition {p} is held by node {holder}, which is connected: a duplicate"
            )
        elif info.get("requires-secagg") and not self.secagg:
            if rnd == 0:
                self.requiring_secagg.append(p)
            self.refuse(
                rnd, node, p, "it requires SecAgg+ (node config require-secagg) and the run does not use it"
            )
        else:
            member = Member(
                node, p, int(info["train-tokens"]), int(info["val-tokens"]), bool(info.get("own-data"))
            )
            member.requires_secagg = bool(info.get("requires-secagg"))
            if holder is not None:  # the same client on a restarted SuperNode: its partition, its state
                del self.members[holder]
                self.members[node] = member
                self.event(rnd, node, "back", p, f"partition {p} was node {holder}'s, which is gone")
            else:
                self.members[node] = member
                # said in the log when a node joins late, not for each node before round 1 or first sampled
                quiet = rnd == 0 or self.lazy
                self.event(rnd, node, "admitted", p, f"{member.train_tokens:,} train tokens", quiet=quiet)

    def refuse(self, rnd: int, node: int, partition: int | None, reason: str) -> None:
        self.refused[node] = reason
        self.event(rnd, node, "refused", partition, reason)

    def event(
        self, rnd: int, node: int, what: str, partition: int | None, reason: str, quiet: bool = False
    ) -> None:
        """One line in the log (unless quiet) and in membership.jsonl."""
        if not quiet:
            where = f" (partition {partition})" if partition is not None else ""
            self.log(f"round {rnd}: node {node}{where} {what}: {reason}")
        if self.record is not None:
            row = {"round": rnd, "node": node, "partition": partition, "event": what, "reason": reason}
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a") as f:
                f.write(json.dumps(row) + "\n")
