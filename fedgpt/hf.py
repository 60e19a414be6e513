"""Hugging Face GPT-2 weights from a local save_pretrained directory, read without network or transformers.

    model = from_hf("data/gpt2")    # config.json + model.safetensors (or pytorch_model.bin, sharded or not)

Conv1D weights are transposed into nn.Linear's layout; the tied lm_head is not read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fedgpt.config import ModelConfig
from fedgpt.model import GPT


def from_hf(path: str | Path, dropout: float = 0.0) -> GPT:
    """Hugging Face GPT-2 weights from a local save_pretrained directory (no network, no transformers)."""
    path = Path(path)
    cfg, eps = read_hf_config(path, dropout)
    model = GPT(cfg)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    ours = model.state_dict()
    loaded = {}
    for key, t in _read_hf_weights(path).items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers, and the head that is tied to wte
        if key.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            t = t.t()  # HF Conv1D stores (in, out); nn.Linear wants (out, in)
        loaded["transformer." + key] = t
    expected = {k for k in ours if k != "lm_head.weight"}
    missing, unexpected = sorted(expected - loaded.keys()), sorted(loaded.keys() - expected)
    wrong = [k for k in expected & loaded.keys() if loaded[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: weights do not match GPT-2 config.json: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    with torch.no_grad():
        for k, t in loaded.items():
            ours[k].copy_(t)
    return model


def read_hf_config(path: Path, dropout: float = 0.0) -> tuple[ModelConfig, float]:
    """The ModelConfig of a Hugging Face GPT-2 directory's config.json, and its LayerNorm epsilon."""
    if not path.is_dir():
        raise ValueError(
            f"Hugging Face model directory {path} not found: pass a local folder written by save_pretrained"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{config_file} not found: expected a Hugging Face GPT-2 directory (config.json + weights)"
        )
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{config_file}: expected model_type 'gpt2', got {hf.get('model_type')!r}")
    standard = (
        hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")
        and hf.get("n_inner") in (None, 4 * hf["n_embd"])
        and hf.get("scale_attn_weights", True)
        and not hf.get("scale_attn_by_inverse_layer_idx", False)
    )
    if not standard:
        raise ValueError(
            f"{config_file}: expected the standard GPT-2 block "
            "(gelu_new, n_inner = 4 * n_embd, default attention scaling)"
        )
    cfg = ModelConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=dropout,
        bias=True,
    )
    return cfg, hf.get("layer_norm_epsilon", 1e-5)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained directory: model.safetensors or pytorch_model.bin, sharded or not."""
    for name, read in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_torch_bin)):
        if (path / name).is_file():
            return read(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: t for shard in shards for k, t in read(path / shard).items()}
    raise ValueError(
        f"no weights in {path}: expected model.safetensors or pytorch_model.bin (or their .index.json)"
    )


def _read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}): download it again") from None
