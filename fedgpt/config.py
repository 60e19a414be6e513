"""One config tree for every entry point: typed dataclasses mirrored 1:1 by YAML files.

    cfg = load_config("configs/shakespeare_char_cpu.yaml", ["--train.max_steps=200"])

YAML keys are exactly the dataclass field names. Unknown keys, wrong types and
out-of-range values are collected and raised as one ValueError naming every key (validate(cfg) lists the
problems of a built Config; the choices it checks against are in fedgpt/config_rules.py, the wire formats in
fedgpt/formats.py).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedgpt.config_rules import (
    ARCHS,
    CLIENT_OPTIMIZER,
    DP_CLIPPING,
    LORA_SCHEMES,
    LORA_TARGETS,
    OPTIMIZERS,
    PARTITIONS,
    PRECISIONS,
    SMALL_ROLES,
    STRAGGLER_POLICIES,
    STRATEGIES,
    TOKENIZERS,
    WEIGHTINGS,
)
from fedgpt.formats import FORMATS, formats_for


@dataclass
class ModelConfig:
    arch: str = "gpt2"  # "gpt2": GPT-2 (LayerNorm, GELU, learned positions); "llama": RMSNorm, SwiGLU, RoPE
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size; larger values pad the embedding (e.g. 50304)
    block_size: int = 256  # context length in tokens
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads; n_embd must be divisible by it
    n_embd: int = 384  # embedding width
    dropout: float = 0.0  # on embeddings, attention and residuals; never in evaluation
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 checkpoints have them)
    head_bias: bool = False  # a bias over the vocabulary on the output head (lora.head_bias merges into it)
    rope_theta: float = 10000.0  # RoPE base, "llama" only


@dataclass
class DataConfig:
    input_file: str = ""  # any UTF-8 text file; "" downloads Tiny Shakespeare into data_dir
    data_dir: str = "data"  # where the corpus and the encoded train.bin / val.bin are cached
    tokenizer: str = "char"  # "char" (vocabulary from the corpus) or "gpt2" (tiktoken r50k_base)
    vocab_file: str = ""  # "char": this text's characters are the vocabulary (a base's corpus); "": input's
    val_fraction: float = 0.1  # the last fraction of the corpus is held out for validation


@dataclass
class TrainConfig:
    out_dir: str = "out"  # run directory: checkpoints, metrics.jsonl, loss.png
    init_from: str = "scratch"  # "scratch", a fedgpt checkpoint, or "hf:DIR" (Hugging Face GPT-2 weights)
    max_steps: int = 5000  # optimizer steps
    batch_size: int = 64  # sequences per micro-batch (per process under DDP)
    grad_accum_steps: int = 1  # micro-batches per optimizer step (global, divided among DDP ranks)
    learning_rate: float = 1e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-4  # cosine decay ends here
    warmup_steps: int = 100  # linear warmup
    lr_decay_steps: int = 0  # 0: decay over max_steps
    decay_lr: bool = True  # False: constant learning rate after warmup
    optimizer: str = "adamw"  # "adamw"; "muon": Muon for the blocks' matrices, AdamW for the rest; "sgd"
    weight_decay: float = 0.1  # AdamW decay of matrices and embeddings (not biases or norms)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.99  # AdamW
    muon_momentum: float = 0.95  # train.optimizer=muon: momentum of Muon's step (Nesterov)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250  # steps between evaluations and checkpoints
    eval_iters: int = 200  # batches per evaluation
    log_interval: int = 10  # steps between log lines
    precision: str = "auto"  # "auto": bf16 on CUDA if supported, else fp16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    seed: int = 1337  # initial weights, batches, partitions
    save_optimizer: bool = True  # keep optimizer state in checkpoints (needed for an exact --resume)
    tensorboard: bool = False  # also log to TensorBoard (needs the tensorboard package)


@dataclass
class FedConfig:
    num_clients: int = 8  # clients = partitions of the training split (simulation: SuperNodes)
    rounds: int = 10  # federated rounds
    local_steps: int = 50  # optimizer steps each client runs per round
    full_batch: bool = False  # a local step is one gradient of all of a client's windows (FedSGD)
    strategy: str = "fedavg"  # one of STRATEGY_SERVER_LR's keys (fedavg, fedprox, fedadam, fedavgm, ...)
    proximal_mu: float = 0.0  # FedProx: weight of (mu/2)·||w - w_global||^2
    server_lr: float = 0.0  # server (outer) learning rate; 0: the strategy's own (STRATEGY_SERVER_LR)
    server_momentum: float = 0.9  # diloco and fedavgm: momentum of the outer SGD step
    nesterov: bool = True  # diloco: Nesterov momentum (fedavgm: plain momentum)
    outer_orthogonal: bool = False  # diloco, fedavgm: block matrices' outer step orthogonalized (Muon's)
    partition: str = "iid"  # iid, speaker, role (a speaker in one play), contiguous, dirichlet (sizes)
    dirichlet_alpha: float = 0.5  # "dirichlet" partitions: smaller is more skewed
    min_role_tokens: int = 0  # "role" partitions: a role with fewer train tokens is small (see small_roles)
    small_roles: str = "keep"  # "role": small roles are kept, dropped (LEAF's rule) or merged per play
    weighting: str = "data"  # a client's weight: "data" (tokens held), "trained" (tokens trained), "uniform"
    client_optimizer: str = "auto"  # keep / reset / average clients' state; auto: keep if fraction_train=1
    client_state_max_age: int = 1  # rounds a kept client state may be old; older is dropped (and counted)
    client_state_dir: str = ""  # where clients keep that state; "": <train.out_dir>/client_state
    client_val_fraction: float = 0.1  # share of a client's data held out, when client evaluation is on
    fraction_train: float = 1.0  # share of clients sampled each round (under DP: Poisson, with this rate)
    client_eval_interval: int = 0  # rounds between client evaluations on their own val slices; 0: never
    min_clients: int = 0  # the fewest admitted, connected nodes that make a round (quorum); 0: num_clients
    uplink: str = "fp32"  # client to server: the update in fp32, fp16, int8, int4, sparse or fp8 (formats.py)
    downlink: str = "fp32"  # server to client: the global weights in fp32 or fp16
    quant_block: int = 256  # int8 / int4 / fp8 uplink: values per fp32 scale
    error_feedback: bool = True  # quantized uplinks: clients add what their last update lost to the next
    sparse_fraction: float = 0.02  # sparse uplink: the share of an update's values sent (largest first)
    fragments: int = 1  # > 1: Streaming DiLoCo's fragments, one synced a round in turn (fed/wire.py)
    stragglers: float = 0.0  # share of each round's clients that run fewer local steps (1 to local_steps - 1)
    straggler_policy: str = "accept"  # "accept" their partial work (FedProx), or "drop" them (FedAvg)
    node_timeout: float = 120.0  # seconds a round waits for min_clients nodes, then the run stops (resumable)
    round_timeout: float = 3600.0  # seconds to wait for the replies of one round


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: every weight trains; > 0: rank-r adapters on the targets train, the rest is frozen
    alpha: float = 16.0  # an adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: str = "attn,mlp"  # any of "attn" (c_attn, c_proj), "mlp" (c_fc, c_proj), "embedding" (tied wte)
    scheme: str = "fedavg"  # "fedavg": A and B averaged apart (inexact); "ffa": A frozen, only B (exact)
    embedding_rows: int = 0  # > 0: the tied embedding's rows of the K most frequent tokens of rows_from train
    rows_from: str = ""  # a public text whose counts the server sends (e.g. the base's training text)
    rows_lr_scale: float = 1.0  # the rows' learning rate over train.learning_rate (the adapters')
    head_bias: bool = False  # a bias over the vocabulary on the output head trains too (vocab_size values)
    bias_lr_scale: float = 1.0  # that bias's learning rate over train.learning_rate


@dataclass
class DPConfig:
    noise_multiplier: float = 0.0  # noise std / clipping norm on the sum of clipped updates; 0: no DP
    target_epsilon: float = 0.0  # > 0: the least noise that keeps the whole run (resumes too) within it
    clipping_norm: float = 1.0  # each client's update is clipped to this L2 norm (adaptive: the first)
    delta: float = 1e-5  # epsilon is reported at this delta; must be below 1 / fed.num_clients
    clipping: str = "server"  # "server": clipped on receipt; "client": clients clip before they send
    adaptive_clipping: bool = False  # the norm follows a quantile of update norms (Andrew et al. 2021)
    target_quantile: float = 0.5  # adaptive: the share of updates to leave unclipped
    clip_lr: float = 0.2  # adaptive: the norm's geometric step per round
    count_noise: float = 0.0  # adaptive: noise std on the unclipped count; 0: expected clients / 20

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0


@dataclass
class SecAggConfig:
    enabled: bool = False  # clients' updates are summed under Flower's SecAgg+: the server sees only the mean
    shares: int = 3  # each client's secrets go to this many clients (itself included; odd; > threshold)
    threshold: int = 2  # shares needed to unmask; shares - threshold clients may drop out of a round
    clipping_range: float = 8.0  # every value of an update is clipped to +-this before quantization
    quantization_range: int = 4194304  # levels over [-clipping_range, clipping_range] (2**22)


@dataclass
class PersonalConfig:
    scheme: str = "none"  # "finetune" (local adaptation), "adapter" (a LoRA adapter kept on the client), both
    steps: int = 20  # finetune: steps from the global model when scored; adapter: steps each round it trains
    learning_rate: float = 1e-3  # of those steps (constant, no weight decay)
    rank: int = 4  # adapter: its LoRA rank
    alpha: float = 8.0  # adapter: its output is scaled by alpha / rank
    targets: str = "attn,mlp"  # adapter: the projections it adapts (as lora.targets)
    check: float = 0.0  # finetune: share of its train text held back; the adaptation is kept if better there


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @property
    def keeps_client_state(self) -> bool:
        """Whether clients keep their optimizer state between rounds. "auto": when every client trains every
        round (fed.fraction_train 1); a client sampled now and then holds a state too old to use most rounds,
        and a thousand of them would fill a disk."""
        mode = self.fed.client_optimizer
        return mode in ("keep", "average") or (mode == "auto" and self.fed.fraction_train == 1.0)

    @property
    def keeps_client_weights(self) -> bool:
        """Whether clients keep their own weights between rounds: with fed.fragments > 1 the fragments not
        synced this round stay as each client trained them."""
        return self.fed.fragments > 1

    @property
    def uses_error_feedback(self) -> bool:
        """Whether clients carry their quantization error into their next update: fed.error_feedback, with an
        uplink format that has it (fedgpt.formats.FORMATS)."""
        fmt = FORMATS.get(self.fed.uplink)
        return self.fed.error_feedback and fmt is not None and fmt.error_feedback


# ---- validation: what each setting may be, each problem naming its key (from_dict raises them together)


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
        + _validate_personal(cfg)
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


def _validate_personal(cfg: Config) -> list[str]:
    p, check = cfg.personal, _Checks()
    names = [] if p.scheme in ("", "none") else [x.strip() for x in p.scheme.split(",")]
    for name in names:
        check.choice(name, ("finetune", "adapter"), "personal.scheme")
    check(len(set(names)) == len(names), "personal.scheme", f"names a scheme twice ({p.scheme!r})")
    if names:
        check(p.steps >= 1, "personal.steps", "must be >= 1")
        check(0.0 <= p.check < 0.5, "personal.check", "must be in [0, 0.5) (0: no check)")
        check(p.learning_rate > 0, "personal.learning_rate", "must be > 0")
        check(p.rank >= 1, "personal.rank", "must be >= 1")
        check(p.alpha > 0, "personal.alpha", "must be > 0")
        check(
            all(t.strip() in ("attn", "mlp") for t in p.targets.split(",")),
            "personal.targets",
            f"{p.targets!r}: any of attn, mlp",
        )
        check(
            cfg.lora.rank == 0,
            "personal.scheme",
            "personal models need the whole global model (lora.rank=0): adapters of a client's own on "
            "shared adapters are not supported",
        )
        check(
            cfg.fed.client_eval_interval > 0,
            "fed.client_eval_interval",
            "must be > 0 with personal.scheme: personal models are scored on the clients' own "
            "validation slices",
        )
        check(
            not cfg.secagg.enabled and not cfg.dp.enabled,
            "personal.scheme",
            "scores each client in the clear: not under secagg.enabled or DP (personal models there are "
            "not built yet)",
        )
    return check


# ---- loading

# The sections, in order, and their dataclasses: Config's own fields.
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _section_types(section: str) -> dict[str, type]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: type) -> Any:
    """Return value as typ, or raise TypeError. Ints are accepted where floats are expected."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise TypeError(f"expected {typ.__name__}, got {type(value).__name__} {value!r}")


def from_dict(d: dict[str, Any], errors: list[str] | None = None) -> Config:
    """Build a Config from a nested dict; collect every problem into one ValueError."""
    own_errors = errors if errors is not None else []
    cfg = Config()
    if not isinstance(d, dict):
        raise ValueError(f"config must be a mapping of sections {list(SECTIONS)}, got {type(d).__name__}")
    for section, values in d.items():
        if section not in SECTIONS:
            own_errors.append(f"{section}: unknown section (expected one of {', '.join(SECTIONS)})")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            own_errors.append(f"{section}: must be a mapping, got {type(values).__name__}")
            continue
        types = _section_types(section)
        obj = getattr(cfg, section)
        for key, value in values.items():
            if key not in types:
                own_errors.append(f"{section}.{key}: unknown key")
                continue
            try:
                setattr(obj, key, _coerce(value, types[key]))
            except TypeError as e:
                own_errors.append(f"{section}.{key}: {e}")
    own_errors.extend(validate(cfg))
    if errors is None and own_errors:
        raise ValueError("invalid config: " + "; ".join(own_errors))
    return cfg


# Keys that change how a run executes, not what it computes: they may differ when a run is resumed or its
# folder is reused.
RUN_NEUTRAL = frozenset(
    {
        "train.out_dir",  # where a run is, not what it computes: a moved folder resumes
        "train.device",
        "train.compile",
        "train.log_interval",
        "train.tensorboard",
        "fed.node_timeout",
        "fed.round_timeout",
        "fed.min_clients",
    }
)


def config_diff(a: dict, b: dict, ignore: frozenset[str] = RUN_NEUTRAL) -> list[str]:
    """["section.key: old -> new", ...] for every key where config dicts a and b differ, but those in
    `ignore`."""
    flat = lambda d: {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()}
    fa, fb = flat(a), flat(b)
    return [
        f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}"
        for k in sorted(set(fa) | set(fb))
        if k not in ignore and fa.get(k) != fb.get(k)
    ]


def _parse_scalar(raw: str) -> Any:
    """YAML scalar parsing, plus floats like 1e-3 that YAML 1.1 leaves as strings."""
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ["--train.max_steps=200", "model.n_layer=2"] into {"train": {"max_steps": 200}, ...}.

    Values are parsed as YAML scalars, so 200 is an int, 1e-3 a float, true a bool.
    """
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for arg in args:
        body = arg[2:] if arg.startswith("--") else arg
        key, sep, raw = body.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            bad.append(arg)
            continue
        types = _section_types(section) if section in SECTIONS else {}
        # A string field keeps the text as typed: --train.out_dir=2024 is a directory, not a number.
        value = raw if types.get(name) is str else _parse_scalar(raw)
        out.setdefault(section, {})[name] = value
    if bad:
        raise ValueError(
            f"bad override(s) {', '.join(bad)}: write them as --section.key=value, e.g. --train.max_steps=200"
        )
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(merged.get(section), dict) and isinstance(values, dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply dotted overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(
                f"config file {p} not found: pass --config with a path such as "
                "configs/shakespeare_char_cpu.yaml"
            )
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must be a mapping of sections {list(SECTIONS)}")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        raw = _merge(raw, extra)
    return from_dict(raw)


def reference_markdown() -> str:
    """A markdown table of every config field with its default and the comment beside it in this file."""
    import inspect
    import re

    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, cls in SECTIONS.items():
        comments = dict(re.findall(r"^\s+(\w+): [^=]+=[^#\n]*(?:#\s*(.*))?$", inspect.getsource(cls), re.M))
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            rows.append(
                f"| `{section}.{f.name}` | `{default!r}` | {comments.get(f.name, '').replace('|', '/')} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())
