"""A curious ServerApp, for tests: it skips SecAgg+ (and the pre-flight that would tell it that the nodes
require it) and sends every node the plain train message fedgpt's round would send without SecAgg+, hoping
for each node's update in the clear. What comes back is written to $FEDGPT_TEST_PROBE_DIR/replies.json.
"""

import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedgpt.fed.grid import error_reason, send_and_receive, wait_for_nodes
from fedgpt.fed.run_config import config_from_run_config
from fedgpt.fed.server import FederatedRun


class PlainTrainRun(FederatedRun):
    """One plain train message per connected node, as FederatedRun.run_round would send it; the replies."""

    def run(self, grid: Grid) -> list[dict]:
        nodes = wait_for_nodes(grid, self.cfg.fed.num_clients, self.cfg.fed.node_timeout, self.log)
        content = RecordDict(
            {
                "arrays": self.exchange.downlink(self.global_state, base_id=1),
                "config": ConfigRecord({**self.run_facts(), **self.work_order(1).to_config()}),
            }
        )
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        return [
            {
                "node": r.metadata.src_node_id,
                "error": error_reason(r) if r.has_error() else None,
                "arrays": sum(a.count_bytes() for a in r.content.array_records.values())
                if r.has_content()
                else 0,
            }
            for r in send_and_receive(grid, msgs, self.cfg.fed.round_timeout)
        ]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, opts = config_from_run_config(context.run_config, app_dir=Path(__file__).parent)
    replies = PlainTrainRun(cfg, **opts).run(grid)
    (Path(os.environ["FEDGPT_TEST_PROBE_DIR"]) / "replies.json").write_text(json.dumps(replies))
