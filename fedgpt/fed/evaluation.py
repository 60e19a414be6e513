"""Central evaluation: the global model's loss on the held-out validation split, which no client ever trains
on.

The evaluation runs in a thread of its own beside the next round (fedgpt.fed.server), at a lower CPU priority
(`yield_cpu`): where the ServerApp shares a machine with SuperNodes or Ray's actors, the clients' processes go
first and the evaluation takes the time they leave, most of a deployment round (Flower's polls).
"""

from __future__ import annotations

import os
import sys
import threading

import torch

from fedgpt.config import Config
from fedgpt.data import Batches, Dataset
from fedgpt.fed.wire import Exchange
from fedgpt.lora import merged_state
from fedgpt.model import GPT
from fedgpt.train import evaluate

EVAL_NICE = 10  # added to the evaluating thread's nice value (Linux: a thread's priority is its own)


def yield_cpu() -> None:
    """Lower the calling thread's CPU priority by EVAL_NICE (Linux only; elsewhere a no-op). Threads it starts
    later, such as torch's intra-op threads for its first parallel region, inherit it."""
    if sys.platform == "linux":
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + EVAL_NICE))


class CentralEvaluator:
    """Scores global weights with a model of its own, on the same fixed validation windows every round."""

    def __init__(self, cfg: Config, ds: Dataset, model: GPT, device: torch.device, exchange: Exchange):
        self.cfg, self.ds, self.model, self.device = cfg, ds, model.to(device), device
        self.exchange = exchange

    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss, perplexity and next-token accuracy of `state` on the validation windows."""
        self.exchange.load(self.model, state)  # with LoRA: the adapters
        tc = self.cfg.train
        batches = Batches(self.ds.val, self.cfg.model.block_size, tc.batch_size, self.device, seed=tc.seed)
        return evaluate(self.model, batches, tc.eval_iters)

    def merged(self, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The plain GPT's weights of base plus `adapters` (LoRA runs' checkpoints hold these)."""
        self.exchange.load(self.model, adapters)
        return merged_state(self.model)
