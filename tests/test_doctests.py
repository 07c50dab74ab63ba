"""The examples in the docstrings run: every module of the package, one doctest pass each.

An example that needs a dataset, a run or a bundle is marked ``# doctest: +SKIP`` on each of its
lines (a later line of a skipped example would otherwise run on names that were never set).
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("fieldid", "fieldid.commands", "fieldid.training", "fieldid.export", "fieldid.serve",
            "fieldid.edge_demo", "fieldid.app")


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        path = importlib.import_module(pkg).__path__
        names += [m.name for m in pkgutil.iter_modules(path, pkg + ".") if not m.ispkg]
    return sorted(set(names))


def test_every_package_is_walked() -> None:
    """A new subpackage joins PACKAGES, or its examples would never run."""
    subpackages = {m.name for m in pkgutil.iter_modules(importlib.import_module("fieldid").__path__, "fieldid.")
                   if m.ispkg}
    assert subpackages <= set(PACKAGES), subpackages - set(PACKAGES)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
