"""On a CUDA device (skipped elsewhere): mixed precision against fp32, compile against eager, flash attention
against the math path, the fused AdamW kernel against torch's, and a node's warm trainer (relay and worker)
answering on the GPU as the in-process client does. `python -m fedgpt.bench gpu` runs these first."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from fedgpt.config import ModelConfig, TrainConfig, load_config
from fedgpt.model import GPT
from fedgpt.optim import FusedAdamW
from fedgpt.train import Trainer

pytestmark = pytest.mark.gpu
V = 65


def model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=128))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        xy = torch.randint(0, V, (8, 65), generator=g).cuda()
        yield xy[:, :-1], xy[:, 1:]


def losses(precision: str, compile: bool = False, steps: int = 30) -> list[float]:
    cfg = TrainConfig(
        precision=precision, compile=compile, learning_rate=3e-3, warmup_steps=0, max_steps=steps
    )
    trainer = Trainer(model(), cfg, torch.device("cuda"), log=None)
    it = batches(steps)
    return [trainer.train_steps(it, 1)["loss"] for _ in range(steps)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_as_fp32_does(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    full, mixed = losses("fp32"), losses(precision)  # fp16 goes through the GradScaler
    assert mixed[-1] < mixed[0] - 0.5
    assert all(abs(a - b) < 0.05 * a for a, b in zip(full, mixed))


def test_compiled_model_trains_as_eager_does():
    eager, compiled = losses("bf16"), losses("bf16", compile=True)
    assert all(abs(a - b) < 0.02 * a for a, b in zip(eager, compiled))


def test_flash_attention_matches_the_math_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = model().cuda().eval()
    x = torch.randint(0, V, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash, _ = m(x)
        with sdpa_kernel(SDPBackend.MATH):
            math_path, _ = m(x)
    torch.testing.assert_close(flash.float(), math_path.float(), rtol=2e-2, atol=2e-2)


def test_fused_adamw_is_torchs_fused_kernel_on_cuda():
    ours, theirs = model().cuda(), model().cuda()
    a = FusedAdamW([{"params": list(ours.parameters()), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    b = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for x, y in batches(5):
        for m, opt in ((ours, a), (theirs, b)):
            m(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_warm_trainer_answers_on_the_gpu_as_the_client_does(data_dir, tmp_path):
    # A node's relay and worker (a real process, over its socket), against fedgpt.fed.client in this process.
    import os

    from conftest import fit_in_process

    from fedgpt.fed import client
    from fedgpt.fed.relay import WorkerClient
    from fedgpt.fed.server import FederatedRun

    cfg = load_config(
        TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path}", "--train.device=cuda"]
    )
    run = FederatedRun(cfg, log=lambda s: None)
    reference = fit_in_process(run, rnd=1)
    client._CACHE.clear()
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700)
    worker = WorkerClient(folder, node_id=1, run_id=1, idle_timeout=60, watch_pid=os.getpid())
    remote = fit_in_process(run, rnd=1, via=worker)
    torch.testing.assert_close(remote, reference, rtol=0, atol=0)
