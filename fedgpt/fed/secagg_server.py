"""SecAgg+ on the ServerApp's side: one round's updates summed under Flower's SecAgg+ workflow.

    mean, replies, sent, received = secure_round(grid, msgs, rnd, cfg, train_tokens)

Flower 1.42 runs SecAgg+ as a legacy workflow (flwr.server.workflow.SecAggPlusWorkflow) with a
LegacyContext and a legacy strategy. fedgpt's round loop keeps its own Message-API strategy, so this module
hands the workflow the nodes fedgpt sampled through a relay strategy, and fedgpt's own train messages for the
stage in which the clients train. The node's half (the ClientApp's mod and its floor) is fedgpt.fed.secagg.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedgpt.config import Config
from fedgpt.fed.grid import exchange


class _Node:
    """What the workflow keeps of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id


class _Relay(LegacyStrategy):
    """The legacy strategy the workflow drives: it samples the nodes fedgpt chose, and keeps the aggregate."""

    def __init__(self, nodes: list[int]):
        self.nodes, self.results = nodes, []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Node(n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results  # every FitRes holds the same unmasked weighted mean
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending fedgpt's own train message to each node in its training stage."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        # each node its own copy: the workflow adds its stage's record to the content it sends
        state.nid_to_fitins = {nid: RecordDict({**self.contents[nid]}) for nid in state.nid_to_fitins}
        return ok


class _CountingGrid:
    """A grid that counts the bytes of every message it sends and receives, and keeps the replies."""

    def __init__(self, grid: Grid):
        self._grid, self.sent, self.received, self.replies = grid, 0, 0, []

    def send_and_receive(self, messages, *, timeout: float):
        messages = list(messages)
        self.sent += sum(_nbytes(m.content) for m in messages)
        replies = exchange(self._grid, messages, timeout)  # fedgpt's poll, not the deployment grid's 3 s
        self.received += sum(_nbytes(r.content) for r in replies if not r.has_error())
        self.replies += replies
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _nbytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and of its configs' bytes values (keys, shares, masked vectors)."""
    n = sum(a.count_bytes() for a in content.array_records.values())
    for record in content.config_records.values():
        for v in record.values():
            items = v if isinstance(v, list) else [v]
            n += sum(len(x) for x in items if isinstance(x, bytes))
    return n


def max_weight(cfg: Config, train_tokens: dict[int, int]) -> int:
    """The largest weight a client can send (SecAgg+ scales every update by weight / this, which must not
    exceed 1): its data (`train_tokens`: each node's, from the pre-flight), or the tokens of fed.local_steps
    steps of every micro-batch."""
    f, t = cfg.fed, cfg.train
    most_data = max(train_tokens.values(), default=1)
    step_tokens = most_data if f.full_batch else t.batch_size * cfg.model.block_size * t.grad_accum_steps
    return {"uniform": 1, "trained": f.local_steps * step_tokens, "data": most_data}[f.weighting]


def secure_round(
    grid: Grid, msgs: list[Message], rnd: int, cfg: Config, train_tokens: dict[int, int]
) -> tuple[np.ndarray | None, list[Message], int, int]:
    """Run SecAgg+ over one round's train messages (one per sampled node), the clients' weights bounded by
    max_weight(cfg, train_tokens).

    Returns the weighted mean of the clients' updates (None if the protocol halted: too few clients left),
    the train replies it came from (their metrics; their arrays emptied by the clients' mod), and the bytes
    sent and received over all four stages.
    """
    s = cfg.secagg
    counting = _CountingGrid(grid)
    relay = _Relay([m.metadata.dst_node_id for m in msgs])
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=relay)
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    workflow = _Workflow(
        {m.metadata.dst_node_id: m.content for m in msgs},
        # fewer clients than shares: each shares with all of them (Flower's 1.0)
        num_shares=s.shares if len(msgs) >= s.shares else 1.0,
        reconstruction_threshold=min(s.threshold, len(msgs)),
        max_weight=float(max_weight(cfg, train_tokens)),
        clipping_range=s.clipping_range,
        quantization_range=s.quantization_range,
        timeout=cfg.fed.round_timeout,
    )
    workflow(counting, context)
    trained = [r for r in counting.replies if not r.has_error() and "metrics" in r.content]
    if not relay.results:
        return None, trained, counting.sent, counting.received
    (mean,) = parameters_to_ndarrays(relay.results[0][1].parameters)
    used = {node.node_id for node, _ in relay.results}
    return mean, [r for r in trained if r.metadata.src_node_id in used], counting.sent, counting.received
