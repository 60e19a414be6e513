"""The Flower strategy fed.strategy names, built with settings sized for a GPT, and its state for checkpoints.

    strategy = make_strategy(cfg.fed)
    extra = {"strategy": strategy_state(strategy)}     # saved in last.pt
    load_strategy_state(strategy, extra["strategy"])   # on --resume

fedgpt.config.STRATEGY_SERVER_LR names the strategies and the server learning rate each starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fedgpt.config import STRATEGY_SERVER_LR, FedConfig

# name -> builder(fed, server learning rate, the arguments every strategy takes)
_BUILDERS: dict[str, Callable[[FedConfig, float, dict], Strategy]] = {
    "fedavg": lambda fed, lr, common: FedAvg(**common),
    "fedprox": lambda fed, lr, common: FedProx(**common, proximal_mu=fed.proximal_mu),
    "fedadam": lambda fed, lr, common: FedAdam(**common, eta=lr, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "fedyogi": lambda fed, lr, common: FedYogi(**common, eta=lr, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "fedadagrad": lambda fed, lr, common: FedAdagrad(**common, eta=lr, tau=1e-3),
    "fedavgm": lambda fed, lr, common: FedAvgM(
        **common, server_learning_rate=lr, server_momentum=fed.server_momentum
    ),
    "fedmedian": lambda fed, lr, common: FedMedian(**common),
    "fedtrimmedavg": lambda fed, lr, common: FedTrimmedAvg(**common, beta=0.2),
}
if set(_BUILDERS) != set(STRATEGY_SERVER_LR):
    raise ImportError(
        f"fedgpt.config.STRATEGY_SERVER_LR and the builders here name different strategies: "
        f"{sorted(set(_BUILDERS) ^ set(STRATEGY_SERVER_LR))}"
    )

# Attributes of Flower's strategies that carry state from round to round (FedOpt's moments, FedAvgM's
# momentum).
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def server_lr(fed: FedConfig) -> float | None:
    """fed.server_lr, or the strategy's default when it is 0; None for strategies without one."""
    default = STRATEGY_SERVER_LR[fed.strategy]
    return None if default is None else (fed.server_lr or default)


def make_strategy(fed: FedConfig) -> Strategy:
    """The Flower strategy fed.strategy names, sampling fraction_train of the clients each round."""
    common = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_available_nodes=fed.min_clients or fed.num_clients,
        min_train_nodes=max(1, math.ceil(fed.fraction_train * fed.num_clients)),
        min_evaluate_nodes=1,
    )
    return _BUILDERS[fed.strategy](fed, server_lr(fed), common)


def strategy_state(strategy: Strategy) -> dict:
    """The strategy's optimizer state as tensors (checkpoints are loaded with weights_only)."""
    out = {}
    for name in STATE_ATTRIBUTES:
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
