"""The federation benchmarks and the results table, run as a user runs them, on the tiny model.

Figures that must hold whatever the machine's speed: token counts, byte counts against the model's size,
and that every run of the results table trained on the same number of tokens. No timing assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from fedgpt.bench.results import END, START, TABLES, write_doc
from fedgpt.checkpoint import load_checkpoint
from fedgpt.fed.rounds import read_rounds

FRONTIER = TABLES["frontier"].markers

TINY_TOKENS_PER_STEP = 8 * 16  # configs/tiny.yaml: batch_size x block_size


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny(data_dir: Path, tmp_path: Path, kind: str, *args: str) -> dict:
    out = tmp_path / f"{kind}.json"
    res = run_module(
        "fedgpt.bench",
        kind,
        "--config",
        "configs/tiny.yaml",
        *args,
        "--out",
        str(out),
        f"--data.data_dir={data_dir}",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"| {kind}" in res.stdout  # the markdown table
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_fed_counts_every_client_token(data_dir, tmp_path):
    r = tiny(
        data_dir,
        tmp_path,
        "fed",
        "--num-clients",
        "2",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        "--trainer-steps",
        "3",
    )
    sim = r["simulation"]
    assert sim["tokens"] == 2 * 2 * 3 * TINY_TOKENS_PER_STEP
    assert sim["rounds"] == 2 and 0 < sim["startup_s"] < sim["wall_s"]
    assert all(0 <= s <= 1 for s in sim["outside_training_share_by_round"])
    assert r["local_trainer"]["tokens_per_s"] > 0 and r["tokens_per_s_ratio"] > 0
    assert 0 < r["startup_floor_s"] < 600  # the floor simulation ran, and every one of its clients answered


@pytest.mark.slow
def test_bench_comm_bytes_follow_each_format(data_dir, tmp_path):
    # the rows without error feedback send what the rows with it send: not run here; the LoRA rows
    # (--lora-base) run in tests/test_lora.py
    r = tiny(
        data_dir,
        tmp_path,
        "comm",
        *("--num-clients", "2", "--rounds", "2", "--local-steps", "2"),
        *("--rows", "int4_ef"),  # fp16 and int8 records: tests/test_wire.py; SecAgg+'s: tests/test_secagg.py
    )
    assert r["lora"] is None
    n, rows, block = r["params"], r["rows"], r["quant_block"]
    assert list(rows) == ["fp32", "int4_ef"]
    assert r["fp32_model_bytes"] == 4 * n
    scales = 4 * -(-n // block)  # one fp32 scale per block
    header = 256  # per array, np.save's header and Flower's record, generously
    expected_up = {"fp32": 4 * n, "int4_ef": n / 2 + scales}
    for name, row in rows.items():
        down = 4 * n if name == "fp32" else 2 * n  # fp32 weights, else fp16 weights down
        assert down <= row["downlink_bytes_per_client"] <= down + 2 * header, name  # a header, the weights
        arrays = 2 if name == "fp32" else 3  # the header; the update, or its codes and scales
        up = row["uplink_bytes_per_client"]
        assert expected_up[name] <= up <= expected_up[name] + arrays * header, name
        assert abs(row["val_loss_vs_fp32"]) < 0.05, name
    errors = r["quantization_error"]
    assert all(errors["int8"][b] < errors["int4"][b] for b in errors["int8"])  # 127 steps a side beat 7


@pytest.mark.slow
def test_bench_deploy_times_rounds_of_a_real_deployment(data_dir, tmp_path):
    keep = tmp_path / "work"
    r = tiny(data_dir, tmp_path, "deploy", "--rounds", "1", "--local-steps", "0", "--keep", str(keep))
    run = r["runs"]["run"]
    assert r["supernodes"] == 2 and r["trainer"] == "worker" and run["tokens"] == 0
    assert len(run["round_s_by_round"]) == 1 and run["round_s_by_round"][0] > 0
    # the floor ran the same rounds on the same federation, every node sending an array of the weights' size
    assert len(r["floor_round_s_by_round"]) == 1 and r["floor_round_s_by_round"][0] > 0
    assert r["median_round_over_floor_s"] == pytest.approx(
        run["median_round_s"] - r["floor_median_round_s"], abs=1e-3
    )
    # fedgpt's own share of a message: 11 rounds of one client through a real worker, which was then stopped
    assert r["trainer_message_s"] > 0
    assert list((keep / "relay" / "state").rglob("round-11.pt"))  # in the node's own state-dir
    assert not list((keep / "relay" / "workers").glob("*.sock"))
    # each node's train message, split into Flower's phases from the SuperNodes' own logs: each run's message
    # phases fit inside the round the ServerApp timed on its own clock around them
    for name, round_s in (("fedgpt", run["round_s_by_round"][0]), ("floor", r["floor_round_s_by_round"][0])):
        phases = r["node_phases_s"][name]
        assert phases["idle"] is None  # one round: no next message to wait for
        node_side = [phases[p] for p in ("pull", "launch", "clientapp", "push")]
        assert all(x >= 0 for x in node_side) and phases["launch"] > 0, phases  # a process was started
        assert sum(node_side) <= round_s + 0.01, (name, phases, round_s)


@pytest.mark.slow
def test_results_compare_runs_at_equal_tokens(data_dir, tmp_path):
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    blocks = f"{START}\nold table\n{END}\n\n{FRONTIER[0]}\n{FRONTIER[1]}"
    doc.write_text(f"# Results\n\nintro\n\n{blocks}\n\n## Discussion\nkept\n")
    common = [
        "--config",
        "configs/tiny.yaml",
        "--num-clients",
        "2",
        "--rounds",
        "5",
        "--local-steps",
        "5",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--doc",
        str(doc),
        f"--data.data_dir={data_dir}",
    ]
    # batch 1 is an eighth of the tiny config's 8: that run takes 8 times the steps, for the same tokens
    res = run_module("fedgpt.results", *common, "--only", "centralized", "fedavg_iid_b1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "results-main.json").read_text())
    assert [r["name"] for r in results] == ["centralized", "fedavg_iid_b1"]
    assert {r["tokens"] for r in results} == {2 * 5 * 5 * TINY_TOKENS_PER_STEP}
    assert [r["rounds"] for r in results] == [None, 8]  # 25 local steps of 1 window: 200 / 25
    text = doc.read_text()
    assert "old table" not in text and text.endswith("## Discussion\nkept\n") and "intro" in text
    for r in results:
        assert f"| {r['label']} | {r['final_val_loss']:.4f} |" in text
    assert (doc.parent / "results" / "val_vs_tokens.png").stat().st_size > 0
    # each run left a record beside the runs (not in the repository's results/records), without checkpoints
    record = tmp_path / "records" / "fedavg_iid_b1"
    kept = {p.name for p in record.iterdir()}
    assert {"experiment.json", "rounds.jsonl", "run.json"} <= kept
    assert not kept & {"last.pt", "best.pt", "run.log"}
    assert (tmp_path / "records" / "centralized" / "metrics.jsonl").is_file()

    res = run_module("fedgpt.results", *common, "--frontier", "--only", "frontier_fedavg_h5")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    points = json.loads((tmp_path / "runs" / "results-frontier.json").read_text())
    # batch 4: 50 steps per client, in rounds of 5 local steps
    assert [(r["rounds"], r["tokens"]) for r in points] == [(10, 2 * 25 * 8 * 16)]
    # every round moves the model (fp32, the tied head once) down and up once per client
    from fedgpt.config import load_config
    from fedgpt.model import GPT

    model = load_config(REPO / "configs" / "tiny.yaml").model
    model.vocab_size = 65  # Tiny Shakespeare's characters
    params = sum(p.numel() for p in GPT(model).parameters())
    messages = 10 * 2  # each with a header array and Flower's framing: a few hundred bytes
    assert messages * 4 * params <= points[0]["mb_per_client"] * 1e6 <= messages * (4 * params + 512)
    assert (
        "| FedAvg | 5 | 10 |" in doc.read_text()
        and (doc.parent / "results" / "frontier.png").stat().st_size > 0
    )


def test_results_doc_without_markers_is_refused(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n")
    with pytest.raises(ValueError, match="lacks the"):
        write_doc(doc, "table")
    assert doc.read_text() == "# Results\n"


@pytest.mark.slow
def test_bench_scale_samples_a_fraction_and_measures_the_session(data_dir, tmp_path):
    r = tiny(
        data_dir,
        tmp_path,
        "scale",
        "--clients",
        "12",
        "--fraction",
        "0.5",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        *("--corpus-copies", "2", "--keep", str(tmp_path / "work")),
    )
    by = r["by_clients"]
    assert [(x["clients"], x["sampled_per_round"]) for x in by] == [(12, 6)]
    # the simulation, Ray's daemons and an actor that imports torch: more than one process's worth
    assert all(x["peak_memory_mb"] > 500 and 0 < x["startup_s"] < x["wall_s"] for x in by)
    # 12 nodes are all asked before round 1 (the log's pre-flight line), within the start-up
    assert all(0 < x["preflight_s"] < x["startup_s"] for x in by), by
    # the runs trained on the corpus twice over, one copy after the other
    corpus = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    assert (tmp_path / "work" / "corpus-x2.txt").read_text(encoding="utf-8") == corpus * 2
    run = json.loads((tmp_path / "work" / "clients12" / "run.json").read_text())
    assert run["config"]["data"]["input_file"] == str(tmp_path / "work" / "corpus-x2.txt")
    split = json.loads((tmp_path / "work" / "clients12" / "partition.json").read_text())
    assert abs(sum(split["tokens"]) - 0.9 * 2 * len(corpus)) <= 2  # the clients hold its train 90%


def test_bench_scale_refuses_fewer_than_one_copy_of_the_corpus(tmp_path):
    keep = tmp_path / "work"
    res = run_module(
        "fedgpt.bench",
        "scale",
        *("--config", "configs/tiny.yaml", "--clients", "4", "--corpus-copies", "0"),
        *("--keep", str(keep), "--out", str(tmp_path / "scale.json")),
    )
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "error: --corpus-copies=0 must be >= 1 (1 runs on the config's corpus as it is)"
    ]
    assert not (tmp_path / "scale.json").exists() and list(keep.iterdir()) == []  # nothing run or written


@pytest.mark.slow
def test_rounds_to_target_counts_the_first_round_at_the_target(data_dir, tmp_path):
    from fedgpt.bench.targets import TARGET_ACCURACY

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\n<!-- target:start -->\n<!-- target:end -->\n")
    res = run_module(
        "fedgpt.results",
        "--rounds-to-target",
        "--config",
        "configs/tiny.yaml",
        "--only",
        "target_iid_fedavg",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--doc",
        str(doc),
        f"--data.data_dir={data_dir}",
        "--fed.num_clients=4",
        "--fed.fraction_train=0.5",
        "--fed.rounds=3",
        "--fed.local_steps=15",
        "--train.batch_size=8",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "results-target.json").read_text())
    assert [(r["group"], r["method"], r["rounds_run"]) for r in results] == [("iid", "fedavg", 3)]
    for r in results:
        rows = read_rounds(tmp_path / "runs" / r["name"] / "rounds.jsonl")
        reached = [row.round for row in rows if row.val_accuracy >= TARGET_ACCURACY]
        assert r["rounds_to_target"] == (reached[0] if reached else None)
        for level, got in r["rounds_to_level"].items():  # the first round at or past each level, or None
            first = [row.round for row in rows if row.val_accuracy >= float(level)]
            assert got == (first[0] if first else None), (level, got, [row.val_accuracy for row in rows])
        found = [v for v in r["rounds_to_level"].values() if v is not None]
        assert 0 < len(found) < len(r["rounds_to_level"]), r  # some levels reached, some not: both cases
        assert r["best_accuracy"] == max(row.val_accuracy for row in rows)
        assert all(row.clients_ok == 2 for row in rows[1:])  # half of 4 clients a round
    assert "| IID | FedAvg |" in doc.read_text()


@pytest.mark.slow
def test_lora_table_tunes_the_base_it_pretrained(data_dir, tmp_path):
    doc, runs = tmp_path / "results.md", tmp_path / "runs"
    doc.write_text("# Results\n\n<!-- lora:start -->\n<!-- lora:end -->\n")
    res = run_module(
        "fedgpt.results",
        "--lora",
        "--config",
        "configs/tiny.yaml",
        "--only",
        "lora_base",
        "lora_r16_ffa_lr",
        "--runs-dir",
        str(runs),
        "--doc",
        str(doc),
        f"--data.data_dir={data_dir}",
        f"--data.vocab_file={data_dir / 'tinyshakespeare' / 'input.txt'}",  # one vocabulary for both corpora
        "--train.max_steps=10",
        "--train.eval_interval=10",
        "--fed.rounds=2",
        "--fed.local_steps=2",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    base, ffa = json.loads((runs / "results-lora.json").read_text())
    comedies, tragedies = runs / "lora_plays" / "comedies.txt", runs / "lora_plays" / "tragedies.txt"
    assert f"--data.input_file={comedies}" in base["command"]
    assert (
        f"--data.input_file={tragedies} --train.init_from={runs / 'lora_base' / 'best.pt'}" in ffa["command"]
    )
    assert comedies.stat().st_size > 100_000 and tragedies.stat().st_size > 100_000
    # FFA-LoRA rank 16 on configs/tiny.yaml (2 blocks, 32 wide): only B travels, out x 16 for each target
    b_only = 2 * 16 * (96 + 32 + 128 + 32)
    assert 4 * b_only <= ffa["uplink_mb_per_client"] * 1e6 / ffa["rounds"] <= 4 * b_only + 512
    assert ffa["rounds"] == 2 and ffa["lora_aggregation_error"] < 1e-9  # exact
    # A stays as drawn and is not in the checkpoint's adapters; every round sent B alone and learned
    tuned = load_checkpoint(runs / "lora_r16_ffa_lr" / "last.pt")
    assert sum(v.numel() for v in tuned["extra"]["adapters"].values()) == b_only
    rows = read_rounds(runs / "lora_r16_ffa_lr" / "rounds.jsonl")
    assert all(4 * b_only <= r.bytes_received / r.clients_ok <= 4 * b_only + 512 for r in rows[1:])
    assert all(r.lora_aggregation_error < 1e-9 for r in rows[1:]) and rows[-1].val_loss < rows[0].val_loss
    assert f"| {ffa['label']} | {ffa['uplink_mb_per_client'] / 2:.3f} | - |" in doc.read_text()
