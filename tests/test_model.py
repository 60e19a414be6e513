"""Tests of fedgpt.model: causality, KV cache, sampling, Hugging Face parity, init, optimizer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import tiny_gpt

from fedgpt.config import ModelConfig
from fedgpt.generate import generate
from fedgpt.hf import from_hf
from fedgpt.model import GPT, swiglu_hidden
from fedgpt.ops import _SigmoidTanhGELU, gelu_tanh
from fedgpt.optim import FusedAdamW

ARCHS = ["gpt2", "llama"]
V = 50


def randint(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def naive_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache, conditioning on the last block_size tokens."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.cfg.block_size :])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("arch", ARCHS)
def test_causality(arch):
    model = tiny_gpt(V, arch=arch).eval()
    idx = randint(2, 16)
    ref, _ = model(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        out, _ = model(changed)
        torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
        per_pos = (out[:, t:] - ref[:, t:]).abs().amax(dim=(0, 2))  # (16 - t,)
        assert (per_pos > 1e-6).all(), f"positions >= {t} must see token {t}: {per_pos}"


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_matches_full_sequence(arch):
    model = tiny_gpt(V, arch=arch).eval()
    idx = randint(2, 16)
    full, _ = model(idx)

    cache = model.new_cache(2)
    steps = [model(idx[:, :5], kv_cache=cache)[0]]
    steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 16)]
    assert len(cache) == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)

    # a multi-token chunk at an offset must be causal inside the chunk and see the whole cache
    cache = model.new_cache(2)
    chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 5), (5, 9), (9, 16))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="exceeds model.block_size=16"):
        model(idx[:, :1], kv_cache=cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_matches_naive_loop(arch):
    model = tiny_gpt(V, arch=arch).eval()
    prompt = randint(2, 4)
    # 4 + 20 > block_size: the cache fills and generate falls back to re-running the last 16 tokens
    out = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert out.shape == (2, 24)
    assert torch.equal(out, naive_greedy(model, prompt, 20))


def test_generate_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_gpt(V, arch="gpt2").eval()
    prompt = randint(3, 5)
    greedy = generate(model, prompt, 8, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 8, temperature=1.5, top_k=1, generator=g), greedy)
    assert torch.equal(generate(model, prompt, 8, temperature=1.5, top_p=1e-6, generator=g), greedy)
    sampled = generate(model, prompt, 8, temperature=1.0, top_k=10, top_p=0.9, generator=g)
    assert sampled.shape == (3, 13) and torch.equal(sampled[:, :5], prompt)
    assert ((sampled >= 0) & (sampled < V)).all()


def test_generate_stops_at_eot():
    model = tiny_gpt(V, arch="llama").eval()
    prompt = randint(2, 3)
    greedy = generate(model, prompt, 12, temperature=0)
    new = greedy[:, 3:]
    eot = int(new[0, 2])  # row 0 emits it at its third step
    out = generate(model, prompt, 12, temperature=0, eot_id=eot)
    firsts = [(row == eot).nonzero()[0].item() if (row == eot).any() else None for row in new]
    n_gen = 12 if None in firsts else max(firsts) + 1
    assert out.shape == (2, 3 + n_gen)
    for r, first in enumerate(firsts):
        stop = n_gen if first is None else first + 1
        assert torch.equal(out[r, 3 : 3 + stop], new[r, :stop])
        assert (out[r, 3 + stop :] == eot).all(), "finished rows are padded with eot_id"
    # a single row stops right after emitting it
    assert generate(model, prompt[:1], 12, temperature=0, eot_id=eot).shape == (1, 3 + firsts[0] + 1)


def test_generate_crops_long_prompt():
    """Prompts longer than block_size are cropped for conditioning; the output keeps the whole prompt."""
    model = tiny_gpt(V, arch="gpt2").eval()
    prompt = randint(1, 20)
    out = generate(model, prompt, 3, temperature=0)
    assert out.shape == (1, 23) and torch.equal(out[:, :20], prompt)
    assert torch.equal(out, naive_greedy(model, prompt, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_too_long_sequence_raises(arch):
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds model.block_size=16"):
        tiny_gpt(V, arch=arch).eval()(randint(1, 17))


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_tying(arch):
    model = tiny_gpt(V, arch=arch).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1


def test_param_count_formula():
    C, L, bs = 32, 2, 16
    block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    gpt2 = V * C + bs * C + L * block + 2 * C
    assert tiny_gpt(V, arch="gpt2", bias=True).num_params(non_embedding=False) == gpt2
    assert tiny_gpt(V, arch="gpt2", bias=True).num_params() == gpt2 - bs * C

    H = swiglu_hidden(C)
    assert H == 128 and H % 64 == 0 and H >= 8 * C / 3
    llama = V * C + L * (C + 3 * C * C + C * C + C + C * 2 * H + H * C) + C
    llama_model = tiny_gpt(V, arch="llama")
    assert llama_model.num_params() == llama_model.num_params(non_embedding=False) == llama


@pytest.mark.parametrize("arch", ARCHS)
def test_init_std(arch):
    torch.manual_seed(0)
    L = 8
    model = GPT(
        ModelConfig(arch=arch, vocab_size=V, block_size=16, n_layer=L, n_head=4, n_embd=256, bias=True)
    )
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            want = 0.02 / math.sqrt(2 * L)
        elif p.dim() == 2:
            want = 0.02
        elif name.endswith("bias"):
            assert (p == 0).all(), name
            continue
        else:
            continue
        assert abs(p.std().item() / want - 1) < 0.05, f"{name}: std {p.std().item():.5f}, want {want:.5f}"


def test_configure_optimizers_groups():
    model = tiny_gpt(V, arch="llama", bias=True).eval()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) > 0


def test_fused_adamw_on_cpu_matches_plain():
    # bias=False: the attention key bias has a true gradient of zero (softmax ignores a shift shared
    # by all keys), and Adam blows its rounding noise up to full-size steps that differ between kernels.
    model = tiny_gpt(V, arch="gpt2").eval()
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    if not isinstance(opt, FusedAdamW):
        pytest.skip(
            "this torch has no fused AdamW on CPU; configure_optimizers uses the default implementation"
        )
    ref_model = tiny_gpt(V, arch="gpt2").eval()
    ref_model.load_state_dict(model.state_dict())
    groups = [
        {"params": [p for p in ref_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in ref_model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    ref = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False, fused=False)
    x, y = randint(4, 16), randint(4, 16, seed=2)
    for m, o in ((model, opt), (ref_model, ref)):
        m.train()
        for _ in range(5):
            _, loss = m(x, y)
            o.zero_grad()
            loss.backward()
            o.step()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_one_batch(arch):
    model = tiny_gpt(V, arch=arch)  # in training mode, as built
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    x, y = randint(4, 16), randint(4, 16, seed=2)
    losses = []
    for _ in range(50):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses[::10]


def test_loss_ignores_minus_one_and_autocast():
    model = tiny_gpt(V, arch="llama").eval()
    x, y = randint(2, 16), randint(2, 16, seed=2)
    masked = y.clone()
    masked[:, :8] = -1
    logits, loss = model(x, masked)
    want = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, V), y[:, 8:].reshape(-1))
    torch.testing.assert_close(loss, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
        cache = model.new_cache(2)
        model(x[:, :5], kv_cache=cache)
        model(x[:, 5:6], kv_cache=cache)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- Hugging Face GPT-2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_positions=16,
        vocab_size=V,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with (
        torch.no_grad()
    ):  # HF initializes biases to 0 and LayerNorms to 1: perturb all, so every tensor is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "sharded_safetensors", "bin"])
def test_from_hf_parity(hf_model, tmp_path, fmt):
    if fmt == "bin":  # transformers 5 only writes safetensors; this is what safe_serialization=False wrote
        hf_model.config.save_pretrained(tmp_path)
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf_model.save_pretrained(
            tmp_path, **({"max_shard_size": "20KB"} if fmt == "sharded_safetensors" else {})
        )
    if fmt == "sharded_safetensors":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = from_hf(tmp_path).eval()
    assert model.cfg.arch == "gpt2" and model.cfg.block_size == 16 and model.cfg.vocab_size == V
    idx = randint(2, 16)
    with torch.no_grad():
        want = hf_model(idx).logits
    got, _ = model(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cpu_gelu_equals_torch_tanh_gelu():
    # The CPU float32 path computes the tanh GELU through sigmoid (faster); values and gradients must match
    # F.gelu's.
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    want = torch.nn.functional.gelu(x, approximate="tanh")
    got = gelu_tanh(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    g = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0], atol=1e-5, rtol=1e-5
    )
    # gelu_tanh sends float64 to F.gelu: check the Function itself
    xd = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SigmoidTanhGELU.apply, (xd,))


def test_from_hf_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        from_hf(missing)
    with pytest.raises(ValueError, match="config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="expected model_type 'gpt2', got 'llama'"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8, "n_positions": 8, "vocab_size": 10}
        )
    )
    with pytest.raises(ValueError, match="model.safetensors or pytorch_model.bin"):
        from_hf(tmp_path)
