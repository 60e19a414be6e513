"""Deployment rounds on loopback (a SuperLink, SuperNodes, `flwr run .`), against their floor.

    python -m fedgpt.bench deploy                                     # 2 SuperNodes, 5 rounds, 0 local steps
    python -m fedgpt.bench deploy --local-steps 25 --compile-check    # compile off, on (cold), on (restarted)
    python -m fedgpt.bench deploy --trainer inline                    # a per-message process does the work

Every SuperNode keeps its state (client state, its warm trainer's socket and compile caches) in a folder of
its own. After fedgpt's runs, the floor runs on the same federation: the same rounds of a Flower app whose
ClientApp imports only Flower and numpy (fedgpt.bench.floor_deploy). With --compile-check fedgpt runs three
times on the same federation: train.compile off, on with empty compile caches, and on again in new trainer
processes (each run has its own), which find the caches the second run left on disk. Last, with the federation
stopped, fedgpt's own share of a message alone: a node's relay handing one client's round to its warm trainer
over the socket and reading the reply, outside Flower (trainer_message_s). The SuperNodes log at DEBUG level,
whose lines carry timestamps: node_phases_s splits each train message's time on a node into Flower's phases
(fedgpt.bench.node_phases), for fedgpt's first run and for the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedgpt.bench.common import SimRun, app_dir, wire_params
from fedgpt.bench.loopback import Deployment
from fedgpt.bench.node_phases import PHASES, median_phases, message_phases
from fedgpt.config import load_config
from fedgpt.fed.rounds import median, read_rounds

RUNS = {"off": [], "cold": ["train.compile=true"], "restarted": ["train.compile=true"]}


def fedgpt_run(dep: Deployment, a, overrides: list[str], out: Path, extra: list[str], app: Path) -> SimRun:
    cfg = load_config(a.config, overrides)
    settings = [
        f"fed.num_clients={a.supernodes}",
        f"fed.rounds={a.rounds}",
        f"fed.local_steps={a.local_steps}",
        f"train.out_dir={out}",
        f"data.data_dir={Path(cfg.data.data_dir).resolve()}",
        *(o.lstrip("-") for o in overrides),
        *extra,
    ]
    run_config = f"config='{Path(a.config).resolve()}' client-threads=1 overrides='{' '.join(settings)}'"
    t0 = time.time()
    res = dep.flwr(
        ["run", ".", "loopback", "--stream", "--run-config", run_config], timeout=a.timeout, cwd=app
    )
    if res.returncode != 0 or not (out / "rounds.jsonl").is_file():
        raise RuntimeError(
            f"flwr run exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{dep.logs()}"
        )
    return SimRun(read_rounds(out / "rounds.jsonl"), t0, time.time() - t0, dep.root)


def figures(run: SimRun) -> dict[str, Any]:
    rounds = [r for r in run.rows if r.round > 0]
    between = [b.elapsed_s - a.elapsed_s for a, b in zip(run.rows, run.rows[1:])]
    return {
        "round_s_by_round": [r.round_s for r in rounds],
        "median_round_s": median([r.round_s for r in rounds]),
        "median_round_wall_s": round(median(between[1:]), 3) if len(between) > 1 else None,
        "outside_training_share_by_round": [r.outside_training_share for r in rounds],
        "startup_s": rounds[0].startup_s if rounds else None,
        "tokens": rounds[-1].tokens if rounds else 0,
        "final_val_loss": rounds[-1].val_loss if rounds else None,
    }


def bench_deploy(a: argparse.Namespace, overrides: list[str], work: Path) -> dict[str, Any]:
    """fedgpt's rounds (three runs with --compile-check), then the floor's, on one loopback federation."""
    from fedgpt.bench.floor_deploy import floor_app

    app = app_dir(a.app_dir)
    _check_installed(work)
    cfg = load_config(a.config, overrides)
    floor_out = work / "floor.json"
    floor = floor_app(work / "floor_app", a.supernodes, a.rounds, wire_params(cfg), floor_out)
    dep = Deployment(work / "flwr", env={"FLWR_LOG_LEVEL": "DEBUG"})  # DEBUG: log lines with timestamps
    nodes = [work / f"node{i}" for i in range(a.supernodes)]
    res: dict[str, Any] = {
        "supernodes": a.supernodes,
        "local_steps": a.local_steps,
        "trainer": a.trainer,
        "runs": {},
    }
    try:
        t0 = time.time()
        dep.start_federation(
            Path(cfg.data.data_dir).resolve(),
            a.supernodes,
            state_dirs=nodes,
            node_configs=[f"trainer='{a.trainer}'"] * a.supernodes,
        )
        res["federation_start_s"] = round(time.time() - t0, 2)
        for name, extra in RUNS.items() if a.compile_check else [("run", [])]:
            res["runs"][name] = figures(fedgpt_run(dep, a, overrides, work / name, extra, app))
            print(f"[deploy] {name}: rounds {res['runs'][name]['round_s_by_round']}", flush=True)
        out = dep.flwr(["run", str(floor), "loopback", "--stream"], timeout=a.timeout, cwd=work)
        if out.returncode != 0 or not floor_out.is_file():
            raise RuntimeError(
                f"the deployment floor exited {out.returncode}\n{out.stdout[-2000:]}\n{dep.logs()}"
            )
    finally:
        dep.stop()
    res["node_phases_s"] = node_phases(dep.root, a.supernodes)
    res["trainer_message_s"] = trainer_message_s(a, overrides, work / "relay")
    res["floor_round_s_by_round"] = json.loads(floor_out.read_text())["round_s"]
    res["floor_median_round_s"] = median(res["floor_round_s_by_round"])
    first = next(iter(res["runs"].values()))
    res["median_round_over_floor_s"] = round(first["median_round_s"] - res["floor_median_round_s"], 3)
    if a.compile_check:
        off, cold, warm = (res["runs"][k]["round_s_by_round"] for k in RUNS)
        res["compiled_vs_off_from_round_2"] = [round(c / o, 3) for c, o in zip(cold[1:], off[1:])]
        res["first_round_cold_over_restarted"] = round(cold[0] / warm[0], 2)
    return res


def node_phases(root: Path, supernodes: int) -> dict[str, dict]:
    """Medians of where each train message spent its time on the SuperNodes (fedgpt.bench.node_phases), for
    fedgpt's first run and for the floor's (the last run on the federation), over all nodes."""
    runs = [
        list(message_phases((root / f"supernode{i}.log").read_text()).values()) for i in range(supernodes)
    ]
    if not all(runs):
        return {}  # no timestamped lines: another Flower version's log
    return {
        "fedgpt": median_phases([m for node in runs for m in node[0]]),
        "floor": median_phases([m for node in runs for m in node[-1]]),
    }


def trainer_message_s(a: argparse.Namespace, overrides: list[str], work: Path, calls: int = 10) -> float:
    """Median seconds of one client's train message through a node's relay and warm trainer (a real worker
    process, over its socket), as fedgpt's ServerApp would send it in rounds 2 to `calls` + 1; the first call,
    which starts the trainer, is left out. No Flower process: what fedgpt adds to a message, alone."""
    from flwr.app import ConfigRecord, RecordDict

    from fedgpt.fed.relay import WorkerClient
    from fedgpt.fed.server import FederatedRun
    from fedgpt.fed.worker import stop

    settings = [f"--fed.num_clients={a.supernodes}", f"--fed.local_steps={a.local_steps}"]
    cfg = load_config(a.config, [*overrides, *settings, f"--train.out_dir={work / 'run'}"])
    run = FederatedRun(cfg, client_threads=1, log=lambda _: None)  # client-threads=1, as the runs above
    folder = work / "workers"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    worker = WorkerClient(folder, node_id=1, run_id=1, idle_timeout=120, watch_pid=os.getpid())
    # the node's own settings, as the deployment's SuperNodes have them (fedgpt.fed.node_policy)
    node = {"partition-id": 0, "num-partitions": a.supernodes, "state-dir": str(work / "state")}
    node["data-dir"] = str(Path(cfg.data.data_dir).resolve())
    seconds = []
    try:
        for rnd in range(1, calls + 2):
            sent = run.exchange.downlink(run.global_state, base_id=rnd)
            config = ConfigRecord({**run.run_facts(), **run.work_order(rnd).to_config()})
            t = time.perf_counter()
            worker.call("train", RecordDict({"arrays": sent, "config": config}), node)
            seconds.append(time.perf_counter() - t)
    finally:
        stop(worker.socket_path)
    return round(median(seconds[1:]), 4)


def _check_installed(work: Path) -> None:
    """The floor's ServerApp and ClientApp processes import fedgpt.bench from outside this checkout."""
    code = "import importlib.util as u; print(u.find_spec('fedgpt') is not None)"
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=work, capture_output=True, text=True
    ).stdout.strip()
    if found != "True":
        raise RuntimeError(
            "bench deploy runs its floor from the installed fedgpt package: install it with pip install -e "
            ". (the README's install command)"
        )


def markdown(res: dict[str, Any]) -> str:
    s = lambda xs: ", ".join("-" if x is None else f"{x:.2f}" for x in xs)
    rows = [
        ("SuperNodes, local steps, trainer", f"{res['supernodes']}, {res['local_steps']}, {res['trainer']}")
    ]
    for name, r in res["runs"].items():
        rows += [
            (f"{name}: round time, by round (s)", s(r["round_s_by_round"])),
            (f"{name}: round time (s, median)", r["median_round_s"]),
            (f"{name}: share outside client training, by round", s(r["outside_training_share_by_round"])),
            (f"{name}: start-up, federation up to the first client step (s)", r["startup_s"]),
        ]
    rows += [
        (
            "floor: Flower and a ClientApp of Flower and numpy alone, by round (s)",
            s(res["floor_round_s_by_round"]),
        ),
        ("floor (s, median)", res["floor_median_round_s"]),
        ("round time over the floor (s, median; the first run)", res["median_round_over_floor_s"]),
        (
            "fedgpt's own work per train message: relay to warm trainer and back, no Flower (s, median)",
            res["trainer_message_s"],
        ),
        ("starting SuperLink and SuperNodes (s)", res["federation_start_s"]),
    ]
    if res["node_phases_s"]:
        fed, floor = res["node_phases_s"]["fedgpt"], res["node_phases_s"]["floor"]
        rows += [
            (f"a SuperNode's train message: {p} (s, median), fedgpt / floor", s([fed[p], floor[p]]))
            for p in PHASES
        ]
    if "first_round_cold_over_restarted" in res:
        rows += [
            ("compiled / not compiled, rounds 2 on", s(res["compiled_vs_off_from_round_2"])),
            ("first round: cold compile / restarted trainer", res["first_round_cold_over_restarted"]),
        ]
    return "\n".join(["| deploy | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--supernodes", type=int, default=2, help="SuperNodes = clients (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for each run (default: %(default)s)")
    p.add_argument("--trainer", choices=["worker", "inline"], default="worker", help="node setting trainer")
    p.add_argument(
        "--compile-check", action="store_true", help="compile off, on (cold), on (restarted trainer)"
    )
