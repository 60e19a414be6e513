"""What crosses the wire (fedgpt.fed.wire.Exchange): one flat array, tied weights once; records that say what
they hold; fp16 and int8 / int4 updates against a hand-computed quantizer, and their sizes; updates taken
against exactly what the client received (an fp16 downlink's rounding never accumulates); error feedback
through the client's own round (fedgpt.fed.client.fit, in process); misfit records refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY, fit_in_process

from fedgpt.config import Config, ModelConfig, load_config
from fedgpt.fed.wire import Exchange, decode, dequantize, encode, header, quantize
from fedgpt.model import GPT


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=65))


def exchange_of(model: GPT, **fed) -> Exchange:
    cfg = Config()
    cfg.fed = dataclasses.replace(cfg.fed, **fed)
    return Exchange.of(model, cfg)


def trained_from(base: dict, scale: float = 1e-2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    trained = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    trained["lm_head.weight"] = trained["transformer.wte.weight"]
    return trained


def test_the_wire_sends_tied_weights_once_and_says_what_it_holds(gpt):
    ex = exchange_of(gpt)
    assert ex.aliases == {"lm_head.weight": "transformer.wte.weight"} and "lm_head.weight" not in ex.names
    sd = gpt.state_dict()
    per_tensor = ex.per_tensor(sd)  # what strategies average
    assert "lm_head.weight" not in per_tensor and "transformer.wte.weight" in per_tensor
    down = ex.downlink(sd, base_id=41)  # the wire: a header and one array, tied weights once
    params = sum(v.numel() for k, v in sd.items() if k not in ex.aliases)
    assert (header(down).kind, header(down).values, header(down).base) == ("weights", params, 41)
    assert down["flat"].dtype == "float32" and tuple(down["flat"].shape) == (params,)
    for back in (ex.from_per_tensor(per_tensor), ex.read_downlink(down)):
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    torch.manual_seed(1)
    other = GPT(gpt.cfg)
    ex.load(other, back)
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied after loading
    assert torch.equal(other.lm_head.weight, sd["lm_head.weight"])
    # a tied weight's change counts once in an update's norm
    trained = {k: v.clone() for k, v in sd.items()}
    trained["transformer.wte.weight"][0, 0] += 3.0  # lm_head.weight is the same tensor in a model
    trained["lm_head.weight"] = trained["transformer.wte.weight"]
    assert float(ex.difference(trained, sd).norm()) == pytest.approx(3.0)
    # updates and weights are not interchangeable
    with pytest.raises(ValueError, match="sent weights where update belong"):
        ex.apply(down, sd, down, "node 7")


def test_fp16_update_round_trip(gpt):
    ex = exchange_of(gpt, uplink="fp16")
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    sent = ex.downlink(base, base_id=3)
    update = ex.difference(trained_from(base), base)
    record, residual = ex.uplink(update, sent)
    assert residual is None and record["flat"].dtype == "float16"
    back = ex.apply(record, base, sent, "node 1")
    torch.testing.assert_close(ex.difference(back, base), update.half().float(), rtol=0, atol=1e-7)
    fp32, _ = exchange_of(gpt).uplink(update, sent)
    assert 0 <= 2 * record.count_bytes() - fp32.count_bytes() <= 512  # half of fp32, but for the headers


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
    ex = exchange_of(gpt, uplink=fmt, quant_block=256)
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    sent = ex.downlink(base, base_id=5)
    update = ex.difference(trained_from(base), base)
    record, _ = ex.uplink(update, sent)
    n, headers = ex.size, 3 * 200  # three arrays (header, codes, scales), each with an np.save header
    assert record.count_bytes() <= n * bits_per_value / 8 + 4 * -(-n // 256) + 40 + headers
    back = ex.apply(record, base, sent, "node 1")
    error = (ex.difference(back, base) - update).norm() / update.norm()
    assert error < (0.01 if fmt == "int8" else 0.2)  # 127 or 7 steps either side of zero per block
    assert torch.equal(back["lm_head.weight"], back["transformer.wte.weight"])


def test_an_fp16_downlink_never_loses_small_updates(gpt):
    # The case: a weight of 1.0, 20 rounds of +3e-4 (under half an fp16 step at 1.0, 2^-11 = 4.9e-4).
    # A client trains from the rounded weights it received and sends only its change; the server adds it to
    # its exact fp32 model: 1.006, as with an fp32 downlink (the rounding of the downlink used to be taken for
    # the client's work, and the weight stayed at 1.0003).
    ex = exchange_of(gpt, downlink="fp16")
    global_state = {k: torch.ones_like(v) for k, v in gpt.state_dict().items()}
    for rnd in range(20):
        sent = ex.downlink(global_state, base_id=rnd)
        received = ex.read_downlink(sent)
        trained = {k: v + 3e-4 for k, v in received.items()}
        record, _ = ex.uplink(ex.difference(trained, received), sent)
        global_state = ex.apply(record, global_state, sent, "node 1")
    w = global_state["transformer.h.0.mlp.c_fc.weight"]
    torch.testing.assert_close(w, torch.full_like(w, 1.006), rtol=0, atol=1e-5)
    # an update against an older downlink is refused, not added
    with pytest.raises(ValueError, match="against another model than this round's"):
        ex.apply(record, global_state, ex.downlink(global_state, base_id=99), "node 1")


def fit_rounds(data_dir, tmp_path, uplink: str, error_feedback: bool, rounds: int = 6) -> list:
    """Client 0's round, run `rounds` times in this process (fedgpt.fed.client.fit, its state store on disk)
    from the same global model; the update each round sends, as the server decodes it."""
    from fedgpt.fed import client
    from fedgpt.fed.server import FederatedRun

    overrides = [f"--fed.uplink={uplink}", f"--fed.error_feedback={str(error_feedback).lower()}"]
    # updates of one size each round; a sparse uplink keeps 30% of each (at 2%, 6 rounds are too few to see
    # its error feedback catch up)
    overrides += [f"--fed.rounds={rounds}", "--train.decay_lr=false", "--fed.sparse_fraction=0.3"]
    out = tmp_path / f"{uplink}-{error_feedback}"
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={out}", *overrides])
    run = FederatedRun(cfg, log=lambda s: None)  # the server's side of the exchange; nothing on disk
    client._CACHE.clear()
    return [fit_in_process(run, rnd) for rnd in range(1, rounds + 1)]


def test_sparse_updates_keep_the_largest_values_on_a_2_bit_grid_and_their_size(gpt):
    ex = exchange_of(gpt, uplink="sparse", sparse_fraction=0.05, quant_block=64)
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    sent = ex.downlink(base, base_id=2)
    update = ex.difference(trained_from(base), base)
    record, residual = ex.uplink(update, sent)
    back = ex.difference(ex.apply(record, base, sent, "node 1"), base)
    k = round(0.05 * ex.size)
    kept = torch.topk(update.abs(), k).indices.sort().values
    assert torch.equal(back.nonzero().view(-1), kept)  # exactly the k largest, the rest zero
    # by hand: each block of 64 kept values (in position order) on +-1/3, +-1 of its largest magnitude
    for i in range(0, k, 64):
        x = update[kept[i : i + 64]]
        scale = x.abs().max()
        expected = (torch.round((x / scale * 3 + 3) / 2).clamp(0, 3) * 2 - 3) / 3 * scale
        torch.testing.assert_close(back[kept[i : i + 64]], expected, rtol=0, atol=1e-7)
    assert residual is not None and torch.allclose(residual, update - back)  # error feedback keeps the rest
    # positions as uint16 within chunks of 65,536, 2 bits a value, a scale per 64: about 2.3 bytes a kept
    # value
    assert record.count_bytes() <= k * 2 + k / 4 + 4 * -(-k // 64) + 4 * -(-ex.size // 2**16) + 5 * 200


@pytest.mark.parametrize("fmt", ["int4", "sparse"])
def test_error_feedback_keeps_quantization_error_from_adding_up_over_rounds(fmt, data_dir, tmp_path):
    # The same client, the same global model every round: the true updates are what an fp32 uplink sends.
    # Without error feedback each round's error (int4's rounding; sparse's dropped values) adds to the last;
    # with it, what was sent over the rounds is the true total but for the one residual still carried.
    true = fit_rounds(data_dir, tmp_path, "fp32", False)
    with_ef = fit_rounds(data_dir, tmp_path, fmt, True)
    without = fit_rounds(data_dir, tmp_path, fmt, False)
    total = sum(true)
    one_round = max(float((w - t).norm()) for w, t in zip(without, true))  # a round's quantization error
    err_with, err_without = float((sum(with_ef) - total).norm()), float((sum(without) - total).norm())
    assert err_without > 1.8 * one_round  # grows with the rounds (6 independent errors: sqrt(6) = 2.4 x)
    assert err_with < 0.5 * err_without  # stays bounded: what is carried goes out in the next rounds
    if fmt == "int4":
        assert err_with < 1.2 * one_round  # within one round's error


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
def test_records_from_another_model_are_refused(gpt, fmt):
    ex = exchange_of(gpt, uplink=fmt)
    sd = gpt.state_dict()
    sent = ex.downlink(sd, base_id=1)
    record, _ = ex.uplink(torch.zeros(ex.size), sent)
    smaller = exchange_of(GPT(dataclasses.replace(gpt.cfg, n_layer=1)), uplink=fmt)
    with pytest.raises(ValueError, match="node 7 sent .* values for a model of"):
        smaller.apply(record, sd, sent, "node 7")
    with pytest.raises(ValueError, match="the server sent .* values for a model of"):
        smaller.read_downlink(sent)
    assert decode(encode(torch.ones(5), "update", fmt, 4)).tolist() == [1.0] * 5
