"""Where a deployed train message spends its time on a SuperNode, read from the SuperNode's own log.

    env FLWR_LOG_LEVEL=DEBUG flower-supernode ... > node.log     # DEBUG: Flower's log lines carry timestamps
    runs = message_phases(Path("node.log").read_text())          # {run id: [{phase: seconds}, ...]}, in order

Each train message of a run, from the lines Flower 1.42 logs for it:

    pull       "Receiving: train message" -> "Received successfully": its objects from the SuperLink
    launch     -> "Start `flwr-clientapp` process": the SuperExec's task poll (every
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL, 1 s by default), the process's start and Flower's imports
    clientapp  -> "Sending: train message": the ClientApp's own work, until the SuperNode sees its reply
               (the SuperNode looks every 0.5 s)
    push       -> "Sent successfully": the reply's objects to the SuperLink
    idle       -> the next train message's "Receiving": after a reply the SuperNode asks for the next
               message, finds none yet and sleeps 3 s (longer when the ServerApp is late); None after a
               run's last message

A log without timestamps (another log level) or from another Flower version gives no messages.
"""

from __future__ import annotations

import re
import statistics
from datetime import datetime

PHASES = ("pull", "launch", "clientapp", "push", "idle")
MARKS = {  # the line that ends each phase
    "pull": "Received successfully",
    "launch": "Start `flwr-clientapp` process",
    "clientapp": "Sending: train message",
    "push": "Sent successfully",
}
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
RUN = re.compile(r"\[RUN (\d+)")


def message_phases(log: str) -> dict[str, list[dict[str, float | None]]]:
    """The phases of every complete train message in a SuperNode's log, by run id, in the order received."""
    runs: dict[str, list[dict]] = {}
    run, msg, last = None, None, None  # last: the previous train message of the same run
    for line in log.splitlines():
        if m := RUN.search(line):
            run = m.group(1)
        stamp = STAMP.search(line)
        if stamp is None:
            continue
        t = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "Receiving: train message" in line:
            if last is not None and last["run"] == run:
                last["idle"] = round(t - last["at"], 3)
            msg = {"run": run, "at": t}
        elif msg is not None:
            phase = next((p for p, mark in MARKS.items() if mark in line and p not in msg), None)
            if phase is not None and all(p in msg for p in PHASES[: PHASES.index(phase)]):
                msg[phase], msg["at"] = round(t - msg["at"], 3), t
                if phase == "push":
                    msg["idle"] = None
                    runs.setdefault(run, []).append(msg)
                    msg, last = None, msg
    return {r: [{p: m[p] for p in PHASES} for m in msgs] for r, msgs in runs.items()}


def median_phases(messages: list[dict[str, float | None]]) -> dict[str, float | None]:
    """The median of each phase over messages (idle over those that have one)."""
    out = {}
    for p in PHASES:
        xs = [m[p] for m in messages if m[p] is not None]
        out[p] = round(statistics.median(xs), 3) if xs else None
    return out
