"""Personal models: beside the global model, a model of each client's own, scored on its own held-out text.

    personal.scheme=finetune          # local adaptation (Wang et al. 2019; Yu et al. 2020): personal.steps
                                      # steps from the global model on the client's own training text, made
                                      # whenever the client is evaluated; nothing is kept
    personal.scheme=adapter           # a LoRA adapter of the client's own on the global model (FedPer's
                                      # personal layers in their LLM form): trained personal.steps steps each
                                      # round the client trains, kept in its state, never sent
    personal.scheme=finetune,adapter  # both, scored on the same global model

Neither changes what the federation trains or exchanges: the adapter trains after the round's update is taken,
from the weights the client received, and its RNG is its own, so a run's global models and bytes are those of
the same run without it. A client's evaluation reply carries the global model's and each personal model's loss
and accuracy on its validation slice; the server reports their mean and spread over clients
(per_client_summary) and, outside DP, each client's figures (client_eval.jsonl).

    model, ckpt, who = from_checkpoint("out/fed/last.pt", "ROMEO", "adapter")   # sample / export --client
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from fedgpt.checkpoint import atomic_save
from fedgpt.config import Config, LoRAConfig
from fedgpt.data import Batches
from fedgpt.fed.partition import ClientPartition
from fedgpt.lora import adapter_state, add_lora, merged_model
from fedgpt.model import GPT
from fedgpt.train import Schedule, Trainer, evaluate

SCHEMES = ("finetune", "adapter")


def schemes(cfg: Config) -> list[str]:
    """The personal schemes a run scores, in the order given ([] for personal.scheme=none)."""
    s = cfg.personal.scheme
    return [] if s in ("", "none") else [x.strip() for x in s.split(",")]


def adapter_file(state_dir: str | Path, run_id: str, partition_id: int) -> Path:
    """Where a client keeps its personal adapter: beside its round states, never pruned (a client sampled in
    round 3 and next in round 40 still has it)."""
    return Path(state_dir) / run_id / "personal" / f"partition-{int(partition_id)}.pt"


def _seed(cfg: Config, partition_id: int) -> int:
    return cfg.train.seed * 7_919 + int(partition_id) * 104_729 + 1


def _adapter_config(cfg: Config) -> LoRAConfig:
    p = cfg.personal
    return LoRAConfig(rank=p.rank, alpha=p.alpha, targets=p.targets)


def with_adapter(
    model: GPT, cfg: Config, partition_id: int, path: Path | None, weights: dict | None = None
) -> GPT:
    """A copy of `model` (left as it is; with `weights` loaded into the copy, if given) with this client's
    adapter: as saved at `path`, or a new one (B at zero: the copy then computes what the model does)."""
    base = copy.deepcopy(model)
    if weights is not None:
        base.load_state_dict(weights)
    personal = add_lora(base, _adapter_config(cfg), _seed(cfg, partition_id))
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)["adapter"]
        personal.load_state_dict(
            {k: v.to(next(personal.parameters()).device) for k, v in saved.items()}, strict=False
        )
    return personal


def adapt(model: GPT, cfg: Config, tokens, partition_id: int, rnd: int) -> dict:
    """personal.steps steps of `model` (in place: what requires grad) on the client's own training `tokens`,
    at a constant personal.learning_rate with fresh AdamW moments; batches and dropout from a seed of (run,
    client, round), so that a run and `python -m fedgpt.sample --client` make the same personal model.
    Returns the trainer's metrics."""
    p = cfg.personal
    tc = replace(
        cfg.train,
        learning_rate=p.learning_rate,
        min_lr=p.learning_rate,
        warmup_steps=0,
        decay_lr=False,
        weight_decay=0.0,
        compile=False,
    )
    device = next(model.parameters()).device
    trainer = Trainer(model, tc, device, log=None)
    seed = _seed(cfg, partition_id) + 31 * rnd
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batches = Batches(tokens, cfg.model.block_size, cfg.train.batch_size, device, seed=seed)
        return trainer.train_steps(batches, p.steps, Schedule.of(tc), at_step=0)


def train_adapter(
    model: GPT, weights: dict, cfg: Config, part: ClientPartition, partition_id: int, rnd: int, path: Path
) -> None:
    """The adapter scheme's work in a round the client trains: its adapter (saved, or new) on the global
    `weights` it received (in a copy of `model`, which is left as it is), personal.steps steps, saved
    atomically."""
    personal = with_adapter(model, cfg, partition_id, path, weights)
    adapt(personal, cfg, part.train, partition_id, rnd)
    state = {k: v.detach().cpu() for k, v in adapter_state(personal).items()}
    atomic_save({"round": rnd, "adapter": state}, path)


def personal_model(
    model: GPT,
    cfg: Config,
    scheme: str,
    part: ClientPartition,
    partition_id: int,
    rnd: int,
    path: Path | None = None,
) -> GPT:
    """Client `partition_id`'s personal model of `scheme` on the global `model` (left as it is): fine-tuned
    from it (finetune, made as the run made it in round `rnd`'s evaluation), or with its adapter (adapter).

    With personal.check > 0, finetune holds that share of the client's training text back, adapts on the
    rest, and keeps the adapted model only if its loss on the held-back text is below the global model's:
    a client whose own text does not help (an IID client, say) keeps the global model."""
    if scheme == "finetune":
        personal = copy.deepcopy(model)
        check = round(len(part.train) * cfg.personal.check)
        tokens, held = (part.train[:-check], part.train[-check:]) if check else (part.train, None)
        adapt(personal, cfg, tokens, partition_id, rnd)
        if held is not None:
            device, ctx = next(model.parameters()).device, contextlib.nullcontext()
            before, after = (evaluate_tokens(m, cfg, held, device, ctx)["loss"] for m in (model, personal))
            if after >= before:
                return copy.deepcopy(model)
        return personal
    if scheme == "adapter":
        return with_adapter(model, cfg, partition_id, path)
    raise ValueError(f"unknown personal scheme {scheme!r}: one of {', '.join(SCHEMES)}")


def plain(model: GPT) -> GPT:
    """A personal model as a plain GPT (its adapter merged): what sample and export take."""
    return merged_model(model) if any("lora_" in k for k in model.state_dict()) else model


def evaluate_on(model: GPT, cfg: Config, part: ClientPartition, device, ctx) -> dict:
    """Loss and next-token accuracy of `model` on the client's validation slice (the same windows for every
    model of the client)."""
    return evaluate_tokens(model, cfg, part.val, device, ctx)


def evaluate_tokens(model: GPT, cfg: Config, tokens, device, ctx) -> dict:
    batches = Batches(tokens, cfg.model.block_size, cfg.train.batch_size, device, seed=cfg.train.seed)
    return evaluate(model, batches, cfg.train.eval_iters, ctx)


def per_client_summary(metrics: list[dict], names: list[str]) -> dict:
    """Mean and spread over clients (each counts once) of the global model's and each personal model's loss
    and accuracy on the clients' own validation slices: {"clients": n, "global": {...}, "finetune": {...}}."""
    out: dict = {"clients": len(metrics)}
    for name in ["global", *names]:
        key = "" if name == "global" else f"{name}-"
        losses = [float(m[f"{key}val-loss"]) for m in metrics if f"{key}val-loss" in m]
        accs = [float(m[f"{key}val-accuracy"]) for m in metrics if f"{key}val-accuracy" in m]
        if losses:
            out[name] = {
                "loss": statistics.fmean(losses),
                "loss_std": statistics.pstdev(losses),
                "loss_p10": _quantile(losses, 0.1),
                "loss_p90": _quantile(losses, 0.9),
                "accuracy": statistics.fmean(accs),
                "accuracy_std": statistics.pstdev(accs),
            }
    return out


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    i = q * (len(s) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def find_client(parts, client: str) -> int:
    """A client of a run by partition id ("3") or by the name of the speaker or role it holds ("ROMEO", or
    "Romeo (play 5)"), case aside; a name that several clients hold is refused with their ids."""
    if client.strip().isdigit():
        i = int(client)
        if not 0 <= i < len(parts):
            raise ValueError(f"--client {i}: the run has clients 0 to {len(parts) - 1}")
        return i
    want = client.strip().casefold()
    hits = [
        i
        for i in range(len(parts))
        for name in parts[i].speakers
        if want in (name.casefold(), name.split(" (play ")[0].casefold())
    ]
    hits = sorted(set(hits))
    if not hits:
        raise ValueError(
            f"--client {client!r}: no client of this run holds that speaker or role (give a client id, or a "
            "name as partition.json lists it)"
        )
    if len(hits) > 1:
        raise ValueError(
            f"--client {client!r}: clients {', '.join(map(str, hits[:10]))} all hold it: give one's id"
        )
    return hits[0]


def from_checkpoint(checkpoint: str | Path, client: str, scheme: str | None = None) -> tuple[GPT, dict, str]:
    """Client `client`'s personal model of a simulation's checkpoint, as a plain GPT (adapter merged); with
    the checkpoint and a line saying whose model it is. finetune: made again from the checkpoint's global
    model as the run made it when it scored that round; adapter: the client's adapter, from the run's client
    state on this machine (a deployed node keeps its own)."""
    from fedgpt.checkpoint import load_checkpoint, model_from_checkpoint
    from fedgpt.config import from_dict
    from fedgpt.data import load_dataset
    from fedgpt.fed.client_state import run_state_dir
    from fedgpt.fed.partition import client_partitions

    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"])
    names = schemes(cfg)
    if not names:
        raise ValueError(
            f"{path}: this run kept no personal models (personal.scheme=none): run it with "
            "--personal.scheme=finetune or adapter"
        )
    scheme = scheme or names[0]
    if scheme not in names:
        raise ValueError(f"--scheme {scheme}: this run's personal models are {', '.join(names)}")
    parts = client_partitions(cfg, load_dataset(cfg.data))
    pid = find_client(parts, client)
    model = model_from_checkpoint(ckpt, "cpu", dropout=cfg.model.dropout)
    adapter = None
    if scheme == "adapter":
        last = path.with_name("last.pt")  # the run's id is in last.pt's extra (best.pt keeps none)
        run = ckpt if path.name == "last.pt" else load_checkpoint(last) if last.is_file() else None
        run_id = run["extra"]["run"]["run_id"] if run is not None else ""
        adapter = adapter_file(run_state_dir(cfg), run_id, pid) if run_id else None
        if adapter is None or not adapter.is_file():
            raise ValueError(
                f"client {pid} has no adapter of this run on this machine (looked for {adapter}): adapters "
                "stay where the client trained, a deployed node's on that node"
            )
    personal = personal_model(model, cfg, scheme, parts[pid], pid, int(ckpt["round"] or 0), adapter)
    who = ", ".join(parts[pid].speakers[:3]) or f"partition {pid}"
    return plain(personal).eval(), ckpt, f"client {pid} ({who}), {scheme} personal model"
