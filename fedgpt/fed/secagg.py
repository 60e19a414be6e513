"""Secure aggregation, the node's half: one round's updates summed under Flower's SecAgg+ (Bell et al.
2020), so that the ServerApp learns their weighted mean and nothing of any one client's update.

    app = ClientApp(mods=[secagg.secure_aggregation])

Flower 1.42 runs SecAgg+ in four stages of messages (setup, share keys, collect masked vectors, unmask); the
protocol and its cryptography are Flower's, and the ServerApp's half is fedgpt.fed.secagg_server. On the
client, `secure_aggregation` (the ClientApp's mod) passes SecAgg+ messages to Flower's secaggplus_mod and
everything else straight through, unless the node itself requires SecAgg+ (node config require-secagg):
then it refuses plain train messages. Every ClientApp process imports this module, so it imports none of
Flower's server side.

What the clients mask is their update (trained minus received weights, one fp32 vector), scaled by their
weight: SecAgg+ clips every value to +-secagg.clipping_range and quantizes it to secagg.quantization_range
levels before masking, so the mean it returns differs from the exact mean by at most clipping_range /
quantization_range per value (the weights' rounding aside). Metrics (train loss, tokens) travel in the clear.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict


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
