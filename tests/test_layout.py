"""The package layout: old flat module paths still resolve, no import cycle, every module imports on its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import get_class

import exprae

OLD_TARGETS = {
    "exprae.module.AutoencoderModule": "exprae.training.AutoencoderModule",
    "exprae.callbacks.DivergenceGuard": "exprae.training.DivergenceGuard",
    "exprae.callbacks.BatchSeed": "exprae.training.BatchSeed",
    "exprae.callbacks.ReconstructionFigures": "exprae.training.ReconstructionFigures",
    "exprae.preprocessing.Preprocessing": "exprae.data.Preprocessing",
    "exprae.runguard.RunDirGuard": "exprae.runs.RunDirGuard",
    "exprae.data.ExpressionDataModule": "exprae.data.datamodule.ExpressionDataModule",
    "exprae.losses.MSELoss": "exprae.losses.expression.MSELoss",
    "exprae.nn.AutoEncoder": "exprae.nn.autoencoder.AutoEncoder",
}


@pytest.mark.parametrize("old", sorted(OLD_TARGETS))
def test_old_target_paths_resolve_to_the_moved_class(old: str) -> None:
    assert get_class(old) is get_class(OLD_TARGETS[old])


def test_every_moved_module_is_listed_once() -> None:
    assert set(exprae.MOVED_MODULES) == {p.rsplit(".", 1)[0] for p in OLD_TARGETS if p.count(".") == 2} - {
        "exprae.data",
        "exprae.losses",
        "exprae.nn",
    }


# ---------------------------------------------------------------- no import cycle

SRC = Path(exprae.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The exprae modules ``path`` imports anywhere (function-level too), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from exprae.data import check_matrix` needs exprae.data; `from exprae.runs import rundir`, the module.
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    """Which exprae modules each exprae module imports (a package's ``__init__`` counts as the package)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None (iterative depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0: not seen, 1: on the current path, 2: done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return [*path[path.index(child) :], child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_import_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "exprae.training.module" in graph["exprae.training.build"]
    # exprae.inference.load imports build_module inside a function (it needs Lightning only when loading).
    assert "exprae.training.build" in graph["exprae.inference.load"]


def test_no_import_cycle_between_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = import_graph()
    planted = {**graph, "exprae.data.batching": {*graph["exprae.data.batching"], "exprae.data.datamodule"}}
    cycle = find_cycle(planted)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"exprae.data.batching", "exprae.data.datamodule"} <= set(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# ---------------------------------------------------------------- every module imports on its own

# Run in a fresh interpreter: import the third-party packages exprae uses once, then fork one child per exprae
# module that imports only that module, so each starts with no other exprae module loaded (a module that works
# only after another was imported first fails here) without paying torch's import once per module.
_IMPORT_EACH = """
import importlib, os, sys, traceback
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # optional extras (scvi-tools): a module that needs one fails in its own child below
failed = []
for name in sys.argv[1].split(","):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
sys.exit(1 if failed else 0)
"""


def _third_party() -> list[str]:
    """The top-level non-exprae packages that exprae's modules import at module level."""
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names if n not in ("exprae", "__future__") and n not in sys.stdlib_module_names)


@pytest.mark.slow  # one interpreter importing torch, Lightning and scanpy, then one fork per module
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module (POSIX only)")
def test_every_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, ",".join(sorted(import_graph())), *_third_party()],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.strip() == "FAILED:"
