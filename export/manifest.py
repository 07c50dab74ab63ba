"""The export bundle's ``manifest.json``: one typed, schema-versioned record. Torch-free.

serve/ and edge_demo/ read only this file (and the artifact files it names), never the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# file_sha256 is the manifest's rule for an artifact's ``sha256`` (files and .mlpackage folders).
from fieldid.records import (PreprocessSpec, Record, RecordError, check_field_types, confined_path, file_sha256,
                             labels_difference)

from .examples import check_entries

__all__ = ["MANIFEST_SCHEMA_VERSION", "FORMATS", "Artifact", "Manifest", "load_manifest", "bundle_dir_of", "ManifestError",
           "file_sha256", "check_inside_bundle", "CascadeError", "check_pair"]

MANIFEST_SCHEMA_VERSION = 1
# format name -> file suffix. "pytorch" is the fp32 state dict the server loads.
FORMATS = {
    "pytorch": ".pth",
    "onnx": ".onnx",
    "executorch": ".pte",
    "torchscript": ".pt",
    "torchscript_lite": ".ptl",
    "coreml": ".mlpackage",
}


class ManifestError(RecordError):
    """A bundle whose manifest is missing, malformed, or disagrees with its files."""


def check_inside_bundle(name: Any, what: str) -> str:
    """``name`` as a path relative to the bundle, refusing anything that could point outside it.

    A manifest is read by servers and apps that open the files it names: an absolute path or a
    ``..`` part would let a crafted manifest make them read (or hash, or serve) any file.

    Raises:
        ManifestError: not a non-empty string, absolute (POSIX or Windows), or with a ``..`` part.
    """
    confined_path(".", name, what=f"manifest.json: {what}", where="the bundle", error=ManifestError)
    return name


@dataclass
class Artifact:
    """One exported file.

    ``verification`` holds what was checked against the PyTorch model, e.g.
    ``{"status": "passed", "split": "test", "num_images": 120, "max_abs_logit_diff": 3e-6,
    "top1_agreement": 1.0, "accuracy": 0.98, "reference_accuracy": 0.98}``; status is one of
    passed | failed | structure_only (no runtime here, e.g. Core ML on Linux) | skipped.
    """

    file: str
    format: str
    precision: str  # fp32 | fp16 | int8 | int8_weights | palettized
    sha256: str  # a folder artifact (.mlpackage): see bundle.file_sha256 for how its files are hashed
    size_bytes: int
    method: str = ""  # how it was produced (quantization recipe, delegate, ...)
    input_name: str = "input"
    output_name: str = "logits"
    outputs: str = "logits"  # logits | probabilities | classifier (Core ML label dict)
    verification: dict[str, Any] = field(default_factory=dict)
    # Added in the full export (defaults keep older manifests readable):
    input: dict[str, Any] = field(default_factory=dict)  # shape, dtype, layout, colour, resize/crop, mean/std
    labels_in_file: str = ""  # where the class labels live inside the file ("" = only in this manifest)
    temperature_in_model: bool = False  # True when the file already outputs softmax(logits / T)
    quantization: dict[str, Any] = field(default_factory=dict)  # int8 recipe: calibration, exclusions, ...
    # Name of the file's unknown-score output ("" = none): score > manifest.unknown["threshold"] = unknown.
    unknown_output: str = ""

    def __post_init__(self) -> None:
        check_inside_bundle(self.file, f"artifact {self.file!r}")
        if self.format not in FORMATS:
            raise ManifestError(f"artifact {self.file}: unknown format {self.format!r}; valid: {', '.join(FORMATS)}")


@dataclass
class Manifest(Record):
    """Everything an app or server needs to use the bundle's models."""

    name: str
    labels: list[str]
    preprocess: dict[str, Any]
    temperature: float
    fallback_threshold: float
    fallback_rule: str
    backbone: str
    num_classes: int
    source_run: str
    source_checkpoint: str
    artifacts: list[dict[str, Any]]
    tool_versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # the run's held-out accuracy / macro-F1
    notes: list[str] = field(default_factory=list)
    verification_summary: dict[str, Any] = field(default_factory=dict)  # status + failures of the export
    # Per step ("inputs", each format, "total"): seconds, peak_rss_mb (that step's own peak), rss before/after.
    export_stats: dict[str, Any] = field(default_factory=dict)
    # The unknown detector (threshold, method, fitted_on, ...; {} = none) and the run's model identity.
    unknown: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    # Held-out photos copied into the bundle for the demo: [{"file": "examples/<label>/..", "label"}]
    # (export/examples.py), and where the training photos came from ({"root", "synthetic"}).
    examples: list[dict[str, str]] = field(default_factory=list)
    training_data: dict[str, Any] = field(default_factory=dict)

    SCHEMA_VERSION = MANIFEST_SCHEMA_VERSION

    def validate(self, source: str = "manifest.json") -> None:
        if self.num_classes != len(self.labels) or len(set(self.labels)) != len(self.labels):
            raise ManifestError(f"{source}: labels do not match num_classes or repeat")
        if not 0 < self.temperature < math.inf or not 0 <= self.fallback_threshold <= 1:
            raise ManifestError(f"{source}: temperature must be finite and > 0 and fallback_threshold in [0, 1]")
        PreprocessSpec.from_dict(self.preprocess, source=f"{source}:preprocess")
        try:
            check_entries(self.examples, self.labels, source)
        except ValueError as e:
            raise ManifestError(str(e)) from None
        if self.unknown:
            t = self.unknown.get("threshold")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ManifestError(f"{source}: unknown.threshold must be a number (got {t!r})")
        for k, a in enumerate(self.artifacts):
            if not isinstance(a, dict):
                raise ManifestError(f"{source}: every artifact must be a JSON object")
            try:
                # Types too: a consumer meets "sha256": 5 or "verification": "ok" deep inside a runtime.
                self.artifacts[k] = check_field_types(Artifact, a, f"{source}: artifact {a.get('file', '?')}")
                Artifact(**a)
            except RecordError as e:
                raise ManifestError(str(e)) from None
            except TypeError as e:  # unknown or missing artifact keys
                raise ManifestError(f"{source}: artifact {a.get('file', '?')}: {e}") from None

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def artifact_list(self) -> list[Artifact]:
        return [Artifact(**a) for a in self.artifacts]

    def find(self, format: str, precision: str | None = None) -> Artifact:
        """The artifact of ``format`` (and ``precision``), or a clear error listing what exists."""
        for a in self.artifact_list():
            if a.format == format and (precision is None or a.precision == precision):
                return a
        have = ", ".join(f"{a.format}/{a.precision}" for a in self.artifact_list()) or "none"
        raise ManifestError(f"bundle {self.name!r} has no {format}/{precision or 'any'} artifact (has: {have})")

    def set_artifact(self, art: Artifact) -> None:
        """Add or replace (same file name) an artifact entry."""
        from dataclasses import asdict

        self.artifacts = [a for a in self.artifacts if a["file"] != art.file] + [asdict(art)]


def bundle_dir_of(path: str | Path) -> Path:
    """A bundle folder (or its ``manifest.json``), or a run folder -> its default ``export/`` bundle:
    the one rule serve/, edge_demo/ and the API all use.

    Raises:
        ManifestError: neither holds a ``manifest.json``.

    Example:
        >>> bundle_dir_of("runs/reef")  # doctest: +SKIP
        PosixPath('runs/reef/export')
    """
    path = Path(path)
    if path.name == "manifest.json" and path.is_file():  # the file itself given (tab completion ends there)
        return path.parent
    if (path / "manifest.json").is_file():
        return path
    if (path / "export" / "manifest.json").is_file():
        return path / "export"
    raise ManifestError(f"{path}: no manifest.json here or in {path / 'export'}; run `fieldid export --run RUN` first")


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate ``BUNDLE/manifest.json`` (a run folder: its ``export/``); every named file must exist."""
    bundle_dir = bundle_dir_of(bundle_dir)
    m = Manifest.from_json(bundle_dir / "manifest.json")
    for a in m.artifact_list():
        if not (bundle_dir / a.file).exists():
            raise ManifestError(f"{bundle_dir}: manifest names {a.file}, which is missing")
    return m


class CascadeError(ManifestError):
    """A device/server pair that cannot be compared or served together."""


def check_pair(device: Manifest, server: Manifest) -> None:
    """Refuse a device/server bundle pair whose labels differ (content or order).

    The server's answer replaces the device's by class index in an app, so the two must list
    the same classes in the same order. ``serve archive/start --device-run``, ``fieldid demo
    --server-run`` and ``fieldid bench cascade`` call this; torch-free.

    Raises:
        CascadeError: one line saying what differs.

    Example:
        >>> check_pair(load_manifest("runs/reef"), load_manifest("runs/reef-server"))  # doctest: +SKIP
    """
    what = labels_difference(device.labels, server.labels, first_name=f"device model {device.name!r}",
                             second_name=f"server model {server.name!r}")
    if what:
        raise CascadeError(what)
