"""The README is the front door: its config table and its commands must match the code."""

import re
import subprocess
import sys

from conftest import REPO

from fedgpt.config import reference_markdown


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_config_reference_matches_code():
    m = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", readme(), re.S)
    assert m, "README lacks the config reference markers"
    assert m.group(1) == reference_markdown(), (
        "README config table is stale: paste `python -m fedgpt.config` into it"
    )


def test_ci_runs_the_readme_commands():
    ci = (REPO / ".ci" / "run").read_text()
    text = readme()
    for command in ('pip install -e ".[dev]"', "python -m pytest -q"):
        assert command in text, f"README lacks {command}"
        assert command in ci, f".ci/run does not call {command}"


def test_readme_configs_exist():
    for path in set(re.findall(r"configs/[\w.]+\.yaml", readme())):
        assert (REPO / path).is_file(), f"README names {path}, which does not exist"


def test_entry_points_have_help():
    for args in (
        ["-m", "fedgpt.local_train"],
        ["-m", "fedgpt.sample"],
        ["-m", "fedgpt.export"],
        ["simulate.py"],
    ):
        r = subprocess.run(
            [sys.executable, *args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
