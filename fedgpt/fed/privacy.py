"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) through Flower's central-DP wrappers and
its Rényi accountant.

    strategy = private(make_strategy(cfg.fed), cfg)    # the strategy itself when dp is off
    epsilon = spent_epsilon(strategy)                   # after each round; None when dp is off

Each client's update (its weights minus the global model it started from) is clipped to dp.clipping_norm, by
the server on receipt ("server") or by the client before it sends ("client"); the server averages the clipped
updates without weights and adds Gaussian noise of std noise_multiplier x clipping_norm / sampled clients to
the average. The accountant composes one Gaussian release per round without sampling amplification (what
Flower's fixed-clipping accounting supports), so the epsilon it reports holds whichever clients are sampled.
"""

from __future__ import annotations

import json
import math

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedgpt.config import Config

Wrapper = DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping


def sampled_clients(cfg: Config) -> int:
    """Clients per round, as Flower's FedAvg samples them when every client is connected."""
    f = cfg.fed
    return max(int(f.num_clients * f.fraction_train), max(1, math.ceil(f.fraction_train * f.num_clients)))


def accountant(cfg: Config) -> RdpAccountant:
    return RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.dp.delta,
            population_size=cfg.fed.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def epsilon_after(cfg: Config, noise_multiplier: float, rounds: int) -> float:
    """The epsilon (at dp.delta) that `rounds` releases at this noise multiplier spend."""
    acc = accountant(cfg)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, sampled_clients(cfg), cfg.fed.num_clients), rounds)
    return acc.get_epsilon(cfg.dp.delta)


def noise_multiplier(cfg: Config) -> float:
    """dp.noise_multiplier, or the smallest one (to 0.1%) whose fed.rounds releases spend at most
    dp.target_epsilon."""
    if cfg.dp.noise_multiplier > 0:
        return cfg.dp.noise_multiplier
    lo, hi = 0.01, 1.0
    while epsilon_after(cfg, hi, cfg.fed.rounds) > cfg.dp.target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"dp.target_epsilon={cfg.dp.target_epsilon} is out of reach: raise it")
    # epsilon falls as the noise grows: bisect for the smallest noise within the target
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon_after(cfg, mid, cfg.fed.rounds) <= cfg.dp.target_epsilon else (mid, hi)
    return hi


def private(strategy: Strategy, cfg: Config) -> Strategy:
    """`strategy` inside Flower's fixed-clipping DP wrapper as cfg.dp says, with an accountant; the strategy
    itself when dp is off."""
    if not cfg.dp.enabled:
        return strategy
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if cfg.dp.clipping == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(
        strategy,
        noise_multiplier=noise_multiplier(cfg),
        clipping_norm=cfg.dp.clipping_norm,
        num_sampled_clients=sampled_clients(cfg),
        accountant=accountant(cfg),
    )


def inner(strategy: Strategy) -> Strategy:
    """The strategy a DP wrapper holds, or the strategy itself."""
    return strategy.strategy if isinstance(strategy, Wrapper) else strategy


def spent_epsilon(strategy: Strategy) -> float | None:
    """Epsilon spent so far (at dp.delta), or None without DP."""
    if not isinstance(strategy, Wrapper):
        return None
    return strategy.privacy_spent().epsilon


def accountant_state(strategy: Strategy) -> dict:
    """The accountant's ledger for a checkpoint (a JSON string: checkpoints load with weights_only)."""
    if not isinstance(strategy, Wrapper):
        return {}
    return {"accountant": json.dumps(strategy.accountant.state_dict())}


def load_accountant_state(strategy: Strategy, state: dict) -> None:
    if isinstance(strategy, Wrapper) and "accountant" in state:
        strategy.accountant.load_state_dict(json.loads(state["accountant"]))


def describe(strategy: Wrapper, cfg: Config) -> str:
    """The run's DP in one log line: its noise, its clipping, and the epsilon it will have spent."""
    sigma = strategy.noise_multiplier
    return (
        f"dp: noise multiplier {sigma:.4g}, updates clipped to {cfg.dp.clipping_norm:g} ({cfg.dp.clipping}); "
        f"epsilon after {cfg.fed.rounds} rounds: {epsilon_after(cfg, sigma, cfg.fed.rounds):.3f} "
        f"at delta {cfg.dp.delta:g}"
    )
