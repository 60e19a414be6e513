"""docs/benchmarks.md (and the communication, scale and secure-aggregation tables of docs/results.md) from
their runs: each `python -m fedgpt.bench ...` a section quotes writes its JSON as a record,
results/records/bench/<name>.json (committed), and the section's block is rendered from those records.

    python -m fedgpt.results --benchmarks --nanogpt ../nanoGPT   # run every benchmark, one at a time
    python -m fedgpt.results --benchmarks --no-run               # rewrite the blocks from the records

The speed figures want a quiet machine: nothing else running while they run. Without --nanogpt the step
benchmark runs fedgpt alone and its table has no nanoGPT column.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedgpt.bench import comm
from fedgpt.bench.common import markers, run_logged, write_doc

CONFIG = "configs/shakespeare_char_cpu.yaml"


@dataclass(frozen=True)
class Bench:
    name: str  # its record: <records>/bench/<name>.json
    argv: tuple[str, ...]  # python -m fedgpt.bench ARGV
    nanogpt: bool = False  # side by side with a nanoGPT checkout, when --nanogpt names one

    def command(self, nanogpt: str | None = None) -> list[str]:
        extra = ["--nanogpt", nanogpt] if self.nanogpt and nanogpt else []
        return ["python", "-m", "fedgpt.bench", *self.argv, *extra]


def _train(threads: int) -> Bench:
    argv = ("train", "--config", CONFIG, "--threads", str(threads), "--steps", "30", "--warmup", "5")
    return Bench(f"train-threads{threads}", (*argv, "--repeats", "10"), nanogpt=True)


TRAIN = (_train(2), _train(1))
FED = (Bench("fed-1", ("fed",)), Bench("fed-2", ("fed",)))
DEPLOY = (Bench("deploy-1", ("deploy",)), Bench("deploy-2", ("deploy",)))
COMM = Bench("comm", ("comm", "--config", CONFIG))
SCALE = Bench("scale", ("scale",))  # the role split: 100, 300 and 1,000 clients, 10% a round
MANY = Bench(  # 1,000 and 100,000 IID clients of the tiny model on a 20 MB corpus, 0.1% a round
    "scale-many",
    ("scale", "--config", "configs/tiny.yaml", "--partition", "iid", "--clients", "1000", "100000")
    + ("--fraction", "0.001", "--corpus-copies", "18"),
)
# What SecAgg+ costs: plain FedAvg against SecAgg+ in simulation (each record both, one after the other; two
# records) and in deployment (3 SuperNodes: secagg.shares, each node's secrets shared among all three).
SECAGG_SIM = tuple(
    Bench(f"secagg-sim-{i}", ("comm", "--config", CONFIG, "--rows", "secagg", "--rounds", "4"))
    for i in (1, 2)
)
_DEPLOY3 = ("deploy", "--supernodes", "3", "--rounds", "4")
SECAGG_DEPLOY = (
    Bench("secagg-deploy-plain", _DEPLOY3),
    Bench("secagg-deploy-on", (*_DEPLOY3, "--secagg.enabled=true")),
)
BENCHES = (*TRAIN, *FED, COMM, *DEPLOY, SCALE, MANY, *SECAGG_SIM, *SECAGG_DEPLOY)  # the order they run in


def _join(values: list, fmt: str) -> str:
    return ", ".join("-" if v is None else fmt.format(v) for v in values)


def _measured(records: list[dict]) -> str:
    """When and at which commit, with what: the line under a block."""
    first = records[0]
    commits = sorted({r.get("commit") or "?" for r in records})
    days = sorted({r["time"][:10] for r in records})
    return (
        f"Measured on {', '.join(days)} at commit {', '.join(commits)} ({first['cpus']} CPUs, torch "
        f"{first['torch']}, Python {first['python']}); records in results/records/bench."
    )


def render_train(records: list[dict]) -> str:
    lines = [
        "| threads | fedgpt ms/step | nanoGPT ms/step | fedgpt tokens/s | nanoGPT tokens/s "
        "| fedgpt / nanoGPT tokens/s (median of repeats) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        ours, theirs = r["fedgpt"], r["nanogpt"]
        cells = [
            str(r["threads"]),
            f"{ours['ms_per_step']:.1f}",
            "-",
            f"{ours['tokens_per_s']:,.0f}",
            "-",
            "-",
        ]
        if theirs:  # the step benchmark ran beside nanoGPT
            cells[2], cells[4] = f"{theirs['ms_per_step']:.1f}", f"{theirs['tokens_per_s']:,.0f}"
            cells[5] = f"{r['speedup_repeat_median']:.2f}x"
        lines.append("| " + " | ".join(cells) + " |")
    commands = [" ".join(b.command("../nanoGPT")) for b in TRAIN]
    return "\n".join(["```bash", *commands, "```", "", *lines, "", _measured(records)])


def render_federation(fed: list[dict], comm_: dict, deploy: list[dict]) -> str:
    sim = [r["simulation"] for r in fed]
    fp32, fp16 = comm_["rows"]["fp32"], comm_["rows"]["fp16"]
    runs = [r["runs"]["run"] for r in deploy]
    rows = [
        (
            "simulation start-up, launch to first client step",
            _join([s["startup_s"] for s in sim], "{:.2f} s"),
            "8 s",
        ),
        (
            "the floor under it, same runs: Flower + Ray + a ClientApp that only imports torch",
            _join([r["startup_floor_s"] for r in fed], "{:.2f} s"),
            "",
        ),
        (
            "start-up over the floor: fedgpt's own part",
            _join([r["startup_over_floor_s"] for r in fed], "{:.2f} s"),
            "",
        ),
        (
            "share of a round outside client training (median)",
            _join([100 * s["median_outside_training_share"] for s in sim], "{:.1f}%"),
            "5%",
        ),
        (
            "simulation tokens/s over its rounds / local trainer's tokens/s",
            _join([r["tokens_per_s_ratio"] for r in fed], "{:.2f}x"),
            "0.95x",
        ),
        (
            "the same over the whole run (start-up and the last evaluation included)",
            _join([r["tokens_per_s_ratio_wall"] for r in fed], "{:.2f}x"),
            "",
        ),
        (
            f"fp16 bytes up per client per round / fp32 model ({comm_['params']:,} values, "
            f"{comm_['fp32_model_bytes'] / 1e6:.3f} MB)",
            f"{fp16['uplink_bytes_per_client'] / 1e6:.4f} MB, {fp16['uplink_vs_fp32']:.5f}x",
            "0.5x",
        ),
        (
            f"central val loss, fp16 against fp32 transport, after {fp32['rounds']} rounds",
            f"{fp16['final_val_loss']:.4f} against {fp32['final_val_loss']:.4f}",
            "within 0.01",
        ),
        (
            f"deployment round, {deploy[0]['supernodes']} SuperNodes, {deploy[0]['local_steps']} local steps "
            f"(median of {len(runs[0]['round_s_by_round'])})",
            _join([r["median_round_s"] for r in runs], "{:.1f} s"),
            "4 s",
        ),
        (
            "the floor under it: the same rounds, Flower + a ClientApp of Flower and numpy alone",
            _join([r["floor_median_round_s"] for r in deploy], "{:.1f} s"),
            "",
        ),
        (
            "deployment round over the floor: fedgpt's own part",
            _join([r["median_round_over_floor_s"] for r in deploy], "{:.2f} s"),
            "",
        ),
    ]
    lines = ["| figure | measured | target |", "| --- | --- | --- |"]
    lines += [f"| {figure} | {measured} | {target} |" for figure, measured, target in rows]
    commands = [
        f"{' '.join(FED[0].command())}      # {len(FED)} runs",
        " ".join(COMM.command()),
        f"{' '.join(DEPLOY[0].command())}   # {len(DEPLOY)} runs",
    ]
    return "\n".join(["```bash", *commands, "```", "", *lines, "", _measured([*fed, comm_, *deploy])])


def render_comm(r: dict) -> str:
    """The communication table of docs/results.md: every wire format's bytes and val loss, and the
    round-trip error of the block-scaled formats by block."""
    lines = [
        "| row | down (MB) | up (MB) | up / fp32 | final val loss | vs fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in r["rows"].items():
        vs = "-" if name == "fp32" else f"{row['val_loss_vs_fp32']:+.4f}"
        lines.append(
            f"| {row['label']} | {row['downlink_bytes_per_client'] / 1e6:.3f} | "
            f"{row['uplink_bytes_per_client'] / 1e6:.3f} | {row['uplink_vs_fp32']:.4f}x | "
            f"{row['final_val_loss']:.4f} | {vs} |"
        )
    blocks = comm.BLOCKS
    lines += [
        "",
        "Relative error ‖update − dequantized‖ / ‖update‖ of one client's update (25 steps from the initial "
        "model), by block:",
        "",
        "| block | " + " | ".join(str(b) for b in blocks) + " |",
        "| --- |" + " ---: |" * len(blocks),
    ]
    for fmt, errs in r["quantization_error"].items():
        lines.append(f"| {fmt} | " + " | ".join(f"{errs[str(b)]:.4f}" for b in blocks) + " |")
    return "\n".join(["```bash", " ".join(COMM.command()), "```", "", *lines, "", _measured([r])])


def render_scale(r: dict, bench: Bench) -> str:
    """A scale benchmark's table: start-up (and the pre-flight in it), round seconds and peak memory by
    client count."""
    lines = [
        "| clients | sampled per round | start-up (s) | of it, asking every node (s) | median round (s) "
        "| peak memory (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["by_clients"]:
        asked = "-" if row["preflight_s"] is None else f"{row['preflight_s']:.1f}"
        lines.append(
            f"| {row['clients']:,} | {row['sampled_per_round']:,} | {row['startup_s']:.1f} | {asked} | "
            f"{row['median_round_s']:.2f} | {row['peak_memory_mb']:,} |"
        )
    command = " ".join(bench.command())
    return "\n".join(["```bash", command, "```", "", *lines, "", _measured([r])])


def render_secagg(sim: list[dict], deploy: list[dict]) -> str:
    """Plain FedAvg against SecAgg+: median round, bytes up and the final val loss, in simulation (a value
    per record) and in deployment (its floor measured after each run)."""
    lines = [
        "| run | where | median round (s) | up per client and round (MB) | final val loss |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, label in (("fp32", "plain FedAvg"), ("secagg", "SecAgg+")):
        by = [r["rows"][name] for r in sim]
        median_s = _join([b["median_round_s"] for b in by], "{:.2f}")
        losses = _join([b["final_val_loss"] for b in by], "{:.7f}")
        lines.append(
            f"| {label} | simulation, {by[0]['rounds']} rounds | {median_s} | "
            f"{by[0]['uplink_bytes_per_client'] / 1e6:.3f} | {losses} |"
        )
    for r, label in zip(deploy, ("plain FedAvg", "SecAgg+"), strict=True):
        run = r["runs"]["run"]
        where = f"deployment, {len(run['round_s_by_round'])} rounds, {r['supernodes']} SuperNodes"
        lines.append(
            f"| {label} | {where} (floor {r['floor_median_round_s']:.2f} s) | "
            f"{run['median_round_s']:.2f} | - | {run['final_val_loss']:.7f} |"
        )
    commands = [" ".join(b.command()) for b in (SECAGG_SIM[0], *SECAGG_DEPLOY)]
    commands[0] += f"   # {len(SECAGG_SIM)} runs"
    return "\n".join(["```bash", *commands, "```", "", *lines, "", _measured([*sim, *deploy])])


@dataclass(frozen=True)
class Section:
    doc: str  # the document it sits in, beside --doc
    marker: str  # <!-- marker:start --> ... <!-- marker:end -->
    benches: tuple[Bench, ...]
    render: Callable[[list[dict]], str]  # the records, in the order of benches


SECTIONS = (
    Section("benchmarks.md", "bench-train", TRAIN, render_train),
    Section(
        "benchmarks.md",
        "bench-federation",
        (*FED, COMM, *DEPLOY),
        lambda rs: render_federation(rs[: len(FED)], rs[len(FED)], rs[len(FED) + 1 :]),
    ),
    Section("results.md", "comm", (COMM,), lambda rs: render_comm(rs[0])),
    Section("results.md", "scale", (SCALE,), lambda rs: render_scale(rs[0], SCALE)),
    Section("results.md", "scale-many", (MANY,), lambda rs: render_scale(rs[0], MANY)),
    Section(
        "results.md",
        "secagg",
        (*SECAGG_SIM, *SECAGG_DEPLOY),
        lambda rs: render_secagg(rs[: len(SECAGG_SIM)], rs[len(SECAGG_SIM) :]),
    ),
)


def run(b: Bench, records: Path, runs_dir: Path, app: Path, nanogpt: str | None) -> None:
    """`python -m fedgpt.bench ...` in a subprocess from the app directory, its output into
    <runs-dir>/bench/<name>.log and its JSON written (whole, by the benchmark) as the record."""
    out = records / "bench" / f"{b.name}.json"
    if out.is_relative_to(app):  # the command the record keeps reads as a user's
        out = out.relative_to(app)
    print(f"[{b.name}] {' '.join(b.command(nanogpt))}", flush=True)
    _, wall = run_logged(
        [sys.executable, *b.command(nanogpt)[1:], "--out", str(out)],
        runs_dir / "bench" / f"{b.name}.log",
        app,
    )
    print(f"[{b.name}] done in {wall:.0f} s", flush=True)


def main(a: argparse.Namespace, records: Path, runs_dir: Path, app: Path) -> None:
    """Run every benchmark (unless a.no_run) into its record, then rewrite each section from the records."""
    missing = [b.name for b in BENCHES if not (records / "bench" / f"{b.name}.json").is_file()]
    if a.no_run and missing:
        raise ValueError(
            f"no records for benchmarks ({', '.join(missing)}) in {records / 'bench'}: "
            "run `python -m fedgpt.results --benchmarks` to make them"
        )
    if not a.no_run:
        for b in BENCHES:
            if a.only is None or b.name in a.only:
                run(b, records, runs_dir, app, a.nanogpt)
    got = {b.name: json.loads((records / "bench" / f"{b.name}.json").read_text()) for b in BENCHES}
    docs = Path(a.doc).parent
    for s in SECTIONS:
        block = s.render([got[b.name] for b in s.benches])
        write_doc(docs / s.doc, block, markers(s.marker))
        print(block)
    print(f"wrote {', '.join(sorted({str(docs / s.doc) for s in SECTIONS}))}")
