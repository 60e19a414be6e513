"""What per-client optimizer state costs, with the federation's averaging taken out of the picture.

A diagnostic behind docs/results.md ("Where the gap to synchronous Muon comes from"), not part of fedgpt:

    python docs/diagnostics/per_client_state.py average --seed 2 [--outer-lr 2]
    python docs/diagnostics/per_client_state.py geometry CHECKPOINT  # e.g. a synchronous Muon run's last.pt
    python docs/diagnostics/per_client_state.py val CHECKPOINT [CHECKPOINT ...]

`average`: DiLoCo at one local step with a plain mean as the outer step, i.e. 8 clients that start every
step from the same weights, each stepping its OWN optimizer (fedgpt's Trainer, train.optimizer as
configured) on its own window of train.batch_size=1, their weights averaged after every step (with
--outer-lr f: old + f x (mean - old)). Synchronous data parallelism differs from it in one thing only: one
optimizer steps on the mean gradient of the 8 windows. Prints the validation loss as the federation's
evaluator reads it (100 windows of 1, the run's seed) every 250 steps, and at the end over the whole val
split.

`geometry`: at a checkpoint, 8 clients' Muon momenta (train.muon_momentum) built from their own single
windows for 40 steps, and the synchronous step: Muon's direction for the momentum of the 8-window means.
For every block matrix and several client steps (Muon's, fewer Newton-Schulz steps, U S^p V^T of the
momentum): how the mean of the 8 client steps lines up with the synchronous one (cosine), and its component
along it per unit of a client's own step (1 would be no loss to averaging).

`val`: each checkpoint's loss over the whole val split (consecutive windows of 64), beside the federation's
evaluator's 100 windows (the local trainer's reads 13 batches of 8: other windows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch

from fedgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fedgpt.config import load_config
from fedgpt.data import Batches, load_dataset
from fedgpt.optim import muon_defaults, orthogonalize
from fedgpt.train import Schedule, Trainer, build_model, evaluate

CONFIG, CLIENTS, BLOCK = "configs/shakespeare_char_cpu.yaml", 8, 64
MUON = muon_defaults()  # torch's Newton-Schulz coefficients, steps and eps


def full_val_loss(model: torch.nn.Module, val) -> float:
    x, y = Batches(val, BLOCK, 1).all_windows()
    model.eval()
    with torch.no_grad():
        total = sum(model(xb, yb)[1].item() * len(xb) for xb, yb in zip(x.split(256), y.split(256)))
    return total / len(x)


def average(args: argparse.Namespace) -> None:
    cfg = load_config(
        CONFIG, [f"--train.optimizer={args.optimizer}", "--train.batch_size=1", f"--train.seed={args.seed}"]
    )
    ds = load_dataset(cfg.data)
    torch.manual_seed(args.seed)
    start = build_model(cfg, ds.tokenizer.meta(), ds.tokenizer.vocab_size).state_dict()
    clients = []
    for _ in range(CLIENTS):
        model = build_model(cfg, ds.tokenizer.meta(), ds.tokenizer.vocab_size)
        model.load_state_dict(start)
        clients.append(Trainer(model, cfg.train, torch.device("cpu"), log=None))
    streams = [Batches(ds.train, BLOCK, 1, seed=args.seed * 100 + i) for i in range(CLIENTS)]
    schedule = Schedule.of(cfg.train, args.steps)  # warm-up the same share of the run as the federation's
    tensors = list(zip(*(list(c.raw_model.parameters()) for c in clients)))  # one tuple per parameter
    weights = [group[0].detach().clone() for group in tensors]  # the averaged weights every step starts from
    t0 = time.time()
    for step in range(args.steps):
        for client, stream in zip(clients, streams):
            client.train_steps(stream, 1, schedule, at_step=step)
        with torch.no_grad():
            for i, group in enumerate(tensors):
                mean = torch.stack(group).mean(0)
                old = weights[i]
                weights[i] = mean if args.outer_lr == 1 else old + args.outer_lr * (mean - old)
                for p in group:
                    p.copy_(weights[i])
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            model = clients[0].raw_model
            row = {
                "step": step + 1,
                "val_loss": evaluate(model, Batches(ds.val, BLOCK, 1, seed=args.seed), 100)["loss"],
            }
            if step + 1 == args.steps:
                row["val_loss_full"] = full_val_loss(model, ds.val)
            print(json.dumps({**row, "elapsed_s": round(time.time() - t0, 1)}), flush=True)


def muon_direction(m: torch.Tensor, steps: int = MUON["ns_steps"]) -> torch.Tensor:
    return orthogonalize(m, MUON["ns_coefficients"], steps, MUON["eps"], torch.float32)


def power(m: torch.Tensor, p: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ torch.diag(s**p) @ vh  # p = 0: exact orthogonalization; p = 1: the momentum itself (SGD)


TRANSFORMS = {
    f"Muon (Newton-Schulz, {MUON['ns_steps']} steps)": muon_direction,
    **{f"Newton-Schulz, {k} step(s)": partial(muon_direction, steps=k) for k in (1, 2, 3)},
    **{f"U S^{p} V^T": partial(power, p=p) for p in (0.0, 0.25, 0.5, 1.0)},
}


def geometry(args: argparse.Namespace) -> None:
    cfg = load_config(CONFIG)
    ds = load_dataset(cfg.data)
    model = model_from_checkpoint(load_checkpoint(args.checkpoint))
    matrices = {n: p for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n}
    streams = [Batches(ds.train, BLOCK, 1, seed=100 + i) for i in range(CLIENTS)]
    momenta = [{n: torch.zeros_like(p) for n, p in matrices.items()} for _ in range(CLIENTS)]
    for _ in range(args.steps):
        for stream, momentum in zip(streams, momenta):
            model.zero_grad()
            x, y = next(stream)
            model(x, y)[1].backward()
            for n, p in matrices.items():
                momentum[n].lerp_(p.grad, 1 - cfg.train.muon_momentum)
    sync = {n: muon_direction(torch.stack([m[n] for m in momenta]).mean(0)) for n in matrices}
    for name, transform in TRANSFORMS.items():
        cosine, useful = [], []
        for n in matrices:
            own = torch.stack([transform(m[n]) for m in momenta])  # each client's step
            mean, unit = own.mean(0).flatten(), sync[n].flatten() / sync[n].norm()
            cosine.append(torch.nn.functional.cosine_similarity(mean, unit, 0).item())
            useful.append((mean @ unit).item() / own.flatten(1).norm(dim=1).mean().item())
        print(
            f"{name}: cosine with the synchronous Muon step, median {statistics.median(cosine):.3f}; "
            f"its component along it per unit of a client's step, median {statistics.median(useful):.3f} "
            f"({min(useful):.3f}-{max(useful):.3f})"
        )


def val(args: argparse.Namespace) -> None:
    ds = load_dataset(load_config(CONFIG).data)
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        seed = ckpt["config"]["train"]["seed"]
        sampled = evaluate(model, Batches(ds.val, BLOCK, 1, seed=seed), 100)["loss"]
        whole = full_val_loss(model, ds.val)
        print(f"{path}: whole val split {whole:.4f} | 100 windows of 1, seed {seed}: {sampled:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("average")
    a.add_argument("--seed", type=int, default=1337)
    a.add_argument("--optimizer", default="muon")
    a.add_argument("--steps", type=int, default=3000)
    a.add_argument("--outer-lr", type=float, default=1.0)
    g = sub.add_parser("geometry")
    g.add_argument("checkpoint")
    g.add_argument("--steps", type=int, default=40)
    v = sub.add_parser("val")
    v.add_argument("checkpoints", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(1)
    {"average": average, "geometry": geometry, "val": val}[args.what](args)


if __name__ == "__main__":
    main()
