"""The ClientApp's work: answer the pre-flight query, train one partition on the shared core, evaluate it.

Everything a client needs arrives in the message's ConfigRecord (the run config as JSON, the tokenizer the
server expects, the round); the node adds its partition id and, in deployment, where its data lives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedgpt.config import Config, TrainConfig, from_dict
from fedgpt.data import Batches, load_dataset, load_node_tokens
from fedgpt.fed import secagg
from fedgpt.fed.client_state import ClientStateStore
from fedgpt.fed.partition import ClientPartition, client_partitions
from fedgpt.fed.wire import check_keys, decode, encode, flatten, from_record, tied_aliases, to_record
from fedgpt.lora import adapter_state, add_lora
from fedgpt.model import GPT
from fedgpt.tokenizer import Tokenizer, get_tokenizer
from fedgpt.train import Trainer, build_model, evaluate, resolve_device


@dataclass
class ClientState:
    cfg: Config
    parts: list[ClientPartition]  # every client's partition: any of them may be served by this process
    trainer: Trainer
    aliases: dict[str, str]


# One entry per run in this process. In a Ray actor it lives across rounds and serves whichever partitions
# land on the actor: the model is rebuilt (and recompiled) never, the corpus re-partitioned never; weights
# arrive with every message anyway. In deployment each message is a new process and the on-disk token cache of
# fedgpt.data does the saving.
_CACHE: dict[str, ClientState] = {}


def run_config(msg: Message) -> tuple[Config, dict, ConfigRecord]:
    record = msg.content["config"]
    return from_dict(json.loads(record["fedgpt-config"])), json.loads(record["tokenizer"]), record


def client_state(msg: Message, context: Context) -> tuple[ClientState, int]:
    """This process's model, trainer and partitions for the message's run (cached), and this node's partition
    id.

    A node whose node config names `input-file` (a text, or a folder of them) trains on all of that data, in
    the run's tokenizer: its own data, which no other process ever reads. Otherwise every node holds the run's
    corpus and trains on its partition of it (node config `data-dir` says where the corpus lives).
    """
    cfg, tokenizer_meta, record = run_config(msg)
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "node config lacks partition-id / num-partitions: start the SuperNode with "
            '--node-config "partition-id=0 num-partitions=2"'
        )
    partition_id, n = int(node["partition-id"]), int(node["num-partitions"])
    if "data-dir" in node:  # deployed apps do not run from the repository: a node says where its data lives
        cfg.data.data_dir = str(node["data-dir"])
    own = str(node["input-file"]) if "input-file" in node else None
    key = hashlib.sha256(json.dumps([cfg.to_dict(), tokenizer_meta, n, own]).encode()).hexdigest()
    if key in _CACHE:
        return _CACHE[key], partition_id
    threads = int(record.get("client-threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    tokenizer, parts = (
        own_data(cfg, tokenizer_meta, own, partition_id, n) if own else shared_data(cfg, tokenizer_meta, n)
    )
    model = client_model(cfg, tokenizer)
    aliases = {} if cfg.lora.rank else tied_aliases(model)
    trainer = Trainer(model, cfg.train, resolve_device(cfg.train.device), log=None)
    state = ClientState(cfg, parts, trainer, aliases)
    _CACHE.clear()  # one run at a time per process: drop the model of an earlier run
    _CACHE[key] = state
    return state, partition_id


def shared_data(cfg: Config, tokenizer_meta: dict, n: int) -> tuple[Tokenizer, list[ClientPartition]]:
    """The run's corpus, which this node holds too, split into its n partitions (as spans: tokens on use)."""
    ds = load_dataset(cfg.data)
    if ds.tokenizer.meta() != tokenizer_meta:
        raise ValueError(
            f"its corpus/tokenizer ({ds.tokenizer.meta().get('kind')}, vocab {ds.tokenizer.vocab_size}) "
            f"differs from the server's ({tokenizer_meta.get('kind')}): give every node the same corpus "
            "(node-config data-dir) and data.tokenizer, or the node its own data (node-config input-file)"
        )
    return ds.tokenizer, client_partitions(cfg, ds, n)


def own_data(
    cfg: Config, tokenizer_meta: dict, path: str, partition_id: int, n: int
) -> tuple[Tokenizer, list[ClientPartition]]:
    """This node's own text as its one partition, in the run's tokenizer; no other partition is here."""
    cache = (
        Path(cfg.data.data_dir)
        if Path(cfg.data.data_dir).is_dir()
        else Path(tempfile.gettempdir()) / "fedgpt"
    )
    tokenizer = get_tokenizer(tokenizer_meta, cache_dir=cache / "tiktoken_cache")
    tokens = load_node_tokens(path, tokenizer, cache)
    f = cfg.fed
    n_val = round(len(tokens) * f.client_val_fraction) if f.client_eval_interval > 0 else 0
    spans = np.array([[0, len(tokens)]], dtype=np.int64)
    mine = ClientPartition(partition_id, spans, n_val, [], "own data", source=tokens)
    return tokenizer, [mine if i == partition_id else None for i in range(n)]


def client_model(cfg: Config, tokenizer: Tokenizer) -> GPT:
    """The model a client trains. Its initial weights do not matter, the global model arrives with every
    message; with LoRA only the adapters arrive, so the client builds the frozen base from train.init_from,
    once per process."""
    if not cfg.lora.rank:
        return GPT(cfg.model)
    return add_lora(build_model(cfg, tokenizer.meta(), tokenizer.vocab_size), cfg.lora)


def exchanged(model: GPT, cfg: Config) -> dict[str, torch.Tensor]:
    """What a client receives and sends back: the whole state, or with LoRA the adapters."""
    return adapter_state(model) if cfg.lora.rank else model.state_dict()


def load_global(st: ClientState, arrays: ArrayRecord, partition_id: int) -> dict[str, torch.Tensor]:
    own, who = exchanged(st.trainer.raw_model, st.cfg), f"the server (to client {partition_id})"
    weights = from_record(arrays, st.aliases, like=own, who=who)
    check_keys(weights, own, who)
    st.trainer.load_global(weights)
    return weights


def handshake(msg: Message, context: Context) -> Message:
    """Answer the server's pre-flight query: this node's partition and data sizes (errors surface before round
    1)."""
    st, partition_id = client_state(msg, context)
    part = st.parts[partition_id]
    reply = ConfigRecord(
        {
            "partition-id": partition_id,
            "num-partitions": len(st.parts),
            "own-data": int(part.scheme == "own data"),
            "train-tokens": int(len(part.train)),
            "val-tokens": int(len(part.val)),
            "requires-secagg": int(secagg.node_requires_secagg(context)),
        }
    )
    return Message(RecordDict({"info": reply}), reply_to=msg)


def fit(msg: Message, context: Context) -> Message:
    """Run fed.local_steps optimizer steps from the global weights; reply with weights and metrics."""
    st, partition_id = client_state(msg, context)
    cfg, record, part = st.cfg, msg.content["config"], st.parts[partition_id]
    rnd, trainer = int(record["server-round"]), st.trainer
    received = load_global(st, msg.content["arrays"], partition_id)
    store = state_store(cfg, record, context, partition_id)
    age, stale, residual = restore(trainer, store, rnd, cfg)
    # One schedule over the run's rounds x local steps, shaped like the local trainer's (see client_schedule).
    trainer.cfg = client_schedule(cfg.train, int(record["schedule-steps"]))
    trainer.step = (rnd - 1) * cfg.fed.local_steps
    mu = float(record.get("proximal-mu", 0.0))
    ref = [p.detach().clone() for p in trainer.raw_model.parameters()] if mu > 0 else None
    # A new, deterministic stream of windows per (client, round), identical whichever process serves it.
    seed = cfg.train.seed * 100_003 + partition_id * 1_009 + rnd
    torch.manual_seed(seed)  # dropout masks too: reproducible whichever process serves this partition
    batches = Batches(part.train, cfg.model.block_size, cfg.train.batch_size, trainer.device, seed=seed)
    if cfg.fed.full_batch:  # FedSGD: every step is the gradient of all the client's windows
        batches = itertools.repeat(batches.all_windows())
    t_start = time.time()
    steps = int(record.get("local-steps", cfg.fed.local_steps))  # fewer for a straggler (fed.stragglers)
    m = trainer.train_steps(batches, steps, mu=mu, ref=ref)
    trained = exchanged(trainer.raw_model, cfg)
    length = float(flatten(trained, st.aliases, base=received).norm())  # this round's update's L2 norm
    clipping = float(record["dp-clipping-norm"]) if "dp-clipping-norm" in record else None
    if clipping is not None:  # dp.clipping=client: the server sends the norm, adaptive clipping moves it
        trained = clip_update(trained, received, length, clipping)
    if cfg.secagg.enabled:  # the update travels masked (secaggplus_mod), quantized by SecAgg+ itself
        arrays, residual = None, None
    else:
        arrays, residual = upload(trained, st.aliases, received, residual, cfg)
    if store is not None:
        optimizer = trainer.optimizer.state_dict() if cfg.keeps_client_state else None
        store.save(rnd, {"optimizer": optimizer, "residual": residual})
        store.prune(keep_from_round=int(record["keep-from-round"]))
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
    unclipped = float(clipping is not None and length <= clipping)  # adaptive clipping's count
    if arrays is None:
        update = flatten(trained, st.aliases, base=received)
        if clipping is not None:  # summed under the mask with the others: the server sees only the count
            update = torch.cat([update, torch.tensor([unclipped])])
        return Message(secagg.masked_reply(update.numpy(), metrics["num-examples"], metrics), reply_to=msg)
    if clipping is not None:  # central DP: the server sees this update anyway
        metrics["dp-unclipped"] = int(unclipped)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def clip_update(
    trained: dict[str, torch.Tensor], received: dict[str, torch.Tensor], length: float, norm: float
) -> dict[str, torch.Tensor]:
    """The received weights plus the update (trained minus received, of L2 norm `length`) scaled down to
    norm `norm` if it is longer."""
    scale = min(1.0, norm / length) if length > 0 else 1.0
    return {
        k: received[k].float() + scale * (trained[k].float().cpu() - received[k].float()) for k in trained
    }


def upload(
    trained: dict[str, torch.Tensor],
    aliases: dict[str, str],
    received: dict[str, torch.Tensor],
    residual: torch.Tensor | None,
    cfg: Config,
) -> tuple[ArrayRecord, torch.Tensor | None]:
    """The reply's arrays in fed.uplink (fp32 weights, or the update), and what quantization left out of this
    update for the next one (error feedback), or None."""
    if cfg.fed.uplink == "fp32":
        return to_record(trained, aliases), None
    update = flatten(trained, aliases, base=received)
    if residual is not None:
        update = update + residual
    record = encode(update, cfg.fed.uplink, cfg.fed.quant_block)
    return record, (update - decode(record, update.numel())) if cfg.error_feedback else None


def client_schedule(tc: TrainConfig, schedule_steps: int) -> TrainConfig:
    """The local trainer's learning-rate schedule stretched over a federated run's schedule_steps (rounds x
    local steps): warm-up takes the same share of it (train.warmup_steps of train.max_steps), then the cosine
    decays to train.min_lr at its end. Steps past it (rounds added on --resume) stay at min_lr."""
    warmup = round(tc.warmup_steps * schedule_steps / max(1, tc.max_steps))
    return dataclasses.replace(tc, warmup_steps=warmup, lr_decay_steps=schedule_steps)


def state_store(
    cfg: Config, record: ConfigRecord, context: Context, partition_id: int
) -> ClientStateStore | None:
    """Where this client keeps its state between rounds (its optimizer state, its quantization error), or None
    if it keeps none.

    A SuperNode's node config `state-dir` names a folder on its own machine; without it, the run's
    fed.client_state_dir, or <train.out_dir>/client_state as the server resolved it."""
    if not (cfg.keeps_client_state or cfg.error_feedback):
        return None
    root = context.node_config.get("state-dir") or record["client-state-dir"]
    return ClientStateStore(str(root), str(record["run-id"]), partition_id)


def restore(
    trainer: Trainer, store: ClientStateStore | None, rnd: int, cfg: Config
) -> tuple[int, int, torch.Tensor | None]:
    """Load what this client saved in an earlier round: its AdamW state, if it keeps it and the state is at
    most fed.client_state_max_age rounds old, and its quantization error, if it uses error feedback.

    Returns (age in rounds of the optimizer state loaded, 0 if none; 1 if a saved optimizer state was too old
    and dropped; the residual, or None).
    """
    trainer.optimizer.state.clear()
    state, saved_round = store.load(before_round=rnd) if store is not None else (None, None)
    if state is None:
        return 0, 0, None
    residual = state.get("residual") if cfg.error_feedback else None
    if not cfg.keeps_client_state or state.get("optimizer") is None:
        return 0, 0, residual
    if rnd - saved_round > cfg.fed.client_state_max_age:
        return 0, 1, residual
    trainer.optimizer.load_state_dict(state["optimizer"])
    return rnd - saved_round, 0, residual


def evaluate_partition(msg: Message, context: Context) -> Message:
    """Loss of the global weights on this client's own validation slice."""
    st, partition_id = client_state(msg, context)
    cfg, part = st.cfg, st.parts[partition_id]
    load_global(st, msg.content["arrays"], partition_id)
    batches = Batches(
        part.val, cfg.model.block_size, cfg.train.batch_size, st.trainer.device, seed=cfg.train.seed
    )
    res = evaluate(st.trainer.raw_model, batches, cfg.train.eval_iters, st.trainer.ctx)
    metrics = MetricRecord(
        {"val-loss": res["loss"], "val-accuracy": res["accuracy"], "num-examples": int(len(part.val))}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
