"""The package's rooms keep their boundaries: the core imports neither Flower nor the benchmarks, the
federation package imports no benchmark, no module imports itself back through others, and nothing depends
on a checkout."""

from __future__ import annotations

import ast
import fnmatch
import json
import subprocess
import sys
import warnings
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


def test_model_and_generation_do_not_import_each_other():
    # The KV cache lives with the model and moves itself on; the sampling loop takes any model with one.
    for a, b in (("model", "generate"), ("generate", "model")):
        tree = ast.parse((PACKAGE / f"{a}.py").read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert f"fedgpt.{b}" not in names, f"fedgpt/{a}.py imports fedgpt.{b} (TYPE_CHECKING included)"


# Size is a symptom (shared STYLE.md, point 13): the largest modules and functions are a report to look at,
# not a cap to pass, so that no code moves only to meet a count.
REPORT_MODULE_LINES, REPORT_FUNCTION_LINES = 400, 60
LONG_BY_NATURE = {"fedgpt.model.*.forward", "fedgpt.train.Trainer.train_steps"}


def size_report(root: Path) -> list[str]:
    """Modules over REPORT_MODULE_LINES lines and functions over REPORT_FUNCTION_LINES, largest first."""
    rows = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > REPORT_MODULE_LINES:
            rows.append((text.count("\n"), f"module {path.relative_to(root.parent)}"))
        tree = ast.parse(text)
        for cls in [None, *[n for n in tree.body if isinstance(n, ast.ClassDef)]]:
            for fn in (tree if cls is None else cls).body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
                    name = f"{module}.{cls.name + '.' if cls else ''}{fn.name}"
                    exempt = any(fnmatch.fnmatch(name, pattern) for pattern in LONG_BY_NATURE)
                    if fn.end_lineno - fn.lineno + 1 > REPORT_FUNCTION_LINES and not exempt:
                        rows.append((fn.end_lineno - fn.lineno + 1, f"function {name}"))
    return [f"{what} ({n} lines)" for n, what in sorted(rows, reverse=True)]


def test_size_report_names_the_largest_modules_and_functions(tmp_path):
    pkg = tmp_path / "fedgpt"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(REPORT_FUNCTION_LINES + 5))
    (pkg / "big.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert size_report(pkg) == [f"function fedgpt.big.long ({REPORT_FUNCTION_LINES + 6} lines)"]
    report = size_report(PACKAGE)
    if report:
        warnings.warn("largest modules and functions: " + "; ".join(report), stacklevel=1)
