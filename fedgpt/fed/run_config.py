"""fedgpt's config from Flower's run config (`flwr run . --run-config "..."`).

`flwr run` accepts only the keys of [tool.flwr.app.config] in pyproject.toml, so every fedgpt setting
travels in one `overrides` string:

    config = "configs/shakespeare_char_cpu.yaml"   # YAML config, relative to the app
    overrides = "fed.rounds=3 model.n_layer=2"     # space-separated dotted overrides
    resume = false                                 # continue from <train.out_dir>/last.pt
    overwrite = false                              # replace the run already in train.out_dir
    client-threads = 0                             # torch threads per ClientApp process; 0: torch's default
"""

from __future__ import annotations

from pathlib import Path

from fedgpt.config import Config, load_config


def config_from_run_config(run_config: dict, app_dir: Path) -> tuple[Config, dict]:
    """The Config and the run options (resume, overwrite, client_threads) a run config asks for.

    Relative data and output paths are made absolute against the working directory.
    """
    path = Path(str(run_config.get("config", "configs/shakespeare_char_cpu.yaml")))
    if not path.is_absolute():
        path = app_dir / path
    cfg = load_config(path, str(run_config.get("overrides", "")).split())
    # A deployed app's code lives in $FLWR_HOME/apps/..., but Flower keeps the working directory
    # flower-superlink was started in: relative paths mean that directory. Made absolute, they show in the
    # checkpoint's config, and clients without a node-config data-dir on this machine read the same corpus.
    d, t = cfg.data, cfg.train
    d.data_dir, t.out_dir = str(Path(d.data_dir).resolve()), str(Path(t.out_dir).resolve())
    d.input_file = str(Path(d.input_file).expanduser().resolve()) if d.input_file else ""
    d.vocab_file = str(Path(d.vocab_file).expanduser().resolve()) if d.vocab_file else ""
    opts = {
        "resume": bool(run_config.get("resume", False)),
        "overwrite": bool(run_config.get("overwrite", False)),
        "client_threads": int(run_config.get("client-threads", 0)),
    }
    return cfg, opts
