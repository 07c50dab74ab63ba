"""``make bench-serve``: TorchServe vs the same model in-process, concurrency 1 and 8, batching off/on.

Every row does the same work per image - decode, preprocess, ONNX Runtime run, answer JSON - through
:class:`fieldid.serve.engine.ClassifierEngine`; the server rows add HTTP, the Java frontend and the
worker hop. Printed, each against its goal:

* the handler's own p50 (decode -> answer, in-process) vs the bundle's bare ONNX fp32 p50 (goal <= 2x);
* a 24 MP phone JPEG through the handler with and without the reduced-size (draft) decode;
* TorchServe's overhead measured with a C client (``ab -k``, Debian's apache2-utils), which does
  not compete with the server for the Python interpreter: p50 added over in-process at
  concurrency 1 (goal <= 2 ms) and throughput at concurrency 8 with batching (goal >= in-process);
* the Python-client rows (same as the demo uses), interleaved with in-process at concurrency 1.

Usage::

    fieldid bench serve --run runs/reef [--requests 200] [--threads 1]
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fieldid.cli_common import first_line
from fieldid.records import atomic_write_json

from .archive import bundle_dir_of
from .client import ServeClient
from .server import ServeOptions, default_state_dir, start_server, stop_server
from fieldid.machine import describe_machine

__all__ = ["bench_serve", "run_bench_serve", "OVERHEAD_GOAL_PCT", "HANDLER_GOAL_X", "AB_ADDED_GOAL_MS"]

OVERHEAD_GOAL_PCT = 5.0
HANDLER_GOAL_X = 2.0  # handler p50 <= 2x the bare ONNX fp32 p50
AB_ADDED_GOAL_MS = 2.0  # TorchServe adds <= 2 ms p50 over in-process at concurrency 1 (C client)
Call = Callable[[bytes], float]  # image bytes -> server-side latency_ms of its answer


def _photos(images: Path | None) -> list[bytes]:
    """Request bodies: files from ``images``, else scikit-image's real photos, else synthetic JPEGs."""
    if images is not None:
        files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not files:
            raise ValueError(f"{images}: no .jpg/.png/.webp files")
        return [p.read_bytes() for p in files[:32]]
    from PIL import Image

    try:
        from skimage import data

        arrays = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    except ImportError:  # skimage is a test extra; smooth synthetic photos decode like real ones
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:480, 0:640]
        base = np.stack([xx * 255 / 640, yy * 255 / 480, (xx + yy) * 255 / 1120], -1)
        arrays = [np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _row(lat_ms: list[float], server_ms: list[float], wall_s: float, concurrency: int) -> dict[str, Any]:
    row = {"requests": len(lat_ms), "concurrency": concurrency, "throughput_rps": round(len(lat_ms) / wall_s, 2),
           "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p95_ms": round(float(np.percentile(lat_ms, 95)), 2)}
    if server_ms:
        row["server_p50_ms"] = round(statistics.median(server_ms), 2)
    return row


def _measure(call: Call, photos: list[bytes], requests: int, concurrency: int, warmup: int = 10) -> dict[str, Any]:
    """Run ``requests`` calls at ``concurrency``; per-call wall latency and throughput."""
    for i in range(warmup):
        call(photos[i % len(photos)])
    lat: list[float] = []
    server_ms: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        s = call(photos[i % len(photos)])
        dt = (time.perf_counter() - t0) * 1000.0
        with lock:
            lat.append(dt)
            server_ms.append(s)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(requests)))
    return _row(lat, server_ms, time.perf_counter() - t0, concurrency)


def _measure_interleaved(calls: dict[str, Call], photos: list[bytes], requests: int,
                         warmup: int = 10) -> dict[str, dict[str, Any]]:
    """Concurrency 1, the modes taking turns request by request, so a shared machine's changing
    load hits every mode alike (the overhead is a ratio of two such measurements)."""
    lat: dict[str, list[float]] = {m: [] for m in calls}
    server_ms: dict[str, list[float]] = {m: [] for m in calls}
    for i in range(warmup + requests):
        for mode, call in calls.items():
            t0 = time.perf_counter()
            s = call(photos[i % len(photos)])
            if i >= warmup:
                lat[mode].append((time.perf_counter() - t0) * 1000.0)
                server_ms[mode].append(s)
    return {m: _row(lat[m], server_ms[m], sum(lat[m]) / 1000.0, 1) for m in calls}


def _same_settings(device: str, precision: str, bundle: Path | None = None) -> tuple[str, str]:
    """The in-process engine's ``(device, precision)`` for the server's ``--device``/``--precision``:
    what a TorchServe worker picks (first GPU when ONNX Runtime can use one, fp16 under ``auto``
    where the bundle verified an fp16 file; CPU always fp32)."""
    from fieldid.export.manifest import load_manifest

    from .archive import has_verified
    from .engine import resolve_device

    dev = resolve_device("cpu" if device == "cpu" else None, gpu_id=0)
    if dev.type == "cpu":
        return "cpu", "fp32"
    if precision == "auto":
        precision = "fp16" if bundle and has_verified(load_manifest(bundle), "onnx", "fp16") else "fp32"
    return str(dev), precision


_LOADED_RE = re.compile(r"loaded \S+ \(\S+\) on (\S+), (\w+),")


def _served_on(state_dir: Path) -> tuple[str, str] | None:
    """``(device, precision)`` the server's worker reported in ``model_log.log`` (None: no line)."""
    try:
        text = (state_dir / "logs" / "model_log.log").read_text(errors="replace")
    except OSError:
        return None
    found = _LOADED_RE.findall(text)
    return found[-1] if found else None


@contextlib.contextmanager
def _server(bundle: Path, state_dir: Path, threads: int, batch_size: int, delay_ms: int,
            device: str = "auto", precision: str = "auto", expect: tuple[str, str] | None = None,
            netty_threads: int = 0) -> Iterator[Call]:
    """A benchmark server on free ports; yields a thread-safe ``call(image) -> server latency``.

    ``expect``: the in-process ``(device, precision)``; a worker that loaded differently is an error
    (the overhead would compare a GPU with a CPU, or fp16 with fp32)."""
    opts = ServeOptions.on_free_ports(threads=threads, batch_size=batch_size, max_batch_delay_ms=delay_ms,
                                      device=device, precision=precision, netty_threads=netty_threads)
    state = start_server([bundle], state_dir, opts)
    try:
        served = _served_on(state_dir)
        if expect is not None and served is not None and tuple(served) != tuple(expect):
            raise ValueError(f"server worker runs on {served[0]} ({served[1]}) but in-process on {expect[0]} "
                             f"({expect[1]}): pass --device cpu, or make the GPU visible to both")
        url, token = state.prediction_url(next(iter(state.models))), state.token()
        local = threading.local()

        def call(data: bytes) -> float:
            c = getattr(local, "client", None)
            if c is None:
                c = local.client = ServeClient(url, token, timeout=120)  # keep-alive, one per thread
            return float(c.predict(data)["latency_ms"])

        call.url, call.token = url, token  # type: ignore[attr-defined]  # for the C client
        yield call
    finally:
        stop_server(state_dir)


def _p50(fn: Callable[[], Any], n: int, warmup: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1000.0)
    return round(statistics.median(times), 3)


def _handler_vs_onnx(engine: Any, photos: list[bytes], n: int) -> dict[str, Any]:
    """The handler's whole path per photo vs the bare ONNX Runtime run of the same session, in
    wall time and in this thread's CPU time (with one ORT thread it runs in the caller's thread):
    on a busy machine the wall-time ratio mostly measures the scheduler, the CPU-time one the work."""
    x = engine.decode(photos[0])[None]
    out: dict[str, Any] = {}
    for clock, tag in ((time.perf_counter, ""), (time.thread_time, "_cpu")):
        onnx_ms = _p50(lambda: engine.run(x), n, clock=clock)
        per = max(n // len(photos), 5)
        handler_ms = statistics.median(_p50(lambda d=d: engine.predict(d), per, clock=clock) for d in photos)
        out.update({f"onnx_fp32_p50{tag}_ms": onnx_ms, f"handler_p50{tag}_ms": round(handler_ms, 3),
                    f"ratio{tag}": round(handler_ms / onnx_ms, 2), f"meets_goal{tag}": handler_ms / onnx_ms <= HANDLER_GOAL_X})
    return {**out, "goal_x": HANDLER_GOAL_X}


def _big_jpeg(width: int = 6000, height: int = 4000) -> bytes:
    """A 24 MP phone-sized JPEG made from a real photo (scikit-image's astronaut, upscaled)."""
    from PIL import Image

    try:
        from skimage import data

        img = Image.fromarray(data.astronaut())
    except ImportError:
        img = Image.linear_gradient("L").convert("RGB")
    buf = io.BytesIO()
    img.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _draft_decode(engine: Any, n: int = 7) -> dict[str, Any]:
    """24 MP JPEG through the handler: full decode (before) vs reduced-size draft decode (after),
    and how far the answer moves."""
    data = _big_jpeg()
    keep = engine.draft_side
    try:
        engine.draft_side = 0  # what the server did before: decode every pixel
        full_ms = _p50(lambda: engine.predict(data), n, warmup=1)
        full = engine.predict(data)
    finally:
        engine.draft_side = keep
    draft_ms = _p50(lambda: engine.predict(data), n, warmup=1)
    draft = engine.predict(data)
    pf = {t["label"]: t["probability"] for t in full["top_k"]}
    pd = {t["label"]: t["probability"] for t in draft["top_k"]}
    diff = max(abs(pf[k] - pd.get(k, 0.0)) for k in pf)
    return {"image": "6000x4000 JPEG", "full_decode_p50_ms": full_ms, "draft_decode_p50_ms": draft_ms,
            "speedup": round(full_ms / draft_ms, 1), "same_top1": full["top_k"][0]["label"] == draft["top_k"][0]["label"],
            "max_prob_change": round(diff, 5)}


_AB_RPS = re.compile(r"Requests per second:\s+([\d.]+)")


def _ab(url: str, token: str | None, body: Path, requests: int, concurrency: int) -> dict[str, Any]:
    """``ab -k`` (keep-alive, as TorchServe needs) POSTing one photo: throughput and p50/p95
    (from its CSV of percentiles, in fractional ms)."""
    import shutil
    import subprocess

    ab = shutil.which("ab")
    if ab is None:
        raise ValueError("ab not found: apt-get install apache2-utils (the C client of bench-serve)")
    csv = body.with_suffix(f".c{concurrency}.csv")
    cmd = [ab, "-k", "-q", "-n", str(requests), "-c", str(concurrency), "-p", str(body), "-T", "image/jpeg", "-e", str(csv)]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=600)
    m = _AB_RPS.search(proc.stdout)
    if proc.returncode != 0 or m is None or "Non-2xx responses" in proc.stdout:
        raise ValueError(f"ab failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    pct = {}
    for line in csv.read_text().splitlines()[1:]:
        p, ms = line.split(",")
        pct[int(float(p))] = float(ms)
    return {"requests": requests, "concurrency": concurrency, "throughput_rps": float(m.group(1)),
            "p50_ms": round(pct[50], 2), "p95_ms": round(pct[95], 2)}


def _fmt(row: dict[str, Any]) -> str:
    return (f"{row['mode']:<28} c={row['concurrency']:<2} {row['throughput_rps']:>8.1f} req/s  "
            f"p50 {row['p50_ms']:>7.2f} ms  p95 {row['p95_ms']:>7.2f} ms  (server-side p50 {row['server_p50_ms']:.2f} ms)")


def bench_serve(bundle: str | Path, *, requests: int = 200, threads: int = 1, batch_size: int = 8,
                max_batch_delay_ms: int = 5, concurrency: int = 8, device: str = "auto", precision: str = "auto",
                images: Path | None = None, state_dir: Path | None = None, out: Path | None = None,
                netty_threads: int = 0, handler_only: bool = False) -> dict[str, Any]:
    """Benchmark the server against in-process inference of the same bundle.

    Args:
        bundle: export bundle or run folder.
        requests: measured requests per row (after 10 warm-up requests).
        threads: CPU threads for the in-process engine and for each server worker (same for both).
        batch_size, max_batch_delay_ms: the "batching on" server setting.
        concurrency: the concurrent-clients level measured besides 1.
        device, precision: as ``fieldid serve start --device/--precision``; the in-process engine
            uses the same (first GPU with fp16 under ``auto`` when one is visible, else CPU fp32).
        images: folder of request images (default: scikit-image's photos, or synthetic JPEGs).
        state_dir: the benchmark server's state (default ``RUN/serve-bench``; a running
            ``fieldid serve`` from ``RUN/serve`` is not disturbed).
        out: results JSON (default ``STATE_DIR/bench.json``).
        netty_threads: the servers' frontend threads (0 = TorchServe's default).
        handler_only: only the in-process rows (handler vs bare ONNX, 24 MP draft decode), no
            TorchServe: what the handler goal needs, e.g. for a second, 224-px bundle.

    Returns:
        ``{"rows": [...], "overhead_p50_pct": float, "goal_pct": 5.0, "meets_goal": bool, ...}``.

    Example:
        >>> r = bench_serve("runs/reef", requests=100)  # doctest: +SKIP
        >>> r["overhead_p50_pct"] <= r["goal_pct"]  # doctest: +SKIP
        True
    """
    from .engine import ClassifierEngine

    bundle = bundle_dir_of(bundle)
    state_dir = Path(state_dir or default_state_dir(bundle).with_name(default_state_dir(bundle).name + "-bench"))
    photos = _photos(images)
    load0 = round(os.getloadavg()[0], 2)  # other work on the machine skews every number: record it
    print(f"bench: {bundle}, {len(photos)} images, {requests} requests per row, {threads} thread(s)", flush=True)
    print(f"bench: {describe_machine()}", flush=True)

    dev, prec = _same_settings(device, precision, bundle)
    engine = ClassifierEngine.from_bundle(bundle, threads=threads, device=dev, precision=prec)
    print(f"bench: both sides on {engine.device} ({engine.precision}), {engine.spec.crop_size} px input", flush=True)

    def in_process(data: bytes) -> float:
        return float(engine.predict(data)["latency_ms"])

    rows: list[dict[str, Any]] = []

    def add(mode: str, row: dict[str, Any]) -> None:
        rows.append({"mode": mode, **row})
        print(_fmt(rows[-1]), flush=True)

    handler = _handler_vs_onnx(engine, photos, requests)
    for tag, what in (("", "wall"), ("_cpu", "CPU time")):
        print(f"handler p50 {handler[f'handler_p50{tag}_ms']:.2f} ms vs bare ONNX fp32 p50 "
              f"{handler[f'onnx_fp32_p50{tag}_ms']:.2f} ms ({what}): {handler[f'ratio{tag}']:.2f}x "
              f"(goal <= {HANDLER_GOAL_X:g}x: {'met' if handler[f'meets_goal{tag}'] else 'NOT met'})", flush=True)
    big = _draft_decode(engine)
    print(f"24 MP JPEG through the handler: full decode {big['full_decode_p50_ms']:.0f} ms -> draft decode "
          f"{big['draft_decode_p50_ms']:.0f} ms ({big['speedup']:g}x; same top-1: {big['same_top1']}, "
          f"max probability change {big['max_prob_change']:.4f})", flush=True)
    if handler_only:
        result = {"bundle": str(bundle), "px": engine.spec.crop_size, "threads": threads, "images": len(photos),
                  "load_avg_1m": [load0, round(os.getloadavg()[0], 2)], "device": str(engine.device),
                  "precision": engine.precision, "handler_vs_onnx": handler, "draft_decode_24mp": big}
        out = Path(out or state_dir / "bench-handler.json")
        atomic_write_json(out, result)
        print(f"results: {out}")
        return result

    off, on = "torchserve batch off", f"torchserve batch {batch_size} ({max_batch_delay_ms} ms)"
    same = {"device": device, "precision": precision, "expect": (str(engine.device), engine.precision),
            "netty_threads": netty_threads}
    state_dir.mkdir(parents=True, exist_ok=True)
    body = state_dir / "ab-photo.jpg"
    body.write_bytes(photos[0])
    ab_rows: list[dict[str, Any]] = []

    def add_ab(mode: str, row: dict[str, Any]) -> None:
        ab_rows.append({"mode": mode, "client": "ab -k", **row})
        print(f"{mode:<28} c={row['concurrency']:<2} {row['throughput_rps']:>8.1f} req/s  p50 {row['p50_ms']:>7.2f} ms  "
              f"p95 {row['p95_ms']:>7.2f} ms  (ab -k)", flush=True)

    one = photos[0]
    inproc_one = _p50(lambda: engine.predict(one), requests)
    with _server(bundle, state_dir, threads, 1, 0, **same) as server:
        add_ab(off, _ab(server.url, server.token, body, requests, 1))  # type: ignore[attr-defined]
        for mode, row in _measure_interleaved({"in-process": in_process, off: server}, photos, requests).items():
            add(mode, row)
        add("in-process", _measure(in_process, photos, requests, concurrency))
        add(off, _measure(server, photos, requests, concurrency))
    inproc_one = min(inproc_one, _p50(lambda: engine.predict(one), requests))  # before and after: the calmer one
    with _server(bundle, state_dir, threads, batch_size, max_batch_delay_ms, **same) as server:
        add_ab(on, _ab(server.url, server.token, body, requests, concurrency))  # type: ignore[attr-defined]
        for conc in (1, concurrency):
            add(on, _measure(server, photos, requests, conc))
    overhead = (rows[1]["p50_ms"] / rows[0]["p50_ms"] - 1.0) * 100.0
    added_ms = ab_rows[0]["p50_ms"] - inproc_one
    inproc_c8 = next(r for r in rows if r["mode"] == "in-process" and r["concurrency"] == concurrency)
    c_client = {"in_process_p50_ms_same_photo": inproc_one, "added_p50_ms_c1": round(added_ms, 2),
                "goal_added_ms": AB_ADDED_GOAL_MS, "meets_added_goal": added_ms <= AB_ADDED_GOAL_MS,
                "batched_rps": ab_rows[1]["throughput_rps"], "in_process_rps": inproc_c8["throughput_rps"],
                "meets_throughput_goal": ab_rows[1]["throughput_rps"] >= inproc_c8["throughput_rps"]}
    print(f"ab -k, c=1: TorchServe adds {added_ms:+.2f} ms p50 over in-process {inproc_one:.2f} ms "
          f"(goal <= {AB_ADDED_GOAL_MS:g} ms: {'met' if c_client['meets_added_goal'] else 'NOT met'}); "
          f"c={concurrency} with batching {c_client['batched_rps']:.1f} req/s vs in-process "
          f"{c_client['in_process_rps']:.1f} req/s (goal >=: {'met' if c_client['meets_throughput_goal'] else 'NOT met'})",
          flush=True)
    result = {
        "bundle": str(bundle), "requests_per_row": requests, "threads": threads, "images": len(photos),
        "rows": rows, "overhead_p50_pct": round(overhead, 2), "goal_pct": OVERHEAD_GOAL_PCT,
        "meets_goal": overhead <= OVERHEAD_GOAL_PCT, "load_avg_1m": [load0, round(os.getloadavg()[0], 2)],
        "device": str(engine.device), "precision": engine.precision,
        "handler_vs_onnx": handler, "draft_decode_24mp": big, "ab_rows": ab_rows, "c_client": c_client,
    }
    out = Path(out or state_dir / "bench.json")
    atomic_write_json(out, result)
    print(f"p50 overhead of TorchServe over in-process at concurrency 1: {overhead:+.1f}% "
          f"(goal <= {OVERHEAD_GOAL_PCT:.0f}%: {'met' if result['meets_goal'] else 'NOT met'}); results: {out}")
    return result


def run_bench_serve(run: Path | None = None, bundle: Path | None = None, *, requests: int = 200, threads: int = 1,
                    concurrency: int = 8, batch_on: int = 8, max_batch_delay_ms: int = 5, device: str = "auto",
                    precision: str = "auto", netty_threads: int = 0, images: Path | None = None,
                    state_dir: Path | None = None, out: Path | None = None, handler_only: bool = False) -> int:
    """``fieldid bench serve``: :func:`bench_serve` on ``bundle`` (or ``run``'s bundle), which prints its rows;
    2 for bad input (one line)."""
    target = bundle or run
    if target is None:
        print("error: pass --run RUN or --bundle DIR", file=sys.stderr)
        return 2
    try:
        bench_serve(target, requests=requests, threads=threads, concurrency=concurrency, batch_size=batch_on,
                    device=device, precision=precision, max_batch_delay_ms=max_batch_delay_ms, images=images,
                    state_dir=state_dir, out=out, netty_threads=netty_threads, handler_only=handler_only)
    except ValueError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0
