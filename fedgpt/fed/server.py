"""The ServerApp's round loop: send the global model and each client's work order, collect their updates, let
the strategy aggregate.

    run = FederatedRun(cfg)          # data, initial model, strategy, DP; reads only (resume: last.pt too)
    run.open_folder()                # claims train.out_dir (run.json), writes partition.json
    summary = run.run(grid)          # pre-flight, then rounds until fed.rounds

The loop drives a Flower strategy through its own building blocks (configure_train / aggregate_train /
configure_evaluate / aggregate_evaluate), like Strategy.start does, and adds what a GPT run needs: start at
any round (resume), an fp32 global model whatever the wire or the strategy use (fedgpt.fed.wire), a work order
per client (fedgpt.fed.work), byte and failure accounting per round, a pre-flight check of every node
(fedgpt.fed.grid), client-level DP (fedgpt.fed.privacy) and SecAgg+ (fedgpt.fed.secagg_server), and each
round's central evaluation and checkpoint (fedgpt.fed.evaluation, fedgpt.fed.recorder) in a thread beside the
next round.
"""

from __future__ import annotations

import dataclasses
import json
import random
import secrets
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedgpt.config import Config
from fedgpt.data import check_windows, load_dataset
from fedgpt.fed import personal, privacy
from fedgpt.fed.client_state import ClientStateStore, run_state_dir
from fedgpt.fed.evaluation import CentralEvaluator, yield_cpu
from fedgpt.fed.grid import PartitionOrderedGrid, error_reason, send_and_receive
from fedgpt.fed.membership import Membership
from fedgpt.fed.moments import SharedMoments
from fedgpt.fed.partition import client_partitions, format_summary, summarize_partitions
from fedgpt.fed.recorder import RunRecorder, Snapshot
from fedgpt.fed.rounds import RoundRow, summarize_rounds
from fedgpt.fed.secagg_server import secure_round
from fedgpt.fed.strategies import load_strategy_state, make_strategy, strategy_state
from fedgpt.fed.wire import Exchange, check_metrics
from fedgpt.fed.work import WorkOrder, straggler_steps
from fedgpt.files import atomic_write_bytes
from fedgpt.lora import add_lora, aggregation_error, embedding_rows
from fedgpt.rundir import claim_run_dir
from fedgpt.train import Schedule, build_model, resolve_device


class FederatedRun:
    """One federated training run: the global model, its strategy, and its folder. Constructing it reads
    (data, partitions, with resume=True the last checkpoint) and writes nothing; open_folder writes."""

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
        self.resume, self.overwrite = resume, overwrite
        self.slots, self.client_threads = slots or cfg.fed.num_clients, client_threads
        self.ds = load_dataset(cfg.data)
        # The server partitions too: the summary is saved with the run, a bad split fails before any round,
        # and so does a context no client's data fills (before the model is built: it may be huge).
        parts = client_partitions(cfg, self.ds)
        check_windows(cfg.model.block_size, self.ds, parts.train_sizes.tolist())
        tok = self.ds.tokenizer
        self.summary = summarize_partitions(parts, self.ds.train, tok.vocab_size)
        model = self.initial_model()
        # LoRA's trained embedding rows (lora.embedding_rows), sent with the run facts: clients train these
        self.rows = json.dumps(embedding_rows(model))
        self.exchange = Exchange.of(model, cfg)
        self.global_state = {
            k: v.detach().float().cpu().clone() for k, v in self.exchange.state(model).items()
        }
        self.evaluator = CentralEvaluator(
            cfg, self.ds, model, resolve_device(cfg.train.device), self.exchange
        )
        # Under DP fedgpt samples the clients (privacy.ClientDP); the strategy takes every node it is given.
        self.strategy = make_strategy(cfg.fed, presampled=cfg.dp.enabled)
        self.min_train_nodes = self.strategy.min_train_nodes  # at most the nodes connected, each round
        # Fixed for the whole run, resumes included: its id (client state files carry it) and the clients'
        # learning-rate schedule, over rounds x local steps as the run was started.
        self.run_info = {
            "run_id": uuid.uuid4().hex,
            "schedule_steps": cfg.train.lr_decay_steps or cfg.fed.rounds * cfg.fed.local_steps,
        }
        merge = self.evaluator.merged if cfg.lora.rank else None  # checkpoints hold a plain GPT
        self.recorder = RunRecorder(cfg, model.cfg, tok.meta(), self.run_info, log, merge=merge)
        self.round, self.tokens, saved_dp, moments = 0, 0, None, None
        if resume:
            snap = self.recorder.read_last()
            self.round, self.global_state, self.tokens = snap.round, snap.state, snap.tokens
            load_strategy_state(self.strategy, snap.strategy)
            saved_dp, moments = snap.privacy, snap.moments
        # Sampling, clipping, noise, the ledger (on disk, ahead of last.pt after a crash) and what a round may
        # publish, for the rounds left; None without DP. A resume that would break the ledger is refused here.
        self.dp = privacy.ClientDP.for_run(cfg, saved_dp, self.round, resume, overwrite, log)
        self.base_privacy = privacy.base_privacy(cfg.train.init_from)  # a fedgpt checkpoint's DP, if any
        # fed.client_optimizer=average: the clients' mean first moments (fedgpt.fed.moments)
        self.moments = SharedMoments(moments) if cfg.fed.client_optimizer == "average" else None
        self.schedule = Schedule.of(cfg.train, self.run_info["schedule_steps"])
        # the roster, kept through the run: which partition each node serves, its data, who is gone
        self.nodes = Membership(cfg, self.run_facts, log)
        self.lora_error: float | None = None  # this round's LoRA aggregation error (fedgpt.lora)
        self.refused = 0  # this round's replies refused by aggregate (fedgpt.fed.wire)
        self.state_dir = str(run_state_dir(cfg))  # what it prunes after each checkpoint, on this machine

    def initial_model(self):
        """The global model every run of this config starts from (seeded); with LoRA, the base with adapters.
        Fixes cfg.model to the model's (the vocabulary resolved), so that clients build the same."""
        cfg, tok = self.cfg, self.ds.tokenizer
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, tok.meta(), tok.vocab_size)
        cfg.model = dataclasses.replace(model.cfg, dropout=cfg.model.dropout)
        return add_lora(model, cfg.lora, cfg.train.seed, tok) if cfg.lora.rank else model

    def open_folder(self) -> None:
        """Claim train.out_dir for this run (run.json; --overwrite removes an earlier run's outputs), start or
        continue rounds.jsonl, and write partition.json."""
        cfg = self.cfg
        extra = {"init_from_privacy": self.base_privacy} if self.base_privacy is not None else {}
        out_dir = claim_run_dir(
            cfg.train.out_dir,
            "federated",
            cfg.to_dict(),
            resume=self.resume,
            overwrite=self.overwrite,
            extra=extra,
        )
        if self.resume:
            self.recorder.continue_from(self.round)
        else:
            self.recorder.start_fresh()
            if self.dp is not None:
                self.dp.start_ledger()
        atomic_write_bytes(out_dir / "partition.json", json.dumps(self.summary, indent=1).encode())
        self.log(format_summary(self.summary))
        if self.dp is not None:
            self.log(self.dp.describe())
        if self.base_privacy is not None:
            self.log(privacy.describe_base(self.base_privacy))

    def run_facts(self) -> dict:
        """What every client needs, whatever its work: the run config, the tokenizer it must use, its threads,
        the run's id, and the embedding rows it chose (lora.embedding_rows). Where a node keeps its state is
        its own setting (fedgpt.fed.node_policy), never the message's."""
        return {
            "fedgpt-config": json.dumps(self.cfg.to_dict()),
            "tokenizer": json.dumps(self.ds.tokenizer.meta()),
            "client-threads": self.client_threads,
            "run-id": self.run_info["run_id"],
            "embedding-rows": self.rows,
        }

    def work_order(self, rnd: int, local_steps: int | None = None) -> WorkOrder:
        """A client's work in round rnd: fed.local_steps (or `local_steps`, a straggler's), from its place in
        the run's schedule."""
        f = self.cfg.fed
        return WorkOrder(
            round=rnd,
            local_steps=f.local_steps if local_steps is None else local_steps,
            first_step=(rnd - 1) * f.local_steps,
            schedule=self.schedule,
            keep_from_round=self.recorder.saved_round,
            dp_clipping_norm=self.dp.client_clipping_norm if self.dp else None,
            proximal_mu=float(getattr(self.strategy, "proximal_mu", 0.0)),
        )

    def snapshot(self) -> Snapshot:
        dp = self.dp.state.to_json() if self.dp else None
        moments = self.moments.mean if self.moments else None
        return Snapshot(
            self.round, self.global_state, self.tokens, strategy_state(self.strategy), dp, moments
        )

    def finish_round(self, snap: Snapshot, row: RoundRow) -> RoundRow:
        """Central evaluation of a round's global model, then its row, checkpoints and log line."""
        t_eval = time.time()
        scores = self.evaluator.evaluate(snap.state)
        row.val_loss, row.val_accuracy = scores["loss"], scores["accuracy"]
        row.eval_s, row.elapsed_s = round(time.time() - t_eval, 3), round(time.time() - self.t_start, 3)
        if snap.privacy is not None:  # the ledger as of this round, and only what it covers
            row = privacy.publish(row, snap.privacy, self.cfg.dp.delta)
        self.recorder.record(snap, row)
        # Checkpointed: a resume starts here, and no client state older than this round's is needed again.
        ClientStateStore.prune_run(self.state_dir, self.run_info["run_id"], snap.round)
        return row

    def run(self, grid: Grid) -> dict:
        """Pre-flight, then rounds until fed.rounds; returns a summary of timings and losses.

        Each global model's central evaluation (round 0's too) runs in a thread while the next round
        trains: clients never wait for the server's validation. Rows, checkpoints and log lines still
        follow round by round.
        """
        fed = self.cfg.fed
        out_dir = Path(self.cfg.train.out_dir)
        self.nodes.record = out_dir / "membership.jsonl"
        self.nodes.start(grid)  # the nodes there before round 1; later ones are asked when they appear
        if any(m.own_data for m in self.nodes.members.values()):  # partition.json: what the nodes hold
            summary = {**self.summary, "nodes": self.nodes.reported()}
            atomic_write_bytes(out_dir / "partition.json", json.dumps(summary, indent=1).encode())
        rows = []
        with ThreadPoolExecutor(1, thread_name_prefix="central-eval", initializer=yield_cpu) as evaluator:
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
        return {
            **summarize_rounds(rows),
            "best_val_loss": self.recorder.best_val_loss,
            "wall_s": round(time.time() - self.t_start, 1),
        }

    def run_round(self, grid: Grid, rnd: int) -> RoundRow:
        """One round: sample, send each client the weights and its work order, collect, aggregate, and (every
        fed.client_eval_interval) client evaluation."""
        fed, t0 = self.cfg.fed, time.time()
        # The strategy sees one fp32 array per tensor (its own state keeps them); the wire carries one array.
        arrays = self.exchange.per_tensor(self.global_state)
        sampled = self.strategy.configure_train(rnd, arrays, ConfigRecord(), self.sampling_grid(grid, rnd))
        # in a simulation too large to ask every node before round 1, the sampled ones are asked now
        nodes = self.nodes.admit_sampled(grid, [m.metadata.dst_node_id for m in sampled], rnd)
        seed = self.cfg.train.seed  # each node's local steps: fewer for a straggler, None for a dropped one
        steps = straggler_steps(fed.stragglers, fed.straggler_policy, fed.local_steps, seed, rnd, len(nodes))
        orders = {n: self.work_order(rnd, s) for n, s in zip(nodes, steps) if s is not None}
        straggling = sum(s != fed.local_steps for s in steps)
        if self.dp is not None:  # the round counts, on disk, before any of its messages leaves
            self.dp.charge()
        down, up = self.exchange.streaming(rnd)  # the whole model, or streaming fragments
        sent = down.downlink(self.global_state, secrets.randbits(62))
        msgs = [
            Message(
                RecordDict({"arrays": sent, "config": ConfigRecord({**self.run_facts(), **o.to_config()})}),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n, o in orders.items()
        ]
        self.refused = 0
        if self.cfg.secagg.enabled:  # the server sees no single update: SecAgg+ refuses none
            ok, bytes_sent, bytes_received = self.secure_aggregate(grid, rnd, msgs)
        else:
            bytes_sent = sum(m.content["arrays"].count_bytes() for m in msgs)
            bytes_sent += self.moments.attach(msgs) if self.moments else 0
            replies = send_and_receive(grid, msgs, fed.round_timeout)
            taken = self.moments.take(replies) if self.moments else {}  # a strategy takes one ArrayRecord
            ok, bytes_received = self.aggregate(rnd, replies, sent, up)
            bytes_received += self.moments.average(ok, taken) if self.moments else 0
        client_val, client_acc, per_client = self.client_evaluate(grid, rnd)
        self.round = rnd
        metrics = [r.content["metrics"] for r in ok]
        if self.dp is None:  # under DP the tokens trained would count the cohort: checkpoints leave them out
            # under SecAgg+ clients report nothing in the clear: the tokens their work orders asked for
            t = self.cfg.train
            step = t.batch_size * self.cfg.model.block_size * t.grad_accum_steps
            ordered = {n: o.local_steps * step for n, o in orders.items()}
            for r in ok:
                self.tokens += int(r.content["metrics"].get("train-tokens", ordered[r.metadata.src_node_id]))
        row = RoundRow(
            rnd,
            tokens=self.tokens,
            client_val_loss=client_val,
            client_val_accuracy=client_acc,
            client_eval=per_client,
            clients_ok=len(ok),
            clients_failed=len(msgs) - len(ok) - self.refused,
            clients_refused=self.refused,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            clients_straggling=straggling,
        )
        row.add_clients(metrics, time.time() - t0, self.slots)
        row.lora_aggregation_error, self.lora_error = self.lora_error, None
        if self.dp is not None:  # the schedule's, not a client's: a reply's would tell whether one answered
            row.lr = self.schedule.lr(max(0, rnd * fed.local_steps - 1))
        if rnd == 1 and metrics and "train-start" in metrics[0]:
            first = min(float(m["train-start"]) for m in metrics)
            row.startup_s, row.first_step_at = round(first - self.t_start, 3), first
        return row

    def sampling_grid(self, grid: Grid, rnd: int) -> Grid:
        """The grid as the strategy sees it when sampling this round's clients.

        Without DP: nodes in partition order, and Flower's sampler (the global `random`) seeded by the run's
        seed and the round, so that the same partitions train in every run of this config, a resumed one
        included, whatever ids its nodes have. Under DP: only the nodes privacy.ClientDP sampled, from the
        OS's entropy (the strategy takes them all)."""
        candidates = self.nodes.round_nodes(grid, rnd)  # admitted and connected (fedgpt.fed.membership)
        ordered = PartitionOrderedGrid(grid, self.nodes.partition_of, only=candidates)
        if self.dp is not None:
            return PartitionOrderedGrid(
                grid, self.nodes.partition_of, only=self.dp.sample(ordered.get_node_ids())
            )
        # Flower's sampler waits for min_train_nodes to connect: never more than are there
        self.strategy.min_train_nodes = min(self.min_train_nodes, len(candidates))
        random.seed(self.cfg.train.seed * 1_000_003 + rnd)
        return ordered

    def aggregate(
        self, rnd: int, replies: list[Message], sent: ArrayRecord, up: Exchange
    ) -> tuple[list[Message], int]:
        """Take each train reply's update of what `up` exchanges against the global model it was sent; move
        the global model to the strategy's aggregate of them (under DP: of the noised mean of their clipped
        updates). Failed replies are logged and left out; so are refused ones (wire.Exchange.apply: an update
        not against this round's model, of another shape or dtype, or not finite; or a weight or count that is
        not a finite number), before anything is clipped or averaged.

        Returns the replies used (fp32 client weights in their ArrayRecord) and the bytes received; how many
        replies were refused is left in self.refused.
        """
        # Replies arrive in completion order; a fixed order (by partition) makes the float sums, and so the
        # run, reproducible.
        replies = sorted(
            replies, key=lambda r: (self.nodes.partition(r.metadata.src_node_id), r.metadata.src_node_id)
        )
        ok, bytes_received, deltas, states, self.refused = [], 0, [], [], 0
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                self.log(f"round {rnd}: client on node {node} failed: {error_reason(r)}")
                continue
            try:
                bytes_received += r.content["arrays"].count_bytes()
                check_metrics(r.content["metrics"], f"node {node}")
                state = up.apply(r.content["arrays"], self.global_state, sent, f"node {node}")
            except (ValueError, KeyError, TypeError) as e:
                self.log(f"round {rnd}: update of node {node} refused: {e}")
                self.refused += 1
                continue
            if self.dp is not None:
                deltas.append(self.exchange.difference(state, self.global_state))
            states.append(state)
            r.content["arrays"] = up.per_tensor(state)
            ok.append(r)
        if self.cfg.lora.rank and ok:  # what averaging A and B apart costs (0 with lora.scheme=ffa)
            weights = [float(r.content["metrics"]["num-examples"]) for r in ok]
            self.lora_error = aggregation_error(states, weights, self.evaluator.model)
        if self.dp is None:
            self.step(rnd, ok, up)
            return ok, bytes_received
        reported = [r.content["metrics"].get("dp-unclipped") for r in ok]  # dp.clipping=client
        self.step_to_mean(rnd, self.dp.mean_of_updates(deltas, self.exchange.size, reported))
        return ok, bytes_received

    def secure_aggregate(self, grid: Grid, rnd: int, msgs: list[Message]) -> tuple[list[Message], int, int]:
        """The round under SecAgg+ (fedgpt.fed.secagg_server): the server learns only the clients' weighted
        mean update, and the strategy steps on it (a FedAvg of one reply is itself; DiLoCo, FedAdam & co. see
        the same pseudo-gradient as without SecAgg+). Under DP the clients have clipped their updates, the
        last value of each says whether it was within the norm, and the server adds the noise to their sum.
        Returns the replies used, and the bytes sent and received over the protocol's four stages."""
        if len(msgs) < 2:  # one client's "sum" is its update: never run the protocol for it
            self.release_nothing(rnd, f"{len(msgs)} client(s) sampled, SecAgg+ needs 2 or more")
            return [], 0, 0
        mean, replies, sent, received = secure_round(grid, msgs, rnd, self.cfg, self.nodes.train_tokens)
        if mean is None:
            self.release_nothing(rnd, "secure aggregation halted, too few clients answered")
            return [], sent, received
        if not np.isfinite(mean).all():  # SecAgg+ sums integers: only a broken protocol gives this
            raise RuntimeError(f"round {rnd}: SecAgg+ gave a mean that is not finite: the run stops")
        replies = sorted(replies, key=lambda r: self.nodes.partition(r.metadata.src_node_id))
        mean = torch.from_numpy(mean).float()
        if self.dp is not None:  # uniform weights: the mean times the clients is their sum
            mean = self.dp.mean_of_sum(mean * len(replies), self.exchange.size)
        self.step_to_mean(rnd, mean)
        return replies, sent, received

    def release_nothing(self, rnd: int, why: str) -> None:
        """A round with no sum to release: without DP the model stays (and the log says why); under DP it
        steps on the noise alone, and nothing says so: a model that stayed, or a line, would tell how few
        clients the round sampled or heard from."""
        if self.dp is None:
            self.log(f"round {rnd}: {why}; the model stays")
        else:
            self.step_to_mean(rnd, self.dp.mean_of_nothing(self.exchange.size))

    def step_to_mean(self, rnd: int, mean: torch.Tensor) -> None:
        """Let the strategy step on a round's mean update (flat), as if one client had sent global + mean."""
        state = self.exchange.unflatten(self.exchange.flatten(self.global_state) + mean)
        metrics = MetricRecord({"num-examples": 1})
        content = RecordDict({"arrays": self.exchange.per_tensor(state), "metrics": metrics})
        self.step(rnd, [Message(content, dst_node_id=0, message_type=MessageType.TRAIN)])

    def step(self, rnd: int, ok: list[Message], up: Exchange | None = None) -> None:
        """Move the global model (what `up` exchanges of it) to the strategy's aggregate of the replies."""
        agg, _ = self.strategy.aggregate_train(rnd, ok) if ok else (None, None)
        if agg is not None:
            self.global_state = {**self.global_state, **(up or self.exchange).from_per_tensor(agg)}

    def client_evaluate(self, grid: Grid, rnd: int) -> tuple[float | None, float | None, dict | None]:
        """The global model's loss and accuracy on the clients' own validation slices, every
        fed.client_eval_interval rounds (and the last), and each client's scores summarized
        (per_client_scores); (None, None, None) in other rounds."""
        every, fed = self.cfg.fed.client_eval_interval, self.cfg.fed
        if not every or (rnd % every and rnd != fed.rounds):
            return None, None, None
        admitted = PartitionOrderedGrid(grid, self.nodes.partition_of, only=self.nodes.connected())
        msgs = self.strategy.configure_evaluate(
            rnd, self.exchange.per_tensor(self.global_state), ConfigRecord(self.run_facts()), admitted
        )
        sent = self.exchange.downlink(self.global_state, secrets.randbits(62))
        for m in msgs:
            m.content["arrays"] = sent
        replies = send_and_receive(grid, list(msgs), fed.round_timeout)
        per_client = self.per_client_scores(rnd, replies)
        agg = self.strategy.aggregate_evaluate(rnd, replies)
        if agg is None:
            return None, None, per_client
        return float(agg["val-loss"]), float(agg["val-accuracy"]), per_client

    def per_client_scores(self, rnd: int, replies: list[Message]) -> dict | None:
        """The clients' scores of this evaluation, each client once: mean and spread of the global model's
        and each personal model's (fedgpt.fed.personal), and outside DP each client's in client_eval.jsonl."""
        ok = [r for r in replies if r.has_content() and "metrics" in r.content]
        if not ok:
            return None
        metrics = [dict(r.content["metrics"]) for r in ok]
        if self.dp is None:
            rows = [
                {"round": rnd, "client": self.nodes.partition(r.metadata.src_node_id), **m}
                for r, m in zip(ok, metrics)
            ]
            with open(Path(self.cfg.train.out_dir) / "client_eval.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in sorted(rows, key=lambda x: x["client"]))
        return personal.per_client_summary(metrics, personal.schemes(self.cfg))
