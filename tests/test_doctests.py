"""The examples in the docstrings run: every module of the package, one doctest pass each.

An example that needs files, a server or a trained run is marked ``# doctest: +SKIP`` on every line
that uses what it sets (a later line would otherwise run on names that were never set).
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> list[str]:
    """The packages pyproject installs, less those that hold only data files (no module)."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    return [p for p in listed if any(pkgutil.iter_modules(importlib.import_module(p).__path__))]


def _modules() -> list[str]:
    names = []
    for pkg in _packages():
        names.append(pkg)
        path = importlib.import_module(pkg).__path__
        names += [m.name for m in pkgutil.iter_modules(path, pkg + ".") if not m.ispkg]
    return sorted(set(names))


def test_every_module_file_is_walked() -> None:
    """Every .py file of the installed packages' folders is one of the modules whose examples run
    (a new folder mapped in pyproject joins by its packages entry)."""
    names = set(_modules())
    for pkg in _packages():
        folder = Path(importlib.import_module(pkg).__path__[0])
        for f in folder.glob("*.py"):
            name = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            assert name in names, f"{f} is not walked"
    assert {"fieldid.training", "fieldid.export", "fieldid.serve", "fieldid.edge_demo", "fieldid.app"} <= names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
