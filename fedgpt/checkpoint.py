"""One checkpoint format for every producer (local trainer, ServerApp) and every reader (sample, resume).

A checkpoint is one dict saved with torch.save:
    format, version      "fedgpt-checkpoint", 1
    model                state_dict of the plain GPT (no "_orig_mod." / "module." prefixes)
    model_config         ModelConfig as a dict
    tokenizer            tokenizer metadata, enough to rebuild it without the data directory
    step, round          optimizer steps (local trainer) or federated round (ServerApp; None otherwise)
    best_val_loss        best validation loss seen so far
    val_loss             validation loss of these weights (None if not evaluated)
    config               the full run config (Config.to_dict())
    optimizer            optimizer state_dict, or None
    extra                producer-specific resume state (RNG and data positions, strategy state, ...)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from fedgpt.config import ModelConfig
from fedgpt.files import atomic_write

FORMAT = "fedgpt-checkpoint"
VERSION = 1


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip torch.compile's "_orig_mod." and DDP's "module." prefixes."""
    out = {}
    for k, v in state_dict.items():
        # in any order and number: DDP around a compiled model gives "module._orig_mod."
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save, written atomically: a crash never leaves half a checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: ModelConfig,
    tokenizer: dict,
    config: dict,
    step: int = 0,
    round: int | None = None,
    best_val_loss: float | None = None,
    val_loss: float | None = None,
    optimizer: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write a checkpoint atomically; weights are stored as float32 CPU tensors."""
    state = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in clean_state_dict(model_state).items()
    }
    atomic_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "model": state,
            "model_config": dataclasses.asdict(model_config),
            "tokenizer": tokenizer,
            "step": step,
            "round": round,
            "best_val_loss": best_val_loss,
            "val_loss": val_loss,
            "config": config,
            "optimizer": optimizer,
            "extra": extra or {},
        },
        path,
    )


class CheckpointWriter:
    """The one place last.pt and best.pt are written: last.pt after every evaluation (with what a resume
    needs), best.pt whenever the validation loss improves (weights and configs only)."""

    def __init__(self, out_dir: str | Path, best_val_loss: float = math.inf):
        self.out_dir, self.best_val_loss = Path(out_dir), best_val_loss

    def save(
        self, val_loss: float, *, optimizer: dict | None = None, extra: dict | None = None, **common: Any
    ) -> bool:
        """Write last.pt, and best.pt if val_loss is the best so far; True if it was. `common`:
        save_checkpoint's model_state, model_config, tokenizer, config, step and round."""
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        common.update(val_loss=val_loss, best_val_loss=self.best_val_loss)
        save_checkpoint(self.out_dir / "last.pt", **common, optimizer=optimizer, extra=extra)
        if improved:
            save_checkpoint(self.out_dir / "best.pt", **common)
        return improved


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint; a missing, truncated or foreign file gives one clear ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"checkpoint {path} not found: "
            "train one with `python -m fedgpt.local_train` or `python simulate.py`"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} is unreadable (truncated or not a torch file: {type(e).__name__}): point to "
            "a complete fedgpt checkpoint, e.g. out/last.pt"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a fedgpt checkpoint (no format={FORMAT!r} field): for Hugging Face GPT-2 weights "
            "use --train.init_from=hf:DIR"
        )
    if ckpt.get("version") != VERSION:
        raise ValueError(
            f"{path} is fedgpt checkpoint version {ckpt.get('version')}, this fedgpt reads version {VERSION}"
        )
    return ckpt


def model_config_of(ckpt: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", dropout: float | None = None):
    """Build the GPT a checkpoint describes and load its weights."""
    from fedgpt.model import GPT

    mcfg = model_config_of(ckpt)
    if dropout is not None:
        mcfg.dropout = dropout
    model = GPT(mcfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def architecture_diff(theirs: ModelConfig, ours: ModelConfig, *, initialising: bool = False) -> list[str]:
    """ "model.key: checkpoint X vs config Y" for each architecture field where two model configs differ.

    Dropout may always differ. When `initialising` a new run from a checkpoint, the config may also ask for
    a shorter context (the model is cropped) and leave vocab_size at 0 (the checkpoint's).
    """
    diffs = []
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(theirs, f.name), getattr(ours, f.name)
        allowed = (
            f.name == "dropout"
            or (f.name == "rope_theta" and ours.arch == "gpt2")
            or (initialising and f.name == "block_size" and b <= a)
            or (initialising and f.name == "vocab_size" and b == 0)
        )
        if a != b and not allowed:
            diffs.append(f"model.{f.name}: checkpoint {a!r} vs config {b!r}")
    return diffs


def check_compatible(ckpt: dict, model_config: ModelConfig, path: str | Path) -> None:
    """Raise if a checkpoint's architecture differs from the configured one (dropout may differ)."""
    diffs = architecture_diff(model_config_of(ckpt), model_config)
    if diffs:
        raise ValueError(
            f"checkpoint {path} has another architecture ({'; '.join(diffs)}): use the checkpoint's model "
            "settings or start from scratch"
        )
