"""What crosses the wire: one flat array, tied weights once; fp16 updates; int8 / int4 quantized updates
against a hand-computed quantizer, their sizes, and error feedback's bookkeeping; misfit records refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedgpt.config import ModelConfig
from fedgpt.fed.wire import decode, dequantize, encode, from_record, quantize, tied_aliases, to_record
from fedgpt.model import GPT


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=65))


def trained_from(base: dict, scale: float = 1e-2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    trained = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    trained["lm_head.weight"] = trained["transformer.wte.weight"]
    return trained


def test_wire_sends_tied_weights_once(gpt):
    aliases = tied_aliases(gpt)
    assert aliases == {"lm_head.weight": "transformer.wte.weight"}
    sd = gpt.state_dict()
    per_tensor = to_record(sd, aliases, flat=False)  # what strategies average
    assert "lm_head.weight" not in per_tensor and "transformer.wte.weight" in per_tensor
    record = to_record(sd, aliases)  # the wire: one array, tied weights once
    params = sum(v.numel() for k, v in sd.items() if k not in aliases)
    assert len(record) == 1 and all(
        a.dtype == "float32" and tuple(a.shape) == (params,) for a in record.values()
    )
    for rec, like in ((per_tensor, None), (record, sd)):
        back = from_record(rec, aliases, like=like)
        assert set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    torch.manual_seed(1)
    other = GPT(gpt.cfg)
    other.load_state_dict(back)
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied after loading
    assert torch.equal(other.lm_head.weight, sd["lm_head.weight"])


def test_wire_fp16_update_round_trip(gpt):
    aliases = tied_aliases(gpt)
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    trained = trained_from(base)
    record = to_record(trained, aliases, fmt="fp16", base=base)
    assert len(record) == 1 and all(a.dtype == "float16" for a in record.values())
    back = from_record(record, aliases, base=base, like=base)
    for k, v in trained.items():
        delta = v - base[k]
        assert torch.equal(back[k], base[k] + delta.half().float())  # exactly the fp16-rounded update
        assert (
            back[k] - v
        ).abs().max() <= delta.abs().max() * 2**-11 + 1e-6  # fp16 keeps 11 significant bits
    fp32 = to_record(trained, aliases)
    params = sum(v.numel() for k, v in base.items() if k not in aliases)
    assert 0 <= 2 * record.count_bytes() - fp32.count_bytes() <= 256  # half of fp32, but for a header
    assert record.count_bytes() <= 2 * params + 256


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_is_round_to_nearest_on_a_per_block_absmax_grid(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.linspace(1e-4, 1e-1, 1000)  # magnitudes vary across blocks
    x[130:140] = 0.0
    block, levels = 64, 2 ** (bits - 1) - 1
    codes, scales = quantize(x, bits, block)
    assert scales.dtype == torch.float32 and scales.numel() == 16  # ceil(1000 / 64)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8) and codes.numel() == (
        1000 if bits == 8 else 500
    )
    back = dequantize(codes, scales, block, 1000)
    for i in range(16):  # by hand: each block's step is its largest magnitude / levels
        seg = slice(64 * i, min(64 * i + 64, 1000))
        step = x[seg].abs().max() / levels
        expected = torch.round(x[seg] / step) * step if step > 0 else torch.zeros_like(x[seg])
        torch.testing.assert_close(back[seg], expected, rtol=0, atol=1e-7)
        assert (back[seg] - x[seg]).abs().max() <= step / 2 + 1e-9
    assert torch.all(back[130:140] == 0)


@pytest.mark.parametrize("fmt,bits_per_value", [("int8", 8), ("int4", 4)])
def test_quantized_updates_round_trip_and_their_size(gpt, fmt, bits_per_value):
    aliases = tied_aliases(gpt)
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    trained = trained_from(base)
    n = sum(v.numel() for k, v in base.items() if k not in aliases)
    record = to_record(trained, aliases, fmt=fmt, base=base, block=256)
    headers = 3 * 200  # three arrays (codes, scales, block), each with an np.save header
    assert record.count_bytes() <= n * bits_per_value / 8 + 4 * -(-n // 256) + 8 + headers
    back = from_record(record, aliases, base=base, like=base)
    update = torch.cat([(trained[k] - base[k]).reshape(-1) for k in base if k not in aliases])
    sent = torch.cat([(back[k] - base[k]).reshape(-1) for k in base if k not in aliases])
    error = (sent - update).norm() / update.norm()
    assert error < (0.01 if fmt == "int8" else 0.2)  # 127 or 7 steps either side of zero per block
    assert torch.equal(back["lm_head.weight"], back["transformer.wte.weight"])


def test_error_feedback_sends_everything_in_the_end():
    # Quantize an update, carry the error into the next: what was sent over the rounds plus the last error is
    # exactly what there was to send.
    g = torch.Generator().manual_seed(3)
    updates = [torch.randn(500, generator=g) * 1e-3 for _ in range(6)]
    residual, sent = torch.zeros(500), torch.zeros(500)
    for u in updates:
        x = u + residual
        out = decode(encode(x, "int4", 64), 500)
        residual, sent = x - out, sent + out
    torch.testing.assert_close(sent + residual, sum(updates), rtol=0, atol=1e-6)
    assert residual.abs().max() < updates[0].abs().max()  # the carried error stays one step's size


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
def test_wire_from_another_model_is_refused(gpt, fmt):
    aliases = tied_aliases(gpt)
    base = gpt.state_dict()
    record = to_record(base, aliases, fmt=fmt, base=base if fmt.startswith("int") else None)
    smaller = GPT(dataclasses.replace(gpt.cfg, n_layer=1)).state_dict()
    with pytest.raises(ValueError, match="node 7 sent .* values for a model of"):
        from_record(record, aliases, like=smaller, who="node 7")
