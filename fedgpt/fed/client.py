"""The ClientApp's work: answer the pre-flight query, train one partition on the shared core, evaluate it.

Everything a client needs arrives in the message: the global weights (fedgpt.fed.wire), the run config as JSON
and the tokenizer the server expects, and this round's work order (fedgpt.fed.work); the node adds its
partition id and, in deployment, where its data lives.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgpt.config import Config, from_dict
from fedgpt.data import Batches, load_dataset, load_node_tokens
from fedgpt.fed import personal, secagg
from fedgpt.fed.client_state import ClientStateStore
from fedgpt.fed.moments import MOMENTS
from fedgpt.fed.node_policy import NodeError, NodePolicy, node_requires_secagg
from fedgpt.fed.partition import ClientPartition, client_partitions
from fedgpt.fed.privacy import clip_update
from fedgpt.fed.wire import Exchange
from fedgpt.fed.work import WorkOrder
from fedgpt.lora import add_lora
from fedgpt.model import GPT
from fedgpt.optim import first_moments, load_first_moments
from fedgpt.tokenizer import Tokenizer, get_tokenizer
from fedgpt.train import Trainer, build_model, resolve_device


@dataclass
class RunOnNode:
    """A run as this process serves it: its config (the node's paths in it), partitions, trainer and wire."""

    cfg: Config
    parts: list[ClientPartition]  # every client's partition: any of them may be served by this process
    trainer: Trainer
    exchange: Exchange  # what the server and this client exchange (fedgpt.fed.wire)


# One entry per run in this process. In a Ray actor it lives across rounds and serves whichever partitions
# land on the actor: the model is rebuilt (and recompiled) never, the corpus re-partitioned never; weights
# arrive with every message anyway. In deployment each message is a new process and the on-disk token cache of
# fedgpt.data does the saving.
_CACHE: dict[str, RunOnNode] = {}
log = logging.getLogger("fedgpt.node")


def run_config(content: RecordDict) -> tuple[Config, dict, ConfigRecord]:
    record = content["config"]
    return from_dict(json.loads(record["fedgpt-config"])), json.loads(record["tokenizer"]), record


def run_on_node(content: RecordDict, node: dict) -> tuple[RunOnNode, int]:
    """This process's model, trainer and partitions for the message's run (cached), and this node's partition
    id.

    What the node reads is its own (fedgpt.fed.node_policy): the run config chooses the tokenizer, the model
    and the work, and every path in it is replaced by the node's. A node whose node config names `input-file`
    (a text, or a folder of them) trains on all of that data, in the run's tokenizer: its own data, which no
    other process ever reads. Otherwise every node holds the run's corpus (node config `data-dir`, and
    `corpus-file` where it is not Tiny Shakespeare) and trains on its partition of it.
    """
    policy = NodePolicy.of(node)
    partition_id, n = policy.partition()
    server_cfg, tokenizer_meta, record = run_config(content)
    cfg = policy.run_config(server_cfg)
    own = policy.input_file or None
    key = hashlib.sha256(json.dumps([cfg.to_dict(), tokenizer_meta, n, own]).encode()).hexdigest()
    if key in _CACHE:
        return _CACHE[key], partition_id
    threads = int(record.get("client-threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    tokenizer, parts = (
        own_data(cfg, tokenizer_meta, own, partition_id, n) if own else shared_data(cfg, tokenizer_meta, n)
    )
    model = client_model(cfg, tokenizer, json.loads(record.get("embedding-rows", "null")))
    trainer = Trainer(model, cfg.train, resolve_device(cfg.train.device), log=None)
    state = RunOnNode(cfg, parts, trainer, Exchange.of(model, cfg))
    _CACHE.clear()  # one run at a time per process: drop the model of an earlier run
    _CACHE[key] = state
    return state, partition_id


def shared_data(cfg: Config, tokenizer_meta: dict, n: int) -> tuple[Tokenizer, list[ClientPartition]]:
    """The run's corpus, which this node holds too, split into its n partitions (as spans: tokens on use)."""
    ds = load_dataset(cfg.data)
    if ds.tokenizer.meta() != tokenizer_meta:
        raise NodeError(
            f"this node's corpus and tokenizer ({ds.tokenizer.meta().get('kind')}) differ from the server's "
            f"({tokenizer_meta.get('kind')}): give every node the run's corpus (node config data-dir, "
            "corpus-file, vocab-file) and the run's data.tokenizer, or the node its own data (input-file)"
        )
    return ds.tokenizer, client_partitions(cfg, ds, n)


def own_data(
    cfg: Config, tokenizer_meta: dict, path: str, partition_id: int, n: int
) -> tuple[Tokenizer, list[ClientPartition]]:
    """This node's own text as its one partition, in the run's tokenizer; no other partition is here. What is
    wrong with the text (a character outside the server's vocabulary, say) stays in the node's log: the
    server is told what failed, not what the text holds."""
    cache = Path(cfg.data.data_dir)  # the node's own (fedgpt.fed.node_policy)
    tokenizer = get_tokenizer(tokenizer_meta, cache_dir=cache / "tiktoken_cache")
    try:
        tokens = load_node_tokens(path, tokenizer, cache)
    except ValueError as e:
        log.error("this node's own data (input-file) cannot be used: %s", e)
        raise NodeError(
            "this node's own text cannot be encoded with the run's tokenizer or is too small (details in the "
            "node's log): train with data.tokenizer=gpt2, which encodes any text, or give the node other text"
        ) from None
    f = cfg.fed
    n_val = round(len(tokens) * f.client_val_fraction) if f.client_eval_interval > 0 else 0
    spans = np.array([[0, len(tokens)]], dtype=np.int64)
    mine = ClientPartition(partition_id, spans, n_val, [], "own data", source=tokens)
    return tokenizer, [mine if i == partition_id else None for i in range(n)]


def client_model(cfg: Config, tokenizer: Tokenizer, rows: list[int] | None = None) -> GPT:
    """The model a client trains. Its initial weights do not matter, the global model arrives with every
    message; with LoRA only the adapters arrive, so the client builds the frozen base from train.init_from,
    once per process, with the embedding rows the server chose (`rows`, lora.embedding_rows)."""
    if not cfg.lora.rank:
        return GPT(cfg.model)
    model = build_model(cfg, tokenizer.meta(), tokenizer.vocab_size)
    return add_lora(model, cfg.lora, cfg.train.seed, tokenizer, rows)


def load_global(st: RunOnNode, arrays: ArrayRecord, partition_id: int) -> dict[str, torch.Tensor]:
    """The global weights a message holds, loaded into this client's model; returned as received."""
    weights = st.exchange.read_downlink(arrays, f"the server (to client {partition_id})")
    st.exchange.load(st.trainer.raw_model, weights)
    return weights


def handshake(content: RecordDict, node: dict) -> RecordDict:
    """Answer the server's pre-flight query: this node's partition and data sizes (errors surface before round
    1)."""
    st, partition_id = run_on_node(content, node)
    part = st.parts[partition_id]
    reply = ConfigRecord(
        {
            "partition-id": partition_id,
            "num-partitions": len(st.parts),
            "own-data": int(part.scheme == "own data"),
            "train-tokens": int(len(part.train)),
            "val-tokens": int(len(part.val)),
            "requires-secagg": int(node_requires_secagg(node)),
        }
    )
    return RecordDict({"info": reply})


def fit(content: RecordDict, node: dict) -> RecordDict:
    """Carry out the round's work order from the global weights; reply with the update and metrics."""
    st, partition_id = run_on_node(content, node)
    cfg, part, trainer = st.cfg, st.parts[partition_id], st.trainer
    order = WorkOrder.from_config(content["config"])
    NodePolicy.round(order.round)  # both name files of the node's state: checked before they touch any
    NodePolicy.round(order.keep_from_round, "keep-from-round", least=-1)
    down, up = st.exchange.streaming(order.round)  # the whole model, or streaming fragments
    store = state_store(cfg, content["config"], node, partition_id)
    shared = content[MOMENTS].to_torch_state_dict() if MOMENTS in content else None
    age, stale, saved = restore(trainer, store, order.round, cfg, shared)
    if cfg.keeps_client_weights:
        received = own_weights(st, content["arrays"], saved, order.round, down)
    else:
        received = load_global(st, content["arrays"], partition_id)
    mu = order.proximal_mu
    ref = [p.detach().clone() for p in trainer.raw_model.parameters()] if mu > 0 else None
    batches = round_batches(st, part, partition_id, order.round)
    t_start = time.time()
    m = trainer.train_steps(
        batches, order.local_steps, order.schedule, at_step=order.first_step, mu=mu, ref=ref
    )
    trained = st.exchange.state(trainer.raw_model)
    update = up.difference(trained, received)
    length = float(update.norm())  # this round's update's L2 norm
    # dp.clipping=client: the server sends the norm, adaptive clipping moves it
    clipping = order.dp_clipping_norm
    if clipping is not None:
        update, unclipped = clip_update(update, clipping, length)
    # Under SecAgg+ (the run's, or the node's own floor whatever the run config says) the update travels
    # masked (secaggplus_mod), quantized by SecAgg+ itself, and no metric of this client leaves in the clear.
    secure = cfg.secagg.enabled or node_requires_secagg(node)
    if secure:
        arrays, residual = None, None
    else:
        arrays, residual = up.uplink(update, content["arrays"], saved_residual(saved, st, order.round))
    if store is not None:
        keep(store, st, order.round, saved, residual, {"weights": trained, "synced": received})
        store.prune(keep_from_round=order.keep_from_round)
    if "adapter" in personal.schemes(cfg):  # the client's own adapter: trained on what it received, kept
        path = adapter_path(content["config"], node, partition_id)
        personal.train_adapter(trainer.raw_model, received, cfg, part, partition_id, order.round, path)
    weight = {"data": len(part.train), "trained": m["tokens"], "uniform": 1}[cfg.fed.weighting]
    metrics = {
        "train-loss": m["loss"],
        "train-seconds": m["seconds"],
        "train-tokens": m["tokens"],
        "train-start": t_start,
        "train-lr": m["lr"],
        "state-age": age,
        "state-stale": stale,
        "num-examples": max(1, weight),
        # what a clipping norm is chosen from; under DP or SecAgg+ it would reveal in the clear what they hide
        **({} if cfg.dp.enabled or cfg.secagg.enabled else {"update-norm": length}),
    }
    if arrays is None:
        if clipping is not None:  # summed under the mask with the others: the server sees only the count
            update = torch.cat([update, torch.tensor([unclipped])])
        # only the weight SecAgg+ scales by: the server's own pre-flight already holds it
        weight_only = {"num-examples": metrics["num-examples"]}
        return secagg.masked_reply(update.numpy(), metrics["num-examples"], weight_only)
    if clipping is not None:  # central DP: the server sees this update anyway
        metrics["dp-unclipped"] = int(unclipped)
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    if cfg.fed.client_optimizer == "average":  # fedgpt.fed.moments: the server averages them
        moments = first_moments(trainer.optimizer, trainer.raw_model)
        reply[MOMENTS] = ArrayRecord({k: v.detach().float().cpu() for k, v in moments.items()})
    return reply


def round_batches(st: RunOnNode, part: ClientPartition, partition_id: int, rnd: int):
    """A new, deterministic stream of windows per (client, round), identical whichever process serves it
    (dropout masks too); with fed.full_batch (FedSGD) each step is the gradient of all the client's data."""
    cfg = st.cfg
    seed = cfg.train.seed * 100_003 + partition_id * 1_009 + rnd
    torch.manual_seed(seed)
    batches = Batches(part.train, cfg.model.block_size, cfg.train.batch_size, st.trainer.device, seed=seed)
    return itertools.repeat(batches.all_windows()) if cfg.fed.full_batch else batches


def saved_residual(saved: dict, st: RunOnNode, rnd: int) -> torch.Tensor | None:
    """What quantization cut from this client's last update (of this round's fragment), if fed back."""
    if not st.cfg.uses_error_feedback:
        return None
    if st.cfg.keeps_client_weights:  # one residual a fragment
        return (saved.get("residual") or {}).get(st.exchange.synced_fragment(rnd))
    return saved.get("residual")


def keep(
    store: ClientStateStore,
    st: RunOnNode,
    rnd: int,
    saved: dict,
    residual: torch.Tensor | None,
    states: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Save what this client carries into its next round: its optimizer state (if it keeps it) and its
    quantization residual; with fragments, its own weights and what it holds of the global model (`states`),
    and one residual a fragment."""
    cfg = st.cfg
    optimizer = st.trainer.optimizer.state_dict() if cfg.keeps_client_state else None
    kept = {"optimizer": optimizer, "residual": residual}
    if cfg.keeps_client_weights:
        residuals = dict(saved.get("residual") or {})
        if residual is not None:
            residuals[st.exchange.synced_fragment(rnd)] = residual
        kept = {**kept, "residual": residuals or None, "round": rnd}
        kept |= {name: st.exchange.flatten(state) for name, state in states.items()}
    store.save(rnd, kept)


def state_store(cfg: Config, record: ConfigRecord, node: dict, partition_id: int) -> ClientStateStore | None:
    """Where this client keeps its state between rounds (its optimizer state, its quantization error), or None
    if it keeps none: under the node's own state-dir (fedgpt.fed.node_policy), in the folder of the message's
    run id, checked to be a name and not a path."""
    if not (cfg.keeps_client_state or cfg.uses_error_feedback or cfg.keeps_client_weights):
        return None
    policy = NodePolicy.of(node)
    return ClientStateStore(policy.state_dir, policy.run_id(record["run-id"]), partition_id)


def restore(
    trainer: Trainer,
    store: ClientStateStore | None,
    rnd: int,
    cfg: Config,
    shared: dict[str, torch.Tensor] | None = None,
) -> tuple[int, int, dict]:
    """Load what this client saved in an earlier round: its optimizer state, if it keeps it and the state is
    at most fed.client_state_max_age rounds old, with the first moments the server `shared`
    (fed.client_optimizer=average; a client without a state of its own starts fresh); and return the rest
    (its quantization error, its own weights).

    Returns (age in rounds of the optimizer state loaded, 0 if none; 1 if a saved optimizer state was too old
    and dropped; the saved state, {} if none).
    """
    trainer.optimizer.state.clear()
    state, saved_round = store.load(before_round=rnd) if store is not None else (None, None)
    if state is None:
        return 0, 0, {}
    if not cfg.keeps_client_state or state.get("optimizer") is None:
        return 0, 0, state
    if rnd - saved_round > cfg.fed.client_state_max_age:
        return 0, 1, state
    trainer.optimizer.load_state_dict(state["optimizer"])
    if shared is not None:
        load_first_moments(trainer.optimizer, trainer.raw_model, shared)
    return rnd - saved_round, 0, state


def own_weights(
    st: RunOnNode, arrays: ArrayRecord, saved: dict, rnd: int, down: Exchange
) -> dict[str, torch.Tensor]:
    """Streaming fragments: this client's own weights from its last round, with the fragment the server
    synced since as it came down (round 1: the whole model), loaded into its model. Returns the global model
    as this client holds it (each fragment as last synced): what its update is taken against."""
    ex = st.exchange
    got = down.read_downlink(arrays, f"the server (round {rnd})")
    if down is ex:
        ex.load(st.trainer.raw_model, got)
        return got
    if saved.get("round") != rnd - 1:
        raise RuntimeError(
            f"fed.fragments: this client holds no weights of round {rnd - 1} (it has "
            f"{saved.get('round', 'none')}): streaming fragments need every client in every round"
        )
    ex.load(st.trainer.raw_model, {**ex.unflatten(saved["weights"]), **got})
    return {**ex.unflatten(saved["synced"]), **got}


def adapter_path(record: ConfigRecord, node: dict, partition_id: int) -> Path:
    """Where this client keeps its personal adapter: under the node's own state-dir, in the folder of the
    message's run id (checked to be a name)."""
    policy = NodePolicy.of(node)
    return personal.adapter_file(policy.state_dir, policy.run_id(record["run-id"]), partition_id)


def evaluate_partition(content: RecordDict, node: dict) -> RecordDict:
    """Loss and accuracy of the global weights on this client's own validation slice, and of each personal
    model of the run's personal.scheme (fedgpt.fed.personal)."""
    st, partition_id = run_on_node(content, node)
    cfg, part, trainer = st.cfg, st.parts[partition_id], st.trainer
    load_global(st, content["arrays"], partition_id)
    res = personal.evaluate_on(trainer.raw_model, cfg, part, trainer.device, trainer.ctx)
    metrics = {"val-loss": res["loss"], "val-accuracy": res["accuracy"], "num-examples": int(len(part.val))}
    rnd = int(content["config"].get("server-round", 0))
    for scheme in personal.schemes(cfg):
        path = adapter_path(content["config"], node, partition_id) if scheme == "adapter" else None
        model = personal.personal_model(trainer.raw_model, cfg, scheme, part, partition_id, rnd, path)
        res = personal.evaluate_on(model, cfg, part, trainer.device, trainer.ctx)
        metrics |= {f"{scheme}-val-loss": res["loss"], f"{scheme}-val-accuracy": res["accuracy"]}
    return RecordDict({"metrics": MetricRecord(metrics)})


def handle(kind: str, content: RecordDict, node: dict) -> RecordDict:
    """The reply content of a message of `kind` (query, train or evaluate), from its content and the node's
    config. fedgpt.fed.relay calls it in this process, or has the node's worker call it."""
    if kind == "query":
        return handshake(content, node)
    if kind == "train":
        return fit(content, node)
    if kind == "evaluate":
        return evaluate_partition(content, node)
    raise ValueError(f"unknown message kind {kind!r}: query, train or evaluate")
