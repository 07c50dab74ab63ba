"""``fieldid predict``: classify unlabelled photos with a bundle's artifact, as the phone does, to CSV or JSON.

Each photo goes through the phone contract (:mod:`fieldid.export.phone`): its decode (JPEG
draft, pixel limit, EXIF) and preprocessing, the file the phone runs
(:func:`~fieldid.export.phone.select_artifact`; any other artifact by name, in its runtime here:
ONNX Runtime, ExecuTorch, TorchScript), calibration, unknown score and fallback decision, and
the one response schema (:func:`~fieldid.export.phone.answer`). With a server, the photos the device is unsure
about (``needs_fallback``) are sent to the TorchServe fallback and its answer is added.
A photo that cannot be read becomes a row with ``error`` set; it never stops the others.

(The module is not called ``predict``: ``fieldid.predict`` is the API function.)
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from fieldid.cli_common import UsageError, first_line

if TYPE_CHECKING:
    from fieldid.export.manifest import Artifact, Manifest

__all__ = ["collect_photos", "choose_artifact", "DevicePredictor", "classify_photos", "write_table",
           "TABLE_FORMATS", "CSV_COLUMNS"]

TABLE_FORMATS = (".csv", ".json")
# One CSV row per photo; top-k and the server's answer are flattened into text columns.
CSV_COLUMNS = ("path", "label", "probability", "top_k", "unknown", "unknown_score", "needs_fallback", "source",
               "artifact", "latency_ms", "server_label", "server_probability", "server_unknown", "server_error",
               "error")


def collect_photos(items: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (hidden files skipped), in a stable order.

    Raises:
        ValueError: a path that does not exist, or no photos at all.

    Example:
        >>> collect_photos(["photos/"])  # doctest: +SKIP
        [PosixPath('photos/a.jpg'), PosixPath('photos/sub/b.png')]
    """
    from fieldid.training.images import is_image_file  # the one list of image file suffixes

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if is_image_file(f)
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            out.append(p)  # given by name: tried even with an odd suffix; unreadable -> an error row
        else:
            raise UsageError(f"{p}: no such file or folder")
    if not out:
        raise UsageError(f"no photos found in {', '.join(map(str, items))}")
    return list(dict.fromkeys(out))


def _read_photo(f: Path) -> bytes:
    """The file's bytes, refused as the apps refuse them before reading: not a regular file (a FIFO
    would block for ever, a device never ends) or larger than any phone photo."""
    from fieldid.export.phone import MAX_FILE_BYTES
    from fieldid.intake import ImageInputError

    if not f.is_file():
        raise OSError(0, "not a regular file")
    if f.stat().st_size > MAX_FILE_BYTES:
        raise ImageInputError(f"file is larger than {MAX_FILE_BYTES // 1_000_000} MB", 413)
    return f.read_bytes()


def choose_artifact(manifest: Manifest, name: str | None = None) -> Artifact:
    """The artifact to run: ``name`` (a file in the bundle), else the one the phone ships.

    The phone's choice is :func:`fieldid.export.phone.select_artifact` (the verified int8 ONNX
    model, else fp32); a bundle without ONNX falls back to the first verified artifact with a
    runtime here.

    Raises:
        ValueError: ``name`` is not in the bundle, or has no runtime on this machine.
    """
    from fieldid.export import import_exporters
    from fieldid.export.bundle import RUNTIMES

    import_exporters()  # each exporter module registers its runtime
    arts = manifest.artifact_list()
    runnable = [a for a in arts if a.format in RUNTIMES and a.outputs == "logits"]
    if name:
        match = [a for a in arts if a.file == name]
        if not match:
            raise UsageError(f"bundle {manifest.name!r} has no artifact {name!r} (has: "
                             f"{', '.join(a.file for a in arts)})")
        if match[0] not in runnable:
            raise UsageError(f"{name}: no runtime for {match[0].format} artifacts on this machine (runnable: "
                             f"{', '.join(a.file for a in runnable) or 'none'})")
        return match[0]
    if any(a.format == "onnx" and a.outputs == "logits" for a in arts):
        from fieldid.export.phone import select_artifact  # the phone's rule, in one place

        return select_artifact(manifest, "auto")[0]
    verified = [a for a in runnable if a.verification.get("status") == "passed"] or runnable
    if not verified:
        raise UsageError(f"bundle {manifest.name!r} has no artifact with a runtime on this machine")
    return verified[0]


@dataclass
class DevicePredictor:
    """One artifact of a bundle in its runtime: photo bytes -> answer in the shared schema."""

    bundle: Path
    manifest: Manifest
    artifact: Artifact
    # (N, 3, H, W) -> (logits (N, C), unknown_score (N,) or None when the artifact has no such output)
    runner: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]

    @classmethod
    def load(cls, bundle: str | Path, artifact: str | None = None, *, threads: int = 1) -> "DevicePredictor":
        """Load ``artifact`` (default: the phone's choice) of ``bundle``; its sha256 is checked first."""
        from fieldid.export.manifest import bundle_dir_of, load_manifest
        from fieldid.export.phone import OnnxRunner, checked_file, onnx_session

        bundle = bundle_dir_of(bundle)
        manifest = load_manifest(bundle)
        art = choose_artifact(manifest, artifact)
        path = checked_file(bundle, art)
        if art.format == "onnx":  # the phone's runner: one session gives logits and the unknown score
            return cls(bundle, manifest, art, OnnxRunner(onnx_session(path, threads=threads), art))
        return cls(bundle, manifest, art, _other_runner(path, art, threads))

    @property
    def version(self) -> str:
        return self.artifact.sha256[:12]

    def predict(self, data: bytes, *, k: int = 3) -> dict[str, Any]:
        """Photo bytes -> the device answer (``source="device"``).

        Raises:
            fieldid.export.phone.ImageInputError: not an accepted image (its ``status`` says why).
        """
        from fieldid.export.phone import answer, prepare

        t0 = time.perf_counter()
        logits, unknown = self.runner(prepare(data, self.manifest.preprocess_spec))
        return answer(self.manifest, self.artifact, logits[0], None if unknown is None else float(unknown[0]),
                      source="device", latency_ms=(time.perf_counter() - t0) * 1e3, k=k, version=self.version)


def _other_runner(path: Path, art: Artifact,
                  threads: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]:
    """A non-ONNX artifact (ExecuTorch, TorchScript) in its runtime from the export's registry,
    shaped like the phone contract's :class:`~fieldid.export.phone.OnnxRunner`."""
    from fieldid.export.bundle import load_runtime

    # The logits runner first: it sets the runtime's threads, and ExecuTorch's pool is process-wide
    # (a reset after the score method was loaded would leave that method on a freed pool).
    logits_runner = load_runtime(path, art.format, threads=threads)
    score_runner = None
    if art.unknown_output:  # bundles with an unknown detector; others answer without it
        from fieldid.export.unknown import load_unknown_runtime

        score_runner = load_unknown_runtime(path, art.format)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        scores = None if score_runner is None else np.asarray(score_runner(x), np.float32).reshape(len(x))
        return np.asarray(logits_runner(x)), scores

    return run


def _server_token(bundle: Path, url: str, key_file: str | Path | None) -> str | None:
    """The inference key for the server at ``url``: ``key_file``'s, else that of the server
    ``fieldid serve start`` started for this bundle -- in both cases only if the key file belongs
    to the server at ``url`` (:func:`fieldid.serve.client.token_for`): a key must never go to
    another machine because a URL was typed.

    Raises:
        fieldid.serve.client.KeyFileError: ``key_file`` belongs to another server, or is unreadable.
    """
    from fieldid.serve.client import origin, token_for

    if key_file is not None:
        return token_for(url, key_file)
    from fieldid.serve.server import load_state, state_dirs_for

    for d in state_dirs_for(bundle):
        try:
            state = load_state(d)
        except ValueError:
            continue
        if state.auth and state.key_file and origin(state.inference_url) == origin(url):
            return token_for(url, state.key_file)
    return None  # a --no-auth server, or one we hold no key for (its 4xx says so, per photo)


def _prediction_url(server: str, model: str) -> str:
    return server if "/predictions/" in server else f"{server.rstrip('/')}/predictions/{model}"


def _row(path: Path, answer: dict[str, Any] | None, artifact: str, error: str = "") -> dict[str, Any]:
    top = (answer or {}).get("top_k") or [{}]
    return {
        "path": str(path), "label": top[0].get("label"), "probability": top[0].get("probability"),
        "top_k": (answer or {}).get("top_k", []), "unknown": (answer or {}).get("unknown", False) if answer else None,
        "unknown_score": (answer or {}).get("unknown_score"),
        "needs_fallback": (answer or {}).get("needs_fallback"), "source": "device" if answer else None,
        "artifact": artifact, "latency_ms": (answer or {}).get("latency_ms"), "device": answer, "server": None,
        "error": error,
    }


def classify_photos(bundle: str | Path, photos: str | Path | Iterable[str | Path], *, artifact: str | None = None,
                    server: str | None = None, server_run: str | Path | None = None,
                    key_file: str | Path | None = None, ca_file: str | Path | None = None,
                    k: int = 3, threads: int = 1, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Classify photos on the device model and, where it is unsure, on the server (see :func:`fieldid.predict`).

    Returns:
        One row per photo, in ``collect_photos`` order (see :data:`CSV_COLUMNS`; ``device`` and
        ``server`` hold the full answers).

    Raises:
        fieldid.export.manifest.CascadeError: ``server_run``'s labels differ from the device model's.
    """
    from fieldid.export.phone import ImageInputError

    if server_run is not None and not server:
        raise UsageError("server_run names the server's model; give the server's URL too (--server URL)")
    items = [photos] if isinstance(photos, (str, Path)) or hasattr(photos, "__fspath__") else list(photos)
    files = collect_photos(items)
    device = DevicePredictor.load(bundle, artifact, threads=threads)
    client = None
    if server:
        from fieldid.serve.client import ServeClient

        client = ServeClient(_prediction_url(server, _server_model(device.manifest, server_run)),
                             _server_token(device.bundle, server, key_file), ca_file=ca_file)
    rows: list[dict[str, Any]] = []
    try:
        for i, f in enumerate(files, 1):
            try:
                data = _read_photo(f)
                row = _row(f, device.predict(data, k=k), device.artifact.file)
            except ImageInputError as e:
                row, data = _row(f, None, device.artifact.file, f"HTTP-style {e.status}: {first_line(e)}"), b""
            except OSError as e:
                row, data = _row(f, None, device.artifact.file, f"cannot read: {e.strerror or first_line(e)}"), b""
            if client is not None and row["needs_fallback"]:
                row["server"] = _ask(client, data, device.manifest.labels)
            rows.append(row)
            if progress:
                progress(i, len(files))
    finally:
        if client is not None:
            client.close()
    return rows


def _server_model(device: "Manifest", server_run: str | Path | None) -> str:
    """The model name to ask the server for: ``server_run``'s (a bundle or run of the server model,
    checked to have the device's labels in the device's order), else the device model's own."""
    if server_run is None:
        return device.name
    from fieldid.export.manifest import check_pair, load_manifest

    server = load_manifest(server_run)
    check_pair(device, server)
    return server.name


def _ask(client: Any, data: bytes, labels: Sequence[str]) -> dict[str, Any]:
    """The server's answer, or ``{"error": ...}``: an unreachable or refusing server is a row, not a
    crash, and so is an answer naming classes the device model does not have (a server hosting
    another model under this name: its answer cannot stand in for the device's)."""
    import http.client

    from fieldid.serve.client import PredictionError

    try:
        answer = client.predict(data)
    except PredictionError as e:
        return {"error": first_line(e)}
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, timed out, a broken HTTP reply
        return {"error": f"server not reachable: {type(e).__name__}: {first_line(e)}"}
    foreign = sorted({t.get("label") for t in answer.get("top_k", [])} - set(labels))
    if foreign:
        return {"error": f"server model {answer.get('model')!r} answered labels the device model does not have "
                         f"({', '.join(map(repr, foreign[:3]))}); pair them with --server-run"}
    return answer


def _csv_cell(row: dict[str, Any], col: str) -> Any:
    srv = row.get("server") or {}
    top = (srv.get("top_k") or [{}])[0]
    if col == "top_k":
        return ";".join(f"{t['label']}:{t['probability']:.4f}" for t in row["top_k"])
    if col == "server_label":
        return top.get("label", "")
    if col == "server_probability":
        return top.get("probability", "")
    if col == "server_unknown":
        return srv.get("unknown", "") if "top_k" in srv else ""
    if col == "server_error":
        return srv.get("error", "")
    v = row.get(col)
    return "" if v is None else v


def write_table(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Write ``rows`` to ``out`` as CSV or JSON (by its suffix), atomically.

    Raises:
        ValueError: ``out`` has another suffix.
    """
    from fieldid.records import atomic_write_text

    out = Path(out)
    if out.suffix.lower() == ".json":
        text = json.dumps(list(rows), indent=2) + "\n"
    elif out.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([_csv_cell(r, c) for c in CSV_COLUMNS])
        text = buf.getvalue()
    else:
        raise UsageError(f"{out}: --out must end in {' or '.join(TABLE_FORMATS)}")
    return atomic_write_text(out, text, errors="surrogateescape")  # photo names as on disk


def is_predict_table(path: str | Path) -> bool:
    """A table :func:`write_table` wrote (a CSV with its header, a JSON list of rows with a path): what a
    re-run of ``fieldid predict`` may replace inside a run folder, unlike the run's own files."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                return next(csv.reader(f), None) == list(CSV_COLUMNS)
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(rows, list) and all(isinstance(r, dict) and "path" in r and "top_k" in r for r in rows)
    except (OSError, ValueError, csv.Error):
        return False
    return False
