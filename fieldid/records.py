"""Typed, schema-versioned records that make up the run-directory contract.

It lives in the top package, not in ``fieldid.training``: export/, serve/ and edge_demo/ read
these records, and the server and the edge demo must load without anything of training (nor
torch). ``fieldid.training.records`` re-exports every name, so training code is unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fieldid import __version__

__all__ = [
    "RUN_SCHEMA_VERSION",
    "Record",
    "RecordError",
    "PreprocessSpec",
    "RunRecord",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "check_field_types",
    "confined_path",
    "file_sha256",
    "labels_difference",
    "load_record",
    "replace_dir",
]

RUN_SCHEMA_VERSION = 1

T = TypeVar("T", bound="Record")


class RecordError(ValueError):
    """A record on disk is missing, malformed or of an unsupported schema version."""


def confined_path(root: str | os.PathLike, rel: Any, *, what: str, where: str = "the folder",
                  error: type[ValueError] = RecordError) -> Path:
    """``root / rel`` for a path read from a record (``run.json``, ``manifest.json``), refusing
    anything that could point outside ``root``: the one rule for every path a record names.

    Servers, apps, ``evaluate`` and ``export`` open (and some write) the files a record names,
    and records travel (a copied run, a shared ``--teacher``, a downloaded bundle): an absolute
    path or a ``..`` part would let a crafted record make them read or overwrite any file.

    Args:
        root: the folder the record's paths are relative to (``"."`` to check only).
        rel: the path as read from the record.
        what: names the file and field for the error, e.g. ``"run.json: metrics"``.
        where: how the error names ``root`` (``"the run folder"``, ``"the bundle"``).
        error: the exception type to raise (the caller's own error type).

    Raises:
        error: ``rel`` is not a non-empty string, is absolute (POSIX or Windows, a drive), or
            has a ``..`` part.

    Example:
        >>> confined_path("/runs/reef", "checkpoints/best.ckpt", what="run.json: best_checkpoint").as_posix()
        '/runs/reef/checkpoints/best.ckpt'
        >>> confined_path("/runs/reef", "../other/metrics.json", what="run.json: metrics", where="the run folder")
        Traceback (most recent call last):
        ...
        fieldid.records.RecordError: run.json: metrics: '../other/metrics.json' must stay inside the run folder (no absolute path, no '..')
    """
    if not isinstance(rel, str) or not rel.strip():
        raise error(f"{what}: the file name must be a non-empty string")
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
        raise error(f"{what}: {rel!r} must stay inside {where} (no absolute path, no '..')")
    inner = [p for p in parts if p not in ("", ".")]
    if not inner:
        raise error(f"{what}: {rel!r} names {where} itself, not a file in it")
    return Path(root).joinpath(*inner)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file; of a folder (a ``.mlpackage``): over its files sorted by relative POSIX
    path, each contributing its relative path (UTF-8) followed by its bytes.

    Example:
        >>> file_sha256("runs/reef/model.pth")[:8]  # doctest: +SKIP
        '3f1c9a0e'
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        paths = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    else:
        paths = [path]
    for p in paths:
        if path.is_dir():
            h.update(p.relative_to(path).as_posix().encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename.

    A reader (or a ``kill -9``) never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus umask), so a
        # run directory is as shareable as any other folder the user writes.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the finished folder ``new`` where ``out`` is, with two renames; the old ``out`` is
    restored if the second fails, and deleted only once the new one is in place.

    The old folder waits as ``.OUT.old-PID`` next to ``out``: a process killed between the two
    renames leaves it under that name, and the next export's cleanup puts it back
    (:func:`fieldid.export.writer.clean_leftovers`). Bundles and app builds both use this.

    Raises:
        OSError: the new folder could not be moved in (``out`` is as it was).
    """
    # Absolute, not resolved: `--out .` gets a name to put ".old-PID" on, and a symlinked --out is
    # replaced as the link it is (resolving would replace the folder it points to).
    new, out = Path(os.path.abspath(new)), Path(os.path.abspath(out))
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the previous folder back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str, *, errors: str = "strict") -> Path:
    """``text`` as UTF-8, atomically. ``errors``: what to do with a file name that is not UTF-8 (Python
    holds its bytes as surrogates): ``surrogateescape`` writes the original bytes back (a list of paths
    that must match the disk), ``replace`` a U+FFFD (a page for people)."""
    return atomic_write_bytes(path, text.encode("utf-8", errors))


def labels_difference(first: list[str], second: list[str], *, first_name: str = "device model",
                      second_name: str = "server model") -> str:
    """What differs between two models' class labels (content or order); ``""`` when identical.

    The one comparison behind a device/server pair check (training's teacher check, the serve
    archive, the demo, the cascade bench); it lives here so the torch-free parts can use it.

    Example:
        >>> labels_difference(["a", "b"], ["a", "c"])
        'device model and server model labels differ: only in the device model: b; only in the server model: c'
        >>> labels_difference(["a", "b"], ["a", "b"])
        ''
    """
    if list(first) == list(second):
        return ""
    only_a, only_b = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    if only_a or only_b:
        what = (f"only in the {first_name}: {', '.join(only_a) or '-'}; "
                f"only in the {second_name}: {', '.join(only_b) or '-'}")
    elif len(first) != len(second):
        what = f"{len(first)} labels vs {len(second)} (a class listed twice)"
    else:
        i = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        what = f"same classes in another order (first difference at index {i}: {first[i]!r} vs {second[i]!r})"
    return f"{first_name} and {second_name} labels differ: {what}"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class _TypeMismatch(Exception):
    """Internal: a value that does not fit its annotation (carries what was expected)."""


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping"}


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``; numbers written as strings (PyYAML reads ``1e-3`` as one) become numbers."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:  # an exact match first (an int stays an int in ``float | int``)
            if isinstance(value, typing.get_origin(a) or a) and not (isinstance(value, bool) and a is not bool):
                return _coerce(value, a)
        for a in options:
            try:
                return _coerce(value, a)
            except _TypeMismatch:
                pass
        expected = " or ".join(_EXPECTED.get(typing.get_origin(a) or a, str(a)) for a in options)
        raise _TypeMismatch(expected + (" or null" if type(None) in args else ""))
    base = origin or tp
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # `devices: 2` in YAML
    elif base in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if base is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise _TypeMismatch(f"a list of {len(args)} values")
                return tuple(_coerce(v, a) for v, a in zip(value, args))
            item = args[0] if args else Any
            out = [_coerce(v, item) for v in value]
            return tuple(out) if base is tuple else out
    elif base is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(base, type):
        if isinstance(value, base):
            return value
    else:
        return value
    raise _TypeMismatch(_EXPECTED.get(base, getattr(base, "__name__", str(base))))


def check_field_types(cls: type, d: dict[str, Any], source: str, *, prefix: str = "") -> dict[str, Any]:
    """``d`` with every value checked against ``cls``'s dataclass annotations.

    Numbers written as strings (``lr: 1e-3`` in YAML) are converted; any other mismatch
    raises one :class:`RecordError` line naming the key. Keys that are not fields pass through.

    Example:
        >>> check_field_types(PreprocessSpec, {"resize_size": "146", "crop_size": 128}, "x")["resize_size"]
        146
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot evaluate: leave the values to the record
        return dict(d)
    out = dict(d)
    for f in dataclasses.fields(cls):
        if f.name not in d or f.name not in hints:
            continue
        try:
            out[f.name] = _coerce(d[f.name], hints[f.name])
        except _TypeMismatch as e:
            raise RecordError(f"{source}: {prefix}{f.name} must be {e} (got {d[f.name]!r})") from None
    return out


class Record:
    """Mixin: dataclass <-> JSON with schema-version and unknown-key checks."""

    SCHEMA_VERSION: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[arg-type]
        d["schema_version"] = self.SCHEMA_VERSION
        # JSON-normalise (tuples -> lists) so an in-memory dict equals its reloaded copy.
        return json.loads(json.dumps(d))

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any], *, source: str = "record") -> T:
        if not isinstance(d, dict):
            raise RecordError(f"{source}: expected a JSON object")
        d = dict(d)
        version = d.pop("schema_version", None)
        if version != cls.SCHEMA_VERSION:
            raise RecordError(
                f"{source}: schema_version {version!r} is not supported "
                f"(this fieldid reads version {cls.SCHEMA_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecordError(f"{source}: unknown field(s) {', '.join(unknown)}")
        d = check_field_types(cls, d, source)
        try:
            obj = cls(**d)  # type: ignore[call-arg]
        except TypeError as e:
            raise RecordError(f"{source}: {e}") from None
        obj.validate(source)  # type: ignore[attr-defined]
        return obj

    @classmethod
    def from_json(cls: type[T], path: str | os.PathLike) -> T:
        path = Path(path)
        if not path.is_file():
            raise RecordError(f"{path}: missing")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise RecordError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:  # a binary file where JSON text belongs
            raise RecordError(f"{path}: not valid JSON (not UTF-8 text: byte {e.start})") from None
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "record") -> None:  # pragma: no cover - overridden
        pass


MAX_RESIZE = 4096  # the largest resize a preprocess spec may ask for (training allows crops up to 1024)


@dataclass
class PreprocessSpec(Record):
    """Eval-time preprocessing, exactly what a phone app must do before the model.

    Steps: decode RGB (EXIF orientation applied) -> resize the *shorter* side to
    ``resize_size`` with ``interpolation`` (Pillow, antialiased) -> center-crop ``crop_size``
    -> scale to [0, 1] -> ``(x - mean) / std`` -> NCHW float32.

    Example:
        >>> PreprocessSpec(resize_size=146, crop_size=128).crop_size
        128
    """

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    color: str = "RGB"
    scale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        self.mean = tuple(float(x) for x in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(x) for x in self.std)  # type: ignore[assignment]

    def validate(self, source: str = "preprocess") -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise RecordError(f"{source}: interpolation {self.interpolation!r} not supported")
        if not (0 < self.crop_size <= self.resize_size <= MAX_RESIZE):
            raise RecordError(f"{source}: need 0 < crop_size <= resize_size <= {MAX_RESIZE}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise RecordError(f"{source}: mean/std must be 3 values, std > 0")
        # What every runtime here and the phone app implement; anything else would be read as this anyway.
        if (self.layout, self.color, self.scale) != ("NCHW", "RGB", 1.0 / 255.0):
            raise RecordError(f"{source}: only layout NCHW, color RGB and scale 1/255 are supported "
                              f"(got {self.layout}, {self.color}, {self.scale})")

    @staticmethod
    def for_crop(crop_size: int, crop_pct: float, **kw: Any) -> "PreprocessSpec":
        """The usual "resize to crop/crop_pct, then center-crop" recipe (timm's crop_pct)."""
        return PreprocessSpec(resize_size=int(round(crop_size / crop_pct)), crop_size=crop_size, **kw)


@dataclass
class RunRecord(Record):
    """``RUN/run.json``: everything downstream needs to rebuild and describe the model.

    Paths are relative to the run directory and must stay inside it (:func:`confined_path`,
    checked on load): the path fields below, ``unknown["file"]`` and ``extra["samples"]``.
    """

    name: str
    backbone: str
    num_classes: int
    labels: list[str]
    preprocess: dict[str, Any]
    weights: str = "model.pth"  # fp32 state dict of the best checkpoint (weights_only loadable)
    best_checkpoint: str = "checkpoints/best.ckpt"
    last_checkpoint: str = "checkpoints/last.ckpt"
    temperature: float = 1.0
    fallback_threshold: float = 0.5
    fallback_rule: str = ""
    split: str = "split.json"
    config: str = "config.yaml"
    metrics: str = "metrics.json"
    status: str = "trained"  # "training" while in progress, "trained" when complete
    created: str = ""
    fieldid_version: str = __version__  # the fieldid that wrote this run
    extra: dict[str, Any] = field(default_factory=dict)
    # The unknown-score detector (training/ood.py): threshold, method, how it was fitted; {} = none.
    unknown: dict[str, Any] = field(default_factory=dict)
    # Identity of the trained weights (sha256 prefix of model.pth + unknown.pth), the same on
    # every artifact of this run and on the server, so answers can be traced to one model.
    model_version: str = ""
    # Knowledge distillation: teacher run, its backbone, weight and temperature ({} = trained alone).
    distillation: dict[str, Any] = field(default_factory=dict)

    SCHEMA_VERSION = RUN_SCHEMA_VERSION

    def validate(self, source: str = "run.json") -> None:
        if self.num_classes != len(self.labels):
            raise RecordError(f"{source}: num_classes {self.num_classes} != {len(self.labels)} labels")
        if len(set(self.labels)) != len(self.labels):
            raise RecordError(f"{source}: duplicate labels")
        if not 0 < self.temperature < math.inf:
            raise RecordError(f"{source}: temperature must be finite and > 0")
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise RecordError(f"{source}: fallback_threshold must be in [0, 1]")
        PreprocessSpec.from_dict(self.preprocess, source=f"{source}:preprocess")
        for name, rel in self.paths().items():
            confined_path(".", rel, what=f"{source}: {name}", where="the run folder")

    def paths(self) -> dict[str, Any]:
        """Every file this record names, relative to the run folder: ``{field: path}``."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _RUN_PATH_FIELDS}
        for holder, key in (("unknown", "file"), ("extra", "samples")):
            d = getattr(self, holder)
            if isinstance(d, dict) and d.get(key) is not None:
                out[f"{holder}.{key}"] = d[key]
        return out

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)


# RunRecord fields that name a file in the run folder (besides unknown.file and extra.samples).
_RUN_PATH_FIELDS = ("weights", "best_checkpoint", "last_checkpoint", "split", "config", "metrics")


def load_record(run_dir: str | os.PathLike) -> RunRecord:
    """Read and validate ``RUN/run.json``; a clear :class:`RecordError` when it is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecordError(f"{run_dir}: no such run directory")
    rec = RunRecord.from_json(run_dir / "run.json")
    if rec.status != "trained":
        raise RecordError(f"{run_dir}: run is incomplete (status {rec.status!r}); finish it with --resume")
    if not confined_path(run_dir, rec.weights, what="run.json: weights").is_file():
        raise RecordError(f"{run_dir}: weights file {rec.weights} missing")
    return rec
