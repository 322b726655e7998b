"""The house rules of the package's structure, checked on its source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "longtail"

# Imports point one way: a module may import from its own package or from lower layers only.
LAYERS = {
    "longtail": 0,
    "longtail.errors": 0,
    "longtail.registry": 0,
    "longtail.jsonio": 0,
    "longtail.provenance": 0,
    "longtail.config": 1,
    "longtail.data": 2,
    "longtail.models": 2,
    "longtail.losses": 2,
    "longtail.evaluation": 2,
    "longtail.parallel": 1,
    "longtail.methods": 3,
    "longtail.engine": 4,
    "longtail.build": 5,
    "longtail.runs": 6,
    "longtail.studies": 7,
    "longtail.api": 8,
    "longtail.cli": 8,
    "longtail.entry": 9,
    "longtail.__main__": 10,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(module: str) -> str:
    """The layered unit a module belongs to: longtail.x for longtail.x.y..."""
    return ".".join(module.split(".")[:2])


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported longtail module, line, inside a function or class) of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in MODULES else base, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return [(m, line, nested) for m, line, nested in found if m.split(".")[0] == "longtail"]


GRAPH = {m: sorted({t for t, _, _ in _imports(m)}) for m in MODULES}


def test_every_module_has_a_layer():
    assert {_unit(m) for m in MODULES} <= set(LAYERS), set(map(_unit, MODULES)) - set(LAYERS)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in GRAPH.get(m, []):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t in MODULES and state.get(t) is None:
                walk(t)
        path.pop()
        state[m] = 2

    for m in MODULES:
        if state.get(m) is None:
            walk(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    unit, layer = _unit(module), LAYERS[_unit(module)]
    for target, line, _ in _imports(module):
        t_unit = _unit(target)
        if t_unit == unit:
            continue
        assert LAYERS[t_unit] < layer, (
            f"{module}:{line} imports {target}: layer {LAYERS[t_unit]} is not below {layer}"
        )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_longtail_import_inside_a_function(module):
    nested = [(t, line) for t, line, inside in _imports(module) if inside]
    assert not nested, f"{module} imports inside a function or class: {nested}"


def test_config_imports_no_torch():
    code = (
        "import sys\n"
        "import longtail.config as c\n"
        "cfg = c.Config()\n"
        "c.load_config(None, ['method.name=hybrid-sc', 'train.epochs=3'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'numpy'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
