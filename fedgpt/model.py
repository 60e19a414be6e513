"""Decoder-only transformers in one file: GPT-2 (nanoGPT-style) and a Llama-style variant.

    # ModelConfig: fedgpt/config.py, one field per knob
    model = GPT(ModelConfig(arch="gpt2", vocab_size=65))
    logits, loss = model(idx, targets)                      # (B, T, vocab), scalar

The KV cache lives here with the model (model.new_cache(batch)); the sampling loop in fedgpt/generate.py,
Hugging Face loading in fedgpt/hf.py.

Both architectures share one module layout (transformer.wte/h/ln_f, lm_head, and inside each
block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj), so parameter names match
nanoGPT and Hugging Face GPT-2, and the same init and weight-decay rules apply to both.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from fedgpt.config import ModelConfig, TrainConfig
from fedgpt.config_rules import ARCHS
from fedgpt.ops import gelu_tanh
from fedgpt.optim import FusedAdamW, MuonAdamW, fused_supported


class KVCache:
    """Keys and values of every layer for incremental decoding (GPT.new_cache makes one). A forward pass
    reserves its positions, each layer writes its keys and values there, and the pass moves the cache on."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int):
        self.batch_size, self.n_head, self.max_len, self.head_size = batch_size, n_head, max_len, head_size
        # Allocated on the first write of each layer, with the dtype and device of the keys that arrive:
        # under autocast they are bf16/fp16, and a float32 cache would hand SDPA mixed dtypes.
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, max_len, hs)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0  # positions filled so far, the same in every layer

    def __len__(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.pos = 0

    def reserve(self, batch_size: int, length: int) -> int:
        """Check that `length` more positions of `batch_size` rows fit; the position they start at."""
        if self.pos + length > self.max_len or batch_size != self.batch_size:
            raise ValueError(
                f"KV cache holds {self.batch_size} rows of {self.max_len} positions, got {batch_size} rows "
                f"reaching position {self.pos + length}"
            )
        return self.pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at the reserved position; return all keys and values so far."""
        if self.k[layer] is None:
            shape = (self.batch_size, self.n_head, self.max_len, self.head_size)
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos + T, hs)

    def advance(self, length: int) -> None:
        """Move on past the positions every layer has now written."""
        self.pos += length


def rope_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE rotation angles, each (length, head_size // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by position; cos and sin are (T, hs // 2)."""
    # Rotates the two halves of each head against each other (Hugging Face Llama's layout, not
    # Meta's interleaved pairs), so Llama checkpoints in HF format would load without permuting q and k.
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.layer_idx = layer_idx

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if kv_cache is not None:
            past = len(kv_cache)
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        mask = None
        if past > 0 and T > 1:
            # SDPA's is_causal aligns the triangle top-left when Lq != Lk, which would hide the cache
            # from the new queries; query i (at position past + i) may see keys 0 .. past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # past == 0: plain causal (flash on CUDA). past > 0 and T == 1: the one new token sees everything.
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nanoGPT uses exact GELU; GPT-2 was trained with the tanh approximation ("gelu_new" in
        # Hugging Face), and matching it keeps from_hf logits equal to the original model's.
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


def swiglu_hidden(n_embd: int) -> int:
    """SwiGLU width: 8/3 of n_embd keeps the parameter count of a 4x GELU MLP; rounded up to 64 for fast
    matmuls."""
    return 64 * math.ceil(int(8 * n_embd / 3) / 64)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = swiglu_hidden(cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)  # gate (w1) and up (w3) fused
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # down (w2)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=1e-5)
    return nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.arch == "llama" else MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        return x + self.mlp(self.ln_2(x))


def is_block_matrix(name: str, p: torch.Tensor) -> bool:
    """A weight matrix of the transformer blocks: what Muon steps (not embeddings, head, norms, biases)."""
    return p.dim() == 2 and name.startswith("transformer.h.")


class GPT(nn.Module):
    """A decoder-only language model; cfg.arch picks GPT-2 or Llama-style blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: "
                "set it to the tokenizer's vocabulary size before building GPT"
            )
        if cfg.arch not in ARCHS:
            raise ValueError(f"model.arch={cfg.arch!r} is not one of {', '.join(ARCHS)}")
        head_size = cfg.n_embd // cfg.n_head
        if cfg.arch == "llama" and head_size % 2:
            raise ValueError(f"model.n_embd / model.n_head = {head_size}: RoPE needs an even head size")
        self.cfg = dataclasses.replace(cfg)  # own copy: crop_block_size must not change the caller's config

        layers = {"wte": nn.Embedding(cfg.vocab_size, cfg.n_embd)}
        if cfg.arch == "gpt2":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        layers["drop"] = nn.Dropout(cfg.dropout)
        layers["h"] = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        layers["ln_f"] = make_norm(cfg)
        self.transformer = nn.ModuleDict(layers)  # parameter order as in nanoGPT and HF GPT-2
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.head_bias)
        # Weight tying: one Parameter, so it is counted, decayed and averaged across clients once.
        self.transformer.wte.weight = self.lm_head.weight
        if cfg.arch == "llama":
            # Derived from the config, so kept out of state_dict (checkpoints and federated updates).
            cos, sin = rope_tables(head_size, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs // 2)
            self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # since each layer adds two of them and the stream's variance would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token embeddings are lm_head too)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for every position, and the mean cross-entropy when targets are given."""
        B, T = idx.size()
        past = 0 if kv_cache is None else len(kv_cache)
        if past + T > self.cfg.block_size:
            raise ValueError(f"sequence length {past + T} exceeds model.block_size={self.cfg.block_size}")
        if kv_cache is not None:
            kv_cache.reserve(B, T)

        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.cfg.arch == "gpt2":
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over B
        else:
            rope = (self.rope_cos[past : past + T], self.rope_sin[past : past + T])  # each (T, hs // 2)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        if kv_cache is not None:
            kv_cache.advance(T)  # only now: every layer wrote at the same offset

        loss = None
        if targets is not None:
            # float32 loss even under autocast: log-softmax over a large vocabulary loses precision in bf16.
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to max_len (default: block_size) positions of batch_size rows."""
        c = self.cfg
        return KVCache(
            c.n_layer, batch_size, c.n_head, min(max_len or c.block_size, c.block_size), c.n_embd // c.n_head
        )

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. GPT-2's 1024 to 256 for fine-tuning on a small corpus)."""
        assert 0 < block_size <= self.cfg.block_size
        self.cfg.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(
                self.transformer.wpe.weight[:block_size].detach().clone()
            )
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        muon: bool = False,
        muon_momentum: float = TrainConfig.muon_momentum,
    ) -> FusedAdamW | MuonAdamW | torch.optim.AdamW:
        """AdamW that decays matrices and embeddings, not biases or norm weights; fused where torch has it.
        With `muon`, the blocks' weight matrices take Muon's step instead (MuonAdamW). A parameter with an
        `lr_scale` attribute (LoRA's embedding rows) gets a group of its own, which the trainer steps at that
        multiple of the schedule's learning rate."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        matrices = [p for n, p in named if muon and is_block_matrix(n, p)]
        taken = {id(p) for p in matrices}
        params = [p for _, p in named if id(p) not in taken and not hasattr(p, "lr_scale")]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ] + [
            {"params": [p], "weight_decay": weight_decay if p.dim() >= 2 else 0.0, "lr_scale": p.lr_scale}
            for _, p in named
            if hasattr(p, "lr_scale")
        ]
        if muon:
            return MuonAdamW(matrices, groups, learning_rate, betas, weight_decay, muon_momentum)
        if fused_supported(device_type):
            return FusedAdamW(groups, lr=learning_rate, betas=betas)
        # torch picks foreach where supported (CUDA)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def estimate_mfu(self, tokens_per_iter: int, dt: float, peak_flops: float = 312e12) -> float:
        """Model flops utilization: achieved flops per second over peak_flops (A100 bf16 by default)."""
        # PaLM appendix B: 6N per token for the matmuls forward and backward, plus attention over T positions.
        c = self.cfg
        L, H, Q, T = c.n_layer, c.n_head, c.n_embd // c.n_head, c.block_size
        flops_per_token = 6 * self.num_params() + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak_flops
