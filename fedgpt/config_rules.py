"""The choices a config setting takes, by name: fedgpt.config validates against them, and the modules that
build what a choice names (the model's archs, the tokenizers, the partitions, fedgpt/fed/strategies.py's
builders) import them from here without the config. The wire formats are fedgpt/formats.py's table.
"""

from __future__ import annotations

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
