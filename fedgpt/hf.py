"""Hugging Face model folders, both ways, without network or transformers: GPT-2 weights read from a local
save_pretrained directory, and a GPT's config.json and weights in transformers' layout (fedgpt.export writes
them).

    model = from_hf("data/gpt2")    # config.json + model.safetensors (or pytorch_model.bin, sharded or not)
    config, weights = hf_config(model.cfg), hf_state_dict(model)    # GPT2LMHeadModel or LlamaForCausalLM

GPT-2's Conv1D weights are the transpose of nn.Linear's; the tied lm_head is neither read nor written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fedgpt.config import ModelConfig
from fedgpt.config_rules import ARCHS
from fedgpt.model import GPT, swiglu_hidden

# GPT-2's projections are Conv1D in transformers: weights stored (in, out), the transpose of nn.Linear's.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
        if key.endswith(CONV1D):
            t = t.t()
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


def hf_config(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """config.json of the transformers model that computes what GPT(cfg) computes: GPT2LMHeadModel or
    LlamaForCausalLM, weights tied, float32."""
    if cfg.head_bias:
        raise ValueError(
            "the model has a head bias over the vocabulary (lora.head_bias), which neither GPT2LMHeadModel "
            "nor LlamaForCausalLM can hold: export a model trained without it"
        )
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": True, "torch_dtype": "float32"}
    common |= {"bos_token_id": bos_id, "eos_token_id": eos_id}
    if cfg.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": cfg.block_size,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "n_inner": None,  # 4 * n_embd
            "activation_function": "gelu_pytorch_tanh",  # gelu_new's formula in torch's kernel, as fedgpt
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            **common,
        }
    # fedgpt's RoPE rotates the two halves of each head against each other, as transformers' rotate_half
    # does, so q and k keep their rows; only dropout after the residual projections has no place in Llama.
    head_size = cfg.n_embd // cfg.n_head
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.n_embd,
        "intermediate_size": swiglu_hidden(cfg.n_embd),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        **common,
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights of hf_config(model.cfg)'s transformers model, by its names: contiguous float32 copies,
    without the tied lm_head."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = _HF_WEIGHTS[model.cfg.arch](state, model.cfg)
    return {k: v.contiguous().clone() for k, v in out.items()}


def _gpt2_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        if key == "lm_head.weight":
            continue  # tied to wte
        out[key] = t.t() if key.endswith(CONV1D) else t
        if not cfg.bias and key.endswith(".weight") and not key.endswith(("wte.weight", "wpe.weight")):
            # GPT-2 always has biases in its LayerNorms and projections: zeros compute what none do
            out[key.removesuffix("weight") + "bias"] = torch.zeros(t.shape[0])
    return out


def _llama_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"]}
    out["model.norm.weight"] = state["transformer.ln_f.weight"]
    leaves = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ln_2.weight"]
        for leaf in leaves:
            # c_attn's rows are q, k, v in turn; c_fc's are the gate (w1), then the up projection (w3)
            q, k, v = state[f"{ours}attn.c_attn.{leaf}"].chunk(3)
            gate, up = state[f"{ours}mlp.c_fc.{leaf}"].chunk(2)
            out |= {
                f"{theirs}self_attn.q_proj.{leaf}": q,
                f"{theirs}self_attn.k_proj.{leaf}": k,
                f"{theirs}self_attn.v_proj.{leaf}": v,
                f"{theirs}self_attn.o_proj.{leaf}": state[f"{ours}attn.c_proj.{leaf}"],
                f"{theirs}mlp.gate_proj.{leaf}": gate,
                f"{theirs}mlp.up_proj.{leaf}": up,
                f"{theirs}mlp.down_proj.{leaf}": state[f"{ours}mlp.c_proj.{leaf}"],
            }
    return out


_HF_WEIGHTS = {"gpt2": _gpt2_weights, "llama": _llama_weights}
assert set(_HF_WEIGHTS) == set(ARCHS), "every model.arch needs its Hugging Face layout here"
