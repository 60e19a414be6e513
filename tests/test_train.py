"""fedgpt.train: LR schedule, the training core (overfitting, accumulation, FedProx), evaluation, build_model
errors."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_GPT, tiny_gpt

from fedgpt.checkpoint import save_checkpoint
from fedgpt.config import Config, ModelConfig, TrainConfig
from fedgpt.model import GPT
from fedgpt.train import (
    Schedule,
    Trainer,
    add_proximal_grad,
    build_model,
    evaluate,
    precision_context,
    proximal_term,
)

V = 40
CPU = torch.device("cpu")


def train_cfg(**kw) -> TrainConfig:
    base = dict(
        learning_rate=1e-2,
        min_lr=1e-3,
        warmup_steps=0,
        max_steps=100,
        batch_size=4,
        grad_clip=1.0,
        log_interval=1000,
    )
    return TrainConfig(**{**base, **kw})


def batch(b: int = 4, t: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.randint(0, V, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    return xy[:, :-1], xy[:, 1:]


def repeat(*batches):
    while True:
        yield from batches


def flat(model: GPT) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- learning-rate schedule
# -----------------------------------------------------------------------------------------


def test_lr_warmup_is_linear_and_peaks_at_warmup():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    warm = [Schedule.of(cfg).lr(s) for s in range(10)]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d > 0 for d in steps)
    assert max(steps) - min(steps) < 1e-12, "warmup must be linear"
    assert warm[-1] < cfg.learning_rate
    assert Schedule.of(cfg).lr(10) == pytest.approx(cfg.learning_rate)
    assert max(Schedule.of(cfg).lr(s) for s in range(100)) == pytest.approx(cfg.learning_rate)


def test_lr_cosine_ends_at_min_lr_at_the_decay_step():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    lrs = [Schedule.of(cfg).lr(s) for s in range(10, 101)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), "cosine decay must be monotone"
    assert Schedule.of(cfg).lr(100) == pytest.approx(cfg.min_lr)
    assert Schedule.of(cfg).lr(55) == pytest.approx(
        (cfg.learning_rate + cfg.min_lr) / 2
    )  # halfway through the cosine
    assert Schedule.of(cfg).lr(500) == cfg.min_lr
    # lr_decay_steps sizes the decay instead of max_steps
    assert Schedule.of(dataclasses.replace(cfg, lr_decay_steps=40)).lr(40) == pytest.approx(cfg.min_lr)
    assert Schedule.of(dataclasses.replace(cfg, lr_decay_steps=40)).lr(39) > cfg.min_lr


def test_lr_constant_without_decay():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=5, max_steps=100, decay_lr=False)
    assert Schedule.of(cfg).lr(2) < cfg.learning_rate
    assert {Schedule.of(cfg).lr(s) for s in range(5, 300)} == {cfg.learning_rate}


# --- training core
# --------------------------------------------------------------------------------------------------


def test_loss_falls_when_overfitting_one_batch():
    trainer = Trainer(tiny_gpt(V), train_cfg(), CPU, log=None)
    x, y = batch()
    with torch.no_grad():
        before = trainer.model(x, y)[1].item()
    out = trainer.train_steps(repeat((x, y)), num_steps=30)
    with torch.no_grad():
        after = trainer.model(x, y)[1].item()
    assert trainer.step == 30 and out["steps"] == 30
    assert out["tokens"] == 30 * x.numel()
    assert after < before - 1.0, f"loss {before:.3f} -> {after:.3f}"
    assert out["loss"] < before


def test_gradient_accumulation_equals_a_bigger_batch():
    x, y = batch(b=8, seed=3)
    cfg = train_cfg(weight_decay=0.1)
    a = Trainer(tiny_gpt(V), cfg, CPU, log=None)
    b = Trainer(tiny_gpt(V), cfg, CPU, log=None)
    assert torch.equal(flat(a.raw_model), flat(b.raw_model))
    out_a = a.train_steps(repeat((x[:4], y[:4]), (x[4:], y[4:])), num_steps=1, grad_accum_steps=2)
    out_b = b.train_steps(repeat((x, y)), num_steps=1, grad_accum_steps=1)
    # Adam divides by sqrt(v) + eps, which magnifies float noise in near-zero gradients: 1e-5 is 0.1% of this
    # step.
    torch.testing.assert_close(flat(a.raw_model), flat(b.raw_model), atol=1e-5, rtol=0)
    # Adam is blind to the gradients' scale, so check it on the loss and the (pre-clip) gradient norm.
    assert out_a["loss"] == pytest.approx(out_b["loss"], rel=1e-5)
    assert out_a["grad_norm"] == pytest.approx(out_b["grad_norm"], rel=1e-5)
    assert out_a["tokens"] == out_b["tokens"] == x.numel()
    # one micro-batch alone is a different step, so the comparison above can fail
    c = Trainer(tiny_gpt(V), cfg, CPU, log=None)
    c.train_steps(repeat((x[:4], y[:4])), num_steps=1, grad_accum_steps=1)
    assert (flat(c.raw_model) - flat(b.raw_model)).abs().max() > 1e-3


def test_add_proximal_grad_is_the_gradient_of_the_proximal_term():
    mu = 0.3
    model = tiny_gpt(V)
    ref = [p.detach().clone() for p in tiny_gpt(V, seed=5).parameters()]
    params = list(model.parameters())
    x, y = batch()
    model(x, y)[1].backward()
    loss_grads = [p.grad.clone() for p in params]
    add_proximal_grad(params, ref, mu)

    # autograd of (mu/2)·Σ‖w − w_ref‖² on a copy
    copy_model = copy.deepcopy(model)
    cparams = list(copy_model.parameters())
    term = 0.5 * mu * sum(((p - r) ** 2).sum() for p, r in zip(cparams, ref))
    auto = torch.autograd.grad(term, cparams)
    for p, r, g0, g in zip(params, ref, loss_grads, auto):
        torch.testing.assert_close(p.grad - g0, g, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(g, mu * (p.detach() - r), atol=1e-7, rtol=1e-6)
    assert any(g.abs().max() > 1e-4 for g in auto)
    expected = sum(((p.detach() - r) ** 2).sum() for p, r in zip(params, ref)).item()
    assert proximal_term(params, ref).item() == pytest.approx(expected, rel=1e-6)


def test_proximal_term_pulls_weights_toward_ref():
    x, y = batch(seed=7)
    ref = [p.detach().clone() for p in tiny_gpt(V).parameters()]
    dist = {}
    for mu in (0.0, 1.0):
        trainer = Trainer(tiny_gpt(V), train_cfg(grad_clip=0.0, weight_decay=0.0), CPU, log=None)
        trainer.train_steps(repeat((x, y)), num_steps=20, mu=mu, ref=ref if mu else None)
        dist[mu] = proximal_term(list(trainer.raw_model.parameters()), ref).item()
    assert dist[1.0] < 0.8 * dist[0.0], dist
    with pytest.raises(ValueError, match="ref"):
        Trainer(tiny_gpt(V), train_cfg(), CPU, log=None).train_steps(repeat((x, y)), num_steps=1, mu=0.1)


def test_trainer_logs_one_line_per_log_interval():
    lines = []
    trainer = Trainer(tiny_gpt(V), train_cfg(log_interval=2), CPU, log=lines.append)
    trainer.train_steps(repeat(batch()), num_steps=5)
    assert len(lines) == 2
    assert lines[0].startswith("step      2 | loss ") and "tok/s" in lines[0] and "mfu -" in lines[0]


# --- evaluation and precision
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_mean_loss_and_ppl_and_restores_mode(training: bool):
    model = tiny_gpt(V, dropout=0.5)
    model.train(training)
    batches = [batch(seed=s) for s in range(3)]
    model.eval()
    with torch.no_grad():
        expected = [model(x, y)[1].item() for x, y in batches]
    model.train(training)
    out = evaluate(model, iter(batches), iters=3)
    assert model.training is training
    # eval mode: dropout off, so deterministic
    assert out["loss"] == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]), rel=1e-6)


def test_precision_context_on_cpu():
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        precision_context("fp16", CPU)
    ctx, scaler, name = precision_context("auto", CPU)
    assert (scaler, name) == (None, "fp32")
    _, scaler, name = precision_context("bf16", CPU)
    assert (scaler, name) == (None, "bf16")


# --- build_model
# ----------------------------------------------------------------------------------------------------


CHAR_META = {"kind": "char", "chars": "".join(chr(ord("a") + i) for i in range(26))}


def tiny_config(**train) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(**TINY_GPT)
    cfg.train = dataclasses.replace(cfg.train, **train)
    return cfg


def test_build_model_from_scratch_takes_the_tokenizer_vocab():
    model = build_model(tiny_config(), CHAR_META, 26)
    assert model.cfg.vocab_size == 26
    cfg = tiny_config()
    cfg.model.vocab_size = 64
    assert build_model(cfg, CHAR_META, 26).cfg.vocab_size == 64


def test_build_model_rejects_a_vocab_smaller_than_the_tokenizer():
    cfg = tiny_config()
    cfg.model.vocab_size = 10
    with pytest.raises(ValueError, match="model.vocab_size=10 is smaller than the tokenizer's 26"):
        build_model(cfg, CHAR_META, 26)


def test_build_model_rejects_hf_weights_with_a_char_tokenizer(tmp_path: Path):
    with pytest.raises(ValueError, match="data.tokenizer=gpt2"):
        build_model(tiny_config(init_from=f"hf:{tmp_path}"), CHAR_META, 26)


def test_build_model_from_a_checkpoint(tmp_path: Path):
    src = tiny_gpt(26)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path,
        model_state=src.state_dict(),
        model_config=src.cfg,
        tokenizer=CHAR_META,
        config=Config().to_dict(),
    )

    cfg = tiny_config(init_from=str(path))
    cfg.model.block_size = 8  # smaller context: the checkpoint is cropped
    model = build_model(cfg, CHAR_META, 26)
    assert model.cfg.block_size == 8
    torch.testing.assert_close(model.transformer.wpe.weight, src.transformer.wpe.weight[:8])
    torch.testing.assert_close(model.lm_head.weight, src.lm_head.weight)

    other = {"kind": "char", "chars": CHAR_META["chars"][::-1]}
    with pytest.raises(ValueError, match="another tokenizer"):
        build_model(tiny_config(init_from=str(path)), other, 26)
    with pytest.raises(ValueError, match="another tokenizer"):
        build_model(tiny_config(init_from=str(path)), {"kind": "gpt2", "encoding": "r50k_base"}, 50257)
    with pytest.raises(ValueError, match="not found"):
        build_model(tiny_config(init_from=str(tmp_path / "missing.pt")), CHAR_META, 26)


def test_build_model_refuses_a_checkpoint_of_another_architecture(tmp_path: Path):
    src = tiny_gpt(26)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(
        path,
        model_state=src.state_dict(),
        model_config=src.cfg,
        tokenizer=CHAR_META,
        config=Config().to_dict(),
    )
    wider, longer = tiny_config(init_from=str(path)), tiny_config(init_from=str(path))
    wider.model.n_embd, wider.model.n_layer = 64, 3
    longer.model.block_size = 32  # more context than the checkpoint learned positions for
    with pytest.raises(
        ValueError,
        match=r"another architecture .*model.n_layer: checkpoint 2 vs config 3; "
        r"model.n_embd: checkpoint 32 vs config 64",
    ):
        build_model(wider, CHAR_META, 26)
    with pytest.raises(ValueError, match="model.block_size: checkpoint 16 vs config 32"):
        build_model(longer, CHAR_META, 26)
    dropout = tiny_config(init_from=str(path))
    dropout.model.dropout = 0.2  # dropout is training, not architecture
    assert build_model(dropout, CHAR_META, 26).cfg.dropout == 0.2


def test_evaluate_accuracy_counts_right_next_tokens_and_skips_padding():
    model = tiny_gpt(V)
    x, y = batch(seed=0)
    model.eval()
    with torch.no_grad():
        guess = model(x)[0].argmax(dim=-1)
    y = y.clone()
    y[0, :] = guess[0, :]  # row 0: every position right
    y[1, :] = (guess[1, :] + 1) % model.cfg.vocab_size  # row 1: every position wrong
    y[1, 5:] = -1  # ... and padded from position 5: those are not counted
    rows = (x[:2], y[:2])
    out = evaluate(model, iter([rows]), iters=1)
    assert out["accuracy"] == pytest.approx(y.shape[1] / (y.shape[1] + 5))
