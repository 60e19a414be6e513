"""fedgpt.config: every YAML in configs/, dotted overrides, one ValueError naming every bad key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from fedgpt.config import SECTIONS, Config, load_config, parse_overrides, reference_markdown

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "shakespeare_char.yaml", "shakespeare_char_cpu.yaml"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_loads_and_its_keys_are_dataclass_fields(path: Path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert set(raw) <= set(SECTIONS), f"{path.name}: unknown sections {set(raw) - set(SECTIONS)}"
    for section, values in raw.items():
        fields = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        assert set(values) <= fields, f"{path.name}: {section} has unknown keys {set(values) - fields}"
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{path.name}: {section}.{key}"


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert set(cfg.to_dict()) == {"model", "data", "train", "fed", "lora", "dp", "secagg", "personal"}


def test_overrides_parse_ints_floats_bools_strings():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "--train.max_steps=7",
            "--train.learning_rate=1e-3",
            "--train.min_lr=5.0e-5",
            "--model.dropout=0.25",
            "--train.compile=true",
            "--model.bias=True",
            "--train.decay_lr=false",
            "--data.tokenizer=gpt2",
            "--train.out_dir=runs/x",
            "train.seed=3",
            "--fed.node_timeout=5",
        ],
    )
    t = cfg.train
    assert t.max_steps == 7 and type(t.max_steps) is int
    assert t.learning_rate == 1e-3 and type(t.learning_rate) is float
    assert t.min_lr == 5e-5
    assert cfg.model.dropout == 0.25
    assert t.compile is True and cfg.model.bias is True and t.decay_lr is False
    assert cfg.data.tokenizer == "gpt2" and t.out_dir == "runs/x"
    assert t.seed == 3
    assert cfg.fed.node_timeout == 5.0 and type(cfg.fed.node_timeout) is float  # ints are accepted for floats
    assert cfg.model.n_layer == 2  # untouched keys keep the file's values


def test_parse_overrides_shapes():
    assert parse_overrides(["--train.learning_rate=1e-3", "model.n_layer=2", "--data.input_file="]) == {
        "train": {"learning_rate": 1e-3},
        "model": {"n_layer": 2},
        "data": {"input_file": ""},
    }
    with pytest.raises(ValueError, match="--section.key=value") as e:
        parse_overrides(["--max_steps=3", "--train.max_steps"])
    assert "--max_steps=3" in str(e.value) and "--train.max_steps" in str(e.value)


def test_one_error_names_every_offending_key(tmp_path: Path):
    bad = {
        "model": {"n_layer": 0, "n_heads": 4, "dropout": 1.5, "arch": "rnn"},
        "train": {
            "max_steps": "many",
            "learning_rate": -1.0,
            "compile": 1,
            "batch_size": 2.5,
            "muon_momentum": 1.0,
        },
        "data": {"tokenizer": "bytes"},
        "fed": {"strategy": "fedsgd", "fraction_train": 0.0},
        "optim": {"lr": 1},
    }
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError) as e:
        load_config(p)
    msg = str(e.value)
    for key in (
        "model.n_layer",
        "model.n_heads",
        "model.dropout",
        "model.arch",
        "train.max_steps",
        "train.learning_rate",
        "train.compile",
        "train.batch_size",
        "train.muon_momentum",
        "data.tokenizer",
        "fed.strategy",
        "fed.fraction_train",
        "optim",
    ):
        assert key in msg, f"{key} missing from: {msg}"
    assert "unknown key" in msg and "unknown section" in msg


def test_overrides_errors_are_collected_too():
    with pytest.raises(ValueError) as e:
        load_config(
            REPO / "configs" / "tiny.yaml",
            ["--train.max_stepz=3", "--model.n_head=5", "--train.min_lr=1.0", "--bogus.x=1"],
        )
    msg = str(e.value)
    for key in ("train.max_stepz", "model.n_embd", "train.min_lr", "bogus"):
        assert key in msg, f"{key} missing from: {msg}"


def test_missing_file_and_invalid_yaml(tmp_path: Path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  n_layer: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(listing)
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    with pytest.raises(ValueError, match="model: must be a mapping"):
        load_config(section)


def test_empty_yaml_is_the_defaults(tmp_path: Path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_config(p) == Config()


def test_shakespeare_char_is_nanogpts_gpu_recipe():
    cfg = load_config(REPO / "configs" / "shakespeare_char.yaml")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (6, 6, 384, 256)
    assert (t.batch_size, m.dropout) == (64, 0.2)
    assert (t.learning_rate, t.min_lr, t.warmup_steps, t.max_steps) == (1e-3, 1e-4, 100, 5000)
    assert (t.beta2, t.eval_interval, t.eval_iters, t.grad_accum_steps) == (0.99, 250, 200, 1)
    assert cfg.data.tokenizer == "char"


def test_shakespeare_char_cpu_is_nanogpts_baby_gpt_at_a_higher_learning_rate():
    cfg = load_config(REPO / "configs" / "shakespeare_char_cpu.yaml")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (4, 4, 128, 64)
    assert (t.batch_size, m.dropout) == (12, 0.0)
    assert (t.max_steps, t.eval_interval, t.eval_iters) == (2000, 250, 100)  # nanoGPT: 20 eval batches
    assert t.lr_decay_steps in (0, 2000)  # 0 decays over max_steps = nanoGPT's lr_decay_iters=2000
    assert (t.learning_rate, t.min_lr) == (3e-3, 3e-4)  # nanoGPT: 1e-3, 1e-4 (see the config's comment)
    assert t.compile is False and cfg.data.tokenizer == "char"


def test_every_field_is_documented_beside_its_default():
    # The comment on a field's line is its documentation (README table, python -m fedgpt.config).
    rows = reference_markdown().splitlines()[2:]
    undocumented = [row.split("|")[1].strip() for row in rows if not row.split("|")[3].strip()]
    assert not undocumented, f"fields without a comment on their line: {undocumented}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--fed.fragments=3"], r"fed.fragments: must be in \[1, model.n_layer\]"),  # tiny has 2 blocks
        (["--fed.fragments=2", "--fed.strategy=fedadam"], "cannot: use diloco"),
        (["--fed.fragments=2", "--fed.fraction_train=0.5"], "every client in every round"),
        (
            ["--fed.fragments=2", "--fed.stragglers=0.5", "--fed.straggler_policy=drop"],
            "no dropped stragglers",
        ),
        (["--fed.fragments=2", "--secagg.enabled=true"], "without DP or SecAgg"),
    ],
)
def test_streaming_fragments_refuse_what_would_lose_a_fragment(overrides, message):
    load_config(REPO / "configs" / "tiny.yaml", ["--fed.fragments=2", "--fed.strategy=diloco"])  # fine
    with pytest.raises(ValueError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


@pytest.mark.parametrize(
    "other", ["--secagg.enabled=true", "--dp.noise_multiplier=1.0", "--fed.fragments=2 --fed.strategy=diloco"]
)
def test_shared_moments_are_refused_where_they_would_leak(other):
    # fed.client_optimizer=average sends each client's moments in the clear: under SecAgg+ or DP they would
    # hand a curious server the gradient information the masks and the noise hide.
    tiny = REPO / "configs" / "tiny.yaml"
    load_config(tiny, ["--fed.client_optimizer=average", "--train.optimizer=muon"])  # fine alone
    with pytest.raises(
        ValueError, match="fed.client_optimizer: average sends the clients' moments in the clear"
    ):
        load_config(tiny, ["--fed.client_optimizer=average", *other.split()])


def test_an_orthogonal_outer_step_needs_an_outer_sgd_strategy():
    tiny = REPO / "configs" / "tiny.yaml"
    load_config(tiny, ["--fed.outer_orthogonal=true", "--fed.strategy=diloco"])  # fine
    load_config(tiny, ["--fed.outer_orthogonal=true", "--fed.strategy=fedavgm"])  # fine
    with pytest.raises(ValueError, match="fed.outer_orthogonal: orthogonalizes the outer SGD step"):
        load_config(tiny, ["--fed.outer_orthogonal=true", "--fed.strategy=fedadam"])


def test_wire_format_settings_follow_the_format_table():
    # by hand, from the README's table: what may travel which way, what SecAgg+ and DP's client clipping take,
    # and which uplinks carry their quantization error into the next update
    tiny = REPO / "configs" / "tiny.yaml"
    carries = {"fp32": False, "fp16": False, "int8": True, "int4": True, "sparse": True, "fp8": True}
    for uplink, expected in carries.items():
        assert load_config(tiny, [f"--fed.uplink={uplink}"]).uses_error_feedback is expected, uplink
        cfg = load_config(tiny, [f"--fed.uplink={uplink}", "--fed.error_feedback=false"])
        assert cfg.uses_error_feedback is False and cfg.fed.error_feedback is False
    with pytest.raises(
        ValueError, match="fed.uplink: 'bf16' is not one of fp32, fp16, int8, int4, sparse, fp8"
    ):
        load_config(tiny, ["--fed.uplink=bf16"])
    with pytest.raises(ValueError, match="fed.downlink: 'fp8' is not one of fp32, fp16$"):
        load_config(tiny, ["--fed.downlink=fp8"])
    secagg = ["--secagg.enabled=true", "--fed.num_clients=4"]
    load_config(tiny, [*secagg, "--fed.uplink=fp32"])  # fine
    for uplink in ("fp16", "fp8", "sparse"):
        with pytest.raises(ValueError, match=f"secagg: fed.uplink {uplink} is not used: SecAgg\\+ quantizes"):
            load_config(tiny, [*secagg, f"--fed.uplink={uplink}"])
    dp = ["--dp.noise_multiplier=1.0", "--fed.weighting=uniform", "--dp.clipping=client"]
    load_config(tiny, [*dp, "--fed.uplink=fp16"])  # fine: fp16 is not quantized
    for uplink in ("int8", "int4", "fp8", "sparse"):
        with pytest.raises(ValueError, match=f"dp.clipping: client clipping with fed.uplink={uplink} would"):
            load_config(tiny, [*dp, f"--fed.uplink={uplink}"])


def test_validation_lives_with_the_config_and_the_choices_import_nothing_back():
    # config_rules.py is the choices by name (imported by the model, data, partitions and strategies without
    # the config); the checks are fedgpt.config's own: no module imports the other back.
    import ast

    rules = ast.parse((REPO / "fedgpt" / "config_rules.py").read_text())
    imported = [n.module for n in ast.walk(rules) if isinstance(n, ast.ImportFrom)]
    assert imported == ["__future__"], f"fedgpt/config_rules.py imports {imported}"
