"""Export a fedgpt checkpoint as a Hugging Face model folder that transformers loads as it is.

    python -m fedgpt.export --checkpoint out/best.pt --out hf/my-gpt [--overwrite]
    python -m fedgpt.export --checkpoint out/fed/last.pt --client ROMEO --out hf/romeo   # a personal model

    model = AutoModelForCausalLM.from_pretrained("hf/my-gpt")    # GPT2LMHeadModel or LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained("hf/my-gpt")             # fedgpt's token ids, char or GPT-2 BPE

The folder holds config.json, model.safetensors and the tokenizer files; it is written beside DIR and renamed
into place, so DIR holds a whole export or none. A checkpoint whose weights still hold LoRA adapters is merged
first (the ServerApp's checkpoints already hold the merged model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from fedgpt.checkpoint import load_checkpoint, model_config_of
from fedgpt.config import LoRAConfig
from fedgpt.download import DataUnavailableError
from fedgpt.hf import hf_config, hf_state_dict
from fedgpt.hf_tokenizer import tokenizer_files
from fedgpt.lora import ADAPTER_LEAVES, add_lora, merged_model
from fedgpt.model import GPT
from fedgpt.tokenizer import get_tokenizer


def export(
    checkpoint: str | Path,
    out: str | Path,
    overwrite: bool = False,
    client: str | None = None,
    scheme: str | None = None,
) -> Path:
    """Write checkpoint's model and tokenizer as a Hugging Face folder at `out`; returns its path. With
    `client` (an id, or the speaker or role it holds): that client's personal model (fedgpt.fed.personal)."""
    out = Path(out).absolute()  # "." too has a name and a parent to write beside
    check_destination(out, overwrite)
    if client is not None:  # a federated run's client: the federation's code, loaded only for it
        from fedgpt.fed import personal

        model, ckpt, _ = personal.from_checkpoint(checkpoint, client, scheme)
    else:
        ckpt = load_checkpoint(checkpoint)
        model = plain_model(ckpt, checkpoint)
    tok = get_tokenizer(ckpt["tokenizer"])
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"{checkpoint}: its tokenizer has {tok.vocab_size} ids but its model only {model.cfg.vocab_size} "
            "rows: the checkpoint is inconsistent, export another one"
        )
    config = hf_config(model.cfg, bos_id=tok.eot_id, eos_id=tok.eot_id)
    files = {"config.json": json.dumps(config, indent=2) + "\n"}
    files |= tokenizer_files(tok, model_max_length=model.cfg.block_size)
    weights = hf_state_dict(model)

    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")  # safetensors writes it 0600
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse a file, and a folder with something in it unless `overwrite` and it holds a model already."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder to write the model into")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out {out} is not empty: pass --overwrite to replace it, or give a new folder"
            )
        if not (out / "config.json").is_file():
            # --overwrite deletes the folder: never one that is not a model's (".", a home, a checkout)
            raise ValueError(
                f"--out {out} holds no config.json, so it is no model folder that --overwrite may replace: "
                "give a new folder"
            )


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    check_destination(out, overwrite)  # again: something may have appeared there meanwhile
    if out.is_dir() and any(out.iterdir()):
        # rename cannot replace a folder that holds files: move the old export aside, then drop it
        old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # onto nothing, or onto an empty folder


def plain_model(ckpt: dict, path: str | Path) -> GPT:
    """The plain GPT of a checkpoint, with LoRA adapters merged into its weights if it holds them."""
    cfg = model_config_of(ckpt)
    state = ckpt["model"]
    model = GPT(cfg)
    adapters = any(k.rpartition(".")[2] in ADAPTER_LEAVES for k in state)
    if adapters:
        known = {f.name for f in dataclasses.fields(LoRAConfig)}
        lora = LoRAConfig(**{k: v for k, v in ckpt["config"].get("lora", {}).items() if k in known})
        if lora.embedding_rows:
            raise ValueError(
                f"{path} holds LoRA adapters with lora.embedding_rows, whose row ids it does not keep: "
                "export the ServerApp's checkpoint of the run (it holds the merged model)"
            )
        add_lora(model, lora)
    ours = model.state_dict()
    missing, unexpected = sorted(ours.keys() - state.keys()), sorted(state.keys() - ours.keys())
    wrong = sorted(k for k in ours.keys() & state.keys() if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: its weights do not fit its model_config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:3]}): export a checkpoint written by fedgpt"
        )
    model.load_state_dict(state)
    return (merged_model(model) if adapters else model).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedgpt.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="path of a fedgpt checkpoint, e.g. out/best.pt")
    p.add_argument("--out", required=True, help="folder to write the Hugging Face model into")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument(
        "--client",
        help="a personal model of a run with personal.scheme: a client id, or the speaker or role it holds",
    )
    p.add_argument("--scheme", help="with --client: finetune or adapter (default: the run's first)")
    a = p.parse_args(argv)
    try:
        out = export(a.checkpoint, a.out, a.overwrite, a.client, a.scheme)
    except (ValueError, DataUnavailableError) as e:
        sys.exit(f"error: {e}")
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {arch} to {out}: transformers' AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")


if __name__ == "__main__":
    main()
