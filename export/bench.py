"""``fieldid bench``: every artifact of a bundle, measured the same way in one run.

One row per artifact (eager PyTorch fp32 first, so every ratio is read against it in the
same process on the same images): size, accuracy, top-1 agreement with eager fp32, batch-1
latency p50/p95 with 1 thread and with all threads, batch-32 throughput and load time.
Written as a printed table, ``bench.json``, ``bench.md`` and ``bench.png`` (three aligned bar
panels, one bar per artifact: batch-1 latency p50 at 1 and all threads, file size, accuracy).

Under the table, the issue's goals (:func:`bench_goals`, also in ``bench.json`` ``meta.goals``):
the best on-device artifact's batch-1 speedup over eager fp32 (>= 10x, at 1 thread and at all
threads) and, per format, its int8 file's size over the format's own fp32 file (<= 30%).

Inputs go through the phone preprocessing (``fieldid.export.phone``), as an app would feed them.
"""
from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fieldid.training.records import RecordError, atomic_write_bytes, atomic_write_json, atomic_write_text, load_record

from .formats import BENCH_SETTLE_S
from .manifest import Artifact, Manifest, load_manifest

__all__ = ["bench_run", "BenchError", "BenchRow", "bench_table", "bench_markdown", "bench_goals", "goals_text",
           "SPEEDUP_GOAL", "INT8_SIZE_GOAL"]

log = logging.getLogger("fieldid.bench")

# The goals: an on-device artifact >= 10x faster than eager fp32 at batch 1, and int8
# files <= 30% of their own format's fp32 file.
SPEEDUP_GOAL = 10.0
INT8_SIZE_GOAL = 0.30
# Formats whose int8 file keeps the unknown detector's constants in float32, as the fp32 file does
# (both leave the nodes only unknown_score depends on out of quantization: unknown.score_only_nodes,
# executorch_export.score_only_nodes).
# Core ML's weight quantization takes the detector's constants too, so its file is compared whole.
_FLOAT_DETECTOR_FORMATS = ("onnx", "executorch")


class BenchError(ValueError):
    """The benchmark cannot run as asked (no bundle, no images, unknown classes, ...)."""


@dataclass
class BenchRow:
    """One artifact's measurements (``None`` where there is no runtime on this machine)."""

    name: str
    file: str
    format: str
    precision: str
    size_mb: float
    accuracy: float | None = None
    agreement: float | None = None  # top-1 agreement with eager fp32 on the same images
    p50_ms_1t: float | None = None
    p95_ms_1t: float | None = None
    p50_ms_all: float | None = None
    p95_ms_all: float | None = None
    throughput_b32: float | None = None  # images/s at batch 32, all threads
    load_s: float | None = None
    speedup_1t: float | None = None  # eager p50 / this p50, 1 thread
    speedup_all: float | None = None
    size_vs_fp32: float | None = None  # size / eager fp32 size
    detector_mb: float = 0.0  # the float unknown detector inside this file (same in int8 and fp32 files)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- images
def _folder_images(data: Path, labels: list[str]) -> tuple[list[Path], list[int], str]:
    from fieldid.training.images import scan_image_folder

    listing = scan_image_folder(data)
    part = next((p for p in ("test", "all", "val") if p in listing.splits), None)
    if part is None:
        raise BenchError(f"{data}: no test/ or val/ split (or flat class folders) to benchmark on")
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(listing.splits[part]) - set(index))
    if unknown:
        raise BenchError(f"{data}: class folder(s) {', '.join(unknown)} not among the model's labels "
                         f"({', '.join(labels)})")
    paths, targets = [], []
    for name, files in listing.splits[part].items():
        paths += files
        targets += [index[name]] * len(files)
    return paths, targets, f"{data} ({part})"


def _run_split(run_dir: Path) -> Any:
    from fieldid.training.data import load_split

    record = load_record(run_dir)
    path = run_dir / record.split
    if not path.is_file():
        return None
    try:
        return load_split(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"{path}: malformed split file ({type(e).__name__}: {e})") from None


def _heldout_of(split: Any, root: Path) -> tuple[list[Path], list[int], str]:
    """Files and targets of the split's held-out part under ``root``, and its name (test, else val)."""
    which = "test" if split.files.get("test") else "val"
    return [root / p for p, _ in split.files[which]], [y for _, y in split.files[which]], which


def _is_runs_dataset(data: Path, split: Any) -> bool:
    """``data`` is the run's own dataset: the same folder, or a copy holding every file the split names."""
    if split is None:
        return False
    if data.resolve() == Path(split.root).resolve():
        return True
    files = [p for part in split.files.values() for p, _ in part]
    return bool(files) and all((data / p).is_file() for p in files)


def _bench_images(run_dir: Path, data: Path | None, manifest: Manifest,
                  limit: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Images to measure on: ``--data`` (its held-out split when it is the run's own dataset, so no
    training image is scored), else the run's stored held-out samples, else its split's files."""
    from .inputs import heldout_from_run, samples_index

    record = load_record(run_dir)
    spec = manifest.preprocess_spec
    if data is None:
        from .registry import ExportError

        try:
            index = samples_index(run_dir, record)
        except ExportError as e:
            raise BenchError(str(e)) from None
        if index is not None:
            x, y, split_name = heldout_from_run(index, spec)
            if not len(x):
                raise BenchError("no readable images to benchmark on")
            return x[:limit], y[:limit], f"run's {split_name} split (stored samples)"
        split = _run_split(run_dir)
        if split is None:
            raise BenchError(f"{run_dir}: no {record.split} and no stored samples; give --data DIR")
        paths, targets, which = _heldout_of(split, Path(split.root))
        source = f"run's {which} split"
    else:
        split = _run_split(run_dir)
        if _is_runs_dataset(data, split):
            paths, targets, which = _heldout_of(split, data)
            source = f"{data} (the run's own dataset: its {which} split, no training image)"
        else:
            paths, targets, source = _folder_images(data, manifest.labels)
    x, y = _load_images(paths, targets, manifest, limit)
    return x, y, source


def _load_images(paths: list[Path], targets: list[int], manifest: Manifest,
                 limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from .inputs import load_arrays

    paths, targets = paths[:limit], targets[:limit]
    x, kept = load_arrays(paths, manifest.preprocess_spec)
    if not kept:
        raise BenchError("no readable images to benchmark on")
    return x, np.asarray(targets, np.int64)[kept]


# --------------------------------------------------------------------------- runtimes
def _loader(bundle: Path, art: Artifact, manifest: Manifest) -> Callable[[int], Callable[[np.ndarray], np.ndarray]] | None:
    from .bundle import RUNTIMES, load_pytorch, load_runtime

    path = bundle / art.file
    if art.format == "pytorch":
        return lambda t: load_pytorch(path, t, backbone=manifest.backbone, num_classes=manifest.num_classes)
    if art.format not in RUNTIMES or art.outputs != "logits":
        return None
    return lambda t: load_runtime(path, art.format, threads=t)


Runner = Callable[[np.ndarray], np.ndarray]
# ONNX Runtime and OpenMP (torch) worker threads spin for a while after a call; starting the
# next artifact's timing inside that window would charge it for another runtime's spinning.
DEFAULT_SETTLE_S = BENCH_SETTLE_S


def _timed_calls(run: Runner, x: np.ndarray, n: int, warmup: int, start: int = 0) -> list[float]:
    for i in range(warmup):
        run(x[(start + i) % len(x)][None])
    out = []
    for i in range(n):
        xi = x[(start + i) % len(x)][None]
        t0 = time.perf_counter()
        run(xi)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _throughput(run: Runner, x: np.ndarray, batch: int, batches: int) -> float:
    xb = np.ascontiguousarray(np.resize(x, (batch,) + x.shape[1:]))
    run(xb)  # warm-up: allocators and kernel selection for this shape
    t0 = time.perf_counter()
    for _ in range(batches):
        run(xb)
    return batch * batches / (time.perf_counter() - t0)


def _set_threads(n: int) -> None:
    """torch and ExecuTorch thread counts are process-wide (ONNX Runtime's are per session)."""
    import torch

    torch.set_num_threads(n)
    try:
        from .executorch_export import set_threads
    except ImportError:
        return
    set_threads(n)


def _load_and_score(row: BenchRow, make: Callable[[int], Runner], x: np.ndarray, y: np.ndarray, *, batch: int,
                    batches: int, threads: int) -> np.ndarray:
    """Load time, accuracy and throughput (all threads); returns the logits."""
    make(threads)  # first load pays one-off imports; time a second, warm load as an app restart would see
    t0 = time.perf_counter()
    run = make(threads)
    row.load_s = time.perf_counter() - t0
    logits = run(x)
    row.accuracy = float((logits.argmax(1) == y).mean())
    row.throughput_b32 = _throughput(run, x, batch, batches)
    return logits


def _interleaved_latencies(measured: list[tuple[BenchRow, Callable[[int], Runner]]], x: np.ndarray, *, iters: int,
                           warmup: int, threads: int, settle_s: float, rounds: int = 5) -> None:
    """Batch-1 latency of every artifact, measured round-robin.

    This machine is shared: timing artifact after artifact would give each one different
    background load. Per thread setting, every artifact is loaded once, then each round gives
    each artifact ``iters / rounds`` calls, so every ratio to eager compares like with like.
    Runners are loaded *after* the thread count is set and dropped before it changes:
    ExecuTorch's threadpool is process-wide and a method must not outlive a pool reset.
    """
    per_round = max(1, iters // rounds)
    for t in dict.fromkeys((1, threads)):
        _set_threads(t)
        runners = [make(t) for _, make in measured]
        times: list[list[float]] = [[] for _ in measured]
        for r in range(rounds):
            for k, run in enumerate(runners):
                time.sleep(settle_s)  # let the previous runtime's spinning worker threads go idle
                times[k] += _timed_calls(run, x, per_round, warmup if r == 0 else 1, r * per_round)
        del runners
        for (row, _), ms in zip(measured, times):
            p50, p95 = float(np.percentile(ms, 50)), float(np.percentile(ms, 95))
            if t == 1:
                row.p50_ms_1t, row.p95_ms_1t = p50, p95
            if t == threads:
                row.p50_ms_all, row.p95_ms_all = p50, p95
    _set_threads(threads)


# --------------------------------------------------------------------------- report
_COLUMNS = (("artifact", "name", "{}"), ("MB", "size_mb", "{:.2f}"), ("size/fp32", "size_vs_fp32", "{:.0%}"),
            ("acc", "accuracy", "{:.2%}"), ("agree", "agreement", "{:.2%}"),
            ("p50 1t ms", "p50_ms_1t", "{:.2f}"), ("p95 1t ms", "p95_ms_1t", "{:.2f}"),
            ("p50 all ms", "p50_ms_all", "{:.2f}"), ("p95 all ms", "p95_ms_all", "{:.2f}"),
            ("x eager 1t", "speedup_1t", "{:.1f}x"), ("x eager all", "speedup_all", "{:.1f}x"),
            ("b32 img/s", "throughput_b32", "{:.0f}"), ("load s", "load_s", "{:.2f}"))


def _cells(row: BenchRow) -> list[str]:
    out = []
    for _, key, fmt in _COLUMNS:
        v = getattr(row, key)
        out.append("n/a" if v is None else fmt.format(v))
    return out


def bench_table(rows: list[BenchRow]) -> str:
    """Fixed-width text table (what ``fieldid bench`` prints)."""
    head = [c for c, _, _ in _COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def bench_goals(rows: list[BenchRow]) -> dict[str, Any]:
    """The issue's goals, read off the measured rows.

    * speedup: the on-device artifact (any format but eager ``pytorch``) with the largest
      batch-1 p50 speedup over eager fp32, separately at 1 thread and at all threads;
      met when >= :data:`SPEEDUP_GOAL`.
    * int8 size: per format with an int8 artifact, its size over the same format's fp32
      file; Core ML has no fp32 file (its float model is already fp16), so there the
      reference is the fp16 ``.mlpackage`` it replaces, and the ratio to the fp32 weights
      (``model.pth``) is given too. Met when <= :data:`INT8_SIZE_GOAL`.

    Returns:
        ``{"speedup": {"goal_x", "threads_1": {"artifact", "speedup", "met"}, "threads_all": {...}},
        "int8_size": {"goal_ratio", "formats": [{"format", "int8", "float", "float_precision", "ratio",
        "met"}, ...]}}``.

    Example:
        >>> bench_goals(rows)["speedup"]["threads_1"]  # doctest: +SKIP
        {'artifact': 'model.int8.pte', 'speedup': 3.1, 'met': False}
    """
    def best(key: str) -> dict[str, Any]:
        measured = [r for r in rows if r.format != "pytorch" and getattr(r, key) is not None]
        if not measured:
            return {"artifact": None, "speedup": None, "met": False}
        top = max(measured, key=lambda r: getattr(r, key))
        return {"artifact": top.file, "speedup": getattr(top, key), "met": getattr(top, key) >= SPEEDUP_GOAL}

    sizes = []
    weights = next((r for r in rows if r.format == "pytorch" and r.precision == "fp32"), None)
    for q in rows:
        if not q.precision.startswith("int8"):
            continue
        # The file the int8 one replaces: the same format's fp32 file, else its float file (Core ML's
        # is fp16), else the fp32 weights. The ratio to the fp32 weights is reported as well.
        ref = (next((r for r in rows if r.format == q.format and r.precision == "fp32"), None)
               or next((r for r in rows if r.format == q.format and r.precision in ("fp16", "float16")), None)
               or weights)
        if ref is None:
            continue
        # The unknown detector is float in both files on purpose: compared without it, as networks.
        det = min(q.detector_mb, ref.detector_mb)
        ratio = (q.size_mb - det) / (ref.size_mb - det)
        entry = {"format": q.format, "int8": q.file, "float": ref.file, "float_precision": ref.precision,
                 "ratio": ratio, "met": ratio <= INT8_SIZE_GOAL, "detector_mb_left_out": det,
                 "ratio_whole_files": q.size_mb / ref.size_mb}
        if weights is not None and ref is not weights:
            entry.update(vs_fp32_weights=weights.file, ratio_vs_fp32_weights=q.size_mb / weights.size_mb)
        sizes.append(entry)
    return {"speedup": {"goal_x": SPEEDUP_GOAL, "what": "batch-1 p50 latency of eager fp32 / best on-device artifact",
                        "threads_1": best("speedup_1t"), "threads_all": best("speedup_all")},
            "int8_size": {"goal_ratio": INT8_SIZE_GOAL,
                          "what": "int8 file size / the same format's float file (fp32; Core ML's is fp16)",
                          "formats": sizes}}


def goals_text(goals: dict[str, Any]) -> str:
    """The goals as the lines printed under the table."""
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    sp = goals["speedup"]
    lines = [f"goals: batch-1 speedup over eager fp32 >= {sp['goal_x']:g}x (best on-device artifact)"]
    for key, label in (("threads_1", "1 thread"), ("threads_all", "all threads")):
        g = sp[key]
        lines.append(f"  {label}: " + (f"{g['artifact']} {g['speedup']:.1f}x -> {met(g['met'])}" if g["artifact"]
                                        else "no on-device artifact measured -> NOT met"))
    sz = goals["int8_size"]
    lines.append(f"goals: int8 size <= {sz['goal_ratio']:.0%} of the format's own fp32 file (Core ML: its fp16 "
                 f"file; also shown against the fp32 weights); the float unknown detector, the same in "
                 f"both files, is left out of both")
    lines += [f"  {f['format']}: {f['int8']} = {f['ratio']:.1%} of {f['float']} ({f['float_precision']}) "
              + (f"without the {f['detector_mb_left_out']:.2f} MB detector (whole files {f['ratio_whole_files']:.1%}) "
                 if f.get("detector_mb_left_out") else "")
              + f"-> {met(f['met'])}" + (f"; {f['ratio_vs_fp32_weights']:.1%} of {f['vs_fp32_weights']} (fp32)"
                                      if "vs_fp32_weights" in f else "")
              for f in sz["formats"]] or ["  no int8 artifact in this bundle"]
    return "\n".join(lines)


def bench_markdown(rows: list[BenchRow], meta: dict[str, Any]) -> str:
    """Markdown version of the table with the conditions it was measured under."""
    head = [c for c, _, _ in _COLUMNS]
    lines = [f"# fieldid bench: {meta['model']}", "",
             f"{meta['images']} images ({meta['data']}), input {meta['input']}, {meta['threads_all']} threads = all; "
             f"batch-1 latency over {meta['iters']} runs, throughput at batch {meta['batch']}. {meta['machine']}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    notes = [f"- **{r.name}**: {r.note}" for r in rows if r.note]
    goals = ["", "```", goals_text(meta["goals"]), "```"] if "goals" in meta else []
    return "\n".join(lines + ([""] + notes if notes else []) + goals) + "\n"


def _chart(rows: list[BenchRow], title: str) -> bytes:
    """Three aligned bar panels, one row per artifact: latency, size, accuracy (readable when values tie)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["eager (pytorch fp32)" if r.format == "pytorch" else f"{r.file} ({r.precision})" for r in rows]
    y = np.arange(len(rows))[::-1]
    palette = {"fp32": "tab:blue", "fp16": "tab:purple"}
    colors = ["tab:red" if r.format == "pytorch" else palette.get(r.precision, "tab:green") for r in rows]
    fig, (ax_t, ax_s, ax_a) = plt.subplots(1, 3, figsize=(13, 0.45 * len(rows) + 1.8), dpi=100, sharey=True,
                                           gridspec_kw={"width_ratios": [3, 2, 2]})
    lat1 = [r.p50_ms_1t or 0.0 for r in rows]
    latn = [r.p50_ms_all or 0.0 for r in rows]
    ax_t.barh(y + 0.2, lat1, height=0.4, color=colors, alpha=0.55, label="1 thread")
    ax_t.barh(y - 0.2, latn, height=0.4, color=colors, label="all threads")
    for yi, r in zip(y, rows):
        if r.p50_ms_1t is None:
            ax_t.text(0, yi, " no runtime here", va="center", fontsize=7, color="grey")
        elif r.speedup_all:
            ax_t.text(max(r.p50_ms_1t, r.p50_ms_all or 0), yi, f" {r.speedup_all:.1f}x", va="center", fontsize=7)
    ax_t.set_xlabel("batch-1 latency p50 (ms): light = 1 thread, dark = all threads")
    ax_s.barh(y, [r.size_mb for r in rows], color=colors)
    ax_s.set_xlabel("file size (MB)")
    accs = [(r.accuracy or 0.0) * 100 for r in rows]
    ax_a.barh(y, accs, color=colors)
    known = [a for a, r in zip(accs, rows) if r.accuracy is not None]
    lo = min(known) if known else 0.0
    ax_a.set_xlim(max(0.0, lo - 5), 100.5)
    for yi, r in zip(y, rows):
        if r.accuracy is not None:
            ax_a.text(r.accuracy * 100, yi, f" {r.accuracy:.1%}", va="center", fontsize=7)
    ax_a.set_xlabel("accuracy (%)")
    ax_t.set_yticks(y)
    ax_t.set_yticklabels(names, fontsize=8)
    for ax in (ax_t, ax_s, ax_a):
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{title}: latency vs size vs accuracy (red eager, blue fp32, purple fp16, green int8)",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _machine() -> str:
    from fieldid.machine import describe_machine

    return describe_machine()


# --------------------------------------------------------------------------- main
def bench_run(run_dir: str | Path, *, data: str | Path | None = None, bundle: str | Path | None = None,
              out: str | Path | None = None, iters: int = 50, warmup: int = 5, batch: int = 32, batches: int = 3,
              limit: int | None = None, settle_s: float = DEFAULT_SETTLE_S) -> dict[str, Any]:
    """Benchmark every artifact of a run's export bundle.

    Args:
        run_dir: the run directory (its held-out split is the default data).
        data: an ImageFolder to measure accuracy on instead (``test/`` if present, else all;
            class folders must be among the model's labels).
        bundle: export bundle (default ``RUN/export``).
        out: where bench.json / bench.md / bench.png go (default ``RUN/bench``).
        iters: timed batch-1 runs per artifact and thread setting, interleaved across artifacts
            in 5 rounds (each preceded by ``warmup`` untimed runs).
        batch, batches: batch size and number of timed batches for throughput.
        limit: use at most this many images for accuracy.
        settle_s: pause before each timed block, so one runtime's spinning threads do not
            slow the next one down (0 for quick smoke runs).

    Returns:
        ``{"rows": [...], "meta": {...}}`` as written to ``bench.json``.

    Example:
        >>> r = bench_run("runs/reef")  # doctest: +SKIP
        >>> r["rows"][0]["name"]  # doctest: +SKIP
        'eager pytorch fp32'
    """
    from . import _import_exporters

    run_dir = Path(run_dir)
    bundle = Path(bundle) if bundle else run_dir / "export"
    try:
        manifest = load_manifest(bundle)
    except RecordError as e:  # ManifestError is one too
        raise BenchError(f"{e} (run `fieldid export --run {run_dir}` first)") from None
    if iters < 1 or batch < 1 or batches < 1 or settle_s < 0:
        raise BenchError("--iters, --batch and --batches must be >= 1 and --settle >= 0")
    try:
        x, y, source = _bench_images(run_dir, Path(data) if data else None, manifest, limit)
    except RecordError as e:
        raise BenchError(str(e)) from None
    out = Path(out) if out else run_dir / "bench"
    _import_exporters()
    from fieldid.training.data import default_num_threads  # the one "usable cores" rule

    threads = default_num_threads()
    from .bundle import ExportError, converting, file_sha256

    arts = sorted(manifest.artifact_list(), key=lambda a: a.format != "pytorch")
    rows: list[BenchRow] = []
    ref_pred = None
    eager = None
    measured: list[tuple[BenchRow, Callable[[int], Runner]]] = []
    for art in arts:
        name = "eager pytorch fp32" if art.format == "pytorch" else f"{art.file} ({art.format} {art.precision})"
        row = BenchRow(name=name, file=art.file, format=art.format, precision=art.precision,
                       size_mb=art.size_bytes / 1e6,
                       detector_mb=(manifest.unknown or {}).get("detector_float_bytes", 0) / 1e6
                       if art.unknown_output and art.format in _FLOAT_DETECTOR_FORMATS else 0.0)
        # A file that changed since export (truncated copy, replaced by hand) would give numbers
        # for a model the manifest does not describe, or crash its runtime: refuse it by name.
        if file_sha256(bundle / art.file) != art.sha256:
            raise BenchError(f"{bundle / art.file}: does not match the sha256 in manifest.json (corrupt or "
                             f"replaced); re-export with `fieldid export --run {run_dir}`")
        make = _loader(bundle, art, manifest)
        if make is None:
            row.note = ("no runtime on this machine (Core ML runs only on macOS/iOS): size only"
                        if art.format == "coreml" else "no runtime on this machine: size only")
        else:
            log.info("bench %s: load, accuracy, throughput ...", name)
            try:
                with converting(art.format, doing=f"loading and running {art.file}"):
                    logits = _load_and_score(row, make, x, y, batch=batch, batches=batches, threads=threads)
            except ExportError as e:
                raise BenchError(str(e)) from None
            except ImportError as e:  # the format's runtime is an optional install
                row.note = f"runtime not installed ({e.name or e}; pip install 'fieldid[export]'): size only"
                rows.append(row)
                continue
            measured.append((row, make))
            if ref_pred is None:
                ref_pred = logits.argmax(1)
            if art.input.get("shape", [-1])[0] == 1:
                row.note = f"fixed batch 1: batch-{batch} throughput = {batch} sequential batch-1 calls"
            row.agreement = float((logits.argmax(1) == ref_pred).mean())
        if art.format == "pytorch":
            eager = row
        rows.append(row)
    log.info("bench: batch-1 latency of %d artifacts, interleaved ...", len(measured))
    _interleaved_latencies(measured, x, iters=iters, warmup=warmup, threads=threads, settle_s=settle_s)
    for row in rows:
        if eager is not None:
            row.size_vs_fp32 = row.size_mb / eager.size_mb
            if row.p50_ms_1t and eager.p50_ms_1t:
                row.speedup_1t = eager.p50_ms_1t / row.p50_ms_1t
            if row.p50_ms_all and eager.p50_ms_all:
                row.speedup_all = eager.p50_ms_all / row.p50_ms_all
    spec = manifest.preprocess_spec
    meta = {"model": manifest.name, "backbone": manifest.backbone, "bundle": str(bundle), "data": source,
            "images": int(len(x)), "input": f"{spec.crop_size}x{spec.crop_size}", "threads_all": threads,
            "iters": iters, "warmup": warmup, "batch": batch, "batches": batches, "settle_s": settle_s,
            "timing": "batch-1 latency interleaved round-robin across artifacts (5 rounds per thread setting)",
            "machine": _machine(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "goals": bench_goals(rows)}
    result = {"schema_version": 1, "meta": meta, "rows": [asdict(r) for r in rows]}
    try:
        atomic_write_json(out / "bench.json", result)
        atomic_write_text(out / "bench.md", bench_markdown(rows, meta))
        atomic_write_bytes(out / "bench.png", _chart(rows, manifest.name))
    except OSError as e:
        raise BenchError(f"{out}: cannot write the benchmark results ({e.strerror})") from None
    result["table"] = bench_table(rows) + "\n" + goals_text(meta["goals"])
    return result
