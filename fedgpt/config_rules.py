"""What each config setting may be: the choices a setting takes, and the checks of every section, each problem
naming its key (fedgpt.config.from_dict raises them together in one ValueError).

    problems = validate(cfg)     # [] when cfg is fine
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedgpt.formats import FORMATS, formats_for

if TYPE_CHECKING:
    from fedgpt.config import Config

ARCHS = ("gpt2", "llama")
TOKENIZERS = ("char", "gpt2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "muon", "sgd")
# Every strategy fed.strategy may name (fedgpt/fed/strategies.py builds them), with the server learning rate
# it takes when fed.server_lr is 0; None: it has none. Flower's own eta=0.1 makes a GPT diverge in its first
# rounds.
STRATEGY_SERVER_LR: dict[str, float | None] = {
    "fedavg": None,
    "fedprox": None,
    "diloco": 0.7,  # Douillard et al. 2023's outer learning rate
    "fedavgm": 1.0,
    "fedadam": 1e-2,
    "fedyogi": 1e-2,
    "fedadagrad": 1e-2,
    "fedmedian": None,
    "fedtrimmedavg": None,
}
STRATEGIES = tuple(STRATEGY_SERVER_LR)
PARTITIONS = ("iid", "speaker", "role", "contiguous", "dirichlet")
SMALL_ROLES = ("keep", "drop", "merge")
WEIGHTINGS = ("data", "trained", "uniform")
STRAGGLER_POLICIES = ("accept", "drop")
DP_CLIPPING = ("server", "client")
CLIENT_OPTIMIZER = ("auto", "keep", "reset", "average")
LORA_TARGETS = ("attn", "mlp", "embedding")
LORA_SCHEMES = ("fedavg", "ffa")


class _Checks(list):
    """Problems found so far, each naming its key."""

    def __call__(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            self.append(f"{key}: {msg}")

    def choice(self, value: str, options, key: str) -> None:
        self(value in options, key, f"{value!r} is not one of {', '.join(options)}")


def validate(cfg: Config) -> list[str]:
    """Range and choice checks; returns a list of problems, each naming its key."""
    return (
        _validate_core(cfg)
        + _validate_fed(cfg)
        + _validate_dp(cfg)
        + _validate_secagg(cfg)
        + _validate_lora(cfg)
    )


def _validate_core(cfg: Config) -> list[str]:
    m, d, t, check = cfg.model, cfg.data, cfg.train, _Checks()
    check.choice(m.arch, ARCHS, "model.arch")
    check(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 takes the tokenizer's size)")
    for key in ("block_size", "n_layer", "n_head", "n_embd"):
        check(getattr(m, key) > 0, f"model.{key}", "must be > 0")
    check(
        m.n_head > 0 and m.n_embd % m.n_head == 0,
        "model.n_embd",
        f"{m.n_embd} is not divisible by model.n_head={m.n_head}",
    )
    if m.arch == "llama" and m.n_head > 0 and m.n_embd % m.n_head == 0:
        check((m.n_embd // m.n_head) % 2 == 0, "model.n_embd", "head size must be even for RoPE")
    check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    check(m.rope_theta > 0, "model.rope_theta", "must be > 0")
    check.choice(d.tokenizer, TOKENIZERS, "data.tokenizer")
    check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    for key in ("max_steps", "lr_decay_steps", "warmup_steps"):
        check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0")
    for key in ("batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "log_interval"):
        check(getattr(t, key) > 0, f"train.{key}", "must be > 0")
    check(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    check(0 <= t.min_lr <= t.learning_rate, "train.min_lr", "must be in [0, train.learning_rate]")
    check.choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
    check(0 <= t.muon_momentum < 1, "train.muon_momentum", "must be in [0, 1)")
    check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    check.choice(t.precision, PRECISIONS, "train.precision")
    return check


def _validate_fed(cfg: Config) -> list[str]:
    f, check = cfg.fed, _Checks()
    check(f.num_clients > 0, "fed.num_clients", "must be > 0")
    check(f.rounds > 0, "fed.rounds", "must be > 0")
    check(f.local_steps >= 0, "fed.local_steps", "must be >= 0")
    check.choice(f.strategy, STRATEGIES, "fed.strategy")
    check(f.proximal_mu >= 0, "fed.proximal_mu", "must be >= 0")
    check(f.server_lr >= 0, "fed.server_lr", "must be >= 0 (0: the strategy's default)")
    check(0 <= f.server_momentum < 1, "fed.server_momentum", "must be in [0, 1)")
    check(
        not f.outer_orthogonal or f.strategy in ("diloco", "fedavgm"),
        "fed.outer_orthogonal",
        "orthogonalizes the outer SGD step: use it with fed.strategy diloco or fedavgm",
    )
    check.choice(f.partition, PARTITIONS, "fed.partition")
    check(f.dirichlet_alpha > 0, "fed.dirichlet_alpha", "must be > 0")
    check(f.min_role_tokens >= 0, "fed.min_role_tokens", "must be >= 0")
    check.choice(f.small_roles, SMALL_ROLES, "fed.small_roles")
    check.choice(f.weighting, WEIGHTINGS, "fed.weighting")
    check.choice(f.client_optimizer, CLIENT_OPTIMIZER, "fed.client_optimizer")
    check(f.client_state_max_age >= 1, "fed.client_state_max_age", "must be >= 1")
    check(  # the moments travel in the clear: they would reveal what the noise and the masks hide
        f.client_optimizer != "average" or not (cfg.dp.enabled or cfg.secagg.enabled or f.fragments > 1),
        "fed.client_optimizer",
        "average sends the clients' moments in the clear, and each client's own weights stay with fragments: "
        "use keep with DP, SecAgg+ or fed.fragments > 1",
    )
    check.choice(f.uplink, formats_for("uplink"), "fed.uplink")
    check.choice(f.downlink, formats_for("downlink"), "fed.downlink")
    check(f.quant_block >= 1, "fed.quant_block", "must be >= 1")
    check(0 < f.sparse_fraction <= 1, "fed.sparse_fraction", "must be in (0, 1]")
    check(0 < f.client_val_fraction < 1, "fed.client_val_fraction", "must be in (0, 1)")
    check(0 < f.fraction_train <= 1, "fed.fraction_train", "must be in (0, 1]")
    check(f.client_eval_interval >= 0, "fed.client_eval_interval", "must be >= 0 (0: never)")
    check(0 <= f.min_clients <= f.num_clients, "fed.min_clients", "must be in [0, fed.num_clients]")
    check(f.node_timeout > 0 and f.round_timeout > 0, "fed.node_timeout/round_timeout", "must be > 0")
    check(0 <= f.stragglers <= 1, "fed.stragglers", "must be in [0, 1]")
    check.choice(f.straggler_policy, STRAGGLER_POLICIES, "fed.straggler_policy")
    check(1 <= f.fragments <= cfg.model.n_layer, "fed.fragments", "must be in [1, model.n_layer]")
    if f.fragments > 1:  # each client carries its own weights from round to round, every round
        check(
            f.strategy in ("fedavg", "diloco", "fedavgm"),
            "fed.fragments",
            f"steps one fragment at a time, which fed.strategy {f.strategy} cannot: "
            "use diloco, fedavgm or fedavg",
        )
        check(
            f.fraction_train == 1 and not (f.stragglers > 0 and f.straggler_policy == "drop"),
            "fed.fragments",
            "needs every client in every round (a client that misses one lacks a fragment's sync): "
            "fed.fraction_train=1 and no dropped stragglers",
        )
        check(
            not (cfg.dp.enabled or cfg.secagg.enabled or cfg.lora.rank),
            "fed.fragments",
            "is for full-model training without DP or SecAgg+: set fed.fragments=1 for those",
        )
    return check


def _validate_lora(cfg: Config) -> list[str]:
    lo, check = cfg.lora, _Checks()
    check(lo.rank >= 0, "lora.rank", "must be >= 0 (0: no adapters)")
    check(
        lo.rank == 0 or cfg.train.init_from != "scratch",
        "lora.rank",
        "adapters fine-tune a pretrained model: set train.init_from to a checkpoint or hf:DIR",
    )
    check(lo.alpha > 0, "lora.alpha", "must be > 0")
    check(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    check.choice(lo.scheme, LORA_SCHEMES, "lora.scheme")
    targets = [t.strip() for t in lo.targets.split(",")]
    check(
        bool(targets) and set(targets) <= set(LORA_TARGETS),
        "lora.targets",
        f"{lo.targets!r}: give one or more of {', '.join(LORA_TARGETS)}, comma-separated",
    )
    check(lo.embedding_rows >= 0, "lora.embedding_rows", "must be >= 0 (0: the embedding stays frozen)")
    check(lo.rows_lr_scale > 0, "lora.rows_lr_scale", "must be > 0 (1: the adapters' learning rate)")
    check(lo.bias_lr_scale > 0, "lora.bias_lr_scale", "must be > 0 (1: the adapters' learning rate)")
    check(not lo.head_bias or lo.rank > 0, "lora.head_bias", "trains beside adapters: set lora.rank > 0 too")
    if lo.embedding_rows:
        check(lo.rank > 0, "lora.embedding_rows", "trains rows beside adapters: set lora.rank > 0 too")
        check(
            bool(lo.rows_from),
            "lora.rows_from",
            "must name a public text file for the server to count (e.g. the base's training text): its "
            "most frequent tokens choose the rows",
        )
        check(
            "embedding" not in targets,
            "lora.embedding_rows",
            "and the embedding adapter both adapt the embedding: drop embedding from lora.targets",
        )
    return check


def _validate_dp(cfg: Config) -> list[str]:
    """The dp section, and what DP needs of the rest: an unweighted sum of clipped updates (what the noise is
    calibrated for) over Poisson-sampled clients (what the accountant counts)."""
    dp, f, check = cfg.dp, cfg.fed, _Checks()
    for key in ("noise_multiplier", "target_epsilon", "count_noise"):
        check(getattr(dp, key) >= 0, f"dp.{key}", "must be >= 0 (0: off)")
    check(
        not (dp.noise_multiplier > 0 and dp.target_epsilon > 0),
        "dp.noise_multiplier",
        "give it or dp.target_epsilon, not both",
    )
    check(dp.clipping_norm > 0, "dp.clipping_norm", "must be > 0")
    check(0 < dp.delta < 1, "dp.delta", "must be in (0, 1)")
    check.choice(dp.clipping, DP_CLIPPING, "dp.clipping")
    check(0 < dp.target_quantile < 1, "dp.target_quantile", "must be in (0, 1)")
    check(dp.clip_lr > 0, "dp.clip_lr", "must be > 0")
    if not dp.enabled:
        return check
    check(
        dp.delta < 1 / max(1, f.num_clients),
        "dp.delta",
        f"{dp.delta:g} is not below 1 / fed.num_clients ({1 / max(1, f.num_clients):g}): at that delta one "
        "client's data could be released outright; lower it",
    )
    check(
        f.strategy not in ("fedmedian", "fedtrimmedavg"),
        "dp",
        f"fed.strategy {f.strategy} needs each client's update, and DP gives the strategy only their noised "
        "sum; use fedavg, fedprox, diloco, fedavgm or fedadam & co.",
    )
    check(
        f.client_eval_interval == 0,
        "fed.client_eval_interval",
        "reports the clients' losses on their own validation slices, which the accountant does not cover: "
        "set it to 0 with DP (the central evaluation of each released model stays)",
    )
    check(
        f.weighting == "uniform",
        "dp",
        "needs fed.weighting=uniform (the noise is calibrated for an unweighted sum)",
    )
    check(
        not (f.stragglers > 0 and f.straggler_policy == "drop"),
        "dp",
        "dropped stragglers leave the round short of its sampled clients; use accept",
    )
    check(
        not (dp.clipping == "client" and f.uplink in FORMATS and FORMATS[f.uplink].quantized),
        "dp.clipping",
        f"client clipping with fed.uplink={f.uplink} would quantize (and carry error into) the clipped "
        "update: use dp.clipping=server, or fed.uplink fp32 or fp16",
    )
    return check


def _validate_secagg(cfg: Config) -> list[str]:
    """The secagg section, and what SecAgg+ cannot share the round with."""
    s, check = cfg.secagg, _Checks()
    check(
        2 <= s.threshold < s.shares,
        "secagg.threshold",
        "needs 2 <= threshold < secagg.shares (as Flower's SecAgg+ does)",
    )
    check(
        s.clipping_range > 0 and s.quantization_range >= 2,
        "secagg.clipping_range / quantization_range",
        "must be > 0 and >= 2",
    )
    if not s.enabled:
        return check
    per_round = math.ceil(cfg.fed.num_clients * cfg.fed.fraction_train)
    check(per_round >= 2, "secagg", "a round needs 2 or more clients to hide one among them")
    check(
        per_round * s.quantization_range < 2**32,  # SecAgg+ sums the clients' integers modulo 2**32
        "secagg.quantization_range",
        f"{per_round} clients a round x {s.quantization_range} levels overflow the protocol's 2**32 modulus: "
        f"use at most {2**32 // per_round - 1}",
    )
    check(
        cfg.fed.uplink not in FORMATS or FORMATS[cfg.fed.uplink].secagg,
        "secagg",
        f"fed.uplink {cfg.fed.uplink} is not used: SecAgg+ quantizes the update itself "
        "(secagg.quantization_range) and sends it masked; leave fed.uplink at fp32",
    )
    check(
        not (cfg.dp.enabled and cfg.dp.clipping == "server"),
        "secagg",
        "the server cannot clip updates it never sees: use dp.clipping=client with secagg",
    )
    check(
        not (cfg.dp.enabled and s.clipping_range < 1),
        "secagg.clipping_range",
        "under DP each client's 0/1 clipped count travels masked with its update: use 1 or more",
    )
    return check
