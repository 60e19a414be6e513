"""fedgpt.optim: FusedAdamW is torch's fused AdamW step for step, shares its state dicts, and imports no
torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_gpt

from fedgpt.model import GPT
from fedgpt.optim import FusedAdamW, fused_supported

V = 40
pytestmark = pytest.mark.skipif(
    not fused_supported("cpu"), reason="this torch has no fused AdamW kernel on CPU"
)


def groups(model: GPT) -> list[dict]:
    return [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]


def train(model: GPT, opt, steps: int, first: int = 0) -> None:
    for i in range(first, first + steps):
        xy = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(i))
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (i + 1) / 8  # a schedule: the lr changes every step
        _, loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def assert_equal(a: GPT, b: GPT) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


def pair() -> tuple[GPT, FusedAdamW, GPT, torch.optim.AdamW]:
    ours, theirs = tiny_gpt(V, bias=False), tiny_gpt(V, bias=False)
    return (
        ours,
        FusedAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95)),
        theirs,
        torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=True),
    )


def test_steps_are_bitwise_torch_fused_adamw():
    ours, opt, theirs, ref = pair()
    train(ours, opt, 6)
    train(theirs, ref, 6)
    assert_equal(ours, theirs)
    assert not torch.equal(next(ours.parameters()), next(tiny_gpt(V, bias=False).parameters())), (
        "training must have moved the weights"
    )


@pytest.mark.parametrize("direction", ["torch to ours", "ours to torch"])
def test_state_dicts_load_either_way(direction):
    ours, opt, theirs, ref = pair()
    train(ours, opt, 3)
    train(theirs, ref, 3)
    # Carry the state across into a fresh optimizer of the other kind; both must continue identically.
    src, dst_kind = (ref, "ours") if direction == "torch to ours" else (opt, "torch")
    model = tiny_gpt(V, bias=False)
    model.load_state_dict(theirs.state_dict())
    dst = (
        FusedAdamW(groups(model), lr=0.0, betas=(0.5, 0.5))
        if dst_kind == "ours"
        else torch.optim.AdamW(groups(model), lr=0.0, betas=(0.5, 0.5), fused=True)
    )
    dst.load_state_dict(src.state_dict())
    assert dst.param_groups[0]["betas"] == (0.9, 0.95) and dst.param_groups[0]["weight_decay"] == 0.1
    train(model, dst, 3, first=3)
    train(theirs, ref, 3, first=3)
    assert_equal(model, theirs)


def test_load_refuses_other_groups():
    ours, opt, _, _ = pair()
    train(ours, opt, 1)
    other = FusedAdamW([{"params": list(tiny_gpt(V, bias=False).parameters())}], lr=1e-2, betas=(0.9, 0.95))
    with pytest.raises(ValueError, match="other parameter groups"):
        other.load_state_dict(opt.state_dict())


def test_training_never_imports_torch_dynamo():
    # The point of FusedAdamW: a process that builds the model, trains and checkpoints pays no torch._dynamo
    # import.
    code = """
import sys, torch
from fedgpt.config import ModelConfig, TrainConfig
from fedgpt.model import GPT
from fedgpt.optim import FusedAdamW
from fedgpt.train import Trainer
model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
tc = TrainConfig(batch_size=2, max_steps=4, warmup_steps=0, grad_clip=1.0)
trainer = Trainer(model, tc, torch.device("cpu"))
def batches():
    while True:
        xy = torch.randint(0, 40, (2, 17))
        yield xy[:, :-1], xy[:, 1:]
trainer.train_steps(batches(), 2)
assert isinstance(trainer.optimizer, FusedAdamW), type(trainer.optimizer)
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", (
        "training imported torch._dynamo (1.5-2 s of start-up in every client process)"
    )


def test_grad_scaler_drives_it_like_torch():
    # fp16 training (CUDA) steps through torch.amp.GradScaler, which only needs param_groups and step(); CPU's
    # scaler runs the same code. Both optimizers see scaled gradients, unscale, step; an inf gradient skips
    # the step.
    ours, opt, theirs, ref = pair()
    for model, o in ((ours, opt), (theirs, ref)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for i in range(3):
            xy = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(i))
            scaler.scale(model(xy[:, :-1], xy[:, 1:])[1]).backward()
            scaler.unscale_(o)
            scaler.step(o)
            scaler.update()
            o.zero_grad()
    assert_equal(ours, theirs)
    before = [p.detach().clone() for p in ours.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(next(ours.parameters()).sum() * float("inf")).backward()
    scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters())), (
        "a step with inf gradients must be skipped"
    )


def test_orthogonalization_is_torchs_newton_schulz_in_any_dtype():
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    from fedgpt.optim import orthogonalize

    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    for shape in [(32, 96), (128, 32)]:  # wide and tall
        g = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
        theirs = _zeropower_via_newtonschulz(g, coefficients, 5, 1e-7)
        assert torch.equal(orthogonalize(g, coefficients, 5, 1e-7, torch.bfloat16), theirs)
        fp32 = orthogonalize(g, coefficients, 5, 1e-7, torch.float32)
        assert fp32.dtype == torch.float32
        torch.testing.assert_close(fp32, theirs.float(), rtol=0, atol=0.03)  # bf16's own rounding
        # what Newton-Schulz is for: singular values pushed from anywhere towards 1 (0.5 to 1.5, not exactly)
        sv = torch.linalg.svdvals(fp32.double())
        assert sv.min() > 0.4 and sv.max() < 1.6, sv
        assert torch.linalg.svdvals(g.double()).max() > 5  # and they were far from it


@pytest.mark.parametrize("momentum", [0.95, 0.7])  # the default, and train.muon_momentum set
def test_muon_is_torchs_muon_on_the_matrices_and_adamw_on_the_rest(tmp_path, momentum):
    # train.optimizer=muon: Muon on the blocks' 2-D weights (torch's algorithm, its orthogonalization in fp32
    # on a CPU), AdamW (torch's fused kernel) on the rest, with one lr schedule, against torch.optim.Muon and
    # torch.optim.AdamW; a state dict round trip (a checkpoint, a client's state) goes on identically.
    from fedgpt.optim import MuonAdamW

    ours, theirs = tiny_gpt(V, bias=False), tiny_gpt(V, bias=False)
    opt = ours.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", muon=True, muon_momentum=momentum)
    assert isinstance(opt, MuonAdamW)
    matrices = [p for n, p in theirs.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")]
    assert len(matrices) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    muon = torch.optim.Muon(
        matrices, lr=1e-2, weight_decay=0.1, momentum=momentum, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    rest = [p for p in theirs.parameters() if all(p is not m for m in matrices)]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        fused=True,
    )

    class Both:
        param_groups = muon.param_groups + adamw.param_groups

        def step(self):
            muon.step()
            adamw.step()

        def zero_grad(self):
            muon.zero_grad()
            adamw.zero_grad()

    start = [p.detach().clone() for p in ours.parameters()]
    train(ours, opt, 3)
    train(theirs, Both(), 3)
    # torch orthogonalizes in bf16: within its rounding (and its effect on the next gradients, so on AdamW's
    # part too) of steps that moved every weight 10x more; a wrong momentum or scaling is as large as a step
    for (name, x), y, x0 in zip(ours.named_parameters(), theirs.parameters(), start, strict=True):
        assert (x - y).abs().max() < 0.1 * (y - x0).abs().max(), name
    # A checkpoint of the optimizer mid-run: reloaded, it goes on exactly as the uninterrupted one.
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    copy = tiny_gpt(V, bias=False)
    copy.load_state_dict(ours.state_dict())
    again = copy.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", muon=True, muon_momentum=momentum)
    again.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(ours, opt, 3, first=3)
    train(copy, again, 3, first=3)
    assert_equal(ours, copy)
    # torch's Muon reads the same state: its momentum buffers
    assert (
        set(opt.state_dict()["muon"]["state"][0]) == set(muon.state_dict()["state"][0]) == {"momentum_buffer"}
    )
    opt.state.clear()
    assert len(opt.state) == 0


@pytest.mark.parametrize("kind", ["fused", "torch"])
def test_first_moments_are_adams_exp_avg_by_name_and_load_alone(kind):
    # After one step Adam's first moment is (1 - beta1) g (Kingma & Ba), by hand from the gradient; loading
    # other first moments replaces exactly those and leaves the second moments and the step count.
    from fedgpt.optim import first_moments, load_first_moments

    model = tiny_gpt(V, bias=False)
    cls = FusedAdamW if kind == "fused" else torch.optim.AdamW
    opt = cls(groups(model), lr=1e-2, betas=(0.9, 0.95))
    xy = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(0))
    model(xy[:, :-1], xy[:, 1:])[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    moments = first_moments(opt, model)
    assert moments.keys() == grads.keys()  # every parameter, the tied embedding and head once
    for n, m in moments.items():
        torch.testing.assert_close(m, 0.1 * grads[n], rtol=1e-6, atol=1e-9)
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    twos = {n: torch.full_like(m, 2.0) for n, m in moments.items()}
    assert load_first_moments(opt, model, twos) == len(twos)
    for p, s in opt.state.items():
        assert torch.equal(s["exp_avg"], torch.full_like(p, 2.0))
        assert (
            torch.equal(s["exp_avg_sq"], before[id(p)]["exp_avg_sq"]) and s["step"] == before[id(p)]["step"]
        )
    with pytest.raises(ValueError, match="the shared moments lack"):
        load_first_moments(opt, model, {})
