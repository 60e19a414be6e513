"""LoRA adapters on the GPT: they start as the identity, only they train, and the merged weights are a plain
GPT that computes what the adapted one does."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt

from fedgpt.config import LoRAConfig, TrainConfig, load_config
from fedgpt.data import Batches
from fedgpt.lora import LoRALinear, adapter_state, add_lora, aggregation_error, merged_state
from fedgpt.tokenizer import CharTokenizer
from fedgpt.train import Trainer

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'-&\n"  # 63 characters: tiny_gpt() has 65


def tokens(seed: int = 0):
    return torch.randint(65, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_adapters_start_as_the_base_model_and_only_they_train():
    base, adapted = tiny_gpt(), tiny_gpt()
    add_lora(adapted, LoRAConfig(rank=4, alpha=8.0))
    x = tokens()
    torch.testing.assert_close(adapted(x)[0], base(x)[0], rtol=0, atol=0)  # B starts at zero
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert (
        trainable == set(adapter_state(adapted)) and len(trainable) == 2 * 4 * 2
    )  # A, B x 4 targets x 2 blocks
    # r * (in + out) values per target: c_attn 32 -> 96, attn.c_proj 32 -> 32, c_fc 32 -> 128, mlp.c_proj 128
    # -> 32
    assert sum(v.numel() for v in adapter_state(adapted).values()) == 2 * 4 * (
        (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)
    )
    only_attn = add_lora(tiny_gpt(), LoRAConfig(rank=2, targets="attn"))
    assert {k.split(".")[3] for k in adapter_state(only_attn)} == {"attn"}
    # the tied embedding and head: one adapter of r * (vocab + n_embd) values, listed once
    with_embedding = add_lora(tiny_gpt(), LoRAConfig(rank=2, targets="attn,embedding"))
    extra = {
        k: v.numel() for k, v in adapter_state(with_embedding).items() if k not in adapter_state(only_attn)
    }
    assert extra == {"transformer.wte.lora_A": 2 * 32, "transformer.wte.lora_B": 65 * 2}
    torch.testing.assert_close(with_embedding(tokens())[0], base(tokens())[0], rtol=0, atol=0)  # B at zero


@pytest.mark.parametrize("targets", ["attn,mlp", "attn,mlp,embedding"])
def test_training_moves_only_the_adapters_and_the_merged_gpt_computes_the_same(targets):
    model = add_lora(tiny_gpt(), LoRAConfig(rank=4, alpha=8.0, targets=targets))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainer = Trainer(
        model, TrainConfig(batch_size=4, learning_rate=1e-2, warmup_steps=0), torch.device("cpu"), log=None
    )
    data = torch.randint(65, (500,), generator=torch.Generator().manual_seed(1)).numpy()
    trainer.train_steps(Batches(data, 16, 4, seed=0), 5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())  # the base did not move
    assert any(v.abs().sum() > 0 for k, v in adapter_state(model).items() if k.endswith("lora_B"))
    plain = tiny_gpt(seed=9)
    plain.load_state_dict(merged_state(model))  # strict: exactly a plain GPT's keys
    model.eval()
    plain.eval()
    x = tokens(2)
    torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)
    wrapped = model.transformer.h[0].attn.c_attn
    assert isinstance(wrapped, LoRALinear)
    update = (
        merged_state(model)["transformer.h.0.attn.c_attn.weight"]
        - frozen["transformer.h.0.attn.c_attn.base.weight"]
    )
    assert torch.linalg.matrix_rank(update) <= 4  # a rank-4 change of the weight
    merged = merged_state(model)
    assert torch.equal(merged["transformer.wte.weight"], merged["lm_head.weight"])  # still one matrix
    moved = not torch.equal(
        merged["transformer.wte.weight"],
        frozen["transformer.wte.base.weight" if "embedding" in targets else "transformer.wte.weight"],
    )
    assert moved == ("embedding" in targets)


@pytest.mark.parametrize("targets", ["attn,mlp", "attn,mlp,embedding"])
def test_the_head_bias_trains_and_merges_into_a_plain_gpt_with_a_head_bias(targets):
    model = add_lora(tiny_gpt(), LoRAConfig(rank=4, alpha=8.0, targets=targets, head_bias=True))
    assert adapter_state(model)["lm_head.lora_bias"].shape == (65,)  # one value a token, sent with the rest
    x = tokens()
    torch.testing.assert_close(model(x)[0], tiny_gpt()(x)[0], rtol=0, atol=0)  # starts at zero: the base
    trainer = Trainer(
        model, TrainConfig(batch_size=4, learning_rate=1e-2, warmup_steps=0), torch.device("cpu"), log=None
    )
    data = torch.randint(65, (500,), generator=torch.Generator().manual_seed(1)).numpy()
    trainer.train_steps(Batches(data, 16, 4, seed=0), 5)
    assert adapter_state(model)["lm_head.lora_bias"].abs().min() > 0  # every token's bias moved
    merged = merged_state(model)
    with pytest.raises(RuntimeError, match="lm_head.bias"):  # a GPT without a head bias cannot hold it
        tiny_gpt().load_state_dict(merged)
    plain = tiny_gpt(head_bias=True)
    plain.load_state_dict(merged)  # strict
    model.eval()
    plain.eval()
    torch.testing.assert_close(plain(tokens(2))[0], model(tokens(2))[0], rtol=1e-4, atol=1e-5)
    assert model.cfg.head_bias  # what the run's checkpoints record as the merged model's config


def test_the_aggregation_error_is_the_gap_between_the_average_of_products_and_the_product_of_averages():
    model = add_lora(tiny_gpt(), LoRAConfig(rank=2, targets="attn"), seed=3)
    names = [k for k in model.state_dict() if k.endswith((".lora_A", ".lora_B"))]
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(model.state_dict()[k].shape, generator=g) for k in names} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    gap, size = 0.0, 0.0
    for b in [k for k in names if k.endswith("lora_B")]:
        a = b[: -len("B")] + "A"
        w = [x / sum(weights) for x in weights]
        product = sum(wi * s[b] @ s[a] for wi, s in zip(w, states))  # by hand
        apart = sum(wi * s[b] for wi, s in zip(w, states)) @ sum(wi * s[a] for wi, s in zip(w, states))
        gap, size = gap + float((product - apart).square().sum()), size + float(product.square().sum())
    assert aggregation_error(states, weights, model) == pytest.approx((gap / size) ** 0.5, rel=1e-6)
    # FFA-LoRA: A frozen, the same on every side (one seed), not sent: the error is 0
    ffa = [add_lora(tiny_gpt(), LoRAConfig(rank=2, targets="attn", scheme="ffa"), seed=3) for _ in range(2)]
    assert all(not k.endswith("lora_A") for k in adapter_state(ffa[0]))
    a_names = [k for k in ffa[0].state_dict() if k.endswith("lora_A")]
    assert all(torch.equal(ffa[0].state_dict()[k], ffa[1].state_dict()[k]) for k in a_names)
    only_b = [{k: v for k, v in s.items() if k.endswith("lora_B")} for s in states]
    assert aggregation_error(only_b, weights, ffa[0]) < 1e-12  # float64 rounding aside


def test_embedding_rows_train_as_the_same_rows_of_a_plain_gpt_and_the_rest_stays(tmp_path):
    # 63 characters in the vocabulary; the public text's counts by hand: e 5, a 4, space 3, d 3, c 2, b 1: the
    # 3 most frequent are e, a, and of space and d (a tie) the lower id, space
    tok = CharTokenizer.from_text(TEXT)
    public = tmp_path / "public.txt"
    public.write_text("eeeee dddaaaa cc b")
    rows = sorted(tok.encode("e a"))[-3:]  # the ids of space, a, e
    model = add_lora(
        tiny_gpt(), LoRAConfig(rank=2, targets="attn", embedding_rows=3, rows_from=str(public)), 0, tok
    )
    x, y = tokens(), tokens(1)
    torch.testing.assert_close(model(x)[0], tiny_gpt()(x)[0], rtol=0, atol=0)  # the rows start at zero
    assert adapter_state(model)["transformer.wte.lora_rows"].shape == (3, 32)
    # Rows D set: the adapted model is a plain GPT whose tied matrix has W + D on those rows, edited by hand,
    # in its output and in its gradient (embedding and head both)
    delta = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.transformer.wte.lora_rows.copy_(delta)
        for block in model.transformer.h:  # and the attention's adapters away from the identity
            block.attn.c_attn.lora_B.normal_(0, 0.1)
    plain = tiny_gpt(seed=9)
    plain.load_state_dict(merged_state(model))
    edited = tiny_gpt()
    edited.load_state_dict(plain.state_dict())
    with torch.no_grad():
        edited.transformer.wte.weight.copy_(tiny_gpt().transformer.wte.weight)
        edited.transformer.wte.weight[rows] += delta
    torch.testing.assert_close(edited.lm_head.weight, plain.lm_head.weight, rtol=0, atol=0)
    _, loss = model(x, y)
    _, edited_loss = edited(x, y)
    torch.testing.assert_close(loss, edited_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    edited_loss.backward()
    grad = edited.transformer.wte.weight.grad
    torch.testing.assert_close(model.transformer.wte.lora_rows.grad, grad[rows], rtol=1e-4, atol=1e-7)
    others = torch.ones(grad.shape[0], dtype=torch.bool)
    others[rows] = False
    assert grad[others].abs().sum() > 0  # full fine-tuning would move the other rows; they stay frozen here
    assert model.transformer.wte.base.weight.grad is None


def test_embedding_rows_step_at_their_own_multiple_of_the_learning_rate(tmp_path):
    # AdamW's first step moves each weight by lr x sign(gradient) (its moments' bias correction), less decay
    public = tmp_path / "public.txt"
    public.write_text("the most frequent letters")
    cfg = LoRAConfig(rank=2, targets="attn", embedding_rows=4, rows_from=str(public), rows_lr_scale=0.25)
    model = add_lora(tiny_gpt(), cfg, 0, CharTokenizer.from_text(TEXT))
    lr = 1e-2
    trainer = Trainer(
        model,
        TrainConfig(batch_size=4, learning_rate=lr, warmup_steps=0, weight_decay=0.0, grad_clip=0.0),
        torch.device("cpu"),
        log=None,
    )
    data = torch.randint(63, (500,), generator=torch.Generator().manual_seed(1)).numpy()
    trainer.train_steps(Batches(data, 16, 4, seed=0), 1)
    moved = {k: v.abs() for k, v in adapter_state(model).items() if v.abs().sum() > 0}
    rows, b = moved.pop("transformer.wte.lora_rows"), moved["transformer.h.0.attn.c_attn.lora_B"]
    # (eps in the denominator shrinks the steps of the tiniest gradients: the largest are exact)
    assert float(rows.max()) == pytest.approx(0.25 * lr, rel=1e-4)
    assert float(b.max()) == pytest.approx(lr, rel=1e-4)


def test_lora_needs_a_pretrained_model_and_a_known_target():
    with pytest.raises(ValueError, match="lora.rank: adapters fine-tune a pretrained model"):
        load_config(None, ["--lora.rank=4"])
    with pytest.raises(
        ValueError, match="lora.targets: 'attn,emb': give one or more of attn, mlp, embedding"
    ):
        load_config(None, ["--lora.rank=4", "--train.init_from=x.pt", "--lora.targets=attn,emb"])
    lora = ["--lora.rank=4", "--train.init_from=x.pt", "--lora.embedding_rows=10"]
    with pytest.raises(ValueError, match="lora.rows_from: must name a public text file"):
        load_config(None, lora)
    with pytest.raises(ValueError, match="lora.embedding_rows: and the embedding adapter both"):
        load_config(None, [*lora, "--lora.rows_from=x.txt", "--lora.targets=attn,embedding"])
    with pytest.raises(
        ValueError, match="lora.embedding_rows: trains rows beside adapters: set lora.rank > 0"
    ):
        load_config(None, ["--lora.embedding_rows=10", "--lora.rows_from=x.txt"])
    with pytest.raises(ValueError, match="lora.head_bias: trains beside adapters: set lora.rank > 0"):
        load_config(None, ["--lora.head_bias=true"])
    with pytest.raises(ValueError, match="lora.bias_lr_scale: must be > 0"):
        load_config(None, ["--lora.bias_lr_scale=0"])
    cfg = load_config(None, [*lora, "--lora.rows_from=no/such.txt"])
    with pytest.raises(ValueError, match=r"lora.rows_from=no/such.txt: cannot read it .*give a public text"):
        add_lora(tiny_gpt(), cfg.lora, 0, CharTokenizer.from_text("ab"))


@pytest.mark.slow
def test_federated_lora_sends_only_adapters_and_checkpoints_a_plain_gpt(data_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    from fedgpt.checkpoint import load_checkpoint
    from fedgpt.fed.rounds import read_rounds

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    tiny = ["--config", str(REPO / "configs" / "tiny.yaml"), f"--data.data_dir={data_dir}"]

    def run(*args: str) -> None:
        r = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    base = tmp_path / "base"
    run(
        "-m",
        "fedgpt.local_train",
        *tiny,
        "--train.max_steps=10",
        "--train.eval_interval=10",
        f"--train.out_dir={base}",
    )
    # The comm bench's LoRA rows, as docs/results.md runs them: full fine-tuning and rank 2, from the base
    work, bench = tmp_path / "bench", tmp_path / "comm.json"
    args = [
        "--lora-only",
        "--lora-base",
        str(base / "last.pt"),
        "--lora-config",
        tiny[1],
        "--lora-ranks",
        "2",
    ]
    run("-m", "fedgpt.bench", "comm", *args, "--keep", str(work), "--out", str(bench), tiny[2])
    lora_bench = json.loads(bench.read_text())["lora"]
    model_bytes, rows = lora_bench["model_bytes"], lora_bench["rows"]
    out = work / "lora_r2"  # the rank-2 row's run folder
    tuned, pretrained = load_checkpoint(out / "last.pt"), load_checkpoint(base / "last.pt")["model"]
    assert model_bytes == 4 * sum(v.numel() for k, v in pretrained.items() if k != "lm_head.weight")  # tied
    adapters = sum(v.numel() for v in tuned["extra"]["adapters"].values())
    assert adapters == 2 * 2 * (
        (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)
    )  # rank 2, 4 targets, 2 blocks
    up = rows["lora_r2"]["uplink_bytes_per_client"]
    assert 4 * adapters <= up <= 4 * adapters + 512  # and a header
    assert rows["lora_r2"]["uplink_vs_fp32"] == pytest.approx(up / model_bytes, rel=1e-3)
    assert rows["full"]["uplink_bytes_per_client"] >= model_bytes
    rows = read_rounds(out / "rounds.jsonl")
    assert all(4 * adapters <= r.bytes_received / r.clients_ok <= 4 * adapters + 512 for r in rows[1:])
    assert rows[-1].val_loss < rows[0].val_loss
    assert all(r.lora_aggregation_error > 0 for r in rows[1:])  # A and B averaged apart: not B A's average
    for k, v in tuned["model"].items():  # a plain GPT: the base as it was, but where adapters were merged
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            assert not torch.equal(v, pretrained[k]) and torch.linalg.matrix_rank(v - pretrained[k]) <= 2, k
        else:
            assert torch.equal(v, pretrained[k]), k
    run("-m", "fedgpt.sample", "--checkpoint", str(out / "best.pt"), "--max-new-tokens", "5")
    # as the bench ran it: the LoRA config as written (its data folder is the repo's data/, where data_dir is)
    lora = [*tiny[:2], f"--train.init_from={base / 'last.pt'}", "--lora.rank=2", f"--train.out_dir={out}"]
    run("simulate.py", *lora, "--fed.rounds=3", "--resume")
    assert [r.round for r in read_rounds(out / "rounds.jsonl")] == [0, 1, 2, 3]
    # FFA-LoRA (A frozen, B alone sent, the average exact) runs end to end in
    # tests/test_bench_fed.py::test_lora_table_tunes_the_base_it_pretrained, as the LoRA table runs it.


def test_clients_train_the_embedding_rows_the_server_chose(data_dir, tmp_path):
    # The server counts lora.rows_from and sends the rows' ids with the run's config: a node where that file
    # is missing (or says something else) trains the server's rows, not rows of its own
    import json

    from conftest import TINY, node_config
    from flwr.app import ConfigRecord, RecordDict

    from fedgpt import local_train
    from fedgpt.fed import client
    from fedgpt.fed.server import FederatedRun
    from fedgpt.lora import embedding_rows

    base, public = tmp_path / "base", tmp_path / "public.txt"
    tiny = ["--config", str(TINY), f"--data.data_dir={data_dir}"]
    local_train.main([*tiny, "--train.max_steps=2", "--train.eval_interval=2", f"--train.out_dir={base}"])
    public.write_text("zzzz yyy xx w")  # by hand: z 4, y 3, space 3, x 2 (w 1 left out)
    lora = [f"--train.init_from={base / 'last.pt'}", "--lora.rank=2", "--lora.embedding_rows=4"]
    cfg = load_config(
        TINY, [*tiny[2:], f"--train.out_dir={tmp_path / 'run'}", *lora, f"--lora.rows_from={public}"]
    )
    run = FederatedRun(cfg, resume=False, log=lambda *_: None)
    facts = run.run_facts()
    assert json.loads(facts["embedding-rows"]) == sorted(run.ds.tokenizer.encode("zy x"))
    as_the_node_reads_it = json.loads(facts["fedgpt-config"])
    as_the_node_reads_it["lora"]["rows_from"] = str(tmp_path / "not-on-this-node.txt")
    facts["fedgpt-config"] = json.dumps(as_the_node_reads_it)
    st, _ = client.run_on_node(RecordDict({"config": ConfigRecord(facts)}), node_config(run))
    assert embedding_rows(st.trainer.raw_model) == json.loads(facts["embedding-rows"])
