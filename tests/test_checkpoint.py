"""fedgpt.checkpoint on real files: round trip, atomic writes, truncated and foreign files, prefixes,
compatibility."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY_GPT, tiny_gpt

from fedgpt.checkpoint import (
    FORMAT,
    VERSION,
    check_compatible,
    clean_state_dict,
    load_checkpoint,
    model_config_of,
    model_from_checkpoint,
    save_checkpoint,
)
from fedgpt.config import Config, ModelConfig
from fedgpt.model import GPT

CHAR_META = {"kind": "char", "chars": "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}
VOCAB = len(CHAR_META["chars"])
MCFG = ModelConfig(**TINY_GPT, vocab_size=VOCAB)  # tiny_gpt(VOCAB)'s


def save(path: Path, model: GPT, **kw) -> None:
    cfg = Config()
    cfg.model = model.cfg
    save_checkpoint(
        path,
        model_state=model.state_dict(),
        model_config=model.cfg,
        tokenizer=CHAR_META,
        config=cfg.to_dict(),
        **kw,
    )


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip(tmp_path: Path):
    model = tiny_gpt(VOCAB)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    path = tmp_path / "run" / "last.pt"  # the directory is created
    save(
        path,
        model,
        step=7,
        best_val_loss=2.5,
        val_loss=2.75,
        optimizer=opt.state_dict(),
        extra={"batches": {"pos": 3}},
    )

    ckpt = load_checkpoint(path)
    assert (ckpt["format"], ckpt["version"]) == (FORMAT, VERSION)
    assert (ckpt["step"], ckpt["round"], ckpt["best_val_loss"], ckpt["val_loss"]) == (7, None, 2.5, 2.75)
    assert ckpt["tokenizer"] == CHAR_META
    assert ckpt["config"]["model"] == dataclasses.asdict(MCFG)
    assert ckpt["config"]["train"]["max_steps"] == Config().train.max_steps
    assert model_config_of(ckpt) == MCFG
    assert ckpt["extra"] == {"batches": {"pos": 3}}
    assert_same_weights(ckpt["model"], model.state_dict())

    loaded = model_from_checkpoint(ckpt)
    assert_same_weights(loaded.state_dict(), model.state_dict())
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # weight tying survives the round trip
    opt2 = loaded.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    opt2.load_state_dict(ckpt["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert model_from_checkpoint(ckpt, dropout=0.3).cfg.dropout == 0.3


def test_weights_are_stored_as_float32_cpu(tmp_path: Path):
    model = tiny_gpt(VOCAB).to(torch.bfloat16)
    save(tmp_path / "bf16.pt", model)
    ckpt = load_checkpoint(tmp_path / "bf16.pt")
    assert {t.dtype for t in ckpt["model"].values()} == {torch.float32}
    assert {t.device.type for t in ckpt["model"].values()} == {"cpu"}


def test_save_is_atomic(tmp_path: Path):
    path = tmp_path / "last.pt"
    old, new = tiny_gpt(VOCAB, seed=0), tiny_gpt(VOCAB, seed=1)
    save(path, old, step=1)
    save(path, new, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temp files may be left behind"
    assert load_checkpoint(path)["step"] == 2

    # An exception while saving (a lambda cannot be pickled) must leave the previous file intact, and no temp
    # file.
    with pytest.raises(Exception):  # noqa: B017 - pickling errors differ between Python versions
        save(path, old, step=3, extra={"bad": lambda: None})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 2
    assert_same_weights(ckpt["model"], new.state_dict())


def test_truncated_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "last.pt"
    save(path, tiny_gpt(VOCAB))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"unreadable \(truncated or not a torch file"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(path)


def test_foreign_files_are_clear_errors(tmp_path: Path):
    plain = tmp_path / "state_dict.pt"
    torch.save(tiny_gpt(VOCAB).state_dict(), plain)
    with pytest.raises(ValueError, match="is not a fedgpt checkpoint.*hf:DIR"):
        load_checkpoint(plain)
    text = tmp_path / "notes.txt"
    text.write_text("ROMEO: not a checkpoint\n")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(text)
    future = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1}, future)
    with pytest.raises(ValueError, match=f"version {VERSION + 1}"):
        load_checkpoint(future)


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="not found.*fedgpt.local_train"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path)  # a directory is not a checkpoint either


def test_clean_state_dict_strips_prefixes():
    t = torch.zeros(1)
    got = clean_state_dict(
        {
            "_orig_mod.lm_head.weight": t,
            "module.transformer.wte.weight": t,
            "module._orig_mod.transformer.ln_f.weight": t,
            "_orig_mod.module.a": t,
            "transformer.h.0._orig_mod.attn.c_attn.weight": t,
            "plain": t,
        }
    )
    assert set(got) == {
        "lm_head.weight",
        "transformer.wte.weight",
        "transformer.ln_f.weight",
        "a",
        "transformer.h.0.attn.c_attn.weight",
        "plain",
    }


def test_compiled_model_saves_plain_keys(tmp_path: Path):
    model = tiny_gpt(VOCAB)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it runs, but state_dict has the prefix
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_checkpoint(
        tmp_path / "c.pt",
        model_state=compiled.state_dict(),
        model_config=model.cfg,
        tokenizer=CHAR_META,
        config=Config().to_dict(),
    )
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert_same_weights(ckpt["model"], model.state_dict())
    model_from_checkpoint(ckpt)  # load_state_dict is strict: any leftover prefix would fail here


def test_check_compatible_names_the_differing_keys(tmp_path: Path):
    save(tmp_path / "c.pt", tiny_gpt(VOCAB))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    check_compatible(ckpt, MCFG, "c.pt")
    check_compatible(ckpt, dataclasses.replace(MCFG, dropout=0.2), "c.pt")  # dropout may differ
    with pytest.raises(ValueError) as e:
        check_compatible(ckpt, dataclasses.replace(MCFG, n_layer=3, n_embd=64, arch="llama"), "c.pt")
    msg = str(e.value)
    assert "model.n_layer: checkpoint 2 vs config 3" in msg
    assert "model.n_embd: checkpoint 32 vs config 64" in msg
    assert "model.arch" in msg and "c.pt" in msg
    assert "model.block_size" not in msg and "model.n_head" not in msg
