"""The package's rooms keep their boundaries: the core imports neither Flower nor the benchmarks, the
federation package imports no benchmark, no module imports itself back through others, and nothing depends
on a checkout."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "fedgpt"
# Entry points that live in the core folder for their command name only (python -m fedgpt.results).
SHIMS = {"fedgpt.results"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(folder: Path) -> list[str]:
    return sorted(module_name(p) for p in folder.glob("*.py"))


def imported_in_fresh_interpreter(names: list[str]) -> list[str]:
    """sys.modules after importing `names` in a new Python process."""
    code = "import importlib, json, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    code += "print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_core_imports_no_flower_no_ray_and_no_benchmark():
    core = [m for m in modules(PACKAGE) if m not in SHIMS]
    assert {"fedgpt.model", "fedgpt.train", "fedgpt.local_train", "fedgpt.sample", "fedgpt.data"} <= set(core)
    loaded = imported_in_fresh_interpreter(core)
    for forbidden in ("flwr", "ray", "fedgpt.fed", "fedgpt.bench"):
        assert not [m for m in loaded if m == forbidden or m.startswith(forbidden + ".")], (
            f"the core imports {forbidden}"
        )


def test_federation_package_imports_no_benchmark():
    loaded = imported_in_fresh_interpreter(
        modules(PACKAGE / "fed") + ["client_app", "server_app", "simulate"]
    )
    assert "flwr" in loaded  # it is the Flower room
    assert not [m for m in loaded if m.startswith("fedgpt.bench")]


def runtime_nodes(tree: ast.AST):
    """Every node of a module but those under `if TYPE_CHECKING:` (imports for annotations, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    """module -> the fedgpt modules it imports when it runs (function-level imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name, deps = module_name(path), set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1]
                        + ([base] if base else [])
                    )
                deps.add(base)
                deps |= {f"{base}.{a.name}" for a in node.names}  # `from fedgpt.bench import floor`
        graph[name] = {d for d in deps if d.startswith("fedgpt")} - {name}
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "fedgpt.fed.server" in graph["fedgpt.fed.simulation"]  # the graph sees function-level imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # the check itself finds a planted cycle
    assert find_cycle({**graph, "fedgpt.config": graph["fedgpt.config"] | {"fedgpt.train"}}) is not None


def test_benchmarks_are_imported_by_nothing_outside_them():
    graph = import_graph()
    users = {m for m, deps in graph.items() if any(d.startswith("fedgpt.bench") for d in deps)}
    assert {m for m in users if not m.startswith("fedgpt.bench")} <= SHIMS


def test_nothing_in_the_package_locates_a_checkout():
    # A module that finds files next to itself (Path(__file__).parents[...]) only works from a checkout.
    for path in PACKAGE.rglob("*.py"):
        assert "__file__" not in path.read_text(), f"{path.relative_to(REPO)} locates files from __file__"
