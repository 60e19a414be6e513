"""Generate text from any fedgpt checkpoint (local trainer or ServerApp).

    python -m fedgpt.sample --checkpoint out/best.pt --prompt "ROMEO:" --num-samples 2 --max-new-tokens 200
    python -m fedgpt.sample --checkpoint out/fed/last.pt --client ROMEO --prompt "ROMEO:"   # a personal model

A checkpoint carries its tokenizer, so char and BPE checkpoints need nothing else.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fedgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fedgpt.download import DataUnavailableError
from fedgpt.generate import generate
from fedgpt.tokenizer import get_tokenizer
from fedgpt.train import resolve_device


def sample(
    checkpoint: str,
    prompt: str = "",
    num_samples: int = 1,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int = 1337,
    device: str = "auto",
    client: str | None = None,
    scheme: str | None = None,
) -> list[str]:
    """Return `num_samples` continuations of `prompt` (the prompt included); from the personal model of
    `client` (an id or a speaker/role name) of a simulation run with personal.scheme, if given."""
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    dev = resolve_device(device)
    if client is not None:  # a federated run's client: the federation's code, loaded only for it
        from fedgpt.fed import personal

        model, ckpt, who = personal.from_checkpoint(checkpoint, client, scheme)
        model = model.to(dev)
        print(f"sampling from {who}", file=sys.stderr)
    else:
        ckpt = load_checkpoint(checkpoint)
        model = model_from_checkpoint(ckpt, dev, dropout=0.0).eval()
    tok = get_tokenizer(ckpt["tokenizer"])
    ids = tok.encode(prompt) if prompt else [tok.eot_id if tok.eot_id is not None else tok.encode("\n")[0]]
    if len(ids) >= model.cfg.block_size:
        ids = ids[
            -(model.cfg.block_size - 1) :
        ]  # keep the end of a long prompt; the model sees only block_size tokens
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    y = generate(
        model,
        x,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eot_id=tok.eot_id,
        generator=gen,
    )
    start = 0 if prompt else 1  # drop the synthetic start token
    return [tok.decode([t for t in row[start:].tolist() if t != tok.eot_id]) for row in y]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedgpt.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="path of a fedgpt checkpoint, e.g. out/best.pt")
    p.add_argument("--prompt", default="", help="text to continue (default: start from scratch)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--client",
        help="a personal model of a run with personal.scheme: a client id, or the speaker or role it holds",
    )
    p.add_argument("--scheme", help="with --client: finetune or adapter (default: the run's first)")
    a = p.parse_args(argv)
    try:
        texts = sample(
            a.checkpoint,
            a.prompt,
            a.num_samples,
            a.max_new_tokens,
            a.temperature,
            a.top_k or None,
            a.top_p,
            a.seed,
            a.device,
            a.client,
            a.scheme,
        )
    except (ValueError, DataUnavailableError) as e:
        sys.exit(f"error: {e}")
    for text in texts:
        print(text)
        print("-" * 40)


if __name__ == "__main__":
    main()
