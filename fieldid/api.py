"""The Python API: train, evaluate, export_bundle, predict, serve_bundles -- what the ``fieldid`` CLI calls.

Five plain functions take a folder of photos to answers, one spelling each::

    import fieldid
    run = fieldid.train("photos/", "runs/fish", epochs=10, image_size=160)
    fieldid.evaluate(run)["accuracy"]
    bundle = fieldid.export_bundle(run)
    fieldid.predict(bundle, ["new/photo.jpg"])[0]["label"]
    server = fieldid.serve_bundles(bundle)   # TorchServe fallback server; server.prediction_url("fish")

:class:`Run` and :class:`Bundle` are thin handles on the folders the stages write (the run
directory, the bundle with ``manifest.json``): they read those folders (``run.record``,
``bundle.manifest``, ``labels``) and every function accepts them or a plain path, so the CLI and
a notebook see the same state. The names do not collide with the subpackages
(``fieldid.export``, ``fieldid.serve``), which stay plain packages. Importing this module is
torch-free: each call imports its stage when it runs.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from fieldid.cli_common import UsageError

if TYPE_CHECKING:  # only for annotations; importing them at run time would pull in the stages
    from fieldid.export.manifest import Manifest
    from fieldid.serve.server import ServerState
    from fieldid.training.records import RunRecord

__all__ = ["Run", "Bundle", "train", "evaluate", "export_bundle", "predict", "serve_bundles"]

PathLike = str | os.PathLike


class Run:
    """A finished (or interrupted) run directory, as written by :func:`train`.

    Examples:
        >>> run = Run("runs/reef")  # doctest: +SKIP
        >>> run.labels[:2], run.record.status  # doctest: +SKIP
        (['blue_tang', 'foureye_butterflyfish'], 'trained')
    """

    def __init__(self, path: PathLike, record: RunRecord | None = None) -> None:
        self.path = Path(path)
        if record is not None:
            self.__dict__["record"] = record  # the cached_property's slot: no second read of run.json

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @cached_property
    def record(self) -> RunRecord:
        """``run.json`` (labels, preprocessing, temperature, fallback threshold, status, ...)."""
        from fieldid.training.records import RunRecord

        return RunRecord.from_json(self.path / "run.json")

    @property
    def labels(self) -> list[str]:
        return list(self.record.labels)

    @property
    def bundle(self) -> "Bundle":
        """The run's default bundle (``RUN/export``); a clear error when it was not exported yet."""
        return Bundle(self.path)


class Bundle:
    """An export bundle: verified artifacts + ``manifest.json``. A run folder means its ``export/``.

    Examples:
        >>> b = Bundle("runs/reef")  # doctest: +SKIP
        >>> [a.file for a in b.manifest.artifact_list()][:2]  # doctest: +SKIP
        ['model.pth', 'model.onnx']
    """

    def __init__(self, path: PathLike) -> None:
        from fieldid.export.manifest import bundle_dir_of  # torch-free: the one rule every stage uses

        self.path = bundle_dir_of(path)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @cached_property
    def manifest(self) -> Manifest:
        from fieldid.export.manifest import load_manifest

        return load_manifest(self.path)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)


def train(data: PathLike | None, out: PathLike | None, *, config: PathLike | None = None,
          resume: PathLike | None = None, **overrides: Any) -> Run:
    """Fine-tune a backbone on a folder of labelled photos and write a run directory.

    Args:
        data: ImageFolder root (one folder per class, or ``train/`` [``val/``] [``test/``]).
        out: the new run directory.
        config: a YAML file of ``TrainConfig`` keys (``training/configs/*.yaml``).
        resume: an interrupted run to continue instead (``data``/``out``/``config`` then come from it;
            ``overrides`` may change only the settings that are safe to change mid-run, e.g. ``epochs``).
        **overrides: ``TrainConfig`` fields, e.g. ``epochs=10, image_size=160, model="efficientnet_lite0"``;
            nested augmentation keys as ``**{"augment.hue": 0.0}``. ``None`` values change nothing.

    Returns:
        The :class:`Run` (``run.record`` holds test accuracy, temperature, fallback threshold).

    Examples:
        >>> run = train("data/salmon", "runs/salmon", epochs=3, image_size=128)  # doctest: +SKIP
    """
    from fieldid.training.config import TrainConfig, load_config
    from fieldid.training.train import train as _train

    if resume is not None:
        changes = {k: v for k, v in overrides.items() if v is not None}
        return Run(resume, _train(None, None, resume=resume, resume_overrides=changes or None))
    if data is None or out is None:
        raise UsageError("need data and out (or resume=RUN)")
    cfg = load_config(config) if config else TrainConfig()
    return Run(out, _train(data, out, cfg.replace(**overrides)))


def evaluate(run: Run | PathLike, data: PathLike | None = None, *, out: PathLike | None = None) -> dict[str, Any]:
    """Metrics of a finished run; writes ``metrics.json`` and the plots.

    Args:
        run: the run (or its folder).
        data: another ImageFolder to measure on (default: the run's held-out test split).
        out: where the metrics and plots go (default: the run folder; see ``fieldid evaluate --out``).

    Returns:
        ``accuracy``, ``macro_f1``, per-class precision/recall/F1, top-k, confusion matrix, ECE, ...
    """
    from fieldid.training.evaluate import evaluate as _evaluate

    return _evaluate(Path(run), data, out=out)


def export_bundle(run: Run | PathLike, *, formats: list[str] | str | None = None, out: PathLike | None = None,
                  strict: bool = False, allow_drop: bool = False, calibration_size: int = 200,
                  data: PathLike | None = None, int8: bool = True) -> Bundle:
    """Export a run to verified phone artifacts (ONNX, ExecuTorch, TorchScript, Core ML; fp32 + int8).

    Args:
        run: the run (or its folder).
        formats: subset of ``pytorch, onnx, executorch, torchscript, coreml`` (default: all).
        out: bundle folder (default ``RUN/export``); replaced only when the export writes a bundle.
        strict: any artifact that misses its bar fails the export (default: the bundle keeps the
            artifacts that passed; the ones that missed are marked failed and listed in
            ``manifest.verification_summary["missed"]``).
        allow_drop: deprecated (the default now); accepted for one release.
        calibration_size: training images used to calibrate the int8 models.
        int8: False writes the fp32 artifacts only (a server model runs fp32).
        data: read images from this dataset folder instead of the run's stored samples.

    Returns:
        The :class:`Bundle`.

    Examples:
        >>> bundle = export_bundle("runs/salmon", formats="onnx")  # doctest: +SKIP
    """
    from fieldid.export.bundle import export_run  # registers the exporters itself

    out = Path(out) if out is not None else Path(run) / "export"
    export_run(Path(run), formats=formats, out=out, strict=strict, allow_drop=allow_drop,
               calibration_size=calibration_size, data=data, int8=int8)
    return Bundle(out)


def predict(model: Bundle | Run | PathLike, photos: PathLike | Iterable[PathLike], *, artifact: str | None = None,
            server: str | None = None, server_run: PathLike | None = None, key_file: PathLike | None = None,
            ca_file: PathLike | None = None, k: int = 3, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Classify photos with one of the bundle's artifacts, as the phone would.

    Args:
        model: a bundle, or a run (its ``export/`` bundle).
        photos: image files and/or folders (searched recursively).
        artifact: the artifact file to run, e.g. ``"model.int8.pte"`` (default: the phone's
            choice -- the verified int8 ONNX model, else the best other one with a runtime here).
        server: the fallback server's URL (``http://HOST:PORT``); photos the device is unsure
            about (``needs_fallback``) are sent there and its answer is added as ``server``.
        server_run: the server model's bundle or run (e.g. ``runs/reef-server``): the server is asked
            for that model, after checking it lists the device's labels in the same order. Without
            it the server is asked for the device model's name; an answer with labels the device
            does not have is then an error row.
        key_file: the server's ``key_file.json`` (default: the one of the server that
            ``fieldid serve start`` started for this bundle); a key goes only to its own server.
        ca_file: PEM certificate to verify an https server with (default: the system's CAs).
        k: how many classes each answer's ``top_k`` lists.
        progress: ``progress(done, total)`` after each photo.

    Returns:
        One row per photo (unreadable ones included, with ``error`` set): ``path``, ``label``,
        ``probability``, ``top_k``, ``unknown``, ``needs_fallback``, the device answer and,
        for photos sent, ``server``.
    """
    from fieldid.classify import classify_photos

    items = [photos] if isinstance(photos, (str, os.PathLike)) else list(photos)
    return classify_photos(Bundle(model).path, [Path(p) for p in items], artifact=artifact, server=server,
                           server_run=_path(server_run), key_file=_path(key_file), ca_file=_path(ca_file), k=k,
                           progress=progress)


def _path(p: PathLike | None) -> Path | None:
    return None if p is None else Path(p)


def serve_bundles(*models: Bundle | Run | PathLike, state_dir: PathLike | None = None, free_ports: bool = False,
          **options: Any) -> ServerState:
    """Start the TorchServe fallback server on one or more bundles; returns when it is READY.

    Args:
        *models: bundles or runs (distinct model names).
        state_dir: where the server keeps config, logs and ``key_file.json`` (default ``RUN/serve``).
        free_ports: pick five free loopback ports instead of 8080-8082 / 7070-7071 (notebooks, tests).
        **options: :class:`fieldid.serve.ServeOptions` fields (``port``, ``workers``, ``auth``, ...).

    Returns:
        The server's state: ``prediction_url(name)``, ``key_file``, ``token()``; stop it with
        ``fieldid.serve.stop_server(state.state_dir)``.

    Examples:
        >>> st = serve_bundles("runs/reef", port=8080)  # doctest: +SKIP
        >>> st.prediction_url("reef")  # doctest: +SKIP
        'http://127.0.0.1:8080/predictions/reef'
    """
    from fieldid.serve.server import ServeOptions, start_server

    try:
        opts = ServeOptions.on_free_ports(**options) if free_ports else ServeOptions(**options)
    except TypeError as e:  # an unknown option name is bad input, like an unknown CLI flag
        raise UsageError(f"serve: {e}") from None
    return start_server([Bundle(m).path for m in models], state_dir, opts)
