"""Communication: bytes per client per round of each wire format, and the central val loss each reaches.

    python -m fedgpt.bench comm --config configs/shakespeare_char_cpu.yaml

Every row is the same federation (the config's, at --num-clients x --rounds x --local-steps) with another
fed.uplink / fed.downlink: fp32 weights both ways; fp16; the update quantized to int8 or int4 (with and
without error feedback), fp8 or sparse, under fp16 downlinks; the update under SecAgg+ (all four of its
stages counted).
Beside them, the relative error of quantizing one real update (25 local steps from the initial model) at
several block sizes: what the scales buy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedgpt.bench.common import app_dir, run_simulate_py, sim_args, wire_params
from fedgpt.config import Config, load_config
from fedgpt.fed.rounds import median

ROWS = (
    ("fp32", "fp32 weights down and up", ["--fed.uplink=fp32", "--fed.downlink=fp32"]),
    ("fp16", "fp16 weights down, fp16 update up", ["--fed.uplink=fp16", "--fed.downlink=fp16"]),
    ("int8_ef", "int8 update up, error feedback; fp16 down", ["--fed.uplink=int8", "--fed.downlink=fp16"]),
    (
        "int8",
        "int8 update up, no error feedback; fp16 down",
        ["--fed.uplink=int8", "--fed.downlink=fp16", "--fed.error_feedback=false"],
    ),
    ("int4_ef", "int4 update up, error feedback; fp16 down", ["--fed.uplink=int4", "--fed.downlink=fp16"]),
    (
        "int4",
        "int4 update up, no error feedback; fp16 down",
        ["--fed.uplink=int4", "--fed.downlink=fp16", "--fed.error_feedback=false"],
    ),
    ("fp8_ef", "fp8 update up, error feedback; fp16 down", ["--fed.uplink=fp8", "--fed.downlink=fp16"]),
    (
        "sparse_ef",
        "sparse update up (2% kept), error feedback; fp16 down",
        ["--fed.uplink=sparse", "--fed.downlink=fp16"],
    ),
    ("secagg", "SecAgg+: masked update up (fp32 down)", ["--secagg.enabled=true"]),
)
QUANTIZED = ("int8", "fp8", "int4")  # the block-scaled formats, whose round-trip error is measured by block
BLOCKS = (32, 64, 128, 256, 512, 1024)


def quantization_error(cfg: Config, steps: int = 25) -> dict[str, dict[int, float]]:
    """‖update - dequantized‖ / ‖update‖ of one client's update (steps local steps from the initial model),
    for each format of QUANTIZED at every block size of BLOCKS."""
    import torch

    from fedgpt.data import Batches, load_dataset
    from fedgpt.fed.wire import Exchange, decode, encode
    from fedgpt.train import Trainer, build_model, resolve_device

    ds = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, ds.tokenizer.meta(), ds.tokenizer.vocab_size)
    ex = Exchange.of(model, cfg)
    start = {k: v.clone() for k, v in ex.state(model).items()}
    trainer = Trainer(model, cfg.train, resolve_device(cfg.train.device), log=None)
    trainer.train_steps(
        Batches(ds.train, cfg.model.block_size, cfg.train.batch_size, seed=cfg.train.seed), steps
    )
    update = ex.difference(ex.state(model), start)
    return {
        fmt: {
            b: float((update - decode(encode(update, "update", fmt, b))).norm() / update.norm())
            for b in BLOCKS
        }
        for fmt in QUANTIZED
    }


def bench_comm(a: argparse.Namespace, overrides: list[str], work: Path) -> dict[str, Any]:
    """Bytes per client per round and final val loss of every row of ROWS, the quantization error, and with
    --lora-base the LoRA rows."""
    app = app_dir(a.app_dir)
    cfg = load_config(a.config, overrides)
    fp32_bytes = 4 * wire_params(cfg)
    out: dict[str, Any] = {
        "params": fp32_bytes // 4,
        "fp32_model_bytes": fp32_bytes,
        "rows": {},
        "quant_block": cfg.fed.quant_block,
        "lora": None,
    }
    wanted = {"fp32", *(a.rows or (name for name, _, _ in ROWS))}  # fp32: the rows' reference
    for name, label, flags in () if a.lora_only else [r for r in ROWS if r[0] in wanted]:
        out["rows"][name] = {
            "label": label,
            **_run(app, sim_args(a) + overrides + flags, work / name, fp32_bytes),
        }
    if out["rows"]:
        base = out["rows"]["fp32"]["final_val_loss"]
        for row in out["rows"].values():
            row["val_loss_vs_fp32"] = round(row["final_val_loss"] - base, 6)
        out["quantization_error"] = quantization_error(cfg)
    if a.lora_base:
        out["lora"] = bench_lora(a, app, work)
    return out


def _run(app: Path, args: list[str], out_dir: Path, fp32_bytes: int) -> dict[str, Any]:
    """One federation: median bytes per client per round each way, against the fp32 model; final val loss."""
    run = run_simulate_py(app, args, out_dir, out_dir.with_suffix(".log"))
    rs = run.rounds
    down = median([r.bytes_sent / (r.clients_ok + r.clients_failed) for r in rs])
    up = median([r.bytes_received / r.clients_ok for r in rs if r.clients_ok])
    print(
        f"{out_dir.name}: {down / 1e6:.3f} MB down, {up / 1e6:.3f} MB up per client per round; "
        f"val {rs[-1].val_loss:.4f}",
        flush=True,
    )
    return {
        "downlink_bytes_per_client": down,
        "uplink_bytes_per_client": up,
        "downlink_vs_fp32": round(down / fp32_bytes, 5),
        "uplink_vs_fp32": round(up / fp32_bytes, 5),
        "round_trip_vs_fp32": round((down + up) / (2 * fp32_bytes), 5),
        "final_val_loss": rs[-1].val_loss,
        "rounds": len(rs),
        "median_round_s": median([r.round_s for r in rs]),
        "wall_s": round(run.wall_s, 1),
    }


def bench_lora(a: argparse.Namespace, app: Path, work: Path) -> dict[str, Any]:
    """Full fine-tuning against LoRA at each rank of a.lora_ranks, from the pretrained a.lora_base, federated
    over a.lora_corpus as a.lora_config says: adapter bytes against the full model's, and the val loss."""
    flags = [
        "--config",
        str(Path(a.lora_config).resolve()),
        f"--train.init_from={Path(a.lora_base).resolve()}",
    ]
    if a.lora_corpus:
        flags.append(f"--data.input_file={Path(a.lora_corpus).resolve()}")
    cfg = load_config(a.lora_config, [f.removeprefix("--") for f in flags[2:]])
    full_bytes = 4 * wire_params(cfg)
    rows = {}
    for rank in (0, *a.lora_ranks):
        name = f"lora_r{rank}" if rank else "full"
        rows[name] = {"rank": rank, **_run(app, [*flags, f"--lora.rank={rank}"], work / name, full_bytes)}
    full = rows["full"]["final_val_loss"]
    for row in rows.values():
        row["val_loss_vs_full"] = round(row["final_val_loss"] - full, 6)
    return {
        "base": str(a.lora_base),
        "corpus": str(a.lora_corpus),
        "config": a.lora_config,
        "model_bytes": full_bytes,
        "rows": rows,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-base", help="a pretrained fedgpt checkpoint: adds full fine-tuning and LoRA rows")
    p.add_argument("--lora-corpus", help="the text the LoRA rows fine-tune on (data.input_file)")
    p.add_argument("--lora-config", default="configs/shakespeare_bpe_cpu.yaml", help="their config")
    p.add_argument("--lora-ranks", type=int, nargs="+", default=[4, 16], help="LoRA ranks (default: 4 16)")
    p.add_argument("--lora-only", action="store_true", help="the LoRA rows alone, not the wire formats")
    p.add_argument(
        "--rows",
        nargs="+",
        choices=[name for name, _, _ in ROWS],
        metavar="ROW",
        help=f"run only these wire-format rows, and fp32 ({', '.join(name for name, _, _ in ROWS)})",
    )


def markdown(res: dict[str, Any]) -> str:
    lines = []
    if res["rows"]:
        lines += [
            "| comm: wire | down MB | up MB | up / fp32 | down+up / fp32 | final val loss | vs fp32 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in res["rows"].values():
            lines.append(
                f"| {r['label']} | {r['downlink_bytes_per_client'] / 1e6:.4f} | "
                f"{r['uplink_bytes_per_client'] / 1e6:.4f} | {r['uplink_vs_fp32']:.4f}x | "
                f"{r['round_trip_vs_fp32']:.4f}x | {r['final_val_loss']:.4f} | {r['val_loss_vs_fp32']:+.4f} |"
            )
        lines += [
            "",
            f"{res['params']:,} parameters (tied weights once), fp32 model "
            f"{res['fp32_model_bytes'] / 1e6:.3f} MB; bytes per client per round; quantization block "
            f"{res['quant_block']}",
            "",
            "| relative error of one update | " + " | ".join(f"block {b}" for b in BLOCKS) + " |",
            "| --- |" + " ---: |" * len(BLOCKS),
        ]
        for fmt, errs in res["quantization_error"].items():
            lines.append(f"| {fmt} | " + " | ".join(f"{errs[b]:.4f}" for b in BLOCKS) + " |")
    if res["lora"]:
        lo = res["lora"]
        lines += [
            "",
            "| comm: fine-tuning | rank | up MB per client per round | of the full model | final val loss "
            "| vs full |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in lo["rows"].items():
            lines.append(
                f"| {name} | {r['rank']} | {r['uplink_bytes_per_client'] / 1e6:.4f} | "
                f"{r['uplink_vs_fp32']:.2%} | {r['final_val_loss']:.4f} | {r['val_loss_vs_full']:+.4f} |"
            )
        lines.append(
            f"\nbase {lo['base']}, fine-tuned on {lo['corpus']} ({lo['config']}); full model "
            f"{lo['model_bytes'] / 1e6:.2f} MB"
        )
    return "\n".join(lines)
