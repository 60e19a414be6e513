"""Personal models (fedgpt.fed.personal): they change nothing the federation trains or sends, each client is
scored once, and the model `sample --client` / `export --client` rebuild is the one the run scored."""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import pytest
from conftest import TINY, as_serverapp
from in_process_grid import InProcessGrid

from fedgpt.config import load_config
from fedgpt.data import Batches
from fedgpt.fed import personal
from fedgpt.fed.rounds import read_rounds
from fedgpt.fed.server import FederatedRun
from fedgpt.train import evaluate

pytestmark = pytest.mark.usefixtures("serverapp_identity")
CLIENTS = 3


def federate(data_dir: Path, out: Path, *overrides: str) -> tuple[list, list[str], InProcessGrid]:
    cfg = load_config(
        TINY,
        [
            f"--data.data_dir={data_dir}",
            f"--train.out_dir={out}",
            "--fed.partition=speaker",
            f"--fed.num_clients={CLIENTS}",
            "--fed.rounds=3",
            "--fed.client_eval_interval=1",
            *overrides,
        ],
    )
    lines: list[str] = []
    run = FederatedRun(cfg, log=lines.append)
    run.open_folder()
    grid = InProcessGrid(CLIENTS, data_dir, state_dir=Path(run.state_dir))
    run.run(grid)
    return read_rounds(out / "rounds.jsonl"), lines, grid


def per_client(out: Path) -> dict[int, dict[int, dict]]:
    rows = [json.loads(line) for line in (out / "client_eval.jsonl").read_text().splitlines()]
    by_round: dict[int, dict[int, dict]] = {}
    for r in rows:
        assert r["client"] not in by_round.setdefault(r["round"], {}), "a client scored twice in a round"
        by_round[r["round"]][r["client"]] = r
    return by_round


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("personal")
    with pytest.MonkeyPatch.context() as mp:
        as_serverapp(mp)
        plain = federate(data_dir, tmp / "plain")
        both = federate(
            data_dir,
            tmp / "personal",
            "--personal.scheme=finetune,adapter",
            "--personal.steps=6",
            "--personal.learning_rate=3e-3",
        )
    return tmp, plain, both


def test_personal_models_leave_the_global_models_and_the_bytes_as_they_were(runs):
    tmp, (plain_rows, _, plain_grid), (rows, lines, grid) = runs
    # the reference is the same run without personal models
    assert [r.val_loss for r in rows] == [r.val_loss for r in plain_rows]
    assert [(r.bytes_sent, r.bytes_received) for r in rows] == [
        (r.bytes_sent, r.bytes_received) for r in plain_rows
    ]
    # no adapter tensor in any message, down or up
    for msg in grid.sent:
        for record in msg.content.array_records.values():
            assert not any("lora" in k for k in record), f"{msg.metadata.message_type} carried an adapter"
    # each client keeps its adapter in its own state folder
    files = sorted(p.name for p in (tmp / "personal").glob("client_state/*/personal/*.pt"))
    assert files == [f"partition-{i}.pt" for i in range(CLIENTS)]


def test_each_client_is_scored_once_and_the_spread_is_over_clients(runs):
    tmp, (plain_rows, _, _), (rows, lines, _) = runs
    plain_scores, scores = per_client(tmp / "plain"), per_client(tmp / "personal")
    assert sorted(scores) == [1, 2, 3] and all(sorted(s) == list(range(CLIENTS)) for s in scores.values())
    for row in rows[1:]:
        got = row.client_eval
        assert set(got) == {"clients", "global", "finetune", "adapter"} and got["clients"] == CLIENTS
        mine = scores[row.round]
        # the global model's per-client losses are the plain run's (same global model), averaged by hand
        want = statistics.fmean(plain_scores[row.round][c]["val-loss"] for c in range(CLIENTS))
        assert got["global"]["loss"] == pytest.approx(want, rel=1e-9)
        for name in ("finetune", "adapter"):
            losses = [mine[c][f"{name}-val-loss"] for c in range(CLIENTS)]
            assert got[name]["loss"] == pytest.approx(sum(losses) / CLIENTS, rel=1e-9)
            assert got[name]["loss_std"] == pytest.approx(statistics.pstdev(losses), rel=1e-6, abs=1e-12)
    # fine-tuning on a client's own text moves its model away from the global one, on every client
    last = scores[3]
    assert all(abs(last[c]["finetune-val-loss"] - last[c]["val-loss"]) > 1e-4 for c in range(CLIENTS))
    # an adapter trained in rounds 1-3 is no longer the identity
    assert all(abs(last[c]["adapter-val-loss"] - last[c]["val-loss"]) > 1e-5 for c in range(CLIENTS))
    assert any("round   3/3 |" in line and "| finetune " in line for line in lines)
    assert any("round   1/3 |" in line and "| left ~" in line for line in lines)


@pytest.mark.parametrize("scheme", ["finetune", "adapter"])
def test_the_personal_model_rebuilt_from_the_checkpoint_is_the_one_the_run_scored(runs, scheme, data_dir):
    tmp, _, _ = runs
    out = tmp / "personal"
    scored = per_client(out)[3]
    for client in range(CLIENTS):
        model, ckpt, who = personal.from_checkpoint(out / "last.pt", str(client), scheme)
        cfg = load_config(TINY, [f"--data.data_dir={data_dir}"])
        part = personal_partition(out, client)
        batches = Batches(part.val, cfg.model.block_size, cfg.train.batch_size, "cpu", seed=cfg.train.seed)
        res = evaluate(model, batches, cfg.train.eval_iters, contextlib.nullcontext())
        assert res["loss"] == pytest.approx(scored[client][f"{scheme}-val-loss"], rel=1e-5), who


def personal_partition(out: Path, client: int):
    from fedgpt.config import from_dict
    from fedgpt.data import load_dataset
    from fedgpt.fed.partition import client_partitions

    cfg = from_dict(json.loads((out / "run.json").read_text())["config"])
    return client_partitions(cfg, load_dataset(cfg.data))[client]


def test_a_client_by_name(runs):
    tmp, _, _ = runs
    out = tmp / "personal"
    part = personal_partition(out, 1)
    name = part.speakers[0]
    _, _, who = personal.from_checkpoint(out / "last.pt", name.lower(), "finetune")
    assert who.startswith("client 1 ")
    with pytest.raises(ValueError, match="no client of this run holds"):
        personal.from_checkpoint(out / "last.pt", "NOBODY AT ALL", "finetune")
    with pytest.raises(ValueError, match="kept no personal models"):
        personal.from_checkpoint(tmp / "plain" / "last.pt", "0")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--personal.scheme=finetune,bogus"], "personal.scheme"),
        (["--personal.scheme=adapter", "--lora.rank=4"], "personal.scheme"),
        (["--personal.scheme=finetune", "--fed.client_eval_interval=0"], "fed.client_eval_interval"),
        (["--personal.scheme=adapter", "--personal.targets=embedding"], "personal.targets"),
        (["--personal.scheme=finetune", "--personal.steps=0"], "personal.steps"),
    ],
)
def test_bad_personal_settings_say_which_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        load_config(TINY, ["--fed.client_eval_interval=1", *overrides])


def test_export_client_writes_the_personal_model_transformers_scores_as_the_run_did(runs, tmp_path):
    """The adapter model of client 2, exported: transformers' loss on the client's held-out windows is the
    run's figure for it."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    from fedgpt.export import main as export_main

    tmp, _, _ = runs
    out = tmp / "personal"
    export_main(
        [
            "--checkpoint",
            str(out / "last.pt"),
            "--client",
            "2",
            "--scheme",
            "adapter",
            "--out",
            str(tmp_path / "hf"),
        ]
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg = load_config(TINY)
    part = personal_partition(out, 2)
    batches = Batches(part.val, cfg.model.block_size, cfg.train.batch_size, "cpu", seed=cfg.train.seed)
    import torch

    losses = []
    with torch.no_grad():
        for _ in range(cfg.train.eval_iters):
            x, y = next(batches)
            logits = theirs(x).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())))
    assert sum(losses) / len(losses) == pytest.approx(per_client(out)[3][2]["adapter-val-loss"], rel=1e-5)


def test_a_checked_adaptation_that_hurts_on_the_clients_own_text_keeps_the_global_model(runs, data_dir):
    """personal.check: an adaptation that ruins the model (learning rate 3) is caught on the held-back tenth
    of the client's training text, and the client keeps the global model; one that helps is kept."""
    import dataclasses

    from fedgpt.checkpoint import load_checkpoint, model_from_checkpoint
    from fedgpt.config import from_dict

    tmp, _, _ = runs
    out = tmp / "personal"
    ckpt = load_checkpoint(out / "last.pt")
    cfg = from_dict(ckpt["config"])
    model = model_from_checkpoint(ckpt, "cpu")
    part = personal_partition(out, 0)
    ctx = contextlib.nullcontext()
    base = personal.evaluate_on(model, cfg, part, "cpu", ctx)["loss"]
    for lr, check in ((3.0, 0.0), (3.0, 0.1), (3e-3, 0.1)):
        p = dataclasses.replace(cfg.personal, learning_rate=lr, check=check, steps=10)
        mine = personal.personal_model(model, dataclasses.replace(cfg, personal=p), "finetune", part, 0, 3)
        loss = personal.evaluate_on(mine, cfg, part, "cpu", ctx)["loss"]
        if lr == 3.0 and check == 0.0:
            assert loss > base + 0.5  # unchecked, the ruinous adaptation is what the client gets
        elif lr == 3.0:
            assert loss == base  # caught: the global model, to the bit
        else:
            assert loss < base  # a useful one is kept
