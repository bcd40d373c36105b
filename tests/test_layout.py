"""The package's shape: imports point one way, every module imports on its own, and the library
needs none of the recipes' dependencies (hydra, tensorboard, matplotlib: the ``recipes`` extra)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_paci", "recipes")
RECIPE_ONLY = ("hydra", "omegaconf", "tensorboard", "matplotlib")


def _modules() -> dict[str, Path]:
    return {(f"{pkg}.{p.stem}" if p.stem != "__init__" else pkg): p
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file: at the top, in functions, under
    TYPE_CHECKING (a type-only arrow back is still an arrow back). A submodule's implicit import of
    its own package does not count, nor do the entry points into the torch half that the torch-free
    package reaches by module name (``__init__``'s lazy attributes, ``_registration``'s factory)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    package = name.rpartition(".")[0]
    return {m for m in out if m in modules and m not in (name, package)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_point_one_way() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["lightning_paci.launch"] and graph["recipes.benchmark"], "the scan found no imports"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.timeout(120)
def test_every_module_imports_alone_and_loads_no_recipe_dependency() -> None:
    """Each module imported first, with no other module of ours loaded: an order-dependent import
    (a module that works only after another was imported) fails here. One interpreter, with torch and
    Lightning loaded once, and our modules dropped from ``sys.modules`` between imports.

    Lightning itself may load matplotlib (torchmetrics' plotting does when it is installed): what
    counts is that importing our modules afterwards loads none of the recipes' dependencies, and that
    no module of ours imports one at its top (timeline.plot_gantt imports matplotlib when called, and
    says which extra to install if it is missing)."""
    modules = _modules()
    names = sorted(m for m in modules if m.startswith("lightning_paci"))
    for name in names:
        for node in ast.parse(modules[name].read_text()).body:  # module scope only
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [m for m in imported if m.split(".")[0] in RECIPE_ONLY], (name, imported)
    code = ("import importlib, sys, traceback\n"
            "import lightning.pytorch, torch.distributed.checkpoint\n"
            "before, failed = set(sys.modules), []\n"
            f"for name in {names!r}:\n"
            "    for mod in [m for m in sys.modules if m.split('.')[0] == 'lightning_paci']:\n"
            "        del sys.modules[mod]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception:\n"
            "        failed.append(name + ':\\n' + traceback.format_exc())\n"
            f"added = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {RECIPE_ONLY!r})\n"
            "print('\\n'.join(failed), 'loaded:', added)\n"
            "sys.exit(1 if failed or added else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
