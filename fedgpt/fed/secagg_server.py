"""SecAgg+ on the ServerApp's side: one round's updates summed under Flower's SecAgg+ workflow.

    mean, replies, sent, received = secure_round(grid, msgs, rnd, cfg, train_tokens)

Flower 1.42 runs SecAgg+ as a legacy workflow (flwr.server.workflow.SecAggPlusWorkflow) with a
LegacyContext and a legacy strategy. fedgpt's round loop keeps its own Message-API strategy, so this module
hands the workflow the nodes fedgpt sampled through a legacy strategy of its own, and fedgpt's own train
messages for the stage in which the clients train; and it relays the signatures of nodes that have a roster
(and drives the stage they add: fedgpt.fed.secagg.signed_stage). The node's half (the ClientApp's mod and its
floor) is fedgpt.fed.secagg.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedgpt.config import Config
from fedgpt.fed.grid import send_and_receive
from fedgpt.fed.secagg import CONSISTENCY, SIGNED


class _Node:
    """What the workflow keeps of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id


class _Sampler(LegacyStrategy):
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
    """Flower's SecAgg+ workflow, sending fedgpt's own train message to each node in its training stage, and
    relaying the nodes' signatures (fedgpt.fed.secagg.signed_stage) where nodes sign: each node's signed keys
    to its peers at share keys, a consistency check after the masked vectors, and every signature that check
    needs at unmask. Where no node signs (no roster on the nodes), the stages are Flower's own."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.contents = contents
        self.adverts: dict[int, ConfigRecord] = {}  # node -> its signed public keys (setup)
        self.share_lists: dict[int, ConfigRecord] = {}  # node -> the signed list of its share holders
        self.agreed: dict[int, ConfigRecord] = {}  # node -> its signature over the survivor set

    def setup_stage(self, grid, context, state) -> bool:
        relay = _Relay(grid)
        ok = super().setup_stage(relay, context, state)
        self.adverts = relay.signed
        # each node its own copy: the workflow adds its stage's record to the content it sends
        state.nid_to_fitins = {nid: RecordDict({**self.contents[nid]}) for nid in state.nid_to_fitins}
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:
        def peers_keys(content: RecordDict) -> ConfigRecord:
            peers = [int(k) for k in content[RECORD_KEY_CONFIGS] if k != Key.STAGE]
            return ConfigRecord(
                {
                    str(p): [
                        *state.nid_to_publickeys[p],
                        self.adverts[p]["key"],
                        self.adverts[p]["signature"],
                    ]
                    for p in peers
                    if p in self.adverts
                }
            )

        relay = _Relay(grid, peers_keys if self.adverts else None)
        ok = super().share_keys_stage(relay, context, state)
        self.share_lists = relay.signed
        return ok

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        return ok and (not self.adverts or self.consistency_stage(grid, context, state))

    def consistency_stage(self, grid, context, state) -> bool:
        """fedgpt's stage: every survivor signs the survivor set unmask will use (the workflow's active and
        dead nodes, as its unmask stage computes them). A node that does not answer stays active: its masked
        vector is in the sum."""
        rnd = context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]
        active = sorted(state.active_node_ids)
        dead = sorted(state.sampled_node_ids - state.active_node_ids)
        check = {Key.STAGE: CONSISTENCY, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}
        msgs = [
            Message(
                RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(check)}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
            )
            for nid in active
        ]
        replies = grid.send_and_receive(msgs, timeout=self.timeout)
        self.agreed = {r.metadata.src_node_id: r.content[SIGNED] for r in replies if _signed(r)}
        return True

    def unmask_stage(self, grid, context, state) -> bool:
        return super().unmask_stage(_Relay(grid, self.signatures) if self.adverts else grid, context, state)

    def signatures(self, content: RecordDict) -> ConfigRecord:
        """What a node needs to check an unmask request: for each node it would reveal a share of, that node's
        signed list of share holders, and every survivor-set signature of those holders."""
        configs = content[RECORD_KEY_CONFIGS]
        owners = [*configs[Key.ACTIVE_NODE_ID_LIST], *configs[Key.DEAD_NODE_ID_LIST]]
        record, holders = ConfigRecord({}), set()
        for p in (p for p in owners if p in self.share_lists):
            signed = self.share_lists[p]
            record[f"peers:{p}"], record[f"peer-keys:{p}"] = signed["peers"], signed["peer-keys"]
            record[f"signature:{p}"] = signed["signature"]
            holders |= set(signed["peers"])
        signers = sorted(holders & set(self.agreed))
        record["signers"] = signers
        record["signer-keys"] = [self.agreed[n]["key"] for n in signers]
        record["signatures"] = [self.agreed[n]["signature"] for n in signers]
        return record


class _Relay:
    """A grid for one stage of the workflow: it adds fedgpt's signed record to each message it sends (built
    by `attach` from the message's content), and keeps the signed record of each reply."""

    def __init__(self, grid, attach: Callable[[RecordDict], ConfigRecord] | None = None):
        self._grid, self._attach, self.signed = grid, attach, {}

    def send_and_receive(self, messages, *, timeout: float):
        messages = list(messages)
        for m in messages if self._attach else []:
            m.content[SIGNED] = self._attach(m.content)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        self.signed = {r.metadata.src_node_id: r.content[SIGNED] for r in replies if _signed(r)}
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _signed(reply: Message) -> bool:
    return not reply.has_error() and SIGNED in reply.content.config_records


class _CountingGrid:
    """A grid that counts the bytes of every message it sends and receives, and keeps the replies."""

    def __init__(self, grid: Grid):
        self._grid, self.sent, self.received, self.replies = grid, 0, 0, []

    def send_and_receive(self, messages, *, timeout: float):
        messages = list(messages)
        self.sent += sum(_nbytes(m.content) for m in messages)
        # fedgpt's poll, not the deployment grid's 3 s
        replies = send_and_receive(self._grid, messages, timeout)
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
    sent and received over all its stages (four, or five where the nodes sign).
    """
    s = cfg.secagg
    counting = _CountingGrid(grid)
    sampler = _Sampler([m.metadata.dst_node_id for m in msgs])
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=sampler)
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
    if not sampler.results:
        return None, trained, counting.sent, counting.received
    (mean,) = parameters_to_ndarrays(sampler.results[0][1].parameters)
    used = {node.node_id for node, _ in sampler.results}
    return mean, [r for r in trained if r.metadata.src_node_id in used], counting.sent, counting.received
