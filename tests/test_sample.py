"""fedgpt.sample from checkpoints the local trainer wrote: the CLI end to end, seeds, greedy decoding, BPE,
bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_concurrently

from fedgpt import local_train
from fedgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fedgpt.sample import sample
from fedgpt.tokenizer import get_tokenizer

SEP = "\n" + "-" * 40 + "\n"
TINY = [
    "--config",
    "configs/tiny.yaml",
    "--train.max_steps=4",
    "--train.eval_interval=4",
    "--train.eval_iters=1",
    "--train.device=cpu",
    "--train.log_interval=1000",
]


def train(out: Path, data_dir: Path, *extra: str) -> Path:
    """A few steps of the real local trainer (in this process); returns its last.pt."""
    local_train.main([*TINY, f"--data.data_dir={data_dir}", f"--train.out_dir={out}", *extra])
    return out / "last.pt"


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory, data_dir: Path) -> Path:
    return train(tmp_path_factory.mktemp("char"), data_dir)


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory, data_dir: Path) -> Path:
    return train(tmp_path_factory.mktemp("bpe"), data_dir, "--data.tokenizer=gpt2")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedgpt.sample", *args]


@pytest.fixture(scope="module")
def cli_runs(char_ckpt: Path, bpe_ckpt: Path, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every CLI call of this module, started together: each is mostly interpreter start-up."""
    tmp = tmp_path_factory.mktemp("cli")
    foreign = tmp / "state_dict.pt"
    torch.save(model_from_checkpoint(load_checkpoint(char_ckpt)).state_dict(), foreign)
    common = ["--num-samples", "2", "--max-new-tokens", "20", "--seed", "1"]
    cmds = {
        "char": cli("--checkpoint", str(char_ckpt), "--prompt", "ROMEO:", *common),
        "bpe": cli("--checkpoint", str(bpe_ckpt), "--prompt", "ROMEO:", *common),
        "missing": cli("--checkpoint", str(tmp / "nope.pt"), "--prompt", "ROMEO:"),
        "foreign": cli("--checkpoint", str(foreign), "--prompt", "ROMEO:"),
        "bad_prompt": cli("--checkpoint", str(char_ckpt), "--prompt", "ROMEO: \u4f60\u597d \u00a7"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # TIKTOKEN_CACHE_DIR comes from conftest
    return run_concurrently(cmds, env)


def samples_of(stdout: str) -> list[str]:
    assert stdout.endswith(SEP), stdout[-200:]
    return stdout[: -len(SEP)].split(SEP)


def test_cli_prints_samples_that_continue_the_prompt(cli_runs, char_ckpt: Path):
    r = cli_runs["char"]
    assert r.returncode == 0, r.stderr[-3000:]
    texts = samples_of(r.stdout)
    assert len(texts) == 2
    for t in texts:
        # one token per character, no end-of-text id
        assert t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 20
    # the same seed gives the same text, in this process as in the CLI's; another seed gives other text
    assert sample(str(char_ckpt), "ROMEO:", num_samples=2, max_new_tokens=20, seed=1, device="cpu") == texts
    assert sample(str(char_ckpt), "ROMEO:", num_samples=2, max_new_tokens=20, seed=2, device="cpu") != texts


def test_temperature_zero_is_greedy(char_ckpt: Path):
    a = sample(
        str(char_ckpt), "ROMEO:", num_samples=2, max_new_tokens=12, temperature=0, seed=1, device="cpu"
    )
    b = sample(
        str(char_ckpt), "ROMEO:", num_samples=2, max_new_tokens=12, temperature=0, seed=99, device="cpu"
    )
    assert a == b and a[0] == a[1]
    # the argmax of the model at every step, without a KV cache
    ckpt = load_checkpoint(char_ckpt)
    model, tok = model_from_checkpoint(ckpt).eval(), get_tokenizer(ckpt["tokenizer"])
    ids = torch.tensor([tok.encode("ROMEO:")])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat(
                [ids, model(ids[:, -model.cfg.block_size :])[0][:, -1].argmax(-1, keepdim=True)], dim=1
            )
    assert a[0] == tok.decode(ids[0].tolist())


def test_empty_prompt_and_long_prompt(char_ckpt: Path):
    (text,) = sample(str(char_ckpt), "", max_new_tokens=10, seed=3, device="cpu")
    assert len(text) == 10  # the synthetic start token is dropped
    # longer than block_size=16: the model sees its end, the output keeps its end
    long = "ROMEO:\n" + "a" * 40
    (text,) = sample(str(char_ckpt), long, max_new_tokens=5, seed=3, device="cpu")
    assert long.endswith(text[:-5]) and len(text) == 15 + 5


def test_bpe_checkpoint(cli_runs, bpe_ckpt: Path):
    assert load_checkpoint(bpe_ckpt)["tokenizer"]["kind"] == "gpt2"
    r = cli_runs["bpe"]
    assert r.returncode == 0, r.stderr[-3000:]
    texts = samples_of(r.stdout)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") for t in texts)
    assert sample(str(bpe_ckpt), "ROMEO:", num_samples=2, max_new_tokens=20, seed=1, device="cpu") == texts


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"checkpoint \S*nope.pt not found"),
        ("foreign", r"state_dict.pt is not a fedgpt checkpoint"),
        ("bad_prompt", r"character\(s\) not in the 65-character vocabulary"),
    ],
)
def test_bad_input_is_one_clean_error_line(cli_runs, case: str, message: str):
    r = cli_runs[case]
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]


def test_bad_arguments_are_value_errors(char_ckpt: Path):
    with pytest.raises(ValueError, match="temperature"):
        sample(str(char_ckpt), "ROMEO:", temperature=-1)
    with pytest.raises(ValueError, match="top-p"):
        sample(str(char_ckpt), "ROMEO:", top_p=1.5)
