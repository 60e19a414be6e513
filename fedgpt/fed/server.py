"""The ServerApp's round loop: send the global model, collect the clients' weights, let the strategy
aggregate.

    run = FederatedRun(cfg)          # data, initial model, strategy, run folder (resumed with resume=True)
    summary = run.run(grid)          # pre-flight, then rounds until fed.rounds

The loop drives a Flower strategy through its own building blocks (configure_train / aggregate_train /
configure_evaluate / aggregate_evaluate), like Strategy.start does, and adds what a GPT run needs: start at
any round (resume), an fp32 global model whatever the wire or the strategy use, byte and failure accounting
per round, a pre-flight check of every node (fedgpt.fed.grid), and each round's central evaluation and
checkpoint (fedgpt.fed.evaluation, fedgpt.fed.recorder) in a thread beside the next round.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedgpt.config import Config
from fedgpt.data import load_dataset
from fedgpt.fed import privacy, secagg
from fedgpt.fed.evaluation import CentralEvaluator
from fedgpt.fed.grid import error_reason, exchange, preflight
from fedgpt.fed.partition import client_partitions, format_summary, summarize
from fedgpt.fed.recorder import RunRecorder, Snapshot
from fedgpt.fed.rounds import RoundRow
from fedgpt.fed.rounds import summarize as summarize_rounds
from fedgpt.fed.strategies import load_strategy_state, make_strategy, strategy_state
from fedgpt.fed.wire import check_keys, encode, flatten, from_record, tied_aliases, to_record
from fedgpt.files import atomic_write_bytes
from fedgpt.lora import adapter_state, add_lora
from fedgpt.rundir import claim_run_dir
from fedgpt.train import build_model, resolve_device


class FederatedRun:
    """One federated training run: the global model, its strategy, and its folder."""

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        overwrite: bool = False,
        slots: int | None = None,
        client_threads: int = 0,
        t_start: float | None = None,
        log: Callable[[str], None] = print,
    ):
        self.t_start, self.log, self.cfg = t_start or time.time(), log, cfg
        self.ds = load_dataset(cfg.data)
        tok = self.ds.tokenizer
        torch.manual_seed(cfg.train.seed)  # the same initial global model in every run with this config
        model = build_model(cfg, tok.meta(), tok.vocab_size)
        # vocab resolved: clients build the same
        cfg.model = dataclasses.replace(model.cfg, dropout=cfg.model.dropout)
        if (
            cfg.lora.rank
        ):  # the federation trains and exchanges the adapters; the base stays as init_from has it
            add_lora(model, cfg.lora)
        self.aliases = {} if cfg.lora.rank else tied_aliases(model)
        exchanged = adapter_state(model) if cfg.lora.rank else model.state_dict()
        self.global_state = {k: v.detach().float().cpu().clone() for k, v in exchanged.items()}
        self.evaluator = CentralEvaluator(cfg, self.ds, model, resolve_device(cfg.train.device))
        self.slots, self.client_threads = slots or cfg.fed.num_clients, client_threads
        # The server partitions too: the summary is saved with the run, and a bad split fails before any
        # round.
        self.summary = summarize(client_partitions(cfg, self.ds), self.ds.train, tok.vocab_size)
        # Under DP fedgpt samples the clients (privacy.ClientDP); the strategy takes every node it is given.
        self.strategy = make_strategy(cfg.fed, presampled=cfg.dp.enabled)
        self.dp: privacy.ClientDP | None = None
        self.round, self.tokens = 0, 0
        self.partition_of: dict[int, int] = {}  # node id -> partition id, from the pre-flight check
        self.node_tokens: dict[int, int] = {}  # node id -> its train tokens, from the pre-flight check
        out_dir = claim_run_dir(
            cfg.train.out_dir, "federated", cfg.to_dict(), resume=resume, overwrite=overwrite
        )
        # Fixed for the whole run, resumes included: its id (client state files carry it) and the length of
        # the clients' learning-rate schedule, rounds x local steps as the run was started.
        schedule = cfg.train.lr_decay_steps or cfg.fed.rounds * cfg.fed.local_steps
        self.run_info = {"run_id": uuid.uuid4().hex, "schedule_steps": schedule}
        merge = self.evaluator.merged if cfg.lora.rank else None  # checkpoints hold a plain GPT
        self.recorder = RunRecorder(cfg, model.cfg, tok.meta(), self.run_info, log, merge=merge)
        dp_state = privacy.DPState()
        if resume:
            snap = self.recorder.resume()
            self.round, self.global_state, self.tokens = snap.round, snap.state, snap.tokens
            load_strategy_state(self.strategy, snap.strategy)
            dp_state = privacy.DPState.from_json(snap.privacy)
            if self.run_info["schedule_steps"] != schedule:
                log(
                    f"fed.rounds is now {cfg.fed.rounds}: the clients' learning-rate schedule keeps its "
                    f"{self.run_info['schedule_steps']} steps, and steps past it train at train.min_lr"
                )
        else:
            self.recorder.start_fresh()
        if cfg.dp.enabled:  # its noise is chosen for the rounds left: after the resume
            self.dp = privacy.ClientDP(cfg, dp_state, log)
            log(self.dp.describe())
        self.state_dir = str(Path(cfg.fed.client_state_dir or out_dir / "client_state").resolve())
        atomic_write_bytes(out_dir / "partition.json", json.dumps(self.summary, indent=1).encode())
        log(format_summary(self.summary))

    def train_config(self) -> ConfigRecord:
        """What every client needs: the run config, the tokenizer it must use, its threads, and the run's
        facts (its id, the schedule's length, where client state lives, the newest checkpointed round) and,
        when clients clip for DP, the norm to clip to."""
        config = {
            "fedgpt-config": json.dumps(self.cfg.to_dict()),
            "tokenizer": json.dumps(self.ds.tokenizer.meta()),
            "client-threads": self.client_threads,
            "run-id": self.run_info["run_id"],
            "schedule-steps": self.run_info["schedule_steps"],
            "client-state-dir": self.state_dir,
            "keep-from-round": self.recorder.saved_round,
        }
        if self.dp is not None and self.cfg.dp.clipping == "client":
            config["dp-clipping-norm"] = self.dp.clipping_norm
        return ConfigRecord(config)

    def snapshot(self) -> Snapshot:
        dp = self.dp.state.to_json() if self.dp else None
        return Snapshot(self.round, self.global_state, self.tokens, strategy_state(self.strategy), dp)

    def finish_round(self, snap: Snapshot, row: RoundRow) -> RoundRow:
        """Central evaluation of a round's global model, then its row, checkpoints and log line."""
        t_eval = time.time()
        scores = self.evaluator.evaluate(snap.state)
        row.val_loss, row.val_accuracy = scores["loss"], scores["accuracy"]
        if snap.privacy is not None:  # both accountants over the ledger as of this round
            dp = privacy.DPState.from_json(snap.privacy)
            row.dp_epsilon, row.dp_epsilon_pld = privacy.epsilons(dp.ledger, self.cfg.dp.delta)
            row.dp_clipping_norm, row.dp_rounds_dropped = dp.clipping_norm, dp.rounds_dropped
        row.eval_s, row.elapsed_s = round(time.time() - t_eval, 3), round(time.time() - self.t_start, 3)
        self.recorder.record(snap, row)
        return row

    def run(self, grid: Grid) -> dict:
        """Pre-flight, then rounds until fed.rounds; returns a summary of timings and losses.

        Each global model's central evaluation (round 0's too) runs in a thread while the next round
        trains: clients never wait for the server's validation. Rows, checkpoints and log lines still
        follow round by round.
        """
        fed, t_preflight = self.cfg.fed, time.time()
        answers = preflight(
            grid,
            fed.min_clients or fed.num_clients,
            fed.num_clients,
            self.train_config(),
            fed.node_timeout,
            self.log,
        )
        # One query per node, sampled or not (sampling draws from nodes ordered by partition, which makes it
        # reproducible): start-up grows with the node count by a ClientApp call each.
        self.log(f"pre-flight: {len(answers)} nodes answered in {time.time() - t_preflight:.1f} s")
        strict = sorted(int(i["partition-id"]) for i in answers.values() if i.get("requires-secagg"))
        if strict and not self.cfg.secagg.enabled:
            raise RuntimeError(
                f"the nodes of partitions {strict} require SecAgg+ (their node config require-secagg) and "
                "refuse plain train messages: run with secagg.enabled=true"
            )
        self.partition_of = {node: int(info["partition-id"]) for node, info in answers.items()}
        self.node_tokens = {node: int(info["train-tokens"]) for node, info in answers.items()}
        own = sorted(
            (int(i["partition-id"]), int(i["train-tokens"])) for i in answers.values() if i.get("own-data")
        )
        if own:  # nodes with data of their own: the partition summary above is not theirs
            self.log(
                "nodes with their own data (partition: train tokens): "
                + ", ".join(f"{p}: {t:,}" for p, t in own)
            )
        rows = []
        with ThreadPoolExecutor(1, thread_name_prefix="central-eval") as evaluator:
            pending = (
                evaluator.submit(self.finish_round, self.snapshot(), RoundRow(0)) if self.round == 0 else None
            )
            for rnd in range(self.round + 1, fed.rounds + 1):
                row = self.run_round(grid, rnd)
                if pending is not None:
                    rows.append(pending.result())  # at most one round behind; re-raises what went wrong there
                pending = evaluator.submit(self.finish_round, self.snapshot(), row)
            if pending is not None:
                rows.append(pending.result())
        summary = summarize_rounds(rows)
        return {
            **summary,
            "best_val_loss": self.recorder.best_val_loss,
            "wall_s": round(time.time() - self.t_start, 1),
        }

    def run_round(self, grid: Grid, rnd: int) -> RoundRow:
        """One round: configure, send, collect, aggregate, and (every fed.client_eval_interval) client
        evaluation."""
        fed, t0 = self.cfg.fed, time.time()
        # The strategy sees one fp32 array per tensor (its own state keeps them); the wire carries one flat
        # array.
        arrays = to_record(self.global_state, self.aliases, flat=False)
        msgs = list(
            self.strategy.configure_train(rnd, arrays, self.train_config(), self.sampling_grid(grid, rnd))
        )
        msgs, straggling = self.stragglers(rnd, msgs)
        sent_arrays = to_record(self.global_state, self.aliases, fmt=fed.downlink)
        for m in msgs:
            m.content["arrays"] = sent_arrays
        if self.cfg.secagg.enabled:
            ok, bytes_sent, bytes_received = self.secure_aggregate(grid, rnd, msgs)
        else:
            bytes_sent = sum(m.content["arrays"].count_bytes() for m in msgs)
            ok, bytes_received = self.aggregate(rnd, exchange(grid, msgs, fed.round_timeout))
        client_val, client_acc = self.client_evaluate(grid, rnd)
        self.round = rnd
        metrics = [r.content["metrics"] for r in ok]
        tokens = sum(int(m["train-tokens"]) for m in metrics)
        self.tokens += tokens
        row = RoundRow(
            rnd,
            tokens=self.tokens,
            client_val_loss=client_val,
            client_val_accuracy=client_acc,
            clients_ok=len(ok),
            clients_failed=len(msgs) - len(ok),
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            clients_straggling=straggling,
        )
        self._timings(row, metrics, time.time() - t0)
        if metrics:
            row.train_loss = sum(float(m["train-loss"]) * int(m["train-tokens"]) for m in metrics) / max(
                1, tokens
            )
            row.lr = float(metrics[0]["train-lr"])
            row.clients_state_resumed = sum(int(m["state-age"]) > 0 for m in metrics)
            row.clients_state_stale = sum(int(m["state-stale"]) for m in metrics)
            norms = [float(m["update-norm"]) for m in metrics if "update-norm" in m]
            row.update_norm = statistics.median(norms) if norms else None
        return row

    def sampling_grid(self, grid: Grid, rnd: int) -> Grid:
        """The grid as the strategy sees it when sampling this round's clients.

        Without DP: nodes in partition order, and Flower's sampler (the global `random`) seeded by the run's
        seed and the round, so that the same partitions train in every run of this config, a resumed one
        included, whatever ids its nodes have. Under DP: only the nodes privacy.ClientDP sampled, from the
        OS's entropy (the strategy takes them all)."""
        ordered = PartitionOrderedGrid(grid, self.partition_of)
        if self.dp is not None:
            return PartitionOrderedGrid(grid, self.partition_of, only=self.dp.sample(ordered.get_node_ids()))
        random.seed(self.cfg.train.seed * 1_000_003 + rnd)
        return ordered

    def stragglers(self, rnd: int, msgs: list[Message]) -> tuple[list[Message], int]:
        """fed.stragglers of this round's messages go to stragglers, drawn from the run's seed and the round:
        as in Li et al. 2020 (FedProx, section 5), each gets a local step budget drawn from 1 to
        local_steps - 1 ("accept"), or is left out of the round ("drop": FedAvg does not wait for it).
        Returns the messages to send and how many clients straggle."""
        f = self.cfg.fed
        k = round(f.stragglers * len(msgs)) if f.local_steps > 1 else 0
        if k == 0:
            return msgs, 0
        rng = random.Random(self.cfg.train.seed * 7_919 + rnd)
        chosen = set(rng.sample(range(len(msgs)), k))
        if f.straggler_policy == "drop":
            return [m for i, m in enumerate(msgs) if i not in chosen], k
        out = []
        for i, m in enumerate(msgs):
            if i in chosen:  # the strategy's messages share one RecordDict: a straggler gets its own
                steps = rng.randint(1, f.local_steps - 1)
                config = ConfigRecord({**m.content["config"], "local-steps": steps})
                content = RecordDict({**m.content, "config": config})
                m = Message(content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type)
            out.append(m)
        return out, k

    def _timings(self, row: RoundRow, metrics: list, round_s: float) -> None:
        train_s = [float(m["train-seconds"]) for m in metrics]
        # training time with `slots` clients at once
        busy = sum(train_s) / max(1, min(len(train_s), self.slots))
        row.round_s, row.client_train_s = round(round_s, 3), round(sum(train_s), 3)
        if round_s > 0 and metrics:
            row.outside_training_share = round(max(0.0, 1 - busy / round_s), 4)
        if row.round == 1 and metrics:
            first = min(float(m["train-start"]) for m in metrics)
            row.startup_s, row.first_step_at = round(first - self.t_start, 3), first

    def aggregate(self, rnd: int, replies: list[Message]) -> tuple[list[Message], int]:
        """Unpack the train replies, drop failed or misfit ones, and move the global model to the strategy's
        aggregate (under DP: of the noised mean of their clipped updates).

        Returns the replies used (fp32 weights in their ArrayRecord) and the bytes received.
        """
        updates = self.cfg.fed.uplink != "fp32"  # clients send trained minus received weights
        # Replies arrive in completion order; a fixed order (by partition) makes the float sums, and so the
        # run, reproducible.
        replies = sorted(
            replies, key=lambda r: (self.partition_of.get(r.metadata.src_node_id, -1), r.metadata.src_node_id)
        )
        expected = {k: v for k, v in self.global_state.items() if k not in self.aliases}
        ok, bytes_received = [], 0
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                self.log(f"round {rnd}: client on node {node} failed: {error_reason(r)}")
                continue
            bytes_received += r.content["arrays"].count_bytes()
            try:
                state = from_record(
                    r.content["arrays"],
                    {},
                    base=self.global_state if updates else None,
                    like=expected,
                    who=f"node {node}",
                )
                check_keys(state, expected, f"node {node}")
            except ValueError as e:
                self.log(f"round {rnd}: reply dropped: {e}")
                continue
            r.content["arrays"] = ArrayRecord(state)
            ok.append(r)
        if self.dp is None:
            self.step(rnd, ok)
            return ok, bytes_received
        deltas = [flatten(r.content["arrays"].to_torch_state_dict(), {}, base=expected) for r in ok]
        total, unclipped = self.dp.clip(deltas)
        if self.cfg.dp.clipping == "client":  # clipped before they were sent: the clients say which were not
            unclipped = sum(int(r.content["metrics"]["dp-unclipped"]) for r in ok)
        self.step_to_mean(rnd, self.dp.release(total, self.exchanged_size, unclipped))
        return ok, bytes_received

    @property
    def exchanged_size(self) -> int:
        """Values in one update (tied aliases once)."""
        return sum(v.numel() for k, v in self.global_state.items() if k not in self.aliases)

    def secure_aggregate(self, grid: Grid, rnd: int, msgs: list[Message]) -> tuple[list[Message], int, int]:
        """The round under SecAgg+ (fedgpt.fed.secagg): the server learns only the clients' weighted mean
        update, and the strategy steps on it (a FedAvg of one reply is itself; DiLoCo, FedAdam & co. see the
        same pseudo-gradient as without SecAgg+). Under DP the clients have clipped their updates, the last
        value of each says whether it was within the norm, and the server adds the noise to their sum. Returns
        the replies used, and the bytes sent and received over the protocol's four stages."""
        if len(msgs) < 2:  # one client's "sum" is its update: never run the protocol for it
            self.log(f"round {rnd}: {len(msgs)} client(s) sampled, SecAgg+ needs 2 or more; the model stays")
            if self.dp is not None:
                self.dp.drop()
            return [], 0, 0
        mean, replies, sent, received = secagg.secure_round(grid, msgs, rnd, self.cfg, self.max_weight())
        if mean is None:
            self.log(f"round {rnd}: secure aggregation halted, too few clients answered; the model stays")
            if self.dp is not None:
                self.dp.drop()
            return [], sent, received
        replies = sorted(replies, key=lambda r: self.partition_of.get(r.metadata.src_node_id, -1))
        mean = torch.from_numpy(mean).float()
        if self.dp is not None:  # uniform weights: the mean times the clients is their sum
            total = mean * len(replies)
            mean = self.dp.release(total[:-1], self.exchanged_size, float(total[-1]))
        self.step_to_mean(rnd, mean)
        return replies, sent, received

    def max_weight(self) -> int:
        """The largest weight a client can send (SecAgg+ scales every update by weight / this, which must not
        exceed 1): its data, or the tokens of fed.local_steps steps of every micro-batch."""
        f, t = self.cfg.fed, self.cfg.train
        most_data = max(self.node_tokens.values(), default=1)
        step_tokens = (
            most_data if f.full_batch else t.batch_size * self.cfg.model.block_size * t.grad_accum_steps
        )
        return {"uniform": 1, "trained": f.local_steps * step_tokens, "data": most_data}[f.weighting]

    def step_to_mean(self, rnd: int, mean: torch.Tensor) -> None:
        """Let the strategy step on a round's mean update (flat), as if one client had sent global + mean."""
        expected = {k: v for k, v in self.global_state.items() if k not in self.aliases}
        state = from_record(encode(mean, "fp32"), {}, base=self.global_state, like=expected)
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1})})
        self.step(rnd, [Message(content, dst_node_id=0, message_type=MessageType.TRAIN)])

    def step(self, rnd: int, ok: list[Message]) -> None:
        """Move the global model to the strategy's aggregate of the replies (fp32 weights each)."""
        agg, _ = self.strategy.aggregate_train(rnd, ok) if ok else (None, None)
        if agg is not None:
            new = from_record(agg, self.aliases)  # FedAdam & co. return float64: back to fp32
            self.global_state = {k: new[k].float() for k in self.global_state}

    def client_evaluate(self, grid: Grid, rnd: int) -> tuple[float | None, float | None]:
        """The global model's loss and accuracy on the clients' own validation slices, every
        fed.client_eval_interval rounds (and the last); (None, None) in other rounds."""
        every, fed = self.cfg.fed.client_eval_interval, self.cfg.fed
        if not every or (rnd % every and rnd != fed.rounds):
            return None, None
        arrays = to_record(self.global_state, self.aliases, fmt=fed.downlink)
        msgs = self.strategy.configure_evaluate(rnd, arrays, self.train_config(), grid)
        agg = self.strategy.aggregate_evaluate(rnd, exchange(grid, list(msgs), fed.round_timeout))
        if agg is None:
            return None, None
        return float(agg["val-loss"]), float(agg["val-accuracy"])


class PartitionOrderedGrid:
    """A Grid whose get_node_ids lists nodes by the partition they serve (with `only`: just those nodes);
    everything else is the grid's."""

    def __init__(self, grid: Grid, partition_of: dict[int, int], only: list[int] | None = None):
        self._grid, self._partition_of, self._only = grid, partition_of, only

    def get_node_ids(self) -> list[int]:
        nodes = self._grid.get_node_ids() if self._only is None else self._only
        return sorted(nodes, key=lambda n: (self._partition_of.get(n, -1), n))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
