"""A Flower Grid that delivers each message to fedgpt's own client code in this process: the server's round
loop and the clients' training are fedgpt's, only the transport (SuperLink, Ray) is left out. For tests that
put a fault at an exact point of a round (a send that fails, a reply that was tampered with) in seconds.

    grid = InProcessGrid(3, data_dir)          # three nodes, partitions 0..2
    run.run(grid)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import DEFAULT_TTL, Error, Message, MessageType

KINDS = {MessageType.QUERY: "query", MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}


class InProcessGrid:
    """Nodes 101, 102, ... serving partitions 0, 1, ...; `tamper(kind, node, reply)` may change a reply before
    the server pulls it; `sent` lists every message pushed, in order."""

    def __init__(
        self, clients: int, data_dir: Path, tamper: Callable | None = None, state_dir: Path | None = None
    ):
        own = {"data-dir": str(data_dir), **({"state-dir": str(state_dir)} if state_dir else {})}
        self.nodes = {101 + i: {"partition-id": i, "num-partitions": clients, **own} for i in range(clients)}
        self.tamper, self.sent, self._replies = tamper, [], {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        from fedgpt.fed import client

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            msg.metadata.__dict__["_created_at"] = time.time()
            msg.metadata.ttl = DEFAULT_TTL
            self.sent.append(msg)
            node, kind = msg.metadata.dst_node_id, KINDS[msg.metadata.message_type]
            try:
                reply = Message(client.handle(kind, msg.content, self.nodes[node]), reply_to=msg)
            except Exception as e:  # as Flower returns a ClientApp's exception
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            if self.tamper is not None and not reply.has_error():
                reply = self.tamper(kind, node, reply) or reply
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]
