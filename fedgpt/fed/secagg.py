"""Secure aggregation, the node's half: one round's updates summed under Flower's SecAgg+ (Bell et al.
2020), so that the ServerApp learns their weighted mean and nothing of any one client's update.

    app = ClientApp(mods=[secagg.secure_aggregation])

Flower 1.42 runs SecAgg+ in four stages of messages (setup, share keys, collect masked vectors, unmask); the
protocol and its cryptography are Flower's, and the ServerApp's half is fedgpt.fed.secagg_server. On the
client, `secure_aggregation` (the ClientApp's mod) passes SecAgg+ messages to Flower's secaggplus_mod and
everything else straight through, unless the node itself requires SecAgg+ (node config require-secagg):
then it refuses plain train messages and evaluate messages. Every ClientApp process imports this module, so
it imports none of Flower's server side.

Flower's SecAgg+ is the semi-honest protocol: a node takes its peers' keys and the dropout lists from the
server as given, so a server that lies can make up a node's peers, or show its neighbours split dropout
views, and unmask its update. A node given an identity key and a roster of its peers' public keys
(`secagg-identity-key`, `secagg-roster`: node settings, fedgpt.fed.roster) takes part in the active-adversary
version (Bonawitz et al. 2017, on SecAgg+'s graph): signed keys, and a consistency check, a fifth stage
between collect masked vectors and unmask (signed_stage). Without a roster its SecAgg+ holds against an
honest-but-curious server only, and it says so in its log.

What the clients mask is their update (trained minus received weights, one fp32 vector), scaled by their
weight: SecAgg+ clips every value to +-secagg.clipping_range and quantizes it to secagg.quantization_range
levels before masking, so the mean it returns differs from the exact mean by at most clipping_range /
quantization_range per value (the weights' rounding aside). Metrics (train loss, tokens) travel in the clear.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedgpt.fed.node_policy import (  # the node's own settings, read in one place
    NodeRefusal,
    SecAggPolicy,
    secagg_policy,
)
from fedgpt.fed.roster import (
    Identity,
    Roster,
    advertisement,
    share_list,
    survivors,
)

log = logging.getLogger("fedgpt.node")


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """The ClientApp's mod: SecAgg+ for the messages of its protocol, nothing for the others, and the node's
    own floor, whatever the server's run config says.

    A node started with `require-secagg=true` refuses any train message outside the protocol, any evaluate
    message (a node that evaluates weights the server chose answers a loss oracle: membership inference on
    its data, one query at a time; queries, the pre-flight, still pass), and within the protocol the
    deviations a single node can see: a cohort under `secagg-min-clients` (default 2), a reconstruction
    threshold under 2, and an unmask request that asks for both secrets of one node (listed active and dead)
    or for its own key as if it had dropped out. A node with a roster (`secagg-identity-key`,
    `secagg-roster`) also takes only signed peers and unmasks only a survivor set its peers signed (see
    signed_stage). A refusal is an error reply: no arrays, no training, no shares.
    """
    policy = secagg_policy(context)
    announce(policy, context)
    kind = msg.metadata.message_type
    if kind == MessageType.EVALUATE and policy.require:
        raise NodeRefusal(
            "this node requires SecAgg+ (node config require-secagg) and refuses evaluate messages: "
            "evaluating weights the server chose would answer a loss oracle on its data; run with "
            "fed.client_eval_interval=0"
        )
    if kind == MessageType.TRAIN and policy.require:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            raise NodeRefusal(
                "this node requires SecAgg+ (node config require-secagg) and refuses a plain train message: "
                "run with secagg.enabled=true"
            )
        check_protocol(configs, msg.metadata.dst_node_id, policy.min_clients)
    if kind == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return signed_stage(msg, context, call_next, policy)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def announce(policy: SecAggPolicy, context: Context) -> None:
    """Log once per node (its first message) what its SecAgg+ holds against."""
    state = _state(context)
    if state.get("announced"):
        return
    state["announced"] = True
    if policy.signs:
        log.info("SecAgg+ on this node takes only peers of its roster (%d keys)", len(policy.roster))
    else:
        (log.warning if policy.require else log.info)(
            "SecAgg+ on this node holds against an honest-but-curious server only: it has no roster "
            "(secagg-identity-key, secagg-roster), so a server that lies can make up its peers"
        )


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
    elif stage in (Stage.UNMASK, CONSISTENCY):
        active, dead = set(configs[Key.ACTIVE_NODE_ID_LIST]), set(configs[Key.DEAD_NODE_ID_LIST])
        if active & dead or node_id in dead:
            raise NodeRefusal(
                "the server asked for both secrets of a node (or this node's own key): refused, it would "
                "unmask one client's update"
            )


# What fedgpt adds to SecAgg+ against a server that lies (Bonawitz et al. 2017's active-adversary version):
# its own record beside Flower's in the messages (Flower checks the keys of its own), and one stage between
# collect masked vectors and unmask. SIGNED is also where the node keeps, in context.state, what it signed.
SIGNED = "fedgpt-secagg"
CONSISTENCY = "consistency_check"


def signed_stage(msg: Message, context: Context, call_next, policy: SecAggPolicy) -> Message:
    """One SecAgg+ stage through Flower's secaggplus_mod, with the node's signatures and checks if it has a
    roster:

    - setup: it signs its two public keys for (run, round, its node id) beside Flower's reply; one setup a
      round, rounds only forward (a round's signatures are never given twice);
    - share keys, before Flower encrypts a share: every peer's keys must be signed by a roster member, a
      different one for each peer, for this run and round, and its own entry must be its own keys; then it
      signs the list of nodes it gives shares to (with their roster keys);
    - consistency check (fedgpt's stage): it signs the survivor set, once a round;
    - unmask: the lists must be exactly that set seen from its peers, and for every node whose share it would
      reveal, a majority (and at least the threshold) of the nodes that node shared with must have signed the
      same set. Honest nodes sign one set a round, so no two disjoint groups can each unmask a different view
      of one node (its self-mask from one, its pairwise key from the other): that is what split dropout views
      need. Majority, not the threshold: t signatures each would let two groups of t do it.

    Without a roster the stage is Flower's alone (the consistency check is acknowledged, unsigned).
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage, node = configs.get(Key.STAGE), context.node_id
    if stage == CONSISTENCY:
        return _consistency(msg, context, policy)
    if not policy.signs:
        return secaggplus_mod(msg, context, call_next)
    state, me, roster = _state(context), policy.identity, policy.roster
    forwarded = msg.content.config_records.get(SIGNED)
    if stage == Stage.SETUP:
        rnd = _begin(state, msg, context)
        reply = secaggplus_mod(msg, context, call_next)
        keys = reply.content.config_records[RECORD_KEY_CONFIGS]
        sig = me.sign(
            advertisement(context.run_id, rnd, node, keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2])
        )
        reply.content[SIGNED] = ConfigRecord({"key": me.fingerprint, "signature": sig})
        return reply
    run, rnd = _round(state, context)
    if stage == Stage.SHARE_KEYS:
        peers = _check_peers(configs, forwarded, context, roster, me, run, rnd)
        state["peers"], state["peer-keys"] = list(peers), list(peers.values())
        reply = secaggplus_mod(msg, context, call_next)
        sig = me.sign(share_list(run, rnd, node, peers))
        reply.content[SIGNED] = ConfigRecord(
            {"key": me.fingerprint, "signature": sig, "peers": list(peers), "peer-keys": list(peers.values())}
        )
        return reply
    if stage == Stage.UNMASK:
        _check_unmask(configs, forwarded, state, _flower_state(context), roster, run, rnd)
    return secaggplus_mod(msg, context, call_next)


def _state(context: Context) -> ConfigRecord:
    if SIGNED not in context.state.config_records:
        context.state.config_records[SIGNED] = ConfigRecord({})
    return context.state.config_records[SIGNED]


def _flower_state(context: Context) -> ConfigRecord:
    return context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord({}))


def _begin(state: ConfigRecord, msg: Message, context: Context) -> int:
    """A new round's setup: its round number (the message's group id, as Flower's workflow sets it), after
    every round this node set up before in this run; what the last round signed is forgotten."""
    try:
        rnd = int(msg.metadata.group_id)
    except ValueError:
        raise NodeRefusal(
            "the SecAgg+ setup names no round (group id): this node signs only for a round"
        ) from None
    if msg.metadata.dst_node_id != context.node_id:
        raise NodeRefusal(
            f"a SecAgg+ setup for node {msg.metadata.dst_node_id} reached node {context.node_id}"
        )
    if state.get("run") == context.run_id and rnd <= int(state.get("round", -1)):
        raise NodeRefusal(
            f"a SecAgg+ setup for round {rnd}, after this node set up round {state['round']} of this run: a "
            "round is set up once, and rounds only move forward"
        )
    for k in ("peers", "peer-keys", "active", "dead", "signature"):
        state.pop(k, None)
    state["run"], state["round"] = context.run_id, rnd
    return rnd


def _round(state: ConfigRecord, context: Context) -> tuple[int, int]:
    if state.get("run") != context.run_id or "round" not in state:
        raise NodeRefusal("a SecAgg+ stage without this node's signed setup in this run: refused")
    return context.run_id, int(state["round"])


def _check_peers(
    configs: ConfigRecord,
    forwarded: ConfigRecord | None,
    context: Context,
    roster: Roster,
    me: Identity,
    run: int,
    rnd: int,
) -> dict[int, bytes]:
    """Every peer of the share keys stage, signed by a distinct roster member for this run and round: their
    roster keys. Raises NodeRefusal before any share is encrypted."""
    if forwarded is None:
        raise NodeRefusal(
            "the server forwarded the peers' SecAgg+ keys without their signatures, and this node has a "
            "roster (secagg-roster): it gives shares only to peers it can verify"
        )
    own = _flower_state(context)
    peers, signer_of = {}, {}
    for name, (pk1, pk2) in ((k, v) for k, v in configs.items() if k != Key.STAGE):
        nid, entry = int(name), forwarded.get(name)
        if not isinstance(entry, list) or len(entry) != 4 or entry[:2] != [pk1, pk2]:
            raise NodeRefusal(
                f"peer {nid} comes without a signature over the keys the server forwarded for it"
            )
        fp, sig = entry[2], entry[3]
        if nid == context.node_id and (
            [pk1, pk2] != [own.get("pk1"), own.get("pk2")] or fp != me.fingerprint
        ):
            raise NodeRefusal("the server listed other keys as this node's own")
        if not roster.verify(fp, sig, advertisement(run, rnd, nid, pk1, pk2)):
            raise NodeRefusal(
                f"peer {nid}'s keys are not signed by a member of this node's roster for this run and round: "
                "a peer the server made up (or replayed)"
            )
        if fp in signer_of:
            raise NodeRefusal(
                f"peers {signer_of[fp]} and {nid} are signed by one roster member: made-up peers"
            )
        peers[nid], signer_of[fp] = fp, nid
    return peers


def _consistency(msg: Message, context: Context, policy: SecAggPolicy) -> Message:
    """Sign the survivor set the server will unmask with, once a round (without a roster: acknowledge)."""
    if not policy.signs:
        return Message(RecordDict(), reply_to=msg)
    configs, state = msg.content.config_records[RECORD_KEY_CONFIGS], _state(context)
    run, rnd = _round(state, context)
    if _flower_state(context).get("current_stage") != Stage.COLLECT_MASKED_VECTORS:
        raise NodeRefusal("a consistency check before this node sent its masked vector: refused")
    active, dead = sorted(configs[Key.ACTIVE_NODE_ID_LIST]), sorted(configs[Key.DEAD_NODE_ID_LIST])
    if context.node_id not in active or not set(state.get("peers", [])) <= set(active) | set(dead):
        raise NodeRefusal("a survivor set without this node alive, or without all of its peers: refused")
    if "signature" in state and (list(state["active"]), list(state["dead"])) != (active, dead):
        raise NodeRefusal(
            f"this node already signed another survivor set in round {rnd} (active {list(state['active'])}, "
            f"dead {list(state['dead'])}): it signs one a round, so a server cannot unmask two views"
        )
    if "signature" not in state:
        sig = policy.identity.sign(survivors(run, rnd, context.node_id, active, dead))
        state["active"], state["dead"], state["signature"] = active, dead, sig
    record = ConfigRecord({"key": policy.identity.fingerprint, "signature": state["signature"]})
    return Message(RecordDict({SIGNED: record}), reply_to=msg)


def _check_unmask(
    configs: ConfigRecord,
    forwarded: ConfigRecord | None,
    state: ConfigRecord,
    flower: ConfigRecord,
    roster: Roster,
    run: int,
    rnd: int,
) -> None:
    """Raise NodeRefusal unless the unmask request is the survivor set this node signed, and for every node
    whose share it reveals, a majority of that node's share holders signed the same set."""
    if "signature" not in state:
        raise NodeRefusal(
            "an unmask request without a consistency check (this node signed no survivor set this round): "
            "refused, the server could show other nodes another set"
        )
    active, dead, peers = set(state["active"]), set(state["dead"]), set(state["peers"])
    asked_active, asked_dead = set(configs[Key.ACTIVE_NODE_ID_LIST]), set(configs[Key.DEAD_NODE_ID_LIST])
    if asked_active != active & peers or asked_dead != dead & peers:
        raise NodeRefusal(
            f"the unmask request (active {sorted(asked_active)}, dead {sorted(asked_dead)}) is not the "
            f"survivor set this node signed (active {sorted(active)}, dead {sorted(dead)}) seen from its "
            "peers: refused"
        )
    forwarded = forwarded or ConfigRecord({})
    signed = {}  # roster key -> the node it signed the survivor set as
    for nid, fp, sig in zip(*(forwarded.get(k, []) for k in ("signers", "signer-keys", "signatures"))):
        if fp not in signed and roster.verify(
            fp, sig, survivors(run, rnd, nid, sorted(active), sorted(dead))
        ):
            signed[fp] = nid
    key_of = dict(zip(state["peers"], state["peer-keys"]))
    threshold = int(flower.get("threshold", 2))
    for p in sorted(asked_active | asked_dead):
        holders = dict(zip(forwarded.get(f"peers:{p}", []), forwarded.get(f"peer-keys:{p}", [])))
        if not roster.verify(
            key_of[p], forwarded.get(f"signature:{p}", b""), share_list(run, rnd, p, holders)
        ):
            raise NodeRefusal(f"no signed list of the nodes node {p} shared its secrets with: refused")
        agree = sum(signed.get(fp) == nid for nid, fp in holders.items())
        need = max(threshold, len(holders) // 2 + 1)
        if agree < need:
            raise NodeRefusal(
                f"only {agree} of the {len(holders)} nodes that hold node {p}'s shares signed the survivor "
                f"set this node signed (it needs {need}): refused, another group may have seen another set"
            )


def masked_reply(update: np.ndarray, weight: int, metrics: dict[str, Any]) -> RecordDict:
    """A client's train reply under SecAgg+: the update as the legacy FitRes that secaggplus_mod masks (and
    then empties), and fedgpt's metrics."""
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), num_examples=weight, metrics={})
    content = fitres_to_recorddict(fitres, keep_input=False)
    content["metrics"] = MetricRecord(metrics)
    return content
