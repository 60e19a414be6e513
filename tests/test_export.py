"""python -m fedgpt.export: the Hugging Face folder computes fedgpt's logits, generates its greedy text and
tokenizes as fedgpt does, in transformers (GPT-2 and Llama-style, char and BPE, LoRA merged); writes are
atomic and bad input gets one clear line."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_gpt

from fedgpt import export as export_module
from fedgpt.checkpoint import save_checkpoint
from fedgpt.config import LoRAConfig, TrainConfig
from fedgpt.data import Batches
from fedgpt.export import main
from fedgpt.generate import generate
from fedgpt.hf import from_hf
from fedgpt.lora import add_lora, merged_state
from fedgpt.model import GPT
from fedgpt.tokenizer import BPETokenizer, CharTokenizer
from fedgpt.train import Trainer

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
    "Is't a verdict?\n\nAll:\nNo more talking on't; let it be done: away, away!\n"
) * 4
# What fedgpt's BPE must split as transformers does: contractions, runs of spaces, digits, accents, CJK,
# emoji (bytes without a token of their own), a tab, and a literal <|endoftext|>, which is plain text
BPE_SAMPLE = (
    "ROMEO:\nBut soft! what light through yonder window breaks? 'Tis the east,   and   Juliet's the sun.\n\n"
    "It's 1597 (or 1,597.5);\tnaïve café — 日本語 🙂 <|endoftext|>you'll   \n\n  end"
)
CHAR_SAMPLE = "All:\nWe know't, we know't.  Speak,  speak!\n\n"
CASES = [("gpt2", "char"), ("gpt2", "gpt2"), ("llama", "char"), ("llama", "gpt2")]
BLOCK = 32  # a prompt of 4 tokens and 20 greedy ones fit: transformers does not crop the context as fedgpt


def relative_gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest logit difference over the largest logit."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


def trained(arch: str, tok, lora: LoRAConfig | None = None, bias: bool = False, steps: int = 5) -> GPT:
    """A tiny GPT trained a few steps on TEXT (with `lora`: then its adapters a few more), in eval mode."""
    model = tiny_gpt(tok.vocab_size, arch=arch, block_size=BLOCK, bias=bias)
    data = np.array(tok.encode(TEXT))
    tc = TrainConfig(batch_size=4, learning_rate=1e-2, warmup_steps=0, min_lr=1e-2, weight_decay=0.0)
    Trainer(model, tc, torch.device("cpu"), log=None).train_steps(Batches(data, BLOCK, 4, seed=0), steps)
    if lora is not None:
        add_lora(model, lora)
        Trainer(model, tc, torch.device("cpu"), log=None).train_steps(Batches(data, BLOCK, 4, seed=1), steps)
    return model.eval()


def tokenizer(kind: str):
    return CharTokenizer.from_text(TEXT) if kind == "char" else BPETokenizer()


def checkpoint(path, model: GPT, tok, state: dict | None = None, lora: LoRAConfig | None = None):
    save_checkpoint(
        path,
        model_state=model.state_dict() if state is None else state,
        model_config=model.cfg,
        tokenizer=tok.meta(),
        config={"lora": dataclasses.asdict(lora or LoRAConfig())},
    )
    return path


@pytest.fixture(scope="module")
def transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, tokenizer, folder) of each case, exported once through the command line."""
    done = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in done:
            tok = tokenizer(kind)
            model = trained(arch, tok, bias=kind == "char")  # biases (as GPT-2's own weights) and none
            tmp = tmp_path_factory.mktemp(f"{arch}-{kind}")
            main(["--checkpoint", str(checkpoint(tmp / "ckpt.pt", model, tok)), "--out", str(tmp / "hf")])
            done[arch, kind] = model, tok, tmp / "hf"
        return done[arch, kind]

    return get


def assert_same_model(ours: GPT, folder, tok, transformers) -> float:
    """transformers' model of `folder` gives `ours`' logits (1e-5 of their scale) and greedy 20 tokens."""
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing left at its init
    theirs.eval()
    text = tok.encode(TEXT)
    ids = torch.tensor([text[:BLOCK], text[-BLOCK:]])
    with torch.no_grad():
        want, _ = ours(ids)
        got = theirs(ids).logits
    gap = relative_gap(want, got)
    assert gap <= 1e-5, f"logits differ by {gap:.2e} of their scale"
    prompt = ids[:, :4]
    mine = generate(ours, prompt, 20, temperature=0, eot_id=tok.eot_id)
    hf = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert mine.shape == (2, 24) and torch.equal(hf, mine)
    return gap


@pytest.mark.parametrize("arch,kind", CASES)
def test_transformers_computes_the_same_logits_and_greedy_text(arch, kind, exported, transformers):
    model, tok, folder = exported(arch, kind)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]]
    assert_same_model(model, folder, tok, transformers)


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_auto_tokenizer_gives_fedgpts_ids_and_text(kind, exported, transformers):
    sample = CHAR_SAMPLE if kind == "char" else BPE_SAMPLE
    _, tok, folder = exported("gpt2", kind)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ids = theirs(sample)["input_ids"]
    assert ids == tok.encode(sample)
    assert theirs.decode(ids) == sample == tok.decode(ids)
    if kind == "gpt2":
        assert theirs.eos_token_id == tok.eot_id == 50256 and len(theirs) == tok.vocab_size
        assert "<|endoftext|>" in theirs.decode([tok.eot_id])


@pytest.mark.parametrize("saved", ["merged", "adapters"])
def test_a_lora_model_exports_merged(saved, tmp_path, transformers):
    # "merged": what the ServerApp writes (its checkpoints hold the merged GPT); "adapters": a checkpoint of
    # the adapted model itself, which export merges first
    lora = LoRAConfig(rank=4, alpha=8.0, targets="attn,mlp,embedding")
    tok = tokenizer("char")
    model = trained("llama", tok, lora)
    state = merged_state(model) if saved == "merged" else model.state_dict()
    assert any("lora_B" in k for k in state) == (saved == "adapters")
    ckpt = checkpoint(tmp_path / "c.pt", model, tok, state, lora)
    main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])
    assert_same_model(model, tmp_path / "hf", tok, transformers)  # the adapted model's own logits


def test_the_parity_check_catches_a_wrong_rope_layout(exported, transformers):
    # Meta's Llama weights pair q/k dimensions (2i, 2i + 1); transformers' rotate_half pairs (i, i + hs/2), as
    # fedgpt does. Exporting q and k with Meta's row order must break the logits.
    model, tok, folder = exported("llama", "char")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hs = model.cfg.n_embd // model.cfg.n_head
    interleave = torch.arange(hs).view(2, hs // 2).t().reshape(-1)  # rows 0, hs/2, 1, hs/2 + 1, ...
    rows = (torch.arange(model.cfg.n_head)[:, None] * hs + interleave).reshape(-1)
    with torch.no_grad():
        for layer in theirs.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(proj.weight[rows])
        ids = torch.tensor([tok.encode(CHAR_SAMPLE)[:BLOCK]])
        assert relative_gap(model(ids)[0], theirs(ids).logits) > 1e-3


def test_an_exported_gpt2_reads_back_through_from_hf(exported):
    model, tok, folder = exported("gpt2", "char")
    back = from_hf(folder).eval()  # fedgpt's own reader, with the safetensors package
    ids = torch.tensor([tok.encode(CHAR_SAMPLE)[:BLOCK]])
    torch.testing.assert_close(back(ids)[0], model(ids)[0], rtol=0, atol=1e-6)
    (folder.parent / "broken").mkdir()
    (folder.parent / "broken" / "config.json").write_text((folder / "config.json").read_text())
    (folder.parent / "broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        from_hf(folder.parent / "broken")


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_the_folder_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    tok = tokenizer("char")
    model = tiny_gpt(tok.vocab_size)
    ckpt = str(checkpoint(tmp_path / "c.pt", model, tok))
    out = tmp_path / "hf"
    out.mkdir()
    main(["--checkpoint", ckpt, "--out", str(out)])  # an empty folder may be written into
    written = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(written)
    assert oct(os.stat(out / "model.safetensors").st_mode & 0o777) == oct(
        os.stat(out / "config.json").st_mode & 0o777
    )  # safetensors writes 0600: the weights are as readable as the rest
    assert "pass --overwrite" in error_of(["--checkpoint", ckpt, "--out", str(out)])
    (out / "mine.txt").write_text("a file of the user's")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        main(["--checkpoint", ckpt, "--out", str(out), "--overwrite"])
    assert (out / "mine.txt").is_file()  # the old folder stays as it was
    with pytest.raises(OSError, match="disk full"):
        main(["--checkpoint", ckpt, "--out", str(tmp_path / "new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "hf"]  # no half export, no temp folder
    monkeypatch.undo()
    main(["--checkpoint", ckpt, "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == written  # replaced: the user's file went with the old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "hf"]


def test_bad_input_gets_one_line_that_says_what_to_do(tmp_path):
    out = str(tmp_path / "hf")
    assert "not found" in error_of(["--checkpoint", str(tmp_path / "nope.pt"), "--out", out])
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    assert "not a fedgpt checkpoint" in error_of(["--checkpoint", str(tmp_path / "foreign.pt"), "--out", out])
    (tmp_path / "file").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a model")
    message = error_of(
        ["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "mine"), "--overwrite"]
    )
    assert "holds no config.json" in message and (tmp_path / "mine" / "notes.txt").is_file()
    assert "is a file" in error_of(
        ["--checkpoint", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "file")]
    )
    tok = tokenizer("char")
    model = tiny_gpt(tok.vocab_size, head_bias=True)
    ckpt = checkpoint(tmp_path / "bias.pt", model, tok)
    assert "head bias" in error_of(["--checkpoint", str(ckpt), "--out", out])
    wrong = {k: v for k, v in model.state_dict().items() if k != "lm_head.bias"}
    ckpt = checkpoint(tmp_path / "wrong.pt", model, tok, wrong)
    assert "do not fit its model_config" in error_of(["--checkpoint", str(ckpt), "--out", out])
    assert not (tmp_path / "hf").exists()
