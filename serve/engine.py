"""The server's inference logic as a plain Python class, independent of TorchServe and of torch.

:class:`ClassifierEngine` turns request bodies into answers: decode (``fieldid.export.phone``
allow-list, EXIF, pixel limit; large JPEGs at a reduced DCT scale) -> preprocess
(``fieldid.export.phone``, the phone's exact recipe) -> one batched ONNX Runtime run of the
bundle's *verified* exported ONNX model -> :func:`fieldid.export.phone.prediction` (the response
schema shared with the on-device path). Every request gets its own :class:`Reply` with an HTTP
status, so a bad image never fails its batch-mates.

The engine reads only the bundle (``manifest.json`` + the ONNX file the export verified); it
never rebuilds the network from the training registry, and importing it loads neither torch
nor ``fieldid.training``. TorchServe is only a thin adapter around this class
(``serve/fieldid_handler.py``): TorchServe is in "Limited Maintenance", and another engine
could host the same class.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fieldid.export.manifest import Artifact, Manifest, load_manifest
from fieldid.export.phone import DEFAULT_MAX_PIXELS, ImageInputError, OnnxRunner, answer, checked_file, onnx_session, prepare

from .archive import ServeError, bundle_dir_of, bundle_version, has_verified, served_artifact

__all__ = ["ClassifierEngine", "Device", "Reply", "error_body", "resolve_device", "PRECISIONS"]

log = logging.getLogger("fieldid.serve")

# What ``--precision`` may ask for. CPU always runs the verified fp32 file; on CUDA, fp16 runs
# only when the bundle holds an fp16 ONNX file that the export verified (never an unverified cast).
PRECISIONS = ("fp32", "fp16")


def error_body(status: int, message: str) -> dict[str, Any]:
    """The JSON body of a refused request (same shape for every error status)."""
    return {"error": message, "status": int(status)}


@dataclass
class Reply:
    """One request's answer: HTTP ``status`` and the JSON ``body``."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)

    def json_bytes(self) -> bytes:
        return json.dumps(self.body).encode("utf-8")


@dataclass(frozen=True)
class Device:
    """Where the model runs: ``cpu`` or ``cuda`` (with its GPU ``index``); ``str()`` gives ``cuda:0``."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def resolve_device(device: str | None = None, gpu_id: int | None = None) -> Device:
    """``cuda:<gpu_id>`` when a GPU is assigned and ONNX Runtime can use it, else ``cpu``
    (or ``device`` if given: ``cpu``, ``cuda``, ``cuda:1``).

    Example:
        >>> str(resolve_device("cpu", gpu_id=0))
        'cpu'
    """
    if device not in (None, "auto"):
        kind, _, idx = str(device).partition(":")
        if kind not in ("cpu", "cuda"):
            raise ServeError(f"device {device!r}: use cpu or cuda[:N]")
        return Device(kind, int(idx) if idx else (0 if kind == "cuda" else None))
    if gpu_id is not None and _cuda_available():
        return Device("cuda", int(gpu_id))
    return Device("cpu")


class ClassifierEngine:
    """A bundle's verified ONNX model behind a bytes-in, JSON-out interface.

    Args:
        session: an ``onnxruntime.InferenceSession`` of the artifact.
        manifest: the bundle's manifest (labels, preprocessing, temperature, threshold, unknown).
        artifact: the manifest entry of the file ``session`` runs (input/output names).
        version: model version reported in every answer.
        device: where ``session`` runs.
        precision: the artifact's precision (``fp32``, or ``fp16`` on CUDA).
        max_pixels: images with more pixels are refused with 413.
        top_k: labels per answer.

    Example:
        >>> eng = ClassifierEngine.from_bundle("runs/reef/export")  # doctest: +SKIP
        >>> eng.predict(open("photo.jpg", "rb").read())["top_k"][0]["label"]  # doctest: +SKIP
        'parrotfish'
    """

    def __init__(self, session: Any, manifest: Manifest, artifact: Artifact, *, version: str,
                 device: Device = Device("cpu"), precision: str = "fp32", max_pixels: int = DEFAULT_MAX_PIXELS,
                 top_k: int = 5) -> None:
        self.session = session
        self.manifest = manifest
        self.artifact = artifact
        self.spec = manifest.preprocess_spec
        self.version = version
        self.device = device
        self.precision = precision
        self.max_pixels = int(max_pixels)
        self.top_k = int(top_k)
        # The shorter side the photo is resized to: JPEGs decode at reduced size for it (intake's
        # draft rule); 0 decodes every pixel (bench-serve's 'before' row).
        self.draft_side = int(self.spec.resize_size)
        # The phone contract's runner: logits and, for bundles with an unknown detector, its score.
        self.runner = OnnxRunner(session, artifact, input_dtype=np.float16 if precision == "fp16" else np.float32)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *, device: str | None = None, gpu_id: int | None = None,
                    threads: int | None = None, precision: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                    top_k: int = 5, warmup: bool = True, version: str | None = None) -> "ClassifierEngine":
        """Load ``BUNDLE/manifest.json`` and its verified ONNX model (sha256-checked) into ONNX Runtime.

        Args:
            bundle_dir: an export bundle (or a run directory: its ``export/`` bundle).
            device: ``cpu``, ``cuda:0`` ...; default: the assigned GPU (``gpu_id``) if any, else CPU.
            gpu_id: the GPU TorchServe assigned to this worker (``None``: none).
            threads: intra-op CPU threads (default: ONNX Runtime's, one per core).
            precision: ``auto`` (fp16 on CUDA when the bundle verified an fp16 ONNX file, else
                fp32), ``fp32`` or ``fp16`` (CUDA only; CPU always runs fp32).
            max_pixels: pixel limit for decoded images (413 above).
            top_k: labels per answer.
            warmup: run one inference now, so the first request is not slow.
            version: the version answers report (default: :func:`fieldid.serve.archive.bundle_version`).

        Returns:
            The engine.

        Raises:
            ServeError: no verified ONNX file, or a precision that cannot run here.
            ManifestError: the file does not match the manifest's sha256.
        """
        import onnxruntime as ort

        bundle_dir = bundle_dir_of(bundle_dir)
        manifest = load_manifest(bundle_dir)
        dev = resolve_device(device, gpu_id)
        if precision not in ("auto", *PRECISIONS):
            raise ServeError(f"precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
        if dev.type == "cpu":
            precision = "fp32"  # ONNX Runtime's CPU fp16 kernels are slower and move answers for nothing
        elif precision == "auto":
            precision = "fp16" if has_verified(manifest, "onnx", "fp16") else "fp32"
        art = served_artifact(manifest, precision)
        path = checked_file(bundle_dir, art)
        if dev.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ServeError("device cuda asked for, but this ONNX Runtime has no CUDAExecutionProvider "
                                 "(install onnxruntime-gpu)")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        session = onnx_session(path, threads=threads, providers=providers)
        eng = cls(session, manifest, art, version=version or bundle_version(manifest), device=dev,
                  precision=precision, max_pixels=max_pixels, top_k=top_k)
        if warmup:
            c = eng.spec.crop_size
            eng.logits(np.zeros((1, 3, c, c), np.float32))
        log.info("loaded %s (%s) on %s, %s, %s threads, %s via %s", manifest.name, eng.version, dev, eng.precision,
                 threads or "default", art.file, session.get_providers()[0])
        return eng

    # ------------------------------------------------------------------ steps
    @property
    def name(self) -> str:
        return self.manifest.name

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> preprocessed ``(3, H, W)`` float32. Raises :class:`ImageInputError`."""
        return prepare(bytes(data), self.spec, max_pixels=self.max_pixels, draft=bool(self.draft_side))[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, 3, H, W)`` float32 -> ``(N, num_classes)`` float32 logits and, when the
        artifact has one, the ``(N,)`` unknown scores (else ``None``)."""
        return self.runner(batch)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """``(N, 3, H, W)`` float32 -> ``(N, num_classes)`` float32 logits."""
        return self.run(batch)[0]

    def answer(self, logits: np.ndarray, latency_ms: float, unknown_score: float | None = None) -> dict[str, Any]:
        """One image's logits (and unknown score) -> the shared response schema (``source`` = ``server``)."""
        return answer(self.manifest, self.artifact, logits, None if unknown_score is None else float(unknown_score),
                      source="server", latency_ms=latency_ms, k=self.top_k, version=self.version)

    # ------------------------------------------------------------------ whole requests
    def handle(self, bodies: Sequence[bytes | None | ImageInputError]) -> list[Reply]:
        """A batch of request bodies -> one :class:`Reply` each, never raising for bad input.

        An entry may already be an :class:`ImageInputError` (the adapter found no usable body);
        it is answered with its status. Good images share one inference run. Only an
        :class:`ImageInputError` is the client's fault (4xx); any other failure preparing one
        image is the server's (500, or 503 when memory ran out), logged with its traceback.

        Example:
            >>> [r.status for r in eng.handle([b"", png_bytes])]  # doctest: +SKIP
            [400, 200]
        """
        t0 = time.perf_counter()
        replies: list[Reply | None] = [None] * len(bodies)
        arrays, index = [], []
        for i, body in enumerate(bodies):
            try:
                if isinstance(body, ImageInputError):
                    raise body
                arrays.append(self.decode(body or b""))
                index.append(i)
            except ImageInputError as e:  # the client's fault, and only that: decoding types every bad image
                replies[i] = Reply(e.status, error_body(e.status, str(e)))
            except MemoryError:  # pixels are limited before decoding: the server is short, not the photo wrong
                log.exception("out of memory preparing request %d of the batch", i)
                replies[i] = Reply(503, error_body(503, "the server is out of memory; try again later"))
            except Exception as e:  # a server bug: 500, the traceback in the log; the batch-mates go on
                log.exception("bug preparing request %d of the batch", i)
                replies[i] = Reply(500, error_body(500, f"internal server error ({type(e).__name__}); "
                                                        f"the server log has the details"))
        if arrays:
            logits, unknown = self.run(np.stack(arrays))
            ms = (time.perf_counter() - t0) * 1000.0
            for j, (row, i) in enumerate(zip(logits, index)):
                replies[i] = Reply(200, self.answer(row, ms, None if unknown is None else unknown[j]))
        return replies  # type: ignore[return-value]

    def predict(self, data: bytes) -> dict[str, Any]:
        """One image's answer in-process (what the server returns, without HTTP).

        Raises:
            ImageInputError: empty (400), not an accepted image (415) or too many pixels (413).
        """
        t0 = time.perf_counter()
        x = self.decode(data)
        logits, unknown = self.run(x[None])
        return self.answer(logits[0], (time.perf_counter() - t0) * 1000.0, None if unknown is None else unknown[0])

