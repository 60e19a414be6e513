"""The Flower strategy fed.strategy names, built with settings sized for a GPT, and its state for checkpoints.

    strategy = make_strategy(cfg.fed)
    extra = {"strategy": strategy_state(strategy)}     # saved in last.pt
    load_strategy_state(strategy, extra["strategy"])   # on --resume

fedgpt.config_rules.STRATEGY_SERVER_LR names the strategies and the server learning rate each starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fedgpt.config import FedConfig
from fedgpt.config_rules import STRATEGY_SERVER_LR
from fedgpt.model import is_block_matrix
from fedgpt.optim import muon_defaults, orthogonalize


class OuterSGD(FedAvg):
    """The clients' average as a pseudo-gradient for an outer SGD step with momentum: DiLoCo (Douillard et al.
    2023, Nesterov momentum) or FedAvgM (Hsu et al. 2019, plain momentum).

        delta = global - average(client weights)                   # the outer gradient
        m = momentum * m + delta                                   # m = delta in a tensor's first step
        global = global - lr * (delta + momentum * m)              # Nesterov; plain momentum: lr * m

    torch.optim.SGD's update, in float32, with the momentum buffer as state (state_dict / load_state_dict).
    lr 1 and momentum 0 is FedAvg. A round whose replies hold only some tensors (a streaming fragment) steps
    those and their momentum, and leaves the rest.

    With `orthogonal`, the step of each of the blocks' weight matrices (the ones Muon steps on a client) is
    orthogonalized as Muon's is (torch.optim.Muon's Newton-Schulz) and scaled back to its own Frobenius norm:
    the same length, its singular values evened out. Averaging clients' steps cancels much of them in some
    directions and little in others; this takes the mean's directions at the mean's length.
    """

    def __init__(
        self,
        *,
        server_learning_rate: float,
        server_momentum: float,
        nesterov: bool,
        orthogonal: bool = False,
        **fedavg,
    ):
        super().__init__(**fedavg)
        self.lr, self.momentum, self.nesterov = server_learning_rate, server_momentum, nesterov
        self.orthogonal = orthogonal
        self.current: dict[str, torch.Tensor] | None = (
            None  # the global model this round's clients started from
        )
        self.buffer: dict[str, torch.Tensor] | None = None  # the momentum buffer m

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {k: v.float() for k, v in arrays.to_torch_state_dict().items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None:
            return None, metrics
        delta = {k: self.current[k] - v.float() for k, v in average.to_torch_state_dict().items()}
        if self.momentum > 0:  # per tensor: with streaming fragments a round steps only some of them
            # a new dict: a checkpoint of the last round may still be writing the old one (server.py)
            buffer = dict(self.buffer or {})
            for k, d in delta.items():
                buffer[k] = self.momentum * buffer[k] + d if k in buffer else d.clone()
            self.buffer = buffer
            mom = self.momentum
            step = {k: d + mom * buffer[k] if self.nesterov else buffer[k] for k, d in delta.items()}
        else:
            step = delta
        if self.orthogonal:
            step = {k: orthogonal_step(s) if is_block_matrix(k, s) else s for k, s in step.items()}
        return ArrayRecord({k: self.current[k] - self.lr * step[k] for k in delta}), metrics

    def state_dict(self) -> dict:
        return {"buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = (
            None if state.get("buffer") is None else {k: v.float() for k, v in state["buffer"].items()}
        )


def orthogonal_step(step: torch.Tensor) -> torch.Tensor:
    """`step` orthogonalized by torch.optim.Muon's Newton-Schulz iteration (its coefficients, steps and eps,
    in fp32), at the Frobenius norm of `step`."""
    muon = muon_defaults()
    ortho = orthogonalize(step, muon["ns_coefficients"], muon["ns_steps"], muon["eps"], torch.float32)
    return ortho * (step.norm() / ortho.norm().clamp(min=muon["eps"]))


def _outer_sgd(nesterov: bool | None) -> Callable[[FedConfig, float, dict], Strategy]:
    """OuterSGD with fed's momentum; Nesterov as fed.nesterov says when `nesterov` is None."""
    return lambda fed, lr, common: OuterSGD(
        **common,
        server_learning_rate=lr,
        server_momentum=fed.server_momentum,
        nesterov=fed.nesterov if nesterov is None else nesterov,
        orthogonal=fed.outer_orthogonal,
    )


# name -> builder(fed, server learning rate, the arguments every strategy takes)
_BUILDERS: dict[str, Callable[[FedConfig, float, dict], Strategy]] = {
    "fedavg": lambda fed, lr, common: FedAvg(**common),
    "fedprox": lambda fed, lr, common: FedProx(**common, proximal_mu=fed.proximal_mu),
    "diloco": _outer_sgd(nesterov=None),
    "fedavgm": _outer_sgd(nesterov=False),
    "fedadam": lambda fed, lr, common: FedAdam(**common, eta=lr, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "fedyogi": lambda fed, lr, common: FedYogi(**common, eta=lr, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "fedadagrad": lambda fed, lr, common: FedAdagrad(**common, eta=lr, tau=1e-3),
    "fedmedian": lambda fed, lr, common: FedMedian(**common),
    "fedtrimmedavg": lambda fed, lr, common: FedTrimmedAvg(**common, beta=0.2),
}
if set(_BUILDERS) != set(STRATEGY_SERVER_LR):
    raise ImportError(
        "fedgpt.config_rules.STRATEGY_SERVER_LR and the builders here name different strategies: "
        f"{sorted(set(_BUILDERS) ^ set(STRATEGY_SERVER_LR))}"
    )

# Attributes of Flower's adaptive strategies that carry state from round to round (FedOpt's moments).
FEDOPT_STATE = ("m_t", "v_t")


def server_lr(fed: FedConfig) -> float | None:
    """fed.server_lr, or the strategy's default when it is 0; None for strategies without one."""
    default = STRATEGY_SERVER_LR[fed.strategy]
    return None if default is None else (fed.server_lr or default)


def make_strategy(fed: FedConfig, presampled: bool = False) -> Strategy:
    """The Flower strategy fed.strategy names, sampling fraction_train of the clients each round; with
    `presampled`, every node of the grid it is given (the caller sampled them: DP's Poisson sampling)."""
    fraction = 1.0 if presampled else fed.fraction_train
    common = dict(
        fraction_train=fraction,
        fraction_evaluate=1.0,
        min_available_nodes=0 if presampled else fed.min_clients or fed.num_clients,
        min_train_nodes=0 if presampled else max(1, math.ceil(fraction * fed.num_clients)),
        min_evaluate_nodes=1,
    )
    return _BUILDERS[fed.strategy](fed, server_lr(fed), common)


def strategy_state(strategy: Strategy) -> dict:
    """The strategy's optimizer state as tensors (checkpoints are loaded with weights_only)."""
    if isinstance(strategy, OuterSGD):
        return strategy.state_dict()
    return {
        name: {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
        for name in FEDOPT_STATE
        if isinstance(value := getattr(strategy, name, None), dict)
    }


def load_strategy_state(strategy: Strategy, state: dict) -> None:
    if isinstance(strategy, OuterSGD):
        strategy.load_state_dict(state)
        return
    for name, value in state.items():
        setattr(strategy, name, {k: v.numpy() for k, v in value.items()})
