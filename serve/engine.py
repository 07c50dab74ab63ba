"""The server's inference logic as a plain Python class, independent of TorchServe.

:class:`ClassifierEngine` turns request bodies into answers: decode (``fieldid.export.phone``
allow-list, EXIF, pixel limit) -> preprocess (``fieldid.export.phone``, the phone's exact recipe) ->
one batched forward pass -> :func:`fieldid.export.phone.prediction` (the response schema shared with
the on-device path). Every request gets its own :class:`Reply` with an HTTP status, so a bad
image never fails its batch-mates. TorchServe is only a thin adapter around this class
(``serve/fieldid_handler.py``): TorchServe is in "Limited Maintenance", and another engine
could host the same class.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fieldid.export.manifest import Manifest, ManifestError, file_sha256, load_manifest
from fieldid.export.phone import (DEFAULT_MAX_PIXELS, ImageInputError, check_resize_fits, decode_image, prediction,
                          preprocess)

from .archive import bundle_dir_of, bundle_version

__all__ = ["ClassifierEngine", "Reply", "error_body", "resolve_device", "PRECISIONS"]

log = logging.getLogger("fieldid.serve")

# autocast dtypes on CUDA; CPU always runs fp32 (autocast there is slower without AMX and
# would move answers away from the verified fp32 export for no gain).
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def resolve_device(device: str | None = None, gpu_id: int | None = None) -> torch.device:
    """``cuda:<gpu_id>`` when a GPU is assigned and present, else ``cpu`` (or ``device`` if given)."""
    if device not in (None, "auto"):
        return torch.device(device)
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


class ClassifierEngine:
    """A bundle's fp32 model behind a bytes-in, JSON-out interface.

    Args:
        model: the classifier (eval mode), on any device.
        manifest: the bundle's manifest (labels, preprocessing, temperature, threshold).
        version: model version reported in every answer.
        device: where ``model`` runs.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast; CUDA only).
        max_pixels: images with more pixels are refused with 413.
        top_k: labels per answer.

    Example:
        >>> eng = ClassifierEngine.from_bundle("runs/reef/export")  # doctest: +SKIP
        >>> eng.predict(open("photo.jpg", "rb").read())["top_k"][0]["label"]  # doctest: +SKIP
        'parrotfish'
    """

    def __init__(self, model: torch.nn.Module, manifest: Manifest, *, version: str,
                 device: torch.device | str = "cpu", precision: str = "fp32",
                 max_pixels: int = DEFAULT_MAX_PIXELS, top_k: int = 5) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.precision = precision if self.device.type == "cuda" else "fp32"
        self.manifest = manifest
        self.spec = manifest.preprocess_spec
        self.version = version
        self.max_pixels = int(max_pixels)
        self.top_k = int(top_k)
        self.channels_last = self.device.type == "cuda"
        model = model.eval().to(self.device)
        if self.channels_last:  # NHWC lets cuDNN pick its fastest depthwise/pointwise kernels
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *, device: str | None = None, gpu_id: int | None = None,
                    threads: int | None = None, precision: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                    top_k: int = 5, warmup: bool = True) -> "ClassifierEngine":
        """Load ``BUNDLE/manifest.json`` + its fp32 state dict (``weights_only=True``).

        Args:
            bundle_dir: an export bundle (or a run directory: its ``export/`` bundle).
            device: ``cpu``, ``cuda:0`` ...; default: the assigned GPU (``gpu_id``) if any, else CPU.
            gpu_id: the GPU TorchServe assigned to this worker (``None``: none).
            threads: intra-op CPU threads (default: leave torch's setting alone).
            precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16`` or ``bf16``.
            max_pixels: pixel limit for decoded images (413 above).
            top_k: labels per answer.
            warmup: run one forward pass now, so the first request is not slow.

        Returns:
            The engine.
        """
        from fieldid.training.models import create_model

        bundle_dir = bundle_dir_of(bundle_dir)
        manifest = load_manifest(bundle_dir)
        art = manifest.find("pytorch", "fp32")
        weights = bundle_dir / art.file
        _check_sha256(weights, art.sha256)
        if threads:
            torch.set_num_threads(int(threads))
        dev = resolve_device(device, gpu_id)
        if precision == "auto":
            precision = "fp16" if dev.type == "cuda" else "fp32"
        model = create_model(manifest.backbone, manifest.num_classes, pretrained=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)  # never unpickle code
        model.load_state_dict(state)
        eng = cls(model, manifest, version=bundle_version(manifest), device=dev, precision=precision,
                  max_pixels=max_pixels, top_k=top_k)
        if warmup:
            c = eng.spec.crop_size
            eng.logits(np.zeros((1, 3, c, c), np.float32))
        log.info("loaded %s (%s) on %s, %s, %d threads", manifest.name, eng.version, dev, eng.precision,
                 torch.get_num_threads())
        return eng

    # ------------------------------------------------------------------ steps
    @property
    def name(self) -> str:
        return self.manifest.name

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> preprocessed ``(3, H, W)`` float32. Raises :class:`ImageInputError`."""
        img = decode_image(bytes(data), max_pixels=self.max_pixels, target=self.spec.resize_size)  # JPEG draft
        check_resize_fits(img.size, self.spec.resize_size, self.max_pixels)  # the phone's rule, same 413
        return preprocess(img, self.spec)[0]

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """``(N, 3, H, W)`` float32 -> ``(N, num_classes)`` float32 logits."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.model(x)
        return out.float().cpu().numpy()

    def answer(self, logits: np.ndarray, latency_ms: float) -> dict[str, Any]:
        """One image's logits -> the shared response schema (``source`` = ``server``)."""
        m = self.manifest
        return prediction(logits, m.labels, temperature=m.temperature, fallback_threshold=m.fallback_threshold,
                          model=m.name, version=self.version, source="server", latency_ms=latency_ms,
                          k=self.top_k)

    # ------------------------------------------------------------------ whole requests
    def handle(self, bodies: Sequence[bytes | None | ImageInputError]) -> list[Reply]:
        """A batch of request bodies -> one :class:`Reply` each, never raising for bad input.

        An entry may already be an :class:`ImageInputError` (the adapter found no usable body);
        it is answered with its status. Good images share one forward pass.

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
            except ImageInputError as e:
                replies[i] = Reply(e.status, error_body(e.status, str(e)))
            except Exception as e:  # an image that breaks decoding/preprocessing fails alone
                log.exception("cannot process request %d of the batch", i)
                status = 413 if isinstance(e, MemoryError) else 415
                replies[i] = Reply(status, error_body(status, f"cannot process this image ({type(e).__name__})"))
        if arrays:
            logits = self.logits(np.stack(arrays))
            ms = (time.perf_counter() - t0) * 1000.0
            for row, i in zip(logits, index):
                replies[i] = Reply(200, self.answer(row, ms))
        return replies  # type: ignore[return-value]

    def predict(self, data: bytes) -> dict[str, Any]:
        """One image's answer in-process (what the server returns, without HTTP).

        Raises:
            ImageInputError: empty (400), not JPEG/PNG/WEBP (415) or too many pixels (413).
        """
        t0 = time.perf_counter()
        x = self.decode(data)
        row = self.logits(x[None])[0]
        return self.answer(row, (time.perf_counter() - t0) * 1000.0)


def _check_sha256(path: Path, expected: str) -> None:
    digest = file_sha256(path)
    if digest != expected:
        raise ManifestError(f"{path}: sha256 {digest[:12]}... does not match the manifest ({expected[:12]}...)")
