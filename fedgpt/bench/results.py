"""The results of docs/results.md, each table from its runs: every run the real entry point in a subprocess
(`python -m fedgpt.local_train`, `python simulate.py`), writing to <runs-dir>/<name>, and what the table reads
of it kept as a record in <records-dir>/<name> (results/records, committed), from which the table is rendered.

    python -m fedgpt.results                        # centralized against federated at equal tokens
    python -m fedgpt.results --frontier             # final loss against bytes sent, local steps 5 to 125
    python -m fedgpt.results --sweep                # the sweep behind the main table's settings
    python -m fedgpt.results --privacy              # DP fine-tuning from a public base
    python -m fedgpt.results --lowcomm              # AdamW and Muon, fragments, sparse: loss against bytes
    python -m fedgpt.results --lora                 # federated LoRA, inexact and exact, against full tuning
    python -m fedgpt.results --personal             # personal models per client against the global model
    python -m fedgpt.results --only fedavg_iid      # rerun one; the table keeps the others' records
    python -m fedgpt.results --stragglers --no-run  # rewrite a table from its records, running nothing
    python -m fedgpt.results --benchmarks --no-run  # docs/benchmarks.md from its benchmarks' records

Each table lives in a module of its own (fedgpt.bench.equal_tokens, frontier, sweep, lowcomm, targets,
privacy, finetune, personal) with its experiments and how it renders them; fedgpt.bench.experiments runs,
records and collects them; the benchmarks' figures (docs/benchmarks.md, and the communication, scale and
secure-aggregation tables here) are fedgpt.bench.benchdoc's. The table between the markers of the results
document (and its plot) is rewritten; the rest of the document is left as it is. --no-run refuses a table one
of whose runs has no record, leaving the document as it is: a table rendered without a run would drop its row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedgpt.bench import (
    benchdoc,
    equal_tokens,
    finetune,
    frontier,
    lowcomm,
    personal,
    privacy,
    sweep,
    targets,
)
from fedgpt.bench.common import app_dir, markers, write_doc
from fedgpt.bench.experiments import Experiment, collect, run, save_record
from fedgpt.config import load_config
from fedgpt.files import atomic_write_bytes

CHAR_CONFIG = "configs/shakespeare_char_cpu.yaml"


@dataclass(frozen=True)
class Table:
    name: str  # of its results-<name>.json
    help: str
    markers: tuple[str, str]  # where its block sits in the results document
    experiments: Callable[[argparse.Namespace], list[Experiment]]
    render: Callable[[list[dict], argparse.Namespace, Path], str]
    figures: Callable[[Path], dict] | None = None  # what else it reads from a run's folder or record
    keep: Callable[[Path], dict[str, bytes]] | None = None  # what figures reads that a record must add
    prepare: Callable[[argparse.Namespace, Path], None] | None = None  # what its runs need first
    config: str = CHAR_CONFIG  # its runs' config, unless --config says another


TABLES = {
    "main": Table(
        "main",
        "centralized against federated at equal tokens",
        markers("results"),
        lambda a: equal_tokens.experiments(),
        equal_tokens.render,
    ),
    "frontier": Table(
        "frontier",
        "final loss against bytes sent, local steps 5 to 125",
        markers("frontier"),
        lambda a: frontier.experiments(),
        frontier.render,
    ),
    "sweep": Table(
        "sweep",
        "the sweep behind the main table's settings: batch, local steps, outer step, client lr",
        markers("sweep"),
        lambda a: sweep.experiments(),
        sweep.render,
    ),
    "lowcomm": Table(
        "lowcomm",
        "federated against synchronous at batch 1: AdamW and Muon, fragments, sparse uplinks",
        markers("lowcomm"),
        lambda a: lowcomm.experiments(),
        lowcomm.render,
    ),
    "rounds-to-target": Table(
        "target",
        "rounds to a target accuracy (FedSGD, FedAvg, DiLoCo; role split and IID)",
        markers("target"),
        lambda a: targets.experiments(),
        targets.render,
        figures=targets.figures,
    ),
    "privacy": Table(
        "privacy",
        "DP fine-tuning from a public base, against no DP",
        markers("privacy"),
        privacy.experiments,
        privacy.render,
        figures=privacy.figures,
        keep=privacy.keep,
        prepare=privacy.prepare,
    ),
    "lora": Table(
        "lora",
        "federated LoRA, inexact and exact (FFA), against full fine-tuning from a BPE base",
        markers("lora"),
        finetune.experiments,
        finetune.render,
        figures=finetune.figures,
        prepare=finetune.prepare,
        config=finetune.CONFIG,
    ),
    "personal": Table(
        "personal",
        "personal models (local adaptation, an adapter of each client's own) against the global model",
        markers("personal"),
        personal.experiments,
        personal.render,
        figures=personal.figures,
        prepare=personal.prepare,
        keep=personal.keep,
    ),
    "stragglers": Table(
        "stragglers",
        "50%% and 90%% stragglers: dropped, or their work kept",
        markers("stragglers"),
        lambda a: equal_tokens.stragglers(),
        equal_tokens.stragglers_table,
    ),
}
START, END = TABLES["main"].markers


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m fedgpt.results",
        description=__doc__.splitlines()[0],
        epilog="Any config field can be overridden for every run: --train.eval_iters=50",
    )
    p.add_argument(
        "--config", help=f"YAML config (default: the table's; {CHAR_CONFIG} but for --lora's BPE runs)"
    )
    p.add_argument("--num-clients", type=int, default=8, help="clients (default: %(default)s)")
    p.add_argument(
        "--rounds", type=int, default=10, help="rounds at the config's batch (default: %(default)s)"
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=25,
        help="local steps per round at the config's batch (default: %(default)s)",
    )
    which = p.add_mutually_exclusive_group()
    for name, table in TABLES.items():
        if name != "main":
            which.add_argument(f"--{name}", action="store_true", help=table.help)
    which.add_argument(
        "--benchmarks",
        action="store_true",
        help="docs/benchmarks.md and the communication, scale and SecAgg+ tables: speed, overhead, bytes, "
        "clients (fedgpt.bench)",
    )
    names = [
        e.name for t in TABLES.values() for e in t.experiments(argparse.Namespace(runs_dir=".", data_dir="."))
    ] + [b.name for b in benchdoc.BENCHES]
    p.add_argument(
        "--only", nargs="+", choices=names, metavar="NAME", help=f"run only these ({', '.join(names)})"
    )
    p.add_argument("--nanogpt", help="--benchmarks: a karpathy/nanoGPT checkout to time beside fedgpt's step")
    p.add_argument("--no-run", action="store_true", help="run nothing: rewrite the table from its records")
    p.add_argument("--runs-dir", default="results/runs", help="where each run writes (default: %(default)s)")
    p.add_argument(
        "--records-dir",
        help="where each run's record is kept and the tables are rendered from (default: records beside "
        "--runs-dir, results/records)",
    )
    p.add_argument("--app-dir", default=".", help="the fedgpt app directory (default: the current one)")
    p.add_argument(
        "--doc", default="docs/results.md", help="document whose table is rewritten (default: %(default)s)"
    )
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    a, overrides = parse_args(argv)
    if min(a.num_clients, a.rounds, a.local_steps) < 1:
        raise ValueError(
            "--num-clients, --rounds and --local-steps must be >= 1 "
            f"(got {a.num_clients}, {a.rounds}, {a.local_steps})"
        )
    runs_dir = Path(a.runs_dir).resolve()
    records = Path(a.records_dir).resolve() if a.records_dir else runs_dir.parent / "records"
    if a.benchmarks:
        if overrides:
            raise ValueError(
                f"--benchmarks runs each benchmark as docs/benchmarks.md says: drop {' '.join(overrides)}"
            )
        benchdoc.main(a, records, runs_dir, app_dir(a.app_dir))
        return []
    kind = next((k for k in TABLES if k != "main" and getattr(a, k.replace("-", "_"))), "main")
    table = TABLES[kind]
    a.config = a.config or table.config
    cfg = load_config(a.config, overrides)  # a bad config or override fails here, before any run
    a.data_dir = cfg.data.data_dir
    app = app_dir(a.app_dir)
    exps = table.experiments(a)
    if a.no_run:
        missing = [e.name for e in exps if not (records / e.name / "experiment.json").is_file()]
        if missing:  # a table rendered without them would drop rows from the document
            flag = "" if kind == "main" else f" --{kind}"
            which = "" if len(missing) == len(exps) else f" ({', '.join(missing)})"
            raise ValueError(
                f"no records for {kind}{which} in {records}: "
                f"run `python -m fedgpt.results{flag}` to make them"
            )
    elif table.prepare:
        table.prepare(a, app)
    for e in exps:
        if not a.no_run and (a.only is None or e.name in a.only):
            run(e, a, overrides, cfg.train, app)
            d = runs_dir / e.name
            save_record(d, records / e.name, table.keep(d) if table.keep else None)
    res = []
    for e in exps:
        r = collect(e, records)
        if r is not None:
            res.append({**r, **(table.figures(records / e.name) if table.figures else {})})
    doc = Path(a.doc)
    block = table.render(res, a, doc)
    write_doc(doc, block, table.markers)
    out = runs_dir / f"results-{table.name}.json"
    atomic_write_bytes(out, json.dumps(res, indent=1).encode())
    print(block)
    print(f"wrote {doc} and {out}")
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
