"""Federated LoRA against full fine-tuning: a BPE base pretrained centrally on four comedies, then fine-tuned
by 8 clients (the tragedies' speakers) in full or with LoRA adapters, inexact (A and B averaged apart) or
exact (FFA-LoRA: A frozen, only B trained and sent); val loss on the tragedies' held-out tenth, bytes a client
sends a round against the full model's.

    python -m fedgpt.results --lora

configs/shakespeare_bpe_cpu.yaml: GPT-2 BPE, 4 layers, 128 wide, 7.23M parameters, 6.44M of them the
50,304-wide token embedding; 5 rounds x 20 local steps of 8 windows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedgpt.bench.common import commands, write_plays
from fedgpt.bench.experiments import Experiment
from fedgpt.fed.rounds import read_rounds

CONFIG = "configs/shakespeare_bpe_cpu.yaml"
PLAYS = {"comedies": "6,7,8,9", "tragedies": "1,4"}  # in corpus order (fedgpt.fed.plays)
LR = ["--train.learning_rate=1e-2", "--train.min_lr=1e-3"]  # the adapters' best; full fine-tuning keeps 2e-3
LR3 = ["--train.learning_rate=3e-2", "--train.min_lr=3e-3"]
EMB = "--lora.targets=attn,mlp,embedding"
BIAS = ["--lora.rank=8", "--lora.head_bias=true"]
ROWS_FROM = "--lora.rows_from={plays}/comedies.txt"  # the base's training text: public, counted by the server
ROWS = (  # name, label, flags
    ("lora_full", "full fine-tuning", []),
    ("lora_r4", "LoRA rank 4", ["--lora.rank=4"]),
    ("lora_r16", "LoRA rank 16", ["--lora.rank=16"]),
    ("lora_r16_lr", "LoRA rank 16, lr 1e-2", ["--lora.rank=16", *LR]),
    ("lora_r16_ffa_lr", "FFA-LoRA rank 16 (exact), lr 1e-2", ["--lora.rank=16", "--lora.scheme=ffa", *LR]),
    (
        "lora_r16_emb_lr",
        "LoRA rank 16 with the embedding adapter, lr 1e-2",
        ["--lora.rank=16", EMB, *LR],
    ),
    ("lora_r16_lr3e-2", "LoRA rank 16, lr 3e-2", ["--lora.rank=16", *LR3]),
    # rank 2 everywhere keeps the embedding adapter, 2 x (50,304 + 128) values, within 2% of the model
    ("lora_r2_emb_lr", "LoRA rank 2 with the embedding adapter, lr 1e-2", ["--lora.rank=2", EMB, *LR]),
    # the embedding's rows of the comedies' most frequent tokens trained in full beside the blocks' adapters,
    # at full fine-tuning's learning rate (2e-3: 0.2 x the adapters')
    (
        "lora_r8_rows500_lr_rows2e-3",
        "LoRA rank 8 and 500 embedding rows at lr 2e-3, lr 1e-2",
        ["--lora.rank=8", "--lora.embedding_rows=500", ROWS_FROM, "--lora.rows_lr_scale=0.2", *LR],
    ),
    (
        "lora_r16_rows1000_int8_lr_rows2e-3",
        "LoRA rank 16 and 1,000 embedding rows at lr 2e-3, int8 uplink, lr 1e-2",
        [
            "--lora.rank=16",
            "--lora.embedding_rows=1000",
            ROWS_FROM,
            "--lora.rows_lr_scale=0.2",
            "--fed.uplink=int8",
            *LR,
        ],
    ),
    # a bias over the vocabulary on the head beside rank 8 (50,304 values: 0.7% of the model), at 3x and 10x
    # the adapters' lr; full fine-tuning at seed 2 and at half and twice its lr; the bias rows at seed 2
    (
        "lora_r8_bias_lr_b3",
        "LoRA rank 8 and the head bias at 3x, lr 1e-2",
        [*BIAS, "--lora.bias_lr_scale=3", *LR],
    ),
    (
        "lora_r8_bias_lr_b10",
        "LoRA rank 8 and the head bias at 10x, lr 1e-2",
        [*BIAS, "--lora.bias_lr_scale=10", *LR],
    ),
    ("lora_full_seed2", "full fine-tuning, seed 2", ["--train.seed=2"]),
    ("lora_full_lr1e-3", "full fine-tuning, lr 1e-3", ["--train.learning_rate=1e-3", "--train.min_lr=1e-4"]),
    ("lora_full_lr4e-3", "full fine-tuning, lr 4e-3", ["--train.learning_rate=4e-3", "--train.min_lr=4e-4"]),
    (
        "lora_r8_bias_lr_b3_seed2",
        "LoRA rank 8 and the head bias at 3x, lr 1e-2, seed 2",
        [*BIAS, "--lora.bias_lr_scale=3", *LR, "--train.seed=2"],
    ),
    (
        "lora_r8_bias_lr_b10_seed2",
        "LoRA rank 8 and the head bias at 10x, lr 1e-2, seed 2",
        [*BIAS, "--lora.bias_lr_scale=10", *LR, "--train.seed=2"],
    ),
    # Muon on both sides (on the blocks' matrices, the adapters' A and B among them)
    ("lora_full_muon", "full fine-tuning, Muon", ["--train.optimizer=muon"]),
    ("lora_r16_lr_muon", "LoRA rank 16, lr 1e-2, Muon", ["--lora.rank=16", *LR, "--train.optimizer=muon"]),
)


def plays_dir(a: argparse.Namespace) -> Path:
    return Path(a.runs_dir).resolve() / "lora_plays"


def prepare(a: argparse.Namespace, app: Path) -> None:
    """The comedies and the tragedies as text files under <runs-dir>/lora_plays (fedgpt.fed.plays)."""
    write_plays(a, app, plays_dir(a), PLAYS)


def experiments(a: argparse.Namespace) -> list[Experiment]:
    runs = Path(a.runs_dir).resolve()
    base = Experiment(
        "lora_base",
        "base, pretrained on the comedies",
        [f"--data.input_file={plays_dir(a) / 'comedies.txt'}"],
        kind="own-central",
    )
    tune = [
        f"--data.input_file={plays_dir(a) / 'tragedies.txt'}",
        f"--train.init_from={runs / 'lora_base' / 'best.pt'}",
    ]
    return [base] + [
        Experiment(
            name, label, [*tune, *(f.format(plays=plays_dir(a)) for f in flags)], kind="own", group="tune"
        )
        for name, label, flags in ROWS
    ]


def figures(run_dir: Path) -> dict:
    """The last round's LoRA aggregation error, ||mean(BA) - mean(B) mean(A)|| / ||mean(BA)||."""
    if not (run_dir / "rounds.jsonl").is_file():
        return {}
    last = read_rounds(run_dir / "rounds.jsonl")[-1]
    return {"lora_aggregation_error": last.lora_aggregation_error}


def table(res: list[dict]) -> str:
    tuned = [r for r in res if r["group"] == "tune"]
    full = next((r for r in tuned if r["name"] == "lora_full"), None)
    lines = [
        "| run | up MB per client and round | of the full model | aggregation error, last round "
        "| final val loss | vs full |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in tuned:
        up = r["uplink_mb_per_client"] / r["rounds"]
        share = f"{up / (full['uplink_mb_per_client'] / full['rounds']):.4f}x" if full else "-"
        err = r.get("lora_aggregation_error")
        lines.append(
            f"| {r['label']} | {up:.3f} | {share} | {'-' if err is None else f'{err:.2e}'} | "
            f"{r['final_val_loss']:.4f} | "
            + ("-" if full is None or r is full else f"{r['final_val_loss'] - full['final_val_loss']:+.3f}")
            + " |"
        )
    base = next((r for r in res if r["name"] == "lora_base"), None)
    if base:
        lines += ["", f"The base's val loss on the comedies: {base['final_val_loss']:.4f}."]
    return "\n".join(lines + ["", "Commands:", ""] + commands(res))


def render(res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    return table(res)
