"""``make bench-app``: the phone app's in-browser latency next to ONNX Runtime in Python.

Builds the app for one bundle, serves it on loopback (cross-origin isolated, so WebAssembly
threads work), and lets Debian's Chromium classify the same photos through the page's own code
path (decode, Pillow-exact preprocessing, onnxruntime-web) -- with WebAssembly threads off (1)
and on (all cores) -- for every ONNX precision the bundle ships. Python ONNX Runtime runs the
same file with the same thread count (``fieldid.export.phone.PhoneModel``). Prints a
table of p50/p95 per photo and the browser/Python ratio, checks the goal (in-browser model p50
<= 3x Python ORT at the same thread count) and writes the rows to JSON.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fieldid.records import atomic_write_json
from fieldid.machine import describe_machine

__all__ = ["RATIO_GOAL", "bench_app", "bench_photos", "run_bench_app"]

RATIO_GOAL = 3.0  # in-browser p50 <= 3x Python ONNX Runtime, same thread count (issue 13)
_CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def bench_photos(n: int = 50, seed: int = 0) -> list[bytes]:
    """``n`` phone-like JPEGs (640x480 / 480x640 crops of scikit-image's real photos), deterministic."""
    from PIL import Image
    from skimage import data

    bases = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.hubble_deep_field(),
             data.immunohistochemistry(), np.stack([data.camera()] * 3, -1), np.stack([data.brick()] * 3, -1)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(bases[i % len(bases)]).convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (640, 480) if i % 3 else (480, 640)  # some portrait photos
        buf = io.BytesIO()
        img.crop((x0, y0, x0 + cw, y0 + ch)).resize(size).save(buf, "JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    return round(float(np.percentile(values, 50)), 2), round(float(np.percentile(values, 95)), 2)


def _python_rows(bundle: Path, precision: str, threads: int, photos: list[bytes]) -> dict[str, list[float]]:
    from fieldid.export.phone import PhoneModel

    model = PhoneModel(bundle, precision=precision, threads=threads)
    for p in photos[:3]:
        model.predict(p)  # warm-up, as the browser gets
    rows = [model.predict(p).timings_ms for p in photos]
    return {"model": [r["model"] for r in rows],
            "total": [r["decode"] + r["preprocess"] + r["model"] for r in rows]}


def _browser_rows(browser: Any, url: str, key: str, precision: str, threads: int,
                  photos_b64: list[str]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    ctx = browser.new_context(viewport={"width": 393, "height": 851})
    try:
        page = ctx.new_page()
        page.goto(f"{url}?threads={threads}&precision={precision}")
        page.wait_for_function("window.fieldid !== undefined && document.getElementById('app').dataset.state === 'idle'",
                               timeout=180_000)
        res = page.evaluate("([k, p, photos]) => window.fieldid.bench(k, p, photos)", [key, precision, photos_b64])
    finally:
        ctx.close()
    rows = res["rows"]
    return ({"model": [r["model"] for r in rows], "total": [r["total"] for r in rows]},
            {"threads": res["threads"], "isolated": res["isolated"]})


def bench_app(source: str | Path, *, photos: int = 50, out: Path | None = None,
              thread_counts: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Measure the app in Chromium against Python ONNX Runtime; print the table; write ``out``.

    Args:
        source: run folder (its ``export/`` bundle) or bundle folder.
        photos: photos per row.
        out: results JSON (default ``BUNDLE/../bench/app.json``, i.e. ``RUN/bench/app.json``).
        thread_counts: WebAssembly/ORT thread counts (default: 1 and all cores).

    Returns:
        ``{"rows": [...], "goal_ratio": 3.0, "meets_goal": bool, ...}``.

    Raises:
        ValueError: no chromium, no bundle, onnxruntime-web not installed (from the build).
    """
    from playwright.sync_api import sync_playwright

    from .build import build_app, resolve_modes
    from .server import running_app_server

    exe = shutil.which("chromium")
    if exe is None:
        raise ValueError("Debian's chromium is not installed (apt-get install chromium, or `make chromium-installed`)")
    if photos < 5:
        raise ValueError("--photos must be at least 5")
    modes = resolve_modes([("run", str(source))])
    bundle = modes[0].bundle_dir
    cores = os.cpu_count() or 1
    thread_counts = thread_counts or tuple(sorted({1, cores}))
    imgs = bench_photos(photos)
    b64 = [base64.b64encode(p).decode() for p in imgs]
    result: dict[str, Any] = {"bundle": str(bundle), "photos": photos, "cores": cores, "goal_ratio": RATIO_GOAL,
                              "rows": []}
    with tempfile.TemporaryDirectory(prefix="fieldid-app-bench-") as tmp:
        # Speed only: an int8 file that missed its accuracy bar is timed too (its status is in the row).
        app_dir = build_app(modes, Path(tmp) / "app", progress=False, include_failed=True)
        import json

        cfg = json.loads((app_dir / "config.json").read_text())
        mode = cfg["modes"][0]
        result["onnxruntime_web"] = cfg["onnxruntime_web"]
        combos = [(m["precision"], t) for m in mode["models"] for t in thread_counts]
        with running_app_server(app_dir) as srv, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=_CHROMIUM_ARGS, headless=True)
            result["chromium"] = browser.version
            try:
                for i, (precision, threads) in enumerate(combos, 1):
                    print(f"[{i}/{len(combos)}] {precision}, {threads} thread(s): browser ...", end="", flush=True)
                    web, info = _browser_rows(browser, srv.url, mode["key"], precision, threads, b64)
                    if info["threads"] != threads:
                        raise ValueError(f"the page ran {info['threads']} thread(s), not {threads} "
                                         f"(cross-origin isolated: {info['isolated']})")
                    print(" python ...", end="", flush=True)
                    py = _python_rows(bundle, precision, threads, imgs)
                    row = {"precision": precision, "threads": threads,
                           "verification": next(m["verification"].get("status", "") for m in mode["models"]
                                                if m["precision"] == precision),
                           "size_mb": round(next(m["size_bytes"] for m in mode["models"]
                                                 if m["precision"] == precision) / 1e6, 2)}
                    for name, vals in (("browser_model", web["model"]), ("browser_total", web["total"]),
                                       ("python_model", py["model"]), ("python_total", py["total"])):
                        row[f"{name}_p50_ms"], row[f"{name}_p95_ms"] = _stats(vals)
                    row["ratio_model_p50"] = round(row["browser_model_p50_ms"] / row["python_model_p50_ms"], 2)
                    row["ratio_total_p50"] = round(row["browser_total_p50_ms"] / row["python_total_p50_ms"], 2)
                    row["meets_goal"] = row["ratio_model_p50"] <= RATIO_GOAL
                    result["rows"].append(row)
                    print(f" model p50 {row['browser_model_p50_ms']:.2f} vs {row['python_model_p50_ms']:.2f} ms",
                          flush=True)
            finally:
                browser.close()
    rows = result["rows"]
    fastest = {t: min((r for r in rows if r["threads"] == t), key=lambda r: r["browser_total_p50_ms"])["precision"]
               for t in thread_counts}
    result["fastest_in_browser"] = {str(t): p for t, p in fastest.items()}
    result["meets_goal"] = all(r["meets_goal"] for r in rows)
    _print_table(result)
    out = Path(out) if out else bundle.parent / "bench" / "app.json"
    atomic_write_json(out, result)
    print(f"results: {out}")
    print(describe_machine())
    return result


def _print_table(result: dict[str, Any]) -> None:
    cols = [("precision", "precision", "{}"), ("threads", "threads", "{}"), ("MB", "size_mb", "{:.1f}"),
            ("browser model p50", "browser_model_p50_ms", "{:.2f}"), ("p95", "browser_model_p95_ms", "{:.2f}"),
            ("python model p50", "python_model_p50_ms", "{:.2f}"), ("p95", "python_model_p95_ms", "{:.2f}"),
            ("ratio", "ratio_model_p50", "{:.2f}x"),
            ("browser photo p50", "browser_total_p50_ms", "{:.2f}"), ("python photo p50", "python_total_p50_ms", "{:.2f}"),
            ("ratio", "ratio_total_p50", "{:.2f}x")]
    cells = [[h for h, _, _ in cols]] + [[f.format(r[k]) for _, k, f in cols] for r in result["rows"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    print(f"\nin-browser (Chromium {result.get('chromium', '?')}, onnxruntime-web {result.get('onnxruntime_web', '?')}) "
          f"vs Python ONNX Runtime, {result['photos']} photos, ms per photo; model = inference only, photo = "
          f"decode + preprocess + model")
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    verdict = "met" if result["meets_goal"] else "NOT met"
    print(f"goal: in-browser model p50 <= {result['goal_ratio']:.0f}x Python ORT at the same thread count: {verdict}; "
          f"fastest in the browser: " + ", ".join(f"{p} at {t} thread(s)" for t, p in result["fastest_in_browser"].items()))


def run_bench_app(run: str | Path, *, photos: int = 50, thread_counts: list[int] | None = None,
                  out: Path | None = None) -> int:
    """``fieldid bench app``: :func:`bench_app` on ``run`` (a run folder or a bundle), which prints its table;
    2 for bad input (one line)."""
    try:
        bench_app(run, photos=photos, out=out, thread_counts=tuple(thread_counts) if thread_counts else None)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
