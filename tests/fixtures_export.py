"""Export fixtures: ``full_bundle`` (the tiny run exported to every format) and run-dir helpers.

conftest.py imports this file, so any test module can use them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

__all__ = ["full_bundle", "copy_run"]


def copy_run(run: Path, dest: Path, **run_json_changes: object) -> Path:
    """Copy a run directory (without its bundle) and optionally change fields of its run.json."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("export", "bench", ".export*"))
    if run_json_changes:
        rec = json.loads((dest / "run.json").read_text())
        rec.update(run_json_changes)
        (dest / "run.json").write_text(json.dumps(rec, indent=2))
    return dest


@pytest.fixture(scope="session")
def full_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_run`` exported to *every* format (ONNX, ExecuTorch, TorchScript, Core ML), verified.

    A separate folder from ``tiny_bundle`` (which serve/edge_demo tests read) so neither
    suite's export can disturb the other's.
    """
    from fieldid.export import export_run

    out = tmp_path_factory.mktemp("bundles") / "full"
    export_run(tiny_run, out=out)
    return out
