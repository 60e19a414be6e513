"""ServerApp logic: strategy choice, the round loop, central evaluation, checkpoints, metrics and resume.

The loop drives a Flower strategy through its own building blocks (configure_train / aggregate_train /
configure_evaluate / aggregate_evaluate), like Strategy.start does, and adds what a GPT run needs: start at any
round (resume), an fp32 global model whatever the wire or the strategy use, byte and failure accounting per round,
and a pre-flight check of every node before round 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Strategy

from fedgpt.checkpoint import load_checkpoint, save_checkpoint
from fedgpt.config import Config, FedConfig
from fedgpt.data import Batches, load_dataset
from fedgpt.files import atomic_write_bytes
from fedgpt.metrics import MetricsLog
from fedgpt.partition import format_summary, partition, summarize
from fedgpt.train import build_model, evaluate, resolve_device
from fedgpt.wire import check_keys, from_record, tied_aliases, to_record

# Server learning rates sized for a GPT; Flower's defaults (eta=0.1) make the first rounds diverge.
SERVER_LR = {"fedadam": 1e-2, "fedyogi": 1e-2, "fedadagrad": 1e-2, "fedavgm": 1.0}
# Config keys that may change between a run and its resume.
RESUMABLE = {"fed.rounds", "fed.node_timeout", "fed.round_timeout", "fed.min_clients", "train.device", "train.compile",
             "train.log_interval"}


def make_strategy(fed: FedConfig) -> Strategy:
    """The Flower strategy fed.strategy names, sampling fraction_train of the clients each round."""
    n = fed.min_clients or fed.num_clients
    common = dict(fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_available_nodes=n,
                  min_train_nodes=max(1, math.ceil(fed.fraction_train * fed.num_clients)), min_evaluate_nodes=1)
    lr = fed.server_lr or SERVER_LR.get(fed.strategy, 0.0)
    return {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=fed.proximal_mu),
        "fedadam": lambda: FedAdam(**common, eta=lr, beta_1=0.9, beta_2=0.99, tau=1e-3),
        "fedyogi": lambda: FedYogi(**common, eta=lr, beta_1=0.9, beta_2=0.99, tau=1e-3),
        "fedadagrad": lambda: FedAdagrad(**common, eta=lr, tau=1e-3),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=lr, server_momentum=fed.server_momentum),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=0.2),
    }[fed.strategy]()


STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")


def strategy_state(strategy: Strategy) -> dict:
    """Optimizer state of adaptive / momentum strategies, as tensors (checkpoints load with weights_only)."""
    out = {}
    for name in STRATEGY_STATE:
        value = getattr(strategy, name, None)
        if isinstance(value, dict):
            out[name] = {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
        elif isinstance(value, list):
            out[name] = [torch.from_numpy(np.asarray(v)) for v in value]
    return out


def load_strategy_state(strategy: Strategy, state: dict) -> None:
    for name, value in state.items():
        if isinstance(value, dict):
            setattr(strategy, name, {k: v.numpy() for k, v in value.items()})
        else:
            setattr(strategy, name, [v.numpy() for v in value])


def config_diff(a: dict, b: dict) -> list[str]:
    flat = lambda d: {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()}
    fa, fb = flat(a), flat(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if k not in RESUMABLE and fa.get(k) != fb.get(k)]


def wait_for_nodes(grid: Grid, needed: int, timeout: float, log=print) -> list[int]:
    """Block until `needed` nodes are connected (Flower samples from those connected *before* waiting)."""
    t0 = time.monotonic()
    last = -1
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {len(nodes)} of {needed} nodes connected after {timeout:.0f} s: start more SuperNodes, "
                               "or lower fed.num_clients / fed.min_clients, or raise fed.node_timeout")
        if len(nodes) != last:
            log(f"waiting for nodes: {len(nodes)}/{needed} connected")
            last = len(nodes)
        time.sleep(0.2)
    return nodes


def exchange(grid: Grid, msgs: list[Message], timeout: float, poll_s: float = 0.1) -> list[Message]:
    """Send `msgs` and collect their replies until all are in or `timeout` passes: Grid.send_and_receive, except
    that it polls every `poll_s` (Flower's deployment grid sleeps 3 s between pulls, up to 3 s lost per exchange)."""
    pending = set(grid.push_messages(msgs))
    end, replies = time.monotonic() + timeout, []
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= end:
            break
        time.sleep(poll_s)
    return replies


def error_reason(msg: Message) -> str:
    """The last line of a client's error (Flower sends the whole traceback)."""
    reason = (msg.error.reason or "").strip().splitlines()
    return reason[-1] if reason else f"error code {msg.error.code}"


class FederatedRun:
    """One federated training run: global model, central validation, checkpoints and per-round metrics."""

    def __init__(self, cfg: Config, resume: bool = False, slots: int | None = None, client_threads: int = 0,
                 t_start: float | None = None, log=print):
        self.t_start = t_start or time.time()
        self.log = log
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.ds = load_dataset(cfg.data)
        tok = self.ds.tokenizer
        torch.manual_seed(cfg.train.seed)  # the same initial global model in every run with this config
        self.model = build_model(cfg, tok.meta(), tok.vocab_size)
        cfg.model = dataclasses.replace(self.model.cfg, dropout=cfg.model.dropout)  # vocab resolved: clients build the same model
        self.device = resolve_device(cfg.train.device)
        self.model.to(self.device)
        self.aliases = tied_aliases(self.model)
        self.slots = slots or cfg.fed.num_clients
        self.client_threads = client_threads
        # The server partitions too: the summary is saved with the run, and a bad split fails before any round.
        parts = partition(self.ds.train, cfg.fed.num_clients, cfg.fed.partition, turns=self.ds.turns, seed=cfg.train.seed,
                          block_size=cfg.model.block_size, val_fraction=cfg.fed.client_val_fraction, alpha=cfg.fed.dirichlet_alpha)
        self.summary = summarize(parts, self.ds.train, tok.vocab_size)
        self.strategy = make_strategy(cfg.fed)
        self.global_state = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
        self.round, self.best_val, self.tokens = 0, float("inf"), 0
        self.partition_of: dict[int, int] = {}  # node id -> partition id, from the pre-flight check
        self.metrics = MetricsLog(self.out_dir / "rounds.jsonl", plot=self.out_dir / "loss.png", x="round")
        if resume:
            self._resume()
        else:
            self.metrics.truncate(-1)
        atomic_write_bytes(self.out_dir / "partition.json", json.dumps(self.summary, indent=1).encode())
        log(format_summary(self.summary))

    def _resume(self) -> None:
        path = self.out_dir / "last.pt"
        ckpt = load_checkpoint(path)
        if ckpt.get("round") is None:
            raise ValueError(f"{path} is not from a federated run (no round): resume it with python -m fedgpt.local_train --resume")
        diff = config_diff(ckpt["config"], self.cfg.to_dict())
        if diff:
            raise ValueError(f"{path} was written with another config ({'; '.join(diff)}): use the same config or a new train.out_dir")
        self.global_state = {k: v.float() for k, v in ckpt["model"].items()}
        self.round, self.best_val = ckpt["round"], ckpt["best_val_loss"]
        self.tokens = ckpt["extra"].get("tokens", 0)
        load_strategy_state(self.strategy, ckpt["extra"].get("strategy", {}))
        self.metrics.truncate(self.round)
        self.log(f"resumed from {path} at round {self.round} (best val {self.best_val:.4f})")

    def train_config(self) -> ConfigRecord:
        return ConfigRecord({"fedgpt-config": json.dumps(self.cfg.to_dict()), "tokenizer": json.dumps(self.ds.tokenizer.meta()),
                             "client-threads": self.client_threads})

    def evaluate_global(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state)
        tc = self.cfg.train
        batches = Batches(self.ds.val, self.cfg.model.block_size, tc.batch_size, self.device, seed=tc.seed)
        return evaluate(self.model, batches, tc.eval_iters)["loss"]

    def snapshot(self) -> dict:
        """What a round's checkpoint holds of the run, taken when the round ends: its evaluation runs later."""
        return {"round": self.round, "state": self.global_state, "tokens": self.tokens, "strategy": strategy_state(self.strategy)}

    def save(self, val_loss: float, snap: dict) -> None:
        improved = val_loss < self.best_val
        self.best_val = min(self.best_val, val_loss)
        rnd = snap["round"]
        common = dict(model_state=snap["state"], model_config=self.model.cfg, tokenizer=self.ds.tokenizer.meta(),
                      config=self.cfg.to_dict(), step=rnd * self.cfg.fed.local_steps, round=rnd,
                      best_val_loss=self.best_val, val_loss=val_loss)
        save_checkpoint(self.out_dir / "last.pt", **common, extra={"tokens": snap["tokens"], "strategy": snap["strategy"]})
        if improved:
            save_checkpoint(self.out_dir / "best.pt", **common)

    def finish_round(self, snap: dict, row: dict) -> dict:
        """Central evaluation of a round's global model, then its metrics row, checkpoints and log line."""
        t_eval = time.time()
        val = self.evaluate_global(snap["state"])
        row.update(val_loss=val, best_val_loss=min(self.best_val, val), eval_s=round(time.time() - t_eval, 3),
                   elapsed_s=round(time.time() - self.t_start, 3))
        # The row before the checkpoint: a run killed in between redoes this round on resume instead of losing its row.
        self.metrics.append(row)
        self.save(val, snap)
        if row["round"] == 0:
            self.log(f"round   0 | val {val:.4f}")
        else:
            self.log(f"round {row['round']:3d} | val {val:.4f} | train {row['train_loss'] or float('nan'):.4f} | clients "
                     f"{row['clients_ok']} ok {row['clients_failed']} failed | {row['round_s']:.2f} s | sent "
                     f"{row['bytes_sent'] / 1e6:.2f} MB | received {row['bytes_received'] / 1e6:.2f} MB")
        return row

    def preflight(self, grid: Grid) -> list[int]:
        """Wait for the nodes, then ask each for its partition: data or config problems surface before round 1."""
        fed = self.cfg.fed
        nodes = wait_for_nodes(grid, fed.min_clients or fed.num_clients, fed.node_timeout, self.log)
        msgs = [Message(RecordDict({"config": self.train_config()}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        replies = exchange(grid, msgs, fed.node_timeout)
        errors = [f"node {r.metadata.src_node_id}: {error_reason(r)}" for r in replies if r.has_error()]
        if len(replies) < len(msgs):
            errors.append(f"{len(msgs) - len(replies)} node(s) did not answer within {fed.node_timeout:.0f} s")
        ids = []
        for r in replies:
            if not r.has_error():
                info = r.content["info"]
                ids.append(info["partition-id"])
                self.partition_of[r.metadata.src_node_id] = int(info["partition-id"])
                if info["num-partitions"] != fed.num_clients:
                    errors.append(f"node {r.metadata.src_node_id} has num-partitions={info['num-partitions']} "
                                  f"but fed.num_clients={fed.num_clients}")
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            errors.append(f"partition-id {dupes} served by more than one node: give each SuperNode its own partition-id")
        if errors:
            raise RuntimeError("pre-flight check failed: " + "; ".join(errors))
        return nodes

    def run_round(self, grid: Grid, rnd: int) -> dict:
        fed, half = self.cfg.fed, self.cfg.fed.half_precision
        t0 = time.time()
        # The strategy sees one fp32 array per tensor (its own state keeps them); the wire carries one flat array.
        arrays = to_record(self.global_state, self.aliases, flat=False)
        msgs = list(self.strategy.configure_train(rnd, arrays, self.train_config(), grid))
        sent_arrays = to_record(self.global_state, self.aliases, half=half)
        for m in msgs:
            m.content["arrays"] = sent_arrays
        bytes_sent = sum(m.content["arrays"].count_bytes() for m in msgs)
        replies = exchange(grid, msgs, fed.round_timeout)
        ok, bytes_received = self.aggregate(rnd, replies)
        metrics = [r.content["metrics"] for r in ok]
        tokens = sum(int(m["train-tokens"]) for m in metrics)
        self.tokens += tokens
        client_val = self.client_evaluate(grid, rnd)
        t_end = time.time()
        self.round = rnd
        train_s = [float(m["train-seconds"]) for m in metrics]
        round_s = t_end - t0  # messaging, client work, aggregation and client evaluation; central evaluation runs beside the next round
        busy = sum(train_s) / max(1, min(len(train_s), self.slots))
        row = {"round": rnd, "val_loss": None, "best_val_loss": None,  # filled in by finish_round
               "train_loss": sum(float(m["train-loss"]) * int(m["train-tokens"]) for m in metrics) / max(1, tokens) if metrics else None,
               "client_val_loss": client_val, "clients_ok": len(ok), "clients_failed": len(msgs) - len(ok),
               "tokens": self.tokens, "bytes_sent": bytes_sent, "bytes_received": bytes_received,
               "round_s": round(round_s, 3), "client_train_s": round(sum(train_s), 3),
               "outside_training_share": round(max(0.0, 1 - busy / round_s), 4) if round_s > 0 and metrics else None,
               "eval_s": None, "elapsed_s": None}
        if rnd == 1 and metrics:
            first = min(float(m["train-start"]) for m in metrics)
            row.update(startup_s=round(first - self.t_start, 3), first_step_at=first)  # first_step_at: Unix time
        return row

    def aggregate(self, rnd: int, replies: list[Message]) -> tuple[list[Message], int]:
        """Unpack the train replies, drop failed or misfit ones, and move the global model to the strategy's aggregate.

        Returns the replies used (fp32 weights in their ArrayRecord) and the bytes received.
        """
        half = self.cfg.fed.half_precision
        # Replies arrive in completion order; a fixed order (by partition) makes the float sums, and so the run,
        # reproducible.
        replies = sorted(replies, key=lambda r: (self.partition_of.get(r.metadata.src_node_id, -1), r.metadata.src_node_id))
        ok, bytes_received = [], 0
        for r in replies:
            if r.has_error():
                self.log(f"round {rnd}: client on node {r.metadata.src_node_id} failed: {error_reason(r)}")
                continue
            bytes_received += r.content["arrays"].count_bytes()
            try:
                expected, who = {k: v for k, v in self.global_state.items() if k not in self.aliases}, f"node {r.metadata.src_node_id}"
                state = from_record(r.content["arrays"], {}, base=self.global_state if half else None, like=expected, who=who)
                check_keys(state, expected, who)
            except ValueError as e:
                self.log(f"round {rnd}: reply dropped: {e}")
                continue
            r.content["arrays"] = ArrayRecord(state)
            ok.append(r)
        agg, _ = self.strategy.aggregate_train(rnd, ok) if ok else (None, None)
        if agg is not None:
            new = from_record(agg, self.aliases)  # FedAdam & co. return float64: back to fp32
            self.global_state = {k: new[k].float() for k in self.global_state}
        return ok, bytes_received

    def client_evaluate(self, grid: Grid, rnd: int) -> float | None:
        every, fed = self.cfg.fed.client_eval_interval, self.cfg.fed
        if not every or (rnd % every and rnd != fed.rounds):
            return None
        arrays = to_record(self.global_state, self.aliases, half=fed.half_precision)
        msgs = self.strategy.configure_evaluate(rnd, arrays, self.train_config(), grid)
        agg = self.strategy.aggregate_evaluate(rnd, exchange(grid, list(msgs), fed.round_timeout))
        return float(agg["val-loss"]) if agg is not None else None

    def run(self, grid: Grid) -> dict:
        """Pre-flight, then rounds until fed.rounds; returns a summary of timings and losses.

        The central evaluation of each global model (round 0's too) runs in a thread while the next round trains:
        clients do not wait for the server's validation, which on its own hardware then costs no wall time.
        Rows, checkpoints and log lines still follow round by round.
        """
        self.preflight(grid)
        rows = []
        with ThreadPoolExecutor(1, thread_name_prefix="central-eval") as evaluator:
            pending = evaluator.submit(self.finish_round, self.snapshot(), {"round": 0, "val_loss": None, "best_val_loss": None,
                                                                             "tokens": 0}) if self.round == 0 else None
            for rnd in range(self.round + 1, self.cfg.fed.rounds + 1):
                row = self.run_round(grid, rnd)
                if pending is not None:
                    rows.append(pending.result())  # at most one round behind; re-raises what went wrong there
                pending = evaluator.submit(self.finish_round, self.snapshot(), row)
            if pending is not None:
                rows.append(pending.result())
        return summarize_run([r for r in rows if r["round"] > 0], self.best_val, self.t_start)


def config_from_run_config(run_config: dict, app_dir: Path) -> tuple[Config, dict]:
    """Config and run options from Flower's run config: `config` (YAML path, relative to the app), `overrides`
    (space-separated dotted overrides, e.g. "fed.rounds=3 model.n_layer=2"), `resume`, `client-threads`.
    Relative data and output paths are made absolute against the working directory."""
    from fedgpt.config import load_config

    path = Path(str(run_config.get("config", "configs/shakespeare_char_cpu.yaml")))
    if not path.is_absolute():
        path = app_dir / path
    cfg = load_config(path, str(run_config.get("overrides", "")).split())
    # A deployed app's code lives in $FLWR_HOME/apps/..., but Flower keeps the working directory flower-superlink was
    # started in: relative paths mean that directory. Made absolute, they show in the checkpoint's config, and
    # clients without a node-config data-dir on this machine read the same corpus.
    d, t = cfg.data, cfg.train
    d.data_dir, t.out_dir = str(Path(d.data_dir).resolve()), str(Path(t.out_dir).resolve())
    d.input_file = str(Path(d.input_file).expanduser().resolve()) if d.input_file else ""
    opts = {"resume": bool(run_config.get("resume", False)), "client_threads": int(run_config.get("client-threads", 0))}
    return cfg, opts


def summarize_run(rows: list[dict], best_val: float, t_start: float) -> dict:
    round_s = sorted(r["round_s"] for r in rows)
    shares = sorted(r["outside_training_share"] for r in rows if r.get("outside_training_share") is not None)
    med = lambda xs: xs[len(xs) // 2] if xs else None
    return {"rounds": len(rows), "final_val_loss": rows[-1]["val_loss"] if rows else None, "best_val_loss": best_val,
            "startup_s": rows[0].get("startup_s") if rows else None, "median_round_s": med(round_s),
            "median_outside_training_share": med(shares), "wall_s": round(time.time() - t_start, 1)}
