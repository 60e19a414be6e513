"""A federation as a Flower simulation on the Ray backend, in this process.

    summary = launch(cfg, "client_app:app", Resources(client_cpus=1.0))

It uses flwr.simulation.run_simulation (Flower marks it deprecated) because it runs in-process: fedgpt
checks the config, data and partitions while Ray starts, before any round, and measures start-up from the
launch. Flower's own lines (its deprecation notice for run_simulation, a few INFO lines a round) are shown
only with Resources(verbose=True) (simulate.py --verbose); fedgpt's round lines say what they said.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedgpt.config import Config

# torch, flwr and the ServerApp's modules are imported beside Ray's start (prepare(), simulate()), not before
# it.
if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from fedgpt.fed.server import FederatedRun


@dataclass
class Resources:
    client_cpus: float = 1.0  # CPUs per client: concurrency = Ray's CPUs / this
    client_gpus: float | None = None  # GPU fraction per client; None: 1 where CUDA is available, else 0
    ray_address: str | None = None  # join this Ray cluster ("auto", "HOST:6379") instead of starting one
    verbose: bool = False  # Flower's INFO lines and its run_simulation deprecation notice too


class _Quiet(logging.Filter):
    """Flower's logger without its INFO lines and its notice that run_simulation is deprecated (fedgpt uses it
    to run in-process, see above; `flwr run` runs a simulation too, README "Deployment")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO and "run_simulation" not in record.getMessage()


@contextlib.contextmanager
def flower_lines(verbose: bool):
    """Flower's log lines in this process: all of them if `verbose`, else only its warnings and errors."""
    if verbose:
        yield
        return
    quiet, flwr_log = _Quiet(), logging.getLogger("flwr")
    flwr_log.addFilter(quiet)
    try:
        yield
    finally:
        flwr_log.removeFilter(quiet)


def ray_init_args(address: str | None = None) -> dict:
    """ray.init arguments: join the cluster at `address` (or at $RAY_ADDRESS, Ray's own setting), or start a
    local Ray over this machine's cores."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return {"address": address}
    # "local": a Ray of our own even where `ray start` left a cluster on this machine (ray.init would join it)
    return {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False}


def start_ray(init_args: dict) -> None:
    """Start Ray as Flower would (Flower skips ray.init when Ray is already up), so start-up can overlap our
    own."""
    import ray

    # about GPU env vars; not ours to act on
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
    # Ray workers import client_app and fedgpt: they get this process's import path, like Flower gives them. A
    # local Ray inherits it from the environment; a runtime_env (what Flower passes) would also keep Ray from
    # handing the workers it pre-started at init to the clients, and each client would wait for a fresh one.
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = path
    # A cluster's workers get the environment of its raylet, not ours: fedgpt's own settings go with them.
    ours = {k: v for k, v in os.environ.items() if k.startswith("FEDGPT_")}
    runtime_env = (
        {"runtime_env": {"env_vars": {**ours, "PYTHONPATH": path}}} if init_args["address"] != "local" else {}
    )
    ray.init(logging_level=logging.WARNING, **runtime_env, **init_args)


def launch(
    cfg: Config,
    client_app: str,
    res: Resources,
    resume: bool = False,
    overwrite: bool = False,
    t_start: float | None = None,
) -> dict:
    """Prepare the run (data, partitions, model, run folder) while Ray starts, then simulate it; its summary.

    client_app names the ClientApp as Flower's components do, "module:attribute"; the module must be
    importable (not __main__), so that its per-process cache lives on in each Ray actor between rounds.

    Everything that can fail on bad input fails in the preparation, before any round; it runs in a thread
    because Ray's start must stay on the main thread.
    """
    t_start = t_start or time.time()
    check_data(cfg)  # what a user gets wrong most (a context no data fills) is refused before Ray starts
    with node_environment(cfg):
        return _launch(cfg, client_app, res, resume, overwrite, t_start)


@contextmanager
def node_environment(cfg: Config):
    """The simulated nodes' own settings (fedgpt.fed.node_policy), for the length of a simulation: one
    operator runs the server and every node on this machine, so the nodes' paths are this run's corpus,
    vocabulary, base model and client-state folder. A FEDGPT_NODE_* variable already set is left as it is.
    Ray's workers start with this process's environment (or, in a cluster, fedgpt's settings: start_ray)."""
    from fedgpt.fed.client_state import run_state_dir  # torch: imported beside Ray's start, not before it

    d, t = cfg.data, cfg.train
    absolute = lambda p: str(Path(p).expanduser().resolve()) if p else ""
    base = t.init_from if t.init_from == "scratch" else absolute(t.init_from.removeprefix("hf:"))
    settings = {
        "FEDGPT_NODE_DATA_DIR": absolute(d.data_dir),
        "FEDGPT_NODE_CORPUS_FILE": absolute(d.input_file),
        "FEDGPT_NODE_VOCAB_FILE": absolute(d.vocab_file),
        "FEDGPT_NODE_INIT_FROM": ("hf:" + base) if t.init_from.startswith("hf:") else base,
        "FEDGPT_NODE_STATE_DIR": str(run_state_dir(cfg)),
    }
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _launch(
    cfg: Config, client_app: str, res: Resources, resume: bool, overwrite: bool, t_start: float
) -> dict:
    init_args = ray_init_args(res.ray_address)
    prepared: dict = {}

    def prepare() -> None:
        try:
            prepared["run"], prepared["gpus"] = _prepare(cfg, res, resume, overwrite, t_start)
        except BaseException as e:
            prepared["error"] = e

    worker = threading.Thread(target=prepare, name="prepare")
    worker.start()
    start_ray(init_args)
    worker.join()
    if "error" in prepared:
        import ray

        ray.shutdown()
        raise prepared["error"]
    module, _, attr = client_app.partition(":")
    app = getattr(importlib.import_module(module), attr or "app")
    backend = {
        "client_resources": {"num_cpus": res.client_cpus, "num_gpus": prepared["gpus"]},
        "init_args": init_args,
    }
    with flower_lines(res.verbose):
        summary = simulate(prepared["run"], app, cfg.fed.num_clients, backend)
    return {**summary, "out_dir": cfg.train.out_dir}


def check_data(cfg: Config) -> None:
    """The corpus and its split into clients against the model's context (fedgpt.data.check_windows)."""
    from fedgpt.data import check_windows, load_dataset
    from fedgpt.fed.partition import client_partitions

    ds = load_dataset(cfg.data)
    check_windows(cfg.model.block_size, ds, client_partitions(cfg, ds).train_sizes.tolist())


def _prepare(
    cfg: Config, res: Resources, resume: bool, overwrite: bool, t_start: float
) -> tuple[FederatedRun, float]:
    """The run, ready for its first round, and the GPU share each client gets."""
    import torch

    from fedgpt.fed.server import FederatedRun

    gpus = res.client_gpus if res.client_gpus is not None else (1.0 if torch.cuda.is_available() else 0.0)
    # Clients that can train at once: Ray schedules by CPUs, or by GPUs when clients ask for them.
    if gpus == 0:
        slots = max(1, int((os.cpu_count() or 1) // res.client_cpus))
    else:
        slots = max(1, int(torch.cuda.device_count() // gpus))
    run = FederatedRun(
        cfg,
        resume=resume,
        overwrite=overwrite,
        slots=min(slots, cfg.fed.num_clients),
        client_threads=max(1, int(res.client_cpus)),
        t_start=t_start,
    )
    run.open_folder()
    return run, gpus


def simulate(run: FederatedRun, client_app: ClientApp, num_supernodes: int, backend_config: dict) -> dict:
    """Run `run` in a ServerApp against `num_supernodes` simulated SuperNodes serving `client_app`; its
    summary."""
    with node_environment(run.cfg):  # before Ray starts: its workers take the nodes' settings with them
        return _simulate(run, client_app, num_supernodes, backend_config)


def _simulate(run: FederatedRun, client_app: ClientApp, num_supernodes: int, backend_config: dict) -> dict:
    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    if not ray.is_initialized():  # ours, not Flower's: it would not pass fedgpt's settings to a cluster
        start_ray(backend_config["init_args"])

    outcome = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run.run(grid)
        except BaseException as e:  # surfaced after the simulation stops
            outcome["error"] = e
            raise

    run_simulation(
        server_app=server, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend_config
    )
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("summary", {})
