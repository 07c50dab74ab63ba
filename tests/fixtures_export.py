"""Export fixtures: ``full_bundle`` (the tiny run exported to every format) and run-dir helpers.

conftest.py imports this file, so any test module can use them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import shapes_photos

__all__ = ["full_bundle", "copy_run", "CheckSet", "check_set"]


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


@dataclass
class CheckSet:
    """New photos for the statistical checks of the tiny run's artifacts, and eager PyTorch's answers.

    ``photos`` are 300 new shape photos (another seed than training: independent of the run's splits
    and of the export's own bar images); ``x`` is them through the run's phone preprocessing, ``y``
    their classes, ``logits`` / ``unknown`` eager fp32 outputs. ``unknown_x`` appends
    ``generated`` non-photos (the unknown side of the threshold) to ``x``; ``unknown`` covers both.
    """

    photos: list[Path]
    x: np.ndarray
    y: np.ndarray
    logits: np.ndarray
    unknown_x: np.ndarray
    unknown: np.ndarray
    generated: int


@pytest.fixture(scope="session")
def check_set(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> CheckSet:
    """300 photos + 100 generated non-photos: a 1% rate is 3 images here, not a fraction of one."""
    import torch

    from fieldid.export.inputs import load_arrays
    from fieldid.export.phone import preprocess
    from fieldid.training.negatives import generated_unknowns
    from fieldid.training.ood import scored_model
    from fieldid.training.records import load_record
    from fieldid.training.models import load_run_model

    rec = load_record(tiny_run)
    spec = rec.preprocess_spec
    photos, y = shapes_photos(tmp_path_factory.mktemp("check") / "photos", per_class=100, seed=1)
    x, kept = load_arrays(photos, spec)
    assert len(kept) == len(photos)
    gen = np.concatenate([preprocess(img, spec) for _, img in generated_unknowns(100, size=spec.resize_size, seed=13)])
    ux = np.concatenate([x, gen])
    model = scored_model(tiny_run, rec, load_run_model(tiny_run, rec)).eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(ux[i:i + 100])) for i in range(0, len(ux), 100)]
    logits = torch.cat([o[0] for o in outs]).numpy()
    unknown = torch.cat([o[1] for o in outs]).numpy()
    labels = json.loads((tiny_run / "labels.json").read_text())
    from helpers import SHAPES

    # The run's label order may differ from SHAPES' order: express y in the run's indices.
    y = np.asarray([labels.index(SHAPES[i]) for i in y], np.int64)
    return CheckSet(photos=photos, x=x, y=y, logits=logits[:len(x)], unknown_x=ux, unknown=unknown, generated=len(gen))
