"""Personal models against the global model, each client scored on its own held-out text.

    python -m fedgpt.results --personal

Each run trains one global model (FedAvg) and scores, at its last round, every client's global model and its
two personal models (fedgpt.fed.personal: local adaptation, "finetune", and an adapter of its own, "adapter")
on the last tenth of the client's text. The splits: the role split (every role of Tiny Shakespeare's train
split with at least 1,000 tokens, one client each, 10% a round), the speaker split and IID (8 clients, all
every round). Two seeds each: the seed draws the initial model, the batches and the sampling.

Against them, for the role split's ten largest roles, a model trained centrally on that role's text alone
(python -m fedgpt.local_train, its text's last tenth held out: the client's held-out text), its best val loss
over the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

from fedgpt.bench.common import commands
from fedgpt.bench.experiments import Experiment
from fedgpt.fed.rounds import read_rounds

MODELS = (("global", "global model"), ("finetune", "local adaptation"), ("adapter", "own adapter"))
PERSONAL = [
    "--personal.scheme=finetune,adapter",
    "--personal.steps=20",
    "--personal.learning_rate=1e-3",
    "--train.eval_iters=20",
]
ROLE = [
    "--fed.partition=role",
    "--fed.small_roles=drop",
    "--fed.min_role_tokens=1000",
    "--fed.num_clients=143",
]
SPLITS = (  # name, label, args, rounds (the clients are scored at the last)
    ("role", "role split, 143 clients", [*ROLE, "--fed.fraction_train=0.1"], 10),
    ("speaker", "speaker split, 8 clients", ["--fed.partition=speaker", "--fed.num_clients=8"], 10),
    ("iid", "IID, 8 clients", ["--fed.partition=iid", "--fed.num_clients=8"], 10),
)
SEEDS = (1337, 2)
CENTRAL_ROLES = 3  # the role split's largest roles, each trained on alone (about 10 CPU-minutes each)
CENTRAL = ["--train.max_steps=500", "--train.warmup_steps=20", "--train.lr_decay_steps=0"]
CENTRAL += ["--train.eval_interval=25", "--train.eval_iters=20", "--data.val_fraction=0.1"]


def role_dir(a: argparse.Namespace, k: int) -> Path:
    return Path(a.runs_dir).resolve() / "roles" / f"role-{k}"


def central_roles(a: argparse.Namespace) -> list[Experiment]:
    """The k-th largest role of the role split trained on alone (its text written by prepare)."""
    vocab = Path(a.data_dir).resolve() / "tinyshakespeare" / "input.txt"
    return [
        Experiment(
            f"personal_central_role{k}",
            f"the role's text alone ({k + 1}. largest role)",
            [
                f"--data.input_file={role_dir(a, k) / 'input.txt'}",
                f"--data.vocab_file={vocab}",
                f"--data.data_dir={role_dir(a, k)}",
                *CENTRAL,
            ],
            kind="own-central",
            group="central",
            method=str(k),
        )
        for k in range(CENTRAL_ROLES)
    ]


def prepare(a: argparse.Namespace, app: Path) -> None:
    """Each of the role split's largest roles as a text file of its own (train text, then held-out text:
    the client's order), and which client it is (role.json)."""
    from fedgpt.config import load_config
    from fedgpt.data import load_dataset
    from fedgpt.fed.partition import client_partitions

    cfg = load_config(a.config, [*ROLE, f"--data.data_dir={a.data_dir}", "--fed.client_eval_interval=1"])
    ds = load_dataset(cfg.data)
    parts = client_partitions(cfg, ds)
    largest = sorted(range(len(parts)), key=lambda i: (-parts[i].size, i))[:CENTRAL_ROLES]
    for k, i in enumerate(largest):
        folder = role_dir(a, k)
        folder.mkdir(parents=True, exist_ok=True)
        text = ds.tokenizer.decode(parts[i].tokens.tolist())
        (folder / "input.txt").write_text(text, encoding="utf-8")
        info = {"client": i, "role": parts[i].speakers[0], "tokens": parts[i].size}
        info["val_tokens"] = parts[i].n_val
        (folder / "role.json").write_text(json.dumps(info))


def experiments(a: argparse.Namespace) -> list[Experiment]:
    return central_roles(a) + [
        Experiment(
            f"personal_{split}" + ("" if seed == SEEDS[0] else f"_seed{seed}"),
            label,
            [
                *args,
                f"--fed.rounds={rounds}",
                "--fed.local_steps=25",
                f"--fed.client_eval_interval={rounds}",
                *PERSONAL,
                f"--train.seed={seed}",
            ],
            kind="own",
            group=split,
            method=str(seed),
        )
        for split, label, args, rounds in SPLITS
        for seed in SEEDS
    ]


def keep(run_dir: Path) -> dict[str, bytes]:
    """What a record adds for figures: which role a central run trained on (role.json beside its text); for
    a federated run, the control of other_text_control (control.json)."""
    run = json.loads((run_dir / "run.json").read_text())
    text = Path(run["config"]["data"]["input_file"])
    role = text.parent / "role.json"
    if role.is_file() and text.parent.name.startswith("role-"):
        return {"role.json": role.read_bytes()}
    if (run_dir / "last.pt").is_file() and (run_dir / "client_eval.jsonl").is_file():
        parts = run_partitions(run["config"])
        names = [(parts[i].speakers or [""])[0] for i in range(len(parts))]  # a client's first speaker/role
        return {
            "control.json": json.dumps(other_text_control(run_dir, parts), indent=1).encode(),
            "names.json": json.dumps(names).encode(),
        }
    return {}


def run_partitions(config: dict):
    """The clients' partitions of a run, from its config (run.json's)."""
    from fedgpt.config import from_dict
    from fedgpt.data import load_dataset
    from fedgpt.fed.partition import client_partitions

    cfg = from_dict(config)
    return client_partitions(cfg, load_dataset(cfg.data))


CHECK = 0.1  # personal.check of the checked local adaptation scored after the run


def other_text_control(run_dir: Path, parts) -> dict:
    """Scored after the run on its last global model (last.pt), by the clients' own code
    (fedgpt.fed.personal), each client on its own held-out text as in the run:

    - "other_text": each client c adapts as in the run (the same steps, learning rate and round) on the
      training text of client (c + n/2) mod n instead: what more steps alone give; local adaptation's gain
      beyond it is the client's own text's;
    - "checked": local adaptation with personal.check=CHECK (the adaptation kept only where it lowers the
      loss on the last tenth of the client's own training text): what the run would have reported with it.

    `parts`: the run's partitions (run_partitions).
    """
    import copy
    import dataclasses

    from fedgpt.checkpoint import load_checkpoint, model_from_checkpoint
    from fedgpt.config import from_dict
    from fedgpt.fed import personal

    ckpt = load_checkpoint(run_dir / "last.pt")
    cfg = from_dict(ckpt["config"])
    checked_cfg = dataclasses.replace(cfg, personal=dataclasses.replace(cfg.personal, check=CHECK))
    model = model_from_checkpoint(ckpt, "cpu", dropout=cfg.model.dropout)
    n, rnd, ctx = len(parts), int(ckpt["round"]), contextlib.nullcontext()
    other, checked, kept, base = [], [], 0, []
    for c in range(n):
        o = (c + n // 2) % n
        adapted = copy.deepcopy(model)
        personal.adapt(adapted, cfg, parts[o].train, o, rnd)
        other.append(personal.evaluate_on(adapted, cfg, parts[c], "cpu", ctx)["loss"])
        mine = personal.personal_model(model, checked_cfg, "finetune", parts[c], c, rnd)
        checked.append(personal.evaluate_on(mine, cfg, parts[c], "cpu", ctx)["loss"])
        base.append(personal.evaluate_on(model, cfg, parts[c], "cpu", ctx)["loss"])
        kept += checked[-1] != base[-1]
    return {
        "clients": n,
        "round": rnd,
        "global": statistics.fmean(base),
        "other_text": statistics.fmean(other),
        "checked": {"loss": statistics.fmean(checked), "adapted": kept, "check": CHECK},
    }


def figures(run_dir: Path) -> dict:
    """The last round's per-client scores (rounds.jsonl's client_eval), and from client_eval.jsonl each
    client's, for the ten clients with the most held-out text; a central run's role (role.json)."""
    if (run_dir / "role.json").is_file():
        return {"role": json.loads((run_dir / "role.json").read_text())}
    control = run_dir / "control.json"
    if not (run_dir / "rounds.jsonl").is_file():
        return {}
    rows = read_rounds(run_dir / "rounds.jsonl")
    last = next((r for r in reversed(rows) if r.client_eval), None)
    out: dict = {"client_eval": last.client_eval if last else None, "largest": None}
    out["control"] = json.loads(control.read_text()) if control.is_file() else None
    path = run_dir / "client_eval.jsonl"
    if last is not None and path.is_file():
        mine = [json.loads(x) for x in path.read_text().splitlines()]
        mine = [m for m in mine if m["round"] == last.round]
        out["improved"] = {
            name: sum(m[f"{name}-val-loss"] < m["val-loss"] for m in mine) for name in ("finetune", "adapter")
        }
        # a client never sampled has no adapter: its personal model is the global one, to the bit
        trained = [m for m in mine if m["adapter-val-loss"] != m["val-loss"]]
        gains = [m["val-loss"] - m["adapter-val-loss"] for m in trained]
        out["adapter_trained"] = {"clients": len(trained), "gain": statistics.fmean(gains) if gains else None}
        mine.sort(key=lambda m: (-m["num-examples"], m["client"]))
        part = run_dir / "names.json"
        names = json.loads(part.read_text()) if part.is_file() else None
        keys = ("client", "num-examples", "val-loss", "finetune-val-loss", "adapter-val-loss")
        out["largest"] = [
            {**{k: m[k] for k in keys}, "name": names[m["client"]] if names else ""} for m in mine[:10]
        ]
    return out


def table(res: list[dict]) -> str:
    lines = [
        "| split | seed | model | mean val loss | vs global | std | 10th-90th pct | mean accuracy "
        "| MB per client |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in res:
        if r.get("role"):  # a central run: in largest()
            continue
        ev = r.get("client_eval") or {}
        base = ev.get("global")
        for key, name in MODELS:
            s = ev.get(key)
            if s is None:
                continue
            delta = "-" if key == "global" else f"{s['loss'] - base['loss']:+.4f}"
            lines.append(
                f"| {r['label']} | {r['method']} | {name} | {s['loss']:.4f} | {delta} | "
                f"{s['loss_std']:.3f} | {s['loss_p10']:.3f}-{s['loss_p90']:.3f} | {s['accuracy']:.3f} | "
                f"{r['mb_per_client']:.0f} |"
            )
    return "\n".join(lines)


def seeds_summary(res: list[dict]) -> str:
    """Per split, each personal model's gain over the global model on each seed, and their mean; how many
    clients it improved; for the adapter, the gain over the clients that trained one (sampled at all)."""
    lines = [
        "| split | model | gain, seed by seed | mean gain | clients improved "
        "| adapter's gain where it trained |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for split, label, _, _ in SPLITS:
        runs = [r for r in res if r["group"] == split and r.get("client_eval")]
        for key, name in MODELS[1:]:
            gains = [r["client_eval"]["global"]["loss"] - r["client_eval"][key]["loss"] for r in runs]
            if not gains:
                continue
            each = ", ".join(f"{g:.4f}" for g in gains)
            better = ", ".join(f"{r['improved'][key]} of {r['client_eval']['clients']}" for r in runs)
            where = "-"
            if key == "adapter":
                t = [r["adapter_trained"] for r in runs]
                where = ", ".join(f"{x['gain']:.4f} ({x['clients']} clients)" for x in t if x["gain"])
            mean = statistics.fmean(gains)
            lines.append(f"| {label} | {name} | {each} | {mean:.4f} | {better} | {where} |")
            controls = [r["control"] for r in runs if r.get("control")]
            if key == "finetune" and len(controls) == len(runs):  # other_text_control, after the run
                for name, loss, kept in (
                    ("local adaptation, checked (after the run)", lambda c: c["checked"]["loss"], True),
                    ("local adaptation on another client's text (control)", lambda c: c["other_text"], False),
                ):
                    gains = [c["global"] - loss(c) for c in controls]
                    each = ", ".join(f"{g:.4f}" for g in gains)
                    used = ", ".join(f"adapted {c['checked']['adapted']} of {c['clients']}" for c in controls)
                    mean = statistics.fmean(gains)
                    lines.append(f"| {label} | {name} | {each} | {mean:.4f} | {used if kept else '-'} | - |")
    return "\n".join(lines)


def largest(res: list[dict]) -> str:
    """The role split's ten clients with the most held-out text (first seed): their own losses, and the
    best val loss of a model trained on the role's text alone where one was."""
    r = next((r for r in res if r["group"] == "role" and r.get("largest")), None)
    if r is None:
        return ""
    alone = {c["role"]["client"]: c["best_val_loss"] for c in res if c.get("role")}
    lines = [
        "| client | role | held-out tokens | global | local adaptation | own adapter "
        "| the role's text alone |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in r["largest"]:
        central = alone.get(m["client"])
        lines.append(
            f"| {m['client']} | {m['name']} | {m['num-examples']} | {m['val-loss']:.4f} | "
            f"{m['finetune-val-loss']:.4f} | {m['adapter-val-loss']:.4f} | "
            + ("-" if central is None else f"{central:.4f}")
            + " |"
        )
    return "\n".join(lines)


def render(res: list[dict], a, doc) -> str:
    parts = [
        table(res),
        "",
        "Gain over the global model (mean per-client val loss, global minus personal):",
        "",
    ]
    parts += [seeds_summary(res), ""]
    big = largest(res)
    if big:
        parts += ["The role split's ten clients with the most held-out text (seed 1337):", "", big, ""]
    parts += ["Commands:", "", *commands(res)]
    return "\n".join(parts)
