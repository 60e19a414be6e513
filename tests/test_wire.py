"""What crosses the wire (fedgpt.fed.wire.Exchange): one flat array, tied weights once; records that say what
they hold; fp16 and int8 / int4 updates against a hand-computed quantizer, and their sizes; updates taken
against exactly what the client received (an fp16 downlink's rounding never accumulates); error feedback
through the client's own round (fedgpt.fed.client.fit, in process); misfit records refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import REPO, TINY, fit_in_process, tiny_gpt
from flwr.app import ArrayRecord

from fedgpt.config import Config, load_config
from fedgpt.fed.wire import FORMAT_IDS, HEADER, Exchange, decode, encode, header
from fedgpt.formats import FORMATS, dequantize, markdown_table, quantize
from fedgpt.model import GPT


@pytest.fixture
def gpt() -> GPT:
    return tiny_gpt()


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
    back = dequantize(codes, scales, bits, block, 1000)
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


# ---- the table of formats (fedgpt/formats.py), fp8, and error feedback for every quantized uplink


def test_the_readme_table_of_wire_formats_is_the_code_table():
    text = (REPO / "README.md").read_text()
    start, end = "<!-- wire-formats:start -->\n", "\n<!-- wire-formats:end -->"
    assert start in text and end in text, "README lacks the wire-formats markers"
    assert text.split(start)[1].split(end)[0] == markdown_table(), (
        "README's table of wire formats is stale: paste `python -m fedgpt.formats` into it"
    )


def test_fp8_rounds_each_value_to_e4m3_of_its_block_scale():
    # By hand, one block of 8 scaled so that its largest, 1.0, is e4m3's largest, 448 (scale 1/448). e4m3 has
    # 3 mantissa bits: in [2^e, 2^(e+1)) its values are 2^(e-3) apart. 0.5 -> 224 is one; 0.3 -> 134.4 lies in
    # [128, 256), step 16: 128; -0.1 -> -44.8 in [32, 64), step 4: -44; 0.001 -> 0.448 in [0.25, 0.5), step
    # 2^-5: 0.4375; 1e-6 -> 4.5e-4, under half of the smallest subnormal 2^-9: 0.
    x = torch.tensor([1.0, 0.5, 0.3, -0.1, 0.001, 1e-6, 0.0, -1.0])
    back = decode(encode(x, "update", "fp8", 8))
    expected = torch.tensor([448, 224, 128, -44, 0.4375, 0, 0, -448]) / 448
    torch.testing.assert_close(back, expected, rtol=1e-6, atol=0)


def test_fp8_round_trip_error_bound_size_and_place_between_int8_and_int4(gpt):
    # e4m3 rounds to nearest with 3 mantissa bits: a scaled value v in [2^e, 2^(e+1)) is off by at most half
    # its step 2^(e-3), i.e. 2^-4 |v|; below the smallest normal 2^-6 the step is 2^-9, so at most 2^-10. In
    # x's units (v = x / s, s = the block's largest / 448): |error| <= max(2^-4 |x|, 2^-10 s).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 20, generator=g) * torch.rand(1 << 20, generator=g) ** 4  # magnitudes over decades
    back = decode(encode(x, "update", "fp8", 256))
    s = x.view(-1, 256).abs().amax(dim=1).repeat_interleave(256) / 448
    bound = torch.maximum(x.abs() / 16, s / 1024) * (1 + 1e-6)
    assert bool(((back - x).abs() <= bound).all())
    assert bool(((back - x).abs() > 0.9 * x.abs() / 16).any())  # and the bound is reached: it is e4m3's
    # a random-normal tensor: fp8 errs more than int8's even grid and far less than int4's
    x = torch.randn(1 << 20, generator=g)
    err = {
        f: float((decode(encode(x, "update", f, 256)) - x).norm() / x.norm()) for f in ("int8", "fp8", "int4")
    }
    assert err["int8"] < err["fp8"] < 0.04 < err["int4"]
    # a byte a value and an fp32 scale per block, as int8, through the whole exchange
    ex = exchange_of(gpt, uplink="fp8", quant_block=256)
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    sent = ex.downlink(base, base_id=5)
    update = ex.difference(trained_from(base), base)
    record, residual = ex.uplink(update, sent)
    assert record["codes"].dtype == "uint8" and residual is not None  # e4m3 bytes; quantized: error feedback
    n = ex.size
    assert record.count_bytes() <= n + 4 * -(-n // 256) + 3 * 200
    back = ex.difference(ex.apply(record, base, sent, "node 1"), base)
    assert float((back - update).norm() / update.norm()) < 0.04


@pytest.mark.parametrize(
    "declared,sent",
    [("fp8", "int8"), ("int8", "fp8"), ("int4", "fp8"), ("fp8", "int4"), ("fp16", "fp32"), ("fp8", "sparse")],
)
def test_a_record_is_decoded_as_its_header_declares_and_refused_when_its_arrays_are_another_format(
    gpt, declared, sent
):
    x = torch.linspace(-1, 1, 1000)
    record = encode(x, "update", sent, 64)
    arrays = {k: torch.from_numpy(record[k].numpy().copy()) for k in record}
    arrays[HEADER][1] = FORMAT_IDS.index(declared)
    with pytest.raises(
        ValueError,
        match=f"node 3 sent a {declared} record whose arrays differ from the "
        f"{declared} format its header declares",
    ):
        decode(ArrayRecord(arrays), "node 3")
    # the server's apply refuses it the same way, before anything is decoded
    ex = exchange_of(nn_of(1000), uplink=declared, quant_block=64)
    lying = ArrayRecord(arrays | {HEADER: arrays[HEADER].clone()})
    sent_down = ex.downlink({"weight": torch.zeros(1000, 1)}, base_id=0)
    with pytest.raises(
        ValueError, match=f"node 3 sent an update whose arrays differ from the {declared} format"
    ):
        ex.apply(lying, {"weight": torch.zeros(1000, 1)}, sent_down, "node 3")


def nn_of(n: int) -> torch.nn.Module:
    """A one-tensor model of n values: an exchange of exactly n values."""
    return torch.nn.Linear(1, n, bias=False)


# Every quantized uplink, by name: the table (fedgpt.formats.FORMATS) must give each error feedback. For each,
# a constant update u, K rounds, and by hand: what one round without error feedback sends of u's small values
# (q), and how far from K u the K rounds' sum may be with error feedback (one round's error at most).
K, A = 100, 0.01
EF_CASES = {
    # in each block of 64, a 1.0 (the block's scale) and 63 values of A
    "int8": dict(q=round(A * 127) / 127, bound=0.5 / 127),  # 1.27 steps of 1/127 round to 1; half a step
    "int4": dict(q=0.0, bound=0.5 / 7),  # 0.07 steps of 1/7 round to 0; half a step
    "fp8": dict(q=4.5 / 448, bound=A / 15),  # 4.48 rounds to 4.5 (step 0.5 in [4, 8)); r <= (A + r) / 16
    # every value A, a quarter kept a round: all kept are equal, so they travel exactly; without error
    # feedback the same quarter goes every round and the rest never; with it, each quarter in turn, a value
    # waiting at most 3 rounds (a residual of at most 3 A)
    "sparse": dict(q=0.0, bound=3 * A),
}


def test_every_quantized_format_has_an_error_feedback_case():
    assert {name for name, f in FORMATS.items() if f.quantized} == set(EF_CASES)


def sent_over_rounds(fmt: str, error_feedback: bool, u: torch.Tensor) -> torch.Tensor:
    """The sum of what K rounds of the constant update u send (as the server decodes them), the client
    carrying its residual from round to round as fedgpt.fed.client does."""
    cfg = load_config(None, [f"--fed.uplink={fmt}", f"--fed.error_feedback={str(error_feedback).lower()}",
                             "--fed.quant_block=64", "--fed.sparse_fraction=0.25"])  # fmt: skip
    ex = Exchange.of(nn_of(u.numel()), cfg)  # error feedback as the config and the table say
    sent = ex.downlink({"weight": torch.zeros(u.numel(), 1)}, base_id=1)
    total, residual = torch.zeros_like(u), None
    for _ in range(K):
        record, residual = ex.uplink(u, sent, residual)
        total += decode(record)
    return total


@pytest.mark.parametrize("fmt", list(EF_CASES))
def test_error_feedback_keeps_the_accumulated_error_of_every_quantized_uplink_within_one_round(fmt):
    n, case = 1024, EF_CASES[fmt]
    u = torch.full((n,), A)
    if fmt != "sparse":
        u[::64] = 1.0
    # without error feedback, the same error every round: K times it, by hand
    without = sent_over_rounds(fmt, False, u)
    if fmt == "sparse":  # the same quarter (ties: whichever) every round, the rest never
        expected = torch.tensor([0.0] * (3 * n // 4) + [K * A] * (n // 4))
        torch.testing.assert_close(without.sort().values, expected, rtol=1e-4, atol=0)
    else:
        small = u == A
        torch.testing.assert_close(
            without[small], torch.full_like(without[small], K * case["q"]), rtol=1e-4, atol=0
        )
    worst_without = float((without - K * u).abs().max())
    assert worst_without > 5 * case["bound"]  # so the check below can fail
    # with it, what went out over the K rounds is K u but for the last residual
    with_ef = sent_over_rounds(fmt, True, u)
    worst = float((with_ef - K * u).abs().max())
    assert worst <= case["bound"] * (1 + 1e-4) + 1e-6, (
        f"{fmt}: after {K} rounds the sent sum is {worst:.3g} from the true sum (one round's error: "
        f"{case['bound']:.3g}; without error feedback: {worst_without:.3g}): is error feedback on for {fmt}?"
    )


def test_the_format_table_is_checked_at_import():
    # a format whose codec sends other arrays than it declares, or that feeds back error it never makes
    from fedgpt.formats import check_table, scaled_layout

    fp8 = FORMATS["fp8"]
    check_table({"fp8": fp8})  # fine
    with pytest.raises(ImportError, match="wire format fp8 .* encodes .*'uint8'.* not its layout .*'int8'"):
        check_table({"fp8": dataclasses.replace(fp8, layout=scaled_layout("int8", 1))})
    with pytest.raises(ImportError, match="wire format fp16 .* has error feedback but is not quantized"):
        check_table({"fp16": dataclasses.replace(FORMATS["fp16"], error_feedback=True)})
    with pytest.raises(ImportError, match="wire format fp32 .* directions \\('sideways',\\)"):
        check_table({"fp32": dataclasses.replace(FORMATS["fp32"], directions=("sideways",))})
