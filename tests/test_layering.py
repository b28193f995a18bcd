"""Imports go down the package's layers only (docs/ARCHITECTURE.md).

core (0) < models (1) < configs (2) < training (3) < subnet (4) < planning (5): a module may
import modules of its own layer or of lower ones, never of a higher one. The top-level
`edgepopup_jax/__init__.py` may import core, models and subnet (the library's public face).
Every module is read with `ast`, not imported: function-local imports count as much as the
ones at the top, and nothing here needs the trainer's dependencies.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "edgepopup_jax"
LAYERS = ("core", "models", "configs", "training", "subnet", "planning")
RANK = {name: i for i, name in enumerate(LAYERS)}
TOP_LEVEL_MAY_IMPORT = ("core", "models", "subnet")
# `import edgepopup_jax` (or `from edgepopup_jax import masking`, a name of the public face)
# loads the top-level __init__, which imports up to subnet: it counts as that layer.
TOP_LEVEL_RANK = max(RANK[name] for name in TOP_LEVEL_MAY_IMPORT)
# Top-level short names of commands (`python -m edgepopup_jax.check_data`): each is in the layer
# of the command it starts.
COMMAND_SHIMS = {f"{PACKAGE}.check_data": "training"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every edgepopup_jax import in source, relative ones resolved; for
    `from edgepopup_jax import x`, edgepopup_jax.x when x is a layer, else edgepopup_jax."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == PACKAGE:
                found += [(node.lineno, f"{PACKAGE}.{a.name}" if a.name in RANK else PACKAGE)
                          for a in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found
            if name == PACKAGE or name.startswith(PACKAGE + ".")]


def layer_of(name: str) -> str | None:
    """The layer of module `name` (edgepopup_jax.<layer>...), None for edgepopup_jax itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What in `source` (the text of module `module`) imports against the layering."""
    own = COMMAND_SHIMS.get(module) or layer_of(module)
    if own is None:  # edgepopup_jax/__init__.py
        return [f"{module}:{line} imports {name}: the top level imports only "
                f"{', '.join(TOP_LEVEL_MAY_IMPORT)}"
                for line, name in imported(source, module, True)
                if layer_of(name) not in TOP_LEVEL_MAY_IMPORT]
    if own not in RANK:
        return [f"{module} is in no layer ({', '.join(LAYERS)})"]
    bad = []
    for line, name in imported(source, module, is_package):
        target = layer_of(name)
        rank = TOP_LEVEL_RANK if target is None else RANK.get(target)
        if rank is None:
            bad.append(f"{module}:{line} imports {name}, which is in no layer")
        elif rank > RANK[own]:
            bad.append(f"{module}:{line} ({own}, layer {RANK[own]}) imports {name} "
                       f"({target or 'the top-level package'}, layer {rank})")
    return bad


MODULES = sorted((ROOT / PACKAGE).rglob("*.py"))


def test_every_module_is_read():
    names = {module_name(p) for p in MODULES}
    assert {f"{PACKAGE}.{layer}" for layer in LAYERS} <= names
    assert len(MODULES) > 40, MODULES


def test_imports_only_go_down_the_layers():
    bad = [v for path in MODULES
           for v in violations(path.read_text(), module_name(path), path.name == "__init__.py")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source", [
    "from edgepopup_jax.planning import sweep\n",
    "import edgepopup_jax.planning.grid\n",
    "from edgepopup_jax import planning\n",
    "def f():\n    from edgepopup_jax.planning.sweep import run_sweep\n",
    "from ..planning import grid\n",
])
def test_a_core_module_importing_planning_is_reported(source):
    bad = violations(source, "edgepopup_jax.core.masking")
    assert len(bad) == 1 and "planning" in bad[0], bad


def test_the_checker_reports_the_top_level_and_unknown_layers_and_passes_downward_imports():
    assert violations("import edgepopup_jax as ep\n", "edgepopup_jax.training.train")
    assert violations("from edgepopup_jax import masking\n", "edgepopup_jax.core.layers")
    assert violations("from edgepopup_jax.misc import x\n", "edgepopup_jax.planning.sweep")
    assert violations("from edgepopup_jax.training import train\n", "edgepopup_jax")
    assert violations("x = 1\n", "edgepopup_jax.misc")
    assert not violations("from edgepopup_jax.core import masking\n"
                          "from edgepopup_jax.training import train\n"
                          "from . import grid\n", "edgepopup_jax.planning.sweep")
    assert not violations("from edgepopup_jax import models, subnet\n"
                          "from edgepopup_jax.core.masking import topk_mask\n", "edgepopup_jax")
