"""docs/results.md rebuilds from the committed records (results/records): every table whose runs all have a
record, rendered again by `python -m fedgpt.results --TABLE --no-run` into a copy of the document, gives the
committed document and plots byte for byte; a record changed or missing shows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from fedgpt.bench.results import TABLES, main

RECORDS = REPO / "results" / "records"
DOC = REPO / "docs" / "results.md"
PLOTS = REPO / "docs" / "results"


def names(kind: str) -> list[str]:
    import argparse

    a = argparse.Namespace(runs_dir=str(REPO / "results" / "runs"), data_dir=str(REPO / "data"))
    return [e.name for e in TABLES[kind].experiments(a)]


def unrecorded(kind: str) -> list[str]:
    """The runs of table `kind` without a committed record."""
    return [n for n in names(kind) if not (RECORDS / n / "experiment.json").is_file()]


RECORDED = [k for k in TABLES if not unrecorded(k)]


def flag(kind: str) -> list[str]:
    return [] if kind == "main" else [f"--{kind}"]


def rebuild(kind: str, tmp_path: Path, records: Path, monkeypatch) -> Path:
    """A copy of the document and its plots under tmp_path, with `kind`'s table rendered from `records`."""
    doc = tmp_path / "docs" / "results.md"
    shutil.copytree(PLOTS, doc.parent / "results")
    shutil.copyfile(DOC, doc)
    monkeypatch.chdir(REPO)  # the tables' configs and the app directory, as a user runs it
    runs = tmp_path / "runs"
    main([*flag(kind), "--no-run", "--doc", str(doc), "--runs-dir", str(runs), "--records-dir", str(records)])
    return doc


def test_every_table_has_a_record_of_each_of_its_runs():
    # the test below rebuilds every table whose runs all have records: a table without them would go unchecked
    missing = {k: unrecorded(k) for k in TABLES if k not in RECORDED}
    assert not missing, f"runs without a record in {RECORDS}: {missing}"


@pytest.mark.parametrize("kind", RECORDED)
def test_table_rebuilds_byte_for_byte_from_its_records(kind, tmp_path, monkeypatch):
    doc = rebuild(kind, tmp_path, RECORDS, monkeypatch)
    command = " ".join(["python -m fedgpt.results", *flag(kind), "--no-run"])
    assert doc.read_bytes() == DOC.read_bytes(), (
        f"`{command}` changes docs/results.md: commit what it writes, or the records it was rendered from"
    )
    for plot in sorted((doc.parent / "results").iterdir()):
        assert plot.read_bytes() == (PLOTS / plot.name).read_bytes(), f"{plot.name} does not rebuild"


@pytest.mark.parametrize("kind", list(TABLES))
def test_every_record_holds_the_run_its_table_would_make_today(kind, monkeypatch):
    # `python -m fedgpt.results --TABLE --only NAME` reruns what the record says was run: the command the
    # table builds now, from the app directory, is the one its record kept
    from fedgpt.bench.experiments import as_shown, command
    from fedgpt.bench.results import parse_args
    from fedgpt.config import load_config

    monkeypatch.chdir(REPO)
    a, _ = parse_args(flag(kind))
    a.config = a.config or TABLES[kind].config
    cfg = load_config(a.config, [])
    a.data_dir = cfg.data.data_dir
    checked = 0
    for e in TABLES[kind].experiments(a):
        record = RECORDS / e.name / "experiment.json"
        if record.is_file():
            now = as_shown(command(e, a, [], Path(a.runs_dir).resolve() / e.name, cfg.train), REPO)
            assert now == json.loads(record.read_text())["command"], f"{e.name}: rerun it into its record"
            checked += 1
    assert checked or kind not in RECORDED


def test_a_changed_number_in_a_record_changes_the_document(tmp_path, monkeypatch):
    records = tmp_path / "records"
    for name in names("stragglers"):
        shutil.copytree(RECORDS / name, records / name)
    rounds = records / "straggle0_fedavg" / "rounds.jsonl"
    lines = rounds.read_text().splitlines()
    last = json.loads(lines[-1])
    last["val_loss"] += 0.001  # the table's first row, and every row's difference from it
    rounds.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    doc = rebuild("stragglers", tmp_path, records, monkeypatch)
    text = doc.read_text()
    assert text != DOC.read_text()
    assert f"| FedAvg, no stragglers | {last['val_loss']:.4f} |" in text


def test_missing_records_stop_no_run_and_leave_the_document(tmp_path, monkeypatch):
    records = tmp_path / "records"
    kept = names("stragglers")[1:]  # every run's record but the first's
    for name in kept:
        shutil.copytree(RECORDS / name, records / name)
    doc = tmp_path / "docs" / "results.md"
    with pytest.raises(ValueError) as e:
        rebuild("stragglers", tmp_path, records, monkeypatch)
    message = str(e.value)
    assert message.startswith("no records for stragglers") and "\n" not in message
    assert "python -m fedgpt.results --stragglers" in message and "straggle0_fedavg" in message
    assert doc.read_bytes() == DOC.read_bytes()
    assert not (tmp_path / "runs").exists()  # nor its JSON

    shutil.rmtree(records)  # no record at all: the same, and no table written over the figures
    with pytest.raises(ValueError, match="no records for stragglers"):
        rebuild("stragglers", tmp_path / "again", records, monkeypatch)
    assert (tmp_path / "again" / "docs" / "results.md").read_bytes() == DOC.read_bytes()


def test_a_record_keeps_what_the_tables_read_and_replaces_the_last_whole(tmp_path):
    from fedgpt.bench.experiments import save_record

    run, record = tmp_path / "runs" / "r", tmp_path / "records" / "r"
    run.mkdir(parents=True)
    for name in ("experiment.json", "run.json", "rounds.jsonl", "last.pt", "best.pt", "run.log"):
        (run / name).write_text(name)
    save_record(run, record, {"dp.json": b"{}"})
    kept = sorted(p.name for p in record.iterdir())
    assert kept == ["dp.json", "experiment.json", "rounds.jsonl", "run.json"]
    assert (record / "rounds.jsonl").read_text() == "rounds.jsonl"

    (run / "rounds.jsonl").write_text("again")
    with pytest.raises(OSError):  # a write that fails half-way: the earlier record stays as it was
        save_record(run, record, {"no/such/folder": b""})
    assert (record / "rounds.jsonl").read_text() == "rounds.jsonl" and (record / "dp.json").is_file()
    save_record(run, record)  # a new record replaces the old one whole: no dp.json left from it
    assert (record / "rounds.jsonl").read_text() == "again" and not (record / "dp.json").exists()
    assert [p.name for p in record.parent.iterdir()] == ["r"]  # no temporary folder left behind


def test_a_dp_record_gives_the_privacy_table_the_figures_its_run_gave(tmp_path):
    import torch

    from fedgpt.bench import privacy
    from fedgpt.bench.experiments import save_record
    from fedgpt.checkpoint import FORMAT, VERSION
    from fedgpt.fed.privacy import DPState, Ledger

    run = tmp_path / "runs" / "dp"
    shutil.copytree(RECORDS / "straggle0_fedavg", run)  # any run's rounds
    state = DPState(Ledger([[0.2, 0.935, 25]]), clipping_norm=1.25, noise_multiplier=0.935)
    torch.save({"format": FORMAT, "version": VERSION, "extra": {"dp": state.to_json()}}, run / "last.pt")
    record = tmp_path / "records" / "dp"
    save_record(run, record, privacy.keep(run))
    assert not (record / "last.pt").exists()
    got = privacy.figures(record)
    assert got == privacy.figures(run)
    assert (got["noise_multiplier"], got["clipping_norm"]) == (0.935, 1.25)


# ---- docs/benchmarks.md, and the benchmark tables of docs/results.md: the benchmarks' JSON as records

BENCH_DOCS = ("benchmarks.md", "results.md")


def rebuild_benchmarks(tmp_path: Path, records: Path, monkeypatch) -> Path:
    """Copies of both documents under tmp_path/docs, their benchmark blocks rendered from `records`."""
    docs = tmp_path / "docs"
    docs.mkdir(parents=True)
    for name in BENCH_DOCS:
        shutil.copyfile(REPO / "docs" / name, docs / name)
    monkeypatch.chdir(REPO)
    runs, doc = tmp_path / "runs", docs / "results.md"
    args = ["--doc", str(doc), "--runs-dir", str(runs), "--records-dir", str(records)]
    main(["--benchmarks", "--no-run", *args])
    return docs


def test_benchmarks_rebuild_byte_for_byte_from_their_records(tmp_path, monkeypatch):
    docs = rebuild_benchmarks(tmp_path, RECORDS, monkeypatch)
    for name in BENCH_DOCS:
        assert (docs / name).read_bytes() == (REPO / "docs" / name).read_bytes(), (
            f"`python -m fedgpt.results --benchmarks --no-run` changes docs/{name}: commit what it writes, "
            "or the records it was rendered from"
        )


def test_a_changed_benchmark_figure_changes_its_line(tmp_path, monkeypatch):
    records = tmp_path / "records"
    shutil.copytree(RECORDS / "bench", records / "bench")
    fed2 = records / "bench" / "fed-2.json"
    r = json.loads(fed2.read_text())
    r["simulation"]["startup_s"] = 123.45
    fed2.write_text(json.dumps(r))
    comm = records / "bench" / "comm.json"
    c = json.loads(comm.read_text())
    int4 = c["rows"]["int4_ef"]
    int4["final_val_loss"] = 9.8765
    comm.write_text(json.dumps(c))
    many = records / "bench" / "scale-many.json"
    m = json.loads(many.read_text())
    most = m["by_clients"][-1]
    most["peak_memory_mb"] = 12345
    many.write_text(json.dumps(m))
    sim2, on = records / "bench" / "secagg-sim-2.json", records / "bench" / "secagg-deploy-on.json"
    s2, d = json.loads(sim2.read_text()), json.loads(on.read_text())
    s2["rows"]["secagg"]["final_val_loss"] = 7.654321
    d["runs"]["run"]["median_round_s"] = 99.99
    sim2.write_text(json.dumps(s2))
    on.write_text(json.dumps(d))

    docs = rebuild_benchmarks(tmp_path, records, monkeypatch)
    first = json.loads((RECORDS / "bench" / "fed-1.json").read_text())["simulation"]["startup_s"]
    row = f"| simulation start-up, launch to first client step | {first:.2f} s, 123.45 s | 8 s |"
    assert row in (docs / "benchmarks.md").read_text().splitlines()
    assert f"| {int4['label']} |" in (docs / "results.md").read_text()
    line = next(
        x for x in (docs / "results.md").read_text().splitlines() if x.startswith(f"| {int4['label']} |")
    )
    assert line.split(" | ")[4] == "9.8765"  # its final val loss, the fifth column

    def scale_row(row: dict) -> str:  # a scale table's line of `row`'s client count and sample
        start = f"| {row['clients']:,} | {row['sampled_per_round']:,} |"
        return next(x for x in (docs / "results.md").read_text().splitlines() if x.startswith(start))

    assert scale_row(most).endswith(" | 12,345 |")  # its peak memory, the last column
    fewest = json.loads((RECORDS / "bench" / "scale-many.json").read_text())["by_clients"][0]
    assert scale_row(fewest).endswith(f" | {fewest['peak_memory_mb']:,} |")  # the other row's own
    assert (docs / "benchmarks.md").read_bytes() != (REPO / "docs" / "benchmarks.md").read_bytes()

    secagg = [x for x in (docs / "results.md").read_text().splitlines() if x.startswith("| SecAgg+ |")]
    sim1 = json.loads((RECORDS / "bench" / "secagg-sim-1.json").read_text())["rows"]["secagg"]
    assert secagg[0].endswith(f" | {sim1['final_val_loss']:.7f}, 7.6543210 |")  # run 1's own, then run 2's
    assert secagg[1].split(" | ")[2] == "99.99"  # the deployment's median round
    plain = json.loads((RECORDS / "bench" / "secagg-deploy-plain.json").read_text())["runs"]["run"]
    plain_line = [x for x in (docs / "results.md").read_text().splitlines() if "| plain FedAvg | deploy" in x]
    assert plain_line[0].split(" | ")[2] == f"{plain['median_round_s']:.2f}"


def test_a_missing_benchmark_record_stops_no_run_and_leaves_both_documents(tmp_path, monkeypatch):
    records = tmp_path / "records"
    shutil.copytree(RECORDS / "bench", records / "bench")
    (records / "bench" / "deploy-2.json").unlink()
    with pytest.raises(ValueError) as e:
        rebuild_benchmarks(tmp_path, records, monkeypatch)
    message = str(e.value)
    assert message.startswith("no records for benchmarks (deploy-2)") and "\n" not in message
    assert "python -m fedgpt.results --benchmarks" in message
    for name in BENCH_DOCS:
        assert (tmp_path / "docs" / name).read_bytes() == (REPO / "docs" / name).read_bytes()
