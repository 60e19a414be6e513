"""fedgpt ServerApp: aggregation, central validation and checkpoints each round (`flwr run .`)."""

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgpt.fed.run_config import config_from_run_config
from fedgpt.fed.server import FederatedRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, opts = config_from_run_config(context.run_config, app_dir=Path(__file__).parent)
    run = FederatedRun(cfg, **opts)
    run.open_folder()
    print(json.dumps(run.run(grid)))
