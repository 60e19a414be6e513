"""Central evaluation: the global model's loss on the held-out validation split, which no client ever trains
on."""

from __future__ import annotations

import torch

from fedgpt.config import Config
from fedgpt.data import Batches, Dataset
from fedgpt.fed.wire import Exchange
from fedgpt.lora import merged_state
from fedgpt.model import GPT
from fedgpt.train import evaluate


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
