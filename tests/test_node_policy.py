"""A node that trusts no server (fedgpt.fed.node_policy): the real ClientApp (client_app.app) given what a
server that lies would send it — a run config that names the node's private files, run ids that are paths, a
vocabulary that makes the node describe its text — answers as the node's own config says, and what reaches
the server is what Flower would send it (the reply, or the error's text)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from conftest import TINY, node_config
from flwr.app import ConfigRecord, RecordDict

from fedgpt.config import load_config
from fedgpt.fed.server import FederatedRun

PRIVATE = (
    "JULIET:\nThe vault code is seven four nine two; the key hides under the blue stone by the east gate.\n"
)
KINDS = {"query": "query", "train": "train", "evaluate": "evaluate"}


def tiny_run(data_dir: Path, tmp_path: Path, *overrides: str) -> FederatedRun:
    cfg = load_config(
        TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'run'}", *overrides]
    )
    return FederatedRun(cfg, log=lambda s: None)


def ask(kind: str, config: dict, node: dict, arrays=None) -> tuple[dict | None, str | None]:
    """Send the real ClientApp one message of `kind` with this config record; (reply content, None), or (None,
    the error reason the server gets: Flower's own format, fedgpt.fed.node_policy's text inside it)."""
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    import client_app
    from fedgpt.fed import client

    client._CACHE.clear()  # as a fresh node process would
    meta = Metadata(
        run_id=1,
        message_id=f"{kind}-7",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=KINDS[kind],
    )
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    try:
        reply = client_app.app(Message(content, metadata=meta), context)
    except Exception as ex:  # what flwr's run_clientapp sends the server for a ClientApp that raised
        return None, str(type(ex)) + ":<'" + str(ex) + "'>"
    if reply.has_error():
        return None, reply.error.reason
    return reply.content, None


def lying(run: FederatedRun, rnd: int | None = None, **fields) -> dict:
    """The run's facts (and round rnd's work order) with fields of its config or facts replaced."""
    facts = run.run_facts()
    cfg = json.loads(facts["fedgpt-config"])
    for key, value in fields.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            facts[key.replace("_", "-")] = value
    facts["fedgpt-config"] = json.dumps(cfg)
    return {**facts, **(run.work_order(rnd).to_config() if rnd else {})}


def test_the_run_config_cannot_make_a_node_read_its_files(data_dir, tmp_path):
    run = tiny_run(data_dir, tmp_path)
    node = {**node_config(run), "data-dir": str(tmp_path / "node-data")}
    (tmp_path / "node-data").mkdir()  # the node's own copy of the corpus
    shutil.copytree(Path(data_dir) / "tinyshakespeare", tmp_path / "node-data" / "tinyshakespeare")
    secret = tmp_path / "home" / "diary.txt"
    secret.parent.mkdir()
    secret.write_text(PRIVATE * 50)
    honest, error = ask("query", lying(run), node)
    assert error is None, error
    # the server names the node's private file as corpus and vocabulary, and data folders of its own
    attack = lying(
        run,
        data__input_file=str(secret),
        data__vocab_file=str(secret),
        data__data_dir=str(tmp_path / "server-data"),
        train__init_from=str(secret),
    )
    got, error = ask("query", attack, node)
    assert error is None, error
    assert dict(got["info"]) == dict(honest["info"])  # the node's own corpus, partition 0, as without the lie
    # and it trains on it: one round of the lying run, its update as the server decodes it
    sent = run.exchange.downlink(run.global_state, base_id=1)
    got, error = ask("train", {**attack, **run.work_order(1).to_config()}, node, arrays=sent)
    assert error is None and "arrays" in got, error
    # nothing of the file was read into the node's data folder, nor a folder made where the server said
    cached = [p.name for p in (tmp_path / "node-data").iterdir()]
    assert not any("diary" in name for name in cached), cached
    assert not (tmp_path / "server-data").exists()


def test_a_run_id_is_a_name_never_a_path_and_state_stays_in_the_nodes_folder(data_dir, tmp_path):
    run = tiny_run(data_dir, tmp_path, "--fed.client_optimizer=keep")
    node = {**node_config(run), "state-dir": str(tmp_path / "node-state")}
    sent = run.exchange.downlink(run.global_state, base_id=1)
    # another folder's state files, which an absolute run id with a later keep-from-round would prune
    victim = tmp_path / "victim" / "partition-0"
    victim.mkdir(parents=True)
    for r in (1, 2):
        (victim / f"round-{r}.pt").write_bytes(b"theirs")
    for run_id in ("../../escape", str(tmp_path / "victim"), "", "a/b"):
        order = {**run.work_order(3).to_config(), "work.keep-from-round": 5}
        got, error = ask("train", {**lying(run, run_id=run_id), **order}, node, arrays=sent)
        assert got is None and "run-id is not a run id" in error, (run_id, error)
    assert sorted(p.name for p in victim.iterdir()) == ["round-1.pt", "round-2.pt"]
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    for rnd in (0, -1):
        got, error = ask("train", lying(run, 1) | {"work.round": rnd}, node, arrays=sent)
        assert got is None and "round is not an integer" in error
    # an honest round: the state goes to the node's own state-dir, whatever client-state-dir the server names
    theirs = tmp_path / "server-chose-this"
    got, error = ask("train", lying(run, 1, client_state_dir=str(theirs)), node, arrays=sent)
    assert error is None, error
    assert list((tmp_path / "node-state" / run.run_info["run_id"]).rglob("round-1.pt"))
    assert not theirs.exists()
    # a node with no state-dir of its own keeps it under its node-dir, never under the server's path
    bare = {k: v for k, v in node.items() if k != "state-dir"} | {"node-dir": str(tmp_path / "bare")}
    got, error = ask("train", lying(run, 1, client_state_dir=str(theirs)), bare, arrays=sent)
    assert error is None, error
    assert list((tmp_path / "bare" / "state").rglob("round-1.pt")) and not theirs.exists()


def test_an_error_reply_says_what_failed_and_never_what_the_node_holds(data_dir, tmp_path, caplog):
    run = tiny_run(data_dir, tmp_path)
    own = tmp_path / "node" / "own.txt"
    own.parent.mkdir()
    own.write_text(PRIVATE * 20 + "#&=1479 PZbikmnpqsxy\n")
    node = {**node_config(run), "input-file": str(own), "data-dir": str(tmp_path / "node" / "data")}
    # a one-character vocabulary: encoding the node's text fails on every other character it holds
    attack = {**lying(run), "tokenizer": json.dumps({"kind": "char", "chars": "a"})}
    with caplog.at_level(logging.ERROR, logger="fedgpt.node"):
        got, error = ask("query", attack, node)
    assert got is None and "cannot be encoded with the run's tokenizer" in error, error
    charset = "".join(sorted(set(own.read_text()) - {"a"}))
    for leak in (str(own), own.name, "vault", charset, charset[:8], "1479"):
        assert leak not in error, (leak, error)
    assert "1479" in caplog.text  # the node's operator gets the details in the node's own log
    # any other failure reaches the server as its kind and stage only, without the exception's own text
    got, error = ask("query", {**lying(run), "tokenizer": "{not json"}, node)
    assert got is None and "query failed on this node (JSONDecodeError)" in error, error
    assert "Expecting property name" not in error


@pytest.mark.parametrize(
    "setting, value, needle",
    [
        ("data-dir", "relative/data", "must be absolute"),
        ("partition-id", "5", "not in \\[0, num-partitions=3\\)"),
    ],
)
def test_the_nodes_own_settings_are_checked(data_dir, tmp_path, setting, value, needle):
    run = tiny_run(data_dir, tmp_path)
    got, error = ask("query", lying(run), {**node_config(run), setting: value})
    assert got is None and __import__("re").search(needle, error), error


def test_a_node_that_requires_secagg_sends_no_metric_in_the_clear_whatever_the_run_config_says(
    data_dir, tmp_path
):
    # A server that sends the node a train message whose run config says secagg.enabled=false (as if the
    # round were plain) gets the update only as SecAgg+'s mod would mask it, and no loss or tokens beside it.
    from fedgpt.fed import client

    run = tiny_run(data_dir, tmp_path)
    assert not run.cfg.secagg.enabled
    sent = run.exchange.downlink(run.global_state, base_id=1)
    content = RecordDict({"arrays": sent, "config": ConfigRecord(lying(run, 1))})
    reply = client.fit(content, {**node_config(run), "require-secagg": True})
    assert "arrays" not in reply.array_records  # no update in the clear (the mod masks the FitRes it holds)
    assert dict(reply["metrics"]) == {"num-examples": int(reply["metrics"]["num-examples"])}
