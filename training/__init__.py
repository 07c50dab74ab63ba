"""fieldid training: ImageFolder dataset -> fine-tuned, calibrated model in a run directory.

The entry points are ``fieldid.training.train.train`` and ``fieldid.training.evaluate.evaluate`` (the
modules shadow any package-level ``train`` / ``evaluate`` name, so they are not re-exported here).
A run is made in steps, a module each: ``train`` (data, Lightning) -> ``head`` (cached-feature head
phase, baselines) -> ``finalize`` (shipped model, calibration, metrics, unknown detector), with
``rundir``, ``checkpoints``, ``resume``, ``image_size`` and ``compute`` (devices, precision, Trainer).
Names are re-exported lazily so that torch-free users (the edge demo, the CLI parser) can
import ``fieldid.training.records`` without pulling in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TrainConfig", "AugmentConfig", "load_config", "ConfigError",
    "RunRecord", "PreprocessSpec", "load_record", "RecordError",
    "BackboneSpec", "create_model", "get_backbone", "list_backbones", "example_input", "ModelError",
    "load_run_model", "RunError", "CheckpointError",
    "DataError", "ImageError", "make_split",
    "UnknownDetector", "ScoredModel", "refit_run_detector", "LabelsMismatch", "check_same_labels",
]

_WHERE = {
    "TrainConfig": "config", "AugmentConfig": "config", "load_config": "config", "ConfigError": "config",
    "RunRecord": "records", "PreprocessSpec": "records", "load_record": "records", "RecordError": "records",
    "BackboneSpec": "models", "create_model": "models", "get_backbone": "models", "list_backbones": "models",
    "example_input": "models", "ModelError": "models",
    "load_run_model": "models", "RunError": "rundir",
    "CheckpointError": "checkpoints",
    "DataError": "images", "ImageError": "images", "make_split": "data",
    "UnknownDetector": "ood", "ScoredModel": "ood", "refit_run_detector": "ood",
    "LabelsMismatch": "distill", "check_same_labels": "distill",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
