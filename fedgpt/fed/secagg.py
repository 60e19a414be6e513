"""Secure aggregation: one round's updates summed under Flower's SecAgg+ (Bell et al. 2020), so that the
ServerApp learns their weighted mean and nothing of any one client's update.

    mean, replies, sent, received = secure_round(grid, msgs, rnd, cfg, max_weight)

Flower 1.42 runs SecAgg+ as a legacy workflow (flwr.server.workflow.SecAggPlusWorkflow): it takes a
LegacyContext and a legacy strategy, and drives four stages of messages (setup, share keys, collect masked
vectors, unmask). fedgpt's round loop keeps its own Message-API strategy, so this module hands the workflow
the nodes fedgpt sampled through a relay strategy, and fedgpt's own train messages for the stage in which the
clients train; the protocol and its cryptography are Flower's. On the client, `secure_aggregation` (the
ClientApp's mod) passes SecAgg+ messages to Flower's secaggplus_mod and everything else straight through,
unless the node itself requires SecAgg+ (node config require-secagg): then it refuses plain train messages.

What the clients mask is their update (trained minus received weights, one fp32 vector), scaled by their
weight: SecAgg+ clips every value to +-secagg.clipping_range and quantizes it to secagg.quantization_range
levels before masking, so the mean it returns differs from the exact mean by at most clipping_range /
quantization_range per value (the weights' rounding aside). Metrics (train loss, tokens) travel in the clear.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedgpt.config import Config
from fedgpt.fed.grid import exchange


def node_setting(
    node: Context | dict, key: str, default: str | int | float | bool
) -> str | int | float | bool:
    """A setting of this node (its Context, or its node config): its node config `key`, else the environment
    of its SuperNode as FEDGPT_NODE_<KEY> (how a simulation sets it: Flower gives simulated nodes no config of
    their own), else `default`. The run config never decides it."""
    config = node.node_config if isinstance(node, Context) else node
    if key in config:
        value = config[key]
    else:
        value = os.environ.get("FEDGPT_NODE_" + key.upper().replace("-", "_"))
        if value is None:
            return default
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
    return type(default)(value)


def node_requires_secagg(node: Context | dict) -> bool:
    return bool(node_setting(node, "require-secagg", False))


class NodeRefusal(PermissionError):
    """A node's privacy floor refused a message (the reply carries only this error)."""


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """The ClientApp's mod: SecAgg+ for the messages of its protocol, nothing for the others, and the node's
    own floor, whatever the server's run config says.

    A node started with `require-secagg=true` refuses any train message outside the protocol, and within it
    the deviations a single node can see: a cohort under `secagg-min-clients` (default 2), a reconstruction
    threshold under 2, and an unmask request that asks for both secrets of one node (listed active and dead)
    or for its own key as if it had dropped out. The refusal is an error reply: no arrays, no training.
    """
    if msg.metadata.message_type == MessageType.TRAIN and node_requires_secagg(context):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            raise NodeRefusal(
                "this node requires SecAgg+ (node config require-secagg) and refuses a plain train message: "
                "run with secagg.enabled=true"
            )
        check_protocol(configs, msg.metadata.dst_node_id, int(node_setting(context, "secagg-min-clients", 2)))
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def check_protocol(configs: ConfigRecord, node_id: int, min_clients: int) -> None:
    """Raise NodeRefusal if this stage's message asks for what an honest SecAgg+ server never would."""
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        if int(configs.get(Key.THRESHOLD, 0)) < 2 or int(configs.get(Key.SAMPLE_NUMBER, 0)) < min_clients:
            raise NodeRefusal(
                f"this node requires SecAgg+ among {min_clients} or more clients with a threshold of 2 or "
                f"more (got {configs.get(Key.SAMPLE_NUMBER)} clients, threshold {configs.get(Key.THRESHOLD)})"
            )
    elif stage == Stage.SHARE_KEYS:
        peers = len([k for k in configs if k != Key.STAGE])
        if peers < min_clients:
            raise NodeRefusal(f"this node requires SecAgg+ among {min_clients} or more clients (got {peers})")
    elif stage == Stage.UNMASK:
        active, dead = set(configs[Key.ACTIVE_NODE_ID_LIST]), set(configs[Key.DEAD_NODE_ID_LIST])
        if active & dead or node_id in dead:
            raise NodeRefusal(
                "the server asked for both secrets of a node (or this node's own key): refused, it would "
                "unmask one client's update"
            )


def masked_reply(update: np.ndarray, weight: int, metrics: dict[str, Any]) -> RecordDict:
    """A client's train reply under SecAgg+: the update as the legacy FitRes that secaggplus_mod masks (and
    then empties), and fedgpt's metrics."""
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), num_examples=weight, metrics={})
    content = fitres_to_recorddict(fitres, keep_input=False)
    content["metrics"] = MetricRecord(metrics)
    return content


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


def secure_round(
    grid: Grid, msgs: list[Message], rnd: int, cfg: Config, max_weight: float
) -> tuple[np.ndarray | None, list[Message], int, int]:
    """Run SecAgg+ over one round's train messages (one per sampled node).

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
        max_weight=float(max_weight),
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
