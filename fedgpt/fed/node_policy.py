"""A node's trust boundary: what a node takes from its own configuration, what it takes from the server, and
what it refuses. Read this module to know what a server can make a fedgpt node do.

    policy = NodePolicy.of(context.node_config)       # once per message, from the node's own config
    cfg = policy.run_config(cfg)                      # the server's run config with the node's paths in it
    run_id = policy.run_id(record["run-id"])          # an identifier from a message, checked before any file

The party a node guards against is the server. So:

- **Every path on a node comes from the node.** Its data (`data-dir`, and the node's copy of a shared corpus,
  `corpus-file`, or its own text, `input-file`), a char vocabulary (`vocab-file`), the base model a LoRA run
  fine-tunes (`init-from`), and where it keeps its client state and its trainer's socket (`state-dir`) are
  node settings; what the node is not given lives under its own folder (`node-dir`, by default
  <temp>/fedgpt-<uid>). The run config chooses the tokenizer, the model and the work, never a file: its
  data.input_file, data.vocab_file, data.data_dir, train.init_from, train.out_dir, fed.client_state_dir and
  lora.rows_from are replaced by the node's before any of them is read; the message's client-state-dir is
  ignored.
- **Identifiers from messages are checked before they touch the file system**: a run id is a short
  [A-Za-z0-9_-] name (never a path), rounds are integers. The partition a node serves is its own
  setting (`partition-id`, `num-partitions`), never the server's.
- **Errors sent to the server say what failed, never the node's data**: an exception whose text fedgpt wrote
  for the server (NodeError: a refusal, a mismatch of settings) goes as it is; any other reaches the server as
  its kind and the message's stage only, and its full text goes to the node's own log.
- **Privacy floors are the node's**: require-secagg, secagg-min-clients, and the identity key and roster that
  make SecAgg+ hold against a server that lies (secagg_policy; what they do is fedgpt.fed.secagg's) are node
  settings; the run config never decides them.

A setting is read from the node config (`flower-supernode --node-config "key=value ..."`), else from the
environment of the SuperNode as FEDGPT_NODE_<KEY> (a simulation's nodes get theirs that way from the process
that starts them: fedgpt.fed.simulation.node_environment), else its default.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgpt.fed.roster import Identity, Roster, load_identity, load_roster

if TYPE_CHECKING:
    from fedgpt.config import Config

log = logging.getLogger("fedgpt.node")

RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A node's settings that are paths: absolute, or refused (what each replaces of the run config: run_config).
PATH_SETTINGS = (
    "data-dir",
    "corpus-file",
    "vocab-file",
    "init-from",
    "input-file",
    "state-dir",
    "node-dir",
    "secagg-identity-key",
    "secagg-roster",
)


class NodeError(Exception):
    """An error whose text is safe to send to the server: it says what failed, never what the node holds."""


def node_setting(node: Any, key: str, default: str | int | float | bool) -> str | int | float | bool:
    """A setting of this node (its Context, or its node config): its node config `key`, else the environment
    of its SuperNode as FEDGPT_NODE_<KEY>, else `default`. The run config never decides it."""
    config = node.node_config if hasattr(node, "node_config") else node
    if key in config:
        value = config[key]
    else:
        value = os.environ.get("FEDGPT_NODE_" + key.upper().replace("-", "_"))
        if value is None:
            return default
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
    return type(default)(value)


def node_requires_secagg(node: Any) -> bool:
    return bool(node_setting(node, "require-secagg", False))


class NodeRefusal(NodeError, PermissionError):
    """A node's privacy floor refused a message (the reply carries only this error)."""


@dataclass(frozen=True)
class SecAggPolicy:
    """What this node requires of SecAgg+, from its own settings only (node config, else FEDGPT_NODE_*)."""

    require: bool  # require-secagg: refuse plain train and evaluate messages
    min_clients: int  # secagg-min-clients: the smallest cohort it hides in
    identity: Identity | None  # secagg-identity-key: its signing key ...
    roster: Roster | None  # ... and secagg-roster: its peers' public keys; both or neither

    @property
    def signs(self) -> bool:
        return self.roster is not None


def secagg_policy(node: Any) -> SecAggPolicy:
    """The node's SecAgg+ settings, read in one place. `secagg-identity-key` may hold `{partition-id}`,
    replaced by the node's partition id: how one environment gives each simulated node its own key."""
    key, roster = (
        str(node_setting(node, "secagg-identity-key", "")),
        str(node_setting(node, "secagg-roster", "")),
    )
    if bool(key) != bool(roster):
        raise NodeRefusal(
            "this node has one of secagg-identity-key and secagg-roster but not the other: give it both (its "
            "own private key and its peers' public keys), or neither"
        )
    config = node.node_config if hasattr(node, "node_config") else node
    key = key.replace("{partition-id}", str(config.get("partition-id", "")))
    return SecAggPolicy(
        require=node_requires_secagg(node),
        min_clients=int(node_setting(node, "secagg-min-clients", 2)),
        identity=load_identity(key) if key else None,
        roster=load_roster(roster) if roster else None,
    )


def default_node_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"fedgpt-{os.getuid()}"


@dataclass(frozen=True)
class NodePolicy:
    """What this node takes from its own configuration; built from it once per message."""

    partition_id: int | None  # the partition this node serves (None: the node config lacks it)
    num_partitions: int | None
    node_dir: Path  # the node's own folder: every default path lies under it
    data_dir: Path  # the shared corpus's download and encoded cache; tiktoken's cache
    corpus_file: str  # the node's copy of the run's corpus ("": Tiny Shakespeare, downloaded into data_dir)
    vocab_file: str  # a char vocabulary's text on this node ("": the corpus's own characters)
    input_file: str  # the node's own text (a file or a folder of *.txt): its one partition
    init_from: str  # the base model a LoRA run fine-tunes, on this node ("scratch": none)
    state_dir: Path  # client state between rounds, and the warm trainer's socket (workers/)

    @classmethod
    def of(cls, node: Any) -> NodePolicy:
        """The policy of a node from its Context or node config (and its FEDGPT_NODE_* environment)."""
        s = lambda key, default="": str(node_setting(node, key, default))
        node_dir = Path(s("node-dir") or default_node_dir()).expanduser()
        for key in PATH_SETTINGS:
            path = s(key).removeprefix("hf:") if key == "init-from" else s(key)
            if path and path != "scratch" and not Path(path).expanduser().is_absolute():
                raise NodeError(
                    f"node setting {key}={s(key)!r} is relative: a SuperNode's paths must be absolute "
                    f"(--node-config \"{key}='/abs/path'\")"
                )
        part, n = s("partition-id"), s("num-partitions")
        try:
            partition_id, num_partitions = (int(part) if part else None), (int(n) if n else None)
        except ValueError:
            raise NodeError("node config partition-id / num-partitions must be integers") from None
        if partition_id is not None and num_partitions is not None:
            if not 0 <= partition_id < num_partitions:
                raise NodeError(
                    f"node config partition-id={partition_id} is not in [0, num-partitions={num_partitions})"
                )
        return cls(
            partition_id=partition_id,
            num_partitions=num_partitions,
            node_dir=node_dir,
            data_dir=Path(s("data-dir") or node_dir / "data").expanduser(),
            corpus_file=s("corpus-file"),
            vocab_file=s("vocab-file"),
            input_file=s("input-file"),
            init_from=s("init-from") or "scratch",
            state_dir=Path(s("state-dir") or node_dir / "state").expanduser(),
        )

    def partition(self) -> tuple[int, int]:
        """(partition id, number of partitions) this node serves: its own setting, never the server's."""
        if self.partition_id is None or self.num_partitions is None:
            raise NodeError(
                "node config lacks partition-id / num-partitions: start the SuperNode with "
                '--node-config "partition-id=0 num-partitions=2"'
            )
        return self.partition_id, self.num_partitions

    def run_config(self, cfg: Config) -> Config:
        """The server's run config with every path replaced by this node's: what the node then reads."""
        data = replace(
            cfg.data,
            data_dir=str(self.data_dir),
            input_file=self.corpus_file,
            vocab_file=self.vocab_file,
        )
        if cfg.lora.rank and cfg.train.init_from != "scratch" and self.init_from == "scratch":
            raise NodeError(
                "the run fine-tunes a base model (train.init_from) and this node has none of its own: start "
                "the SuperNode with --node-config \"init-from='/abs/path/to/base.pt'\""
            )
        train = replace(cfg.train, init_from=self.init_from, out_dir=str(self.state_dir / "out"))
        fed = replace(cfg.fed, client_state_dir=str(self.state_dir))
        lora = replace(cfg.lora, rows_from="")  # the server chose the rows and sends them (embedding-rows)
        return replace(cfg, data=data, train=train, fed=fed, lora=lora)

    @staticmethod
    def run_id(value: Any) -> str:
        """A run id from a message, checked: a name, never a path."""
        if not isinstance(value, str) or not RUN_ID.fullmatch(value):
            raise NodeError("the message's run-id is not a run id ([A-Za-z0-9_-], at most 64): refused")
        return value

    @staticmethod
    def round(value: Any, what: str = "round", least: int = 1) -> int:
        """A round number from a message, checked: an integer, `least` or more."""
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise NodeError(f"the message's {what} is not an integer of {least} or more: refused")
        return value

    @staticmethod
    @contextmanager
    def guard(stage: str) -> Iterator[None]:
        """Errors of `stage` as the server may see them: a NodeError as it is, any other as its kind only;
        the full text and traceback go to this node's log."""
        try:
            yield
        except NodeError:
            raise
        except Exception as e:
            log.error("%s failed on this node:\n%s", stage, traceback.format_exc())
            raise NodeError(public_error(stage, e)) from None


def public_error(stage: str, e: BaseException) -> str:
    """What the server is told of an error that is not a NodeError: its kind and the stage, not its text."""
    return f"{stage} failed on this node ({type(e).__name__}); the details are in the node's own log"
