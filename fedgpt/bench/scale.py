"""Simulations of many clients: start-up, seconds per round and peak memory against the number of clients.

    python -m fedgpt.bench scale                                   # role split: 100, 300, 1000 clients
    python -m fedgpt.bench scale --clients 1000 --rounds 3 --fraction 0.1
    python -m fedgpt.bench scale --config configs/tiny.yaml --partition iid --clients 1000 100000 \
        --fraction 0.001 --corpus-copies 18                        # a 20 MB corpus: Tiny Shakespeare 18 times

Each count runs `python simulate.py` in a session of its own, with fed.fraction_train of the clients
sampled per round; the memory figure is the peak, sampled every half second, of the resident memory summed
over every process of that session (the simulation, Ray's daemons and its actors).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedgpt.bench.common import QUIET, app_dir
from fedgpt.config import load_config
from fedgpt.download import download_shakespeare
from fedgpt.fed.relay import proc_stat
from fedgpt.fed.rounds import median, read_rounds

PAGE = os.sysconf("SC_PAGE_SIZE")
PREFLIGHT = re.compile(r"pre-flight: \d+ nodes admitted in ([\d.]+) s")  # every node asked before round 1


def session_rss(sid: int) -> int:
    """Bytes resident in the live processes of session `sid` (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = proc_stat(entry.name)
        try:
            if stat is not None and int(stat[3]) == sid:  # stat[3]: the session
                total += int((entry / "statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError):  # gone, or not ours to read
            pass
    return total


def run_sampled(cmd: list[str], log: Path, cwd: Path, timeout: float) -> tuple[float, float, int]:
    """Run `cmd` in a new session; (Unix start time, wall seconds, peak bytes resident in its session)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, peak = time.time(), 0
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            # its own Ray, not $RAY_ADDRESS's: Ray's daemons are part of the session's memory
            env={k: v for k, v in {**os.environ, **QUIET}.items() if k != "RAY_ADDRESS"},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while proc.poll() is None:
            peak = max(peak, session_rss(proc.pid))
            if time.time() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"{' '.join(cmd[1:])} ran past {timeout:.0f} s; its output is in {log}")
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited with {proc.returncode}; its output is in {log}")
    return t0, time.time() - t0, peak


def copies_of_corpus(a: argparse.Namespace, overrides: list[str], work: Path) -> list[str]:
    """The overrides that point the runs at a.corpus_copies copies of the config's corpus, one after the
    other, written into `work` (and its encoded splits kept there)."""
    cfg = load_config(a.config, overrides)
    source = Path(cfg.data.input_file) if cfg.data.input_file else download_shakespeare(cfg.data.data_dir)
    big = work / f"corpus-x{a.corpus_copies}.txt"
    big.write_text(source.read_text(encoding="utf-8") * a.corpus_copies, encoding="utf-8")
    print(f"corpus: {source} {a.corpus_copies} times, {big.stat().st_size / 1e6:.1f} MB", flush=True)
    return [*overrides, f"--data.input_file={big}", f"--data.data_dir={work / 'data'}"]


def bench_scale(a: argparse.Namespace, overrides: list[str], work: Path) -> dict[str, Any]:
    """Start-up, median round and peak memory of a simulation at each client count of a.clients."""
    if a.corpus_copies < 1:
        raise ValueError(
            f"--corpus-copies={a.corpus_copies} must be >= 1 (1 runs on the config's corpus as it is)"
        )
    app = app_dir(a.app_dir)
    if a.corpus_copies > 1:
        overrides = copies_of_corpus(a, overrides, work)
    rows = []
    for n in a.clients:
        out = work / f"clients{n}"
        cmd = [
            sys.executable,
            "simulate.py",
            "--config",
            str(Path(a.config).resolve()),
            f"--fed.partition={a.partition}",
            f"--fed.num_clients={n}",
            f"--fed.fraction_train={a.fraction}",
            f"--fed.rounds={a.rounds}",
            f"--fed.local_steps={a.local_steps}",
            f"--train.out_dir={out}",
            *overrides,
        ]
        t0, wall, peak = run_sampled(cmd, work / f"clients{n}.log", app, a.timeout)
        rounds = [r for r in read_rounds(out / "rounds.jsonl") if r.round > 0]
        asked = PREFLIGHT.search((work / f"clients{n}.log").read_text(errors="replace"))
        row = {
            "clients": n,
            "sampled_per_round": rounds[0].clients_ok + rounds[0].clients_failed,
            "startup_s": round(rounds[0].first_step_at - t0, 2),
            "preflight_s": float(asked.group(1)) if asked else None,  # None: nodes asked as first sampled
            "median_round_s": median([r.round_s for r in rounds]),
            "round_s_by_round": [r.round_s for r in rounds],
            "peak_memory_mb": round(peak / 2**20),
            "wall_s": round(wall, 1),
            "final_val_loss": rounds[-1].val_loss,
        }
        print(
            f"{n} clients: start-up {row['startup_s']} s, median round {row['median_round_s']} s, "
            f"peak memory {row['peak_memory_mb']} MiB",
            flush=True,
        )
        rows.append(row)
    return {
        "partition": a.partition,
        "corpus_copies": a.corpus_copies,
        "fraction_train": a.fraction,
        "rounds": a.rounds,
        "local_steps": a.local_steps,
        "by_clients": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| scale: clients | sampled per round | start-up (s) | median round (s) | peak memory (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['clients']} | {r['sampled_per_round']} | {r['startup_s']} | {r['median_round_s']} | "
        f"{r['peak_memory_mb']} |"
        for r in res["by_clients"]
    ]
    lines.append(f"\n{res['partition']} split, {res['rounds']} rounds of {res['local_steps']} local steps")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="start-up, round seconds and peak memory at 100 to 1000 clients")
    p.add_argument(
        "--config", default="configs/shakespeare_char_cpu.yaml", help="YAML config (default: %(default)s)"
    )
    p.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[100, 300, 1000],
        help="client counts (default: %(default)s)",
    )
    p.add_argument("--partition", default="role", help="fed.partition (default: %(default)s)")
    p.add_argument("--fraction", type=float, default=0.1, help="fed.fraction_train (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default: %(default)s)")
    p.add_argument("--local-steps", type=int, default=5, help="local steps per round (default: %(default)s)")
    p.add_argument(
        "--corpus-copies",
        type=int,
        default=1,
        help="run on this many copies of the config's corpus, one after the other (default: %(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=3600, help="seconds for one count's run (default: %(default)s)"
    )
    p.add_argument("--app-dir", default=".", help="the fedgpt app directory (default: the current one)")
    p.add_argument(
        "--keep", help="directory for the runs' outputs and logs (default: a temporary one, removed)"
    )
    p.add_argument("--out", help="JSON result file (default results/bench-scale-<time>.json)")
