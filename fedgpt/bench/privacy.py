"""DP that learns: a base pretrained centrally on public plays, then federated fine-tuning on the roles of the
other plays, without DP and under client-level DP (fedgpt.fed.privacy), scored on the private plays' held-out
tenth.

    python -m fedgpt.results --privacy

The public text is three plays of Tiny Shakespeare (Coriolanus, Henry VI part 3, The Tempest: 323k chars), the
private text the other six (792k), split into CLIENTS role clients (a speaker in one play, the largest roles
cut at scenes), of which each round samples q = fed.fraction_train at random (Poisson under DP). Both share
Tiny Shakespeare's 65-character vocabulary (data.vocab_file). The rows: the public base before fine-tuning
(round 0 of every run), federated fine-tuning without DP (the reference), and DP fine-tuning of the whole
model or of LoRA adapters, with FedAvg or DiLoCo's outer step after the noise, at fixed or adaptive clipping,
at epsilon 8 and below (delta 1e-4 < 1 / clients; RDP and PLD).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedgpt.bench.common import commands, write_plays
from fedgpt.bench.experiments import Experiment
from fedgpt.checkpoint import load_checkpoint
from fedgpt.fed.privacy import DPState
from fedgpt.fed.rounds import read_rounds

PUBLIC_PLAYS, PRIVATE_PLAYS = "1,5,9", "2,3,4,6,7,8"
CLIENTS, Q, DELTA = 1000, 0.05, 1e-4
# 5 local steps of 4 windows: about two passes over a median client's 740 characters. Evaluation on 40 batches
# (a third of the private val split) keeps the server's share of the 2 cores small.
ROUNDS, LOCAL_STEPS, BATCH, EVAL_ITERS = 100, 5, 4, 40


def data_args(a: argparse.Namespace) -> list[str]:
    plays = Path(a.runs_dir).resolve() / "plays"
    return [
        f"--data.vocab_file={Path(a.data_dir).resolve() / 'tinyshakespeare' / 'input.txt'}",
        f"--data.data_dir={plays}",
    ]


def prepare(a: argparse.Namespace, app: Path) -> None:
    """The public and private plays as text files under <runs-dir>/plays (fedgpt.fed.plays)."""
    groups = {"public": PUBLIC_PLAYS, "private": PRIVATE_PLAYS}
    write_plays(a, app, Path(a.runs_dir).resolve() / "plays", groups)


def private_args(a: argparse.Namespace, q: float, rounds: int) -> list[str]:
    """What every fine-tuning run shares: the private plays as role clients, the public base; the sampling."""
    runs = Path(a.runs_dir).resolve()
    return [
        f"--data.input_file={runs / 'plays' / 'private.txt'}",
        *data_args(a),
        f"--train.init_from={runs / 'dp_base' / 'best.pt'}",
        *("--non-iid", "role", "--num-clients", str(CLIENTS), f"--fed.fraction_train={q}"),
        *("--rounds", str(rounds), "--local-steps", str(LOCAL_STEPS), "--fed.weighting=uniform"),
        f"--train.batch_size={BATCH}",
        f"--train.eval_iters={EVAL_ITERS}",
        f"--dp.delta={DELTA}",
    ]


# FFA-LoRA (Sun et al. 2024): A frozen as drawn, only B trains and carries noise. With both trained, noise on
# B meets noise on A in their product: pilots at epsilon 8 (q 0.05, 100 rounds) lost 0.13 in val loss over 16
# rounds with LoRA r4 (33k weights) and 0.07 over 26 with FFA-LoRA r2 (9k). Rank 1 leaves 4.6k weights.
LORA = [
    *("--lora.rank=1", "--lora.targets=attn,mlp", "--lora.scheme=ffa"),
    *("--train.learning_rate=1e-2", "--train.min_lr=1e-3"),
]
# The same client rounds (5,000) as 25 rounds of q = 0.2: at epsilon 8 the noise multiplier grows from 0.69 to
# 0.94 while the cohort it is divided by grows 4x, and the noise summed over the run, relative to the signal,
# falls by 1.5x (sqrt(rounds) x noise multiplier / cohort).
DP_SAMPLING = (0.2, 25)
# Adaptive clipping (Andrew et al.): the norm follows the median update norm.
ADAPTIVE = ["--dp.adaptive_clipping=true"]
ROWS = (  # name, label, (q, rounds), what it adds to the shared arguments
    ("dp_none_full", "no DP, full fine-tuning, q 0.05 x 100 rounds", (Q, ROUNDS), []),
    ("dp_none_lora", "no DP, FFA-LoRA r1, q 0.2 x 25 rounds", DP_SAMPLING, LORA),
    (
        "dp_eps8_lora",
        "epsilon 8, FFA-LoRA r1, adaptive clipping, q 0.2 x 25 rounds",
        DP_SAMPLING,
        [*LORA, "--dp.target_epsilon=8", "--dp.clipping_norm=0.5", *ADAPTIVE],
    ),
    (
        "dp_eps8_full",
        "epsilon 8, full fine-tuning, adaptive clipping, q 0.2 x 25 rounds",
        DP_SAMPLING,
        ["--dp.target_epsilon=8", "--dp.clipping_norm=2", *ADAPTIVE],
    ),
)


def experiments(a: argparse.Namespace) -> list[Experiment]:
    runs = Path(a.runs_dir).resolve()
    public = [f"--data.input_file={runs / 'plays' / 'public.txt'}", *data_args(a)]
    base = Experiment("dp_base", "public base (pretrained on 3 plays)", public, kind="own-central")
    return [base] + [
        Experiment(
            name,
            label,
            [*private_args(a, *sampling), *args],
            kind="own",
            group="dp" if "--dp." in " ".join(args) else "none",
        )
        for name, label, sampling, args in ROWS
    ]


DP_FILE = "dp.json"  # a record's copy of the DP state in its run's last checkpoint, which it does not keep


def _dp_state(run_dir: Path) -> str | None:
    """The DP state (DPState.to_json) of a run's last checkpoint, or of a record's copy of it."""
    if (run_dir / DP_FILE).is_file():
        return (run_dir / DP_FILE).read_text()
    if (run_dir / "last.pt").is_file():
        return load_checkpoint(run_dir / "last.pt")["extra"].get("dp")
    return None  # a record of a run without DP


def keep(run_dir: Path) -> dict[str, bytes]:
    """What figures reads that a record must add: the DP state of the run's last checkpoint, if it has one."""
    saved = _dp_state(run_dir)
    return {DP_FILE: saved.encode()} if saved else {}


def figures(run_dir: Path) -> dict:
    """The round-0 (public base) loss and accuracy, and a DP run's noise multiplier and last clipping norm,
    from a run's folder or its record."""
    if not (run_dir / "rounds.jsonl").is_file():
        return {}
    rows = read_rounds(run_dir / "rounds.jsonl")
    saved = _dp_state(run_dir)
    dp = DPState.from_json(saved) if saved else None
    return {
        "base_val_loss": rows[0].val_loss,
        "base_val_accuracy": rows[0].val_accuracy,
        "noise_multiplier": dp.noise_multiplier if dp else None,
        "clipping_norm": dp.clipping_norm if dp else None,
    }


def table(res: list[dict]) -> str:
    fed = [r for r in res if r.get("base_val_loss") is not None]
    reference = next((r for r in fed if r["name"] == "dp_none_full"), None)
    base = fed[0] if fed else None
    fmt = lambda v, f: "-" if v is None else format(v, f)
    lines = [
        "| run | epsilon (RDP) | epsilon (PLD) | noise multiplier | final val loss | accuracy | gap closed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if base:
        lines.append(
            f"| public base, before fine-tuning (round 0) | 0 | 0 | - | {base['base_val_loss']:.4f} | "
            f"{base['base_val_accuracy']:.3f} | 0% |"
        )
    for r in fed:
        gap = "-"
        if reference and base and reference["final_val_loss"] < base["base_val_loss"]:
            closed = (base["base_val_loss"] - r["final_val_loss"]) / (
                base["base_val_loss"] - reference["final_val_loss"]
            )
            gap = f"{100 * closed:.0f}%"
        lines.append(
            f"| {r['label']} | {fmt(r['epsilon'], '.3g')} | {fmt(r['epsilon_pld'], '.3g')} | "
            f"{fmt(r['noise_multiplier'], '.3g')} | {r['final_val_loss']:.4f} | "
            f"{r['final_val_accuracy']:.3f} | {gap} |"
        )
    lines += [
        "",
        f"Private plays {PRIVATE_PLAYS} as {CLIENTS} role clients, each sampled with probability q a round "
        f"(Poisson under DP), {LOCAL_STEPS} local steps of batch {BATCH}, the same "
        f"{int(Q * CLIENTS * ROUNDS):,} client rounds in every run; delta {DELTA:g}; val loss and "
        "next-character accuracy on the private plays' held-out tenth; gap closed: of the base's loss down "
        "to the no-DP full fine-tuning's. Commands:",
        "",
    ]
    return "\n".join(lines + commands(res))


def render(res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    return table(res)
