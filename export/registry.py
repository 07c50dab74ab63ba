"""The format registries and the error rules every exporter shares.

``EXPORTERS`` maps a ``--formats`` name to ``fn(ctx) -> [Artifact, ...]``; ``RUNTIMES`` maps an
artifact format to ``loader(path, threads) -> runner(x) -> logits`` (verification and
``fieldid bench`` use it); ``LABEL_READERS`` maps a format to ``reader(path) -> labels`` so the
label order inside a written file can be checked. :func:`converting` turns a converter's or
runtime's exception into one clear :class:`ExportError`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .manifest import Artifact
    from .verify import ExportContext

__all__ = ["ExportError", "EXPORTERS", "RUNTIMES", "LABEL_READERS", "register_exporter", "register_runtime",
           "register_label_reader", "load_runtime", "batch_size", "run_batched", "runtime_name", "unsupported_op",
           "converting", "quiet_third_party", "Runner"]

log = logging.getLogger("fieldid.export")


class ExportError(ValueError):
    """An export that cannot be done as asked (bad run, unknown format, missed bar, ...)."""


Exporter = Callable[["ExportContext"], "list[Artifact]"]
Runner = Callable[[np.ndarray], np.ndarray]
Loader = Callable[[Path, int], Runner]
LabelReader = Callable[[Path], list[str]]
EXPORTERS: dict[str, Exporter] = {}
RUNTIMES: dict[str, Loader] = {}  # artifact format -> loader(path, threads) -> runner(x) -> logits
LABEL_READERS: dict[str, LabelReader] = {}  # artifact format -> labels stored inside the file


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Register ``fn(ctx) -> [Artifact, ...]`` as the exporter for the ``--formats`` name ``name``."""
    def deco(fn: Exporter) -> Exporter:
        EXPORTERS[name] = fn
        return fn
    return deco


def register_runtime(format: str) -> Callable[[Loader], Loader]:
    """Register ``loader(path, threads) -> runner`` for artifacts of ``format`` (0 threads = all)."""
    def deco(fn: Loader) -> Loader:
        RUNTIMES[format] = fn
        return fn
    return deco


def register_label_reader(format: str) -> Callable[[LabelReader], LabelReader]:
    """Register ``reader(path) -> labels`` that reads the class labels out of a ``format`` file."""
    def deco(fn: LabelReader) -> LabelReader:
        LABEL_READERS[format] = fn
        return fn
    return deco


def load_runtime(path: str | Path, format: str, *, threads: int = 0) -> Runner:
    """Load an artifact with its runtime on this machine.

    Args:
        path: the artifact file (or folder).
        format: its manifest format (``onnx``, ``executorch``, ``torchscript``, ...).
        threads: intra-op threads; 0 = the runtime's default (all cores).

    Returns:
        ``runner(x: float32 (N, 3, H, W)) -> logits (N, C)``.

    Example:
        >>> run = load_runtime("runs/salmon/export/model.onnx", "onnx", threads=1)  # doctest: +SKIP
        >>> run(x).shape  # doctest: +SKIP
        (8, 2)
    """
    if format not in RUNTIMES:
        have = ", ".join(sorted(RUNTIMES)) or "none"
        raise ExportError(f"no runtime for {format} artifacts on this machine (have: {have})")
    return RUNTIMES[format](Path(path), threads)


# ExecuTorch programs are lowered with a static batch of one (executorch_export.MAX_BATCH).
PTE_BATCH = 1


# Pixels per runtime call at most: 8 images at 224 px, 15 at 160, 64 (the largest batch asked for) at 96.
# An int8 ONNX Runtime session holds a batch's float activations between its quantize / dequantize steps:
# on the inspection set's 224-px MobileNetV2, 64 images per call peaked 1.5 GB above the inputs, 8 peaked
# 0.23 GB, and 8 ran faster (0.64 s against 0.92 s per 128 images; fp32 0.53 against 0.92). The export
# had peaked at 4.1 GB, over its 3 GB goal.
BATCH_PIXELS = 8 * 224 * 224


def batch_size(x: Any, batch: int) -> int:
    """``batch``, or fewer where ``x``'s images are large (:data:`BATCH_PIXELS`); at least 1. ``x``: an
    ``(N, C, H, W)`` array or lazily read images with a ``row_shape`` of ``(H, W, C)`` (``inputs.PhoneImages``).

    Example:
        >>> batch_size(np.zeros((1, 3, 224, 224)), 64), batch_size(np.zeros((1, 3, 160, 160)), 64)
        (8, 15)
        >>> from types import SimpleNamespace
        >>> batch_size(SimpleNamespace(row_shape=(96, 96, 3)), 64), batch_size(np.zeros((2, 1280)), 64)
        (43, 64)
    """
    shape = getattr(x, "shape", None)
    hw = shape[2:] if shape is not None and len(shape) == 4 else getattr(x, "row_shape", (0, 0))[:2]
    pixels = int(hw[0]) * int(hw[1])
    return max(1, min(batch, BATCH_PIXELS // pixels)) if pixels else batch


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``x`` in chunks of at most ``batch`` (runtimes have a maximum batch size), fewer for large
    images (:func:`batch_size`)."""
    batch = batch_size(x, batch)
    return np.concatenate([np.asarray(fn(np.ascontiguousarray(x[i:i + batch])), dtype=np.float32)
                           for i in range(0, len(x), batch)])


def runtime_name(format: str) -> str:
    """What runs ``format`` artifacts here, in words (for logs and the manifest)."""
    return {"onnx": "onnxruntime (CPUExecutionProvider)", "executorch": "executorch.runtime (XNNPACK)",
            "torchscript": "torch.jit.load", "torchscript_lite": "torch.jit.mobile lite interpreter",
            "pytorch": "torch eager"}.get(format, format)


_OP_PATTERNS = (
    re.compile(r"convert function for op '([\w.:]+)'"),  # coremltools
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(?:\w+)'\)"),  # torch.onnx dispatch
    re.compile(r"Unsupported FX nodes: \{'call_function': \['([\w.:]+)'"),  # torch.onnx dynamo
    re.compile(r"\b(aten[.:]{1,2}\w+(?:\.\w+)?)"),  # torch.export / executorch / onnx
    re.compile(r"[Oo]perator ['\"]?([\w.:]+)['\"]? (?:is )?not (?:supported|implemented)"),
)


def unsupported_op(exc: BaseException) -> str | None:
    """The operator named in a converter's error message, if it names one."""
    text = f"{exc}"
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            return m.group(1)
    return None


@contextlib.contextmanager
def converting(fmt: str, *, doing: str | None = None) -> Iterator[None]:
    """Turn a converter's or runtime's exception into one clear :class:`ExportError` that names the op.

    Only wrap the third-party call (conversion, quantization, loading or running a written
    file): a bug in our own code should stay a traceback. A missing package (``ImportError``)
    passes through, so :func:`export_run` can say which install is missing.

    Args:
        fmt: the format (or ``"<format> int8"``) being produced.
        doing: what is being done when it is not the conversion itself, e.g.
            ``"loading model.pte with executorch.runtime (XNNPACK)"``.

    Example:
        >>> with converting("onnx"):  # doctest: +SKIP
        ...     torch.onnx.export(model, args, "model.onnx")
    """
    try:
        yield
    except (ExportError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - converters raise anything from RuntimeError to AssertionError
        op = unsupported_op(e)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        what = f"op {op} is not supported" if op else f"{type(e).__name__}: {first[:300]}"
        if doing:
            raise ExportError(f"{fmt}: {doing} failed: {what}") from e
        raise ExportError(f"{fmt}: this model cannot be expressed in {fmt}: {what}") from e


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Hide converters' progress bars and prints (stdout/stderr) unless debug logging is on.

    Errors still surface: exceptions propagate and are reported by the caller.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield
