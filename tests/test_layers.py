"""The three floors: pipeline (Beam-free core) < transforms (Beam) < shardmove (application).

Each package imports only from the floors below it, and every module of the
core imports without loading Apache Beam.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = ("pipeline", "transforms", "shardmove")  # bottom to top


def _modules(package: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out.append(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    return sorted(out)


def _imported(module: str) -> set[str]:
    """Top-level package names a module imports, anywhere in it (functions included)."""
    path = os.path.join(ROOT, *module.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("floor", FLOORS)
def test_each_floor_imports_only_from_the_floors_below(floor):
    above = set(FLOORS[FLOORS.index(floor) + 1:])
    bad = {m: sorted(_imported(m) & above) for m in _modules(floor) if _imported(m) & above}
    assert not bad, f"{floor} imports from a floor above it: {bad}"


def test_no_core_module_names_beam_in_an_import_even_inside_a_function():
    """Beam's GCS IO lives in transforms/bulkio.py: the core does not defer Beam, it never uses it."""
    bad = [m for m in _modules("pipeline") if "apache_beam" in _imported(m)]
    assert not bad, f"these core modules import apache_beam: {bad}"


def test_every_core_module_imports_without_loading_beam():
    """One fresh interpreter per module, so no module hides behind another's imports."""
    modules = _modules("pipeline")
    assert "pipeline.workdir" in modules and "pipeline.stores.sqlite" in modules
    code = ("import importlib, sys\n"
            "importlib.import_module(sys.argv[1])\n"
            "sys.exit(3 if 'apache_beam' in sys.modules else 0)\n")
    loaded = []
    for m in modules:
        r = subprocess.run([sys.executable, "-c", code, m], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 3), (m, r.stderr[-2000:])
        if r.returncode == 3:
            loaded.append(m)
    assert not loaded, f"importing these loads apache_beam: {loaded}"


def test_the_application_package_imports():
    r = subprocess.run([sys.executable, "-c", "import shardmove, shardmove.api, shardmove.cli"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
