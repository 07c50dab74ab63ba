"""``fieldid app build``: export bundle(s) -> a static, installable web app that runs the model on the phone.

The build folder holds everything the phone needs and nothing it would fetch elsewhere:

* the page (``index.html``, ``app.js``, ``preprocess.js``, ``style.css``), a service worker
  (``sw.js``) that caches the app and its default models for offline use, a web app manifest and
  icons (installable);
* onnxruntime-web's WebAssembly build (``ort/``), copied from the pinned npm package in
  ``app/node_modules`` (``make app-deps`` runs ``npm ci``);
* per mode (Dive, Shop) the bundle's verified ONNX files under ``models/<mode>/``;
* ``config.json``: labels, preprocessing, temperature, thresholds, unknown detector and model
  files -- all copied from the bundle's ``manifest.json``, nothing else. The server's inference
  token is never written: the user pastes it into the app, which keeps it in local storage.

The folder is written next to ``--out`` and swapped in at the end, so a failed build leaves a
previous one untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldid import __version__
from fieldid.edge_demo.device import DemoError, bundle_dir_of, onnx_precisions
from fieldid.edge_demo.modes import MAX_FILE_BYTES, MODES, mode_for_labels
from fieldid.export.manifest import Artifact, Manifest, ManifestError, file_sha256, load_manifest
from fieldid.export.phone import DEFAULT_MAX_PIXELS
from fieldid.records import replace_dir

__all__ = ["AppBuildError", "AppMode", "APP_SCHEMA_VERSION", "SAME_ORIGIN", "check_server_url", "resolve_modes", "BROWSER_PRECISIONS", "ORT_FILES", "build_app",
           "default_ort_dir", "ort_web_version", "load_app_config"]

APP_SCHEMA_VERSION = 1
# In-browser order of preference. fp32 first: onnxruntime-web's WebAssembly int8 kernels are
# slower than its fp32 ones (`make bench-app` measures both); int8 stays selectable for its size.
BROWSER_PRECISIONS = ("fp32", "int8")
# onnxruntime-web's WebAssembly-only build: the ES module, its worker/loader and the SIMD+threads binary.
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
_STATIC = Path(__file__).resolve().parent / "static"
_SHELL = ("index.html", "app.js", "preprocess.js", "style.css", "manifest.webmanifest", "icons/icon-192.png",
          "icons/icon-512.png")
_MARKER = "fieldid-app"  # config.json's "app" field: how `build --out` and `serve` recognise a build


class AppBuildError(ValueError):
    """The app cannot be built as asked (no bundle, no ONNX model, damaged file, bad server URL, ...)."""


@dataclass(frozen=True)
class AppMode:
    """One mode of the app: its key (``dive`` / ``shop``) and the bundle folder that feeds it."""

    key: str
    bundle_dir: Path


def default_ort_dir() -> Path:
    """Where ``npm ci`` in ``app/`` put onnxruntime-web's ``dist/`` folder."""
    return Path(__file__).resolve().parent / "node_modules" / "onnxruntime-web" / "dist"


def ort_web_version(ort_dir: Path) -> str:
    """The installed onnxruntime-web version (from its package.json), or "" when not readable."""
    try:
        return str(json.loads((ort_dir.parent / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return ""


SAME_ORIGIN = "same-origin"  # --server value: POST to the app's own host (a reverse proxy forwards it)


def check_server_url(url: str, flag: str = "--server") -> str:
    """An http(s) inference API root without credentials or query, trailing slash removed.

    Raises:
        AppBuildError: anything else (one line naming ``flag``).
    """
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise AppBuildError(f"{flag} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8080)")
    if u.username or u.password or u.query:
        raise AppBuildError(f"{flag} {url!r}: give only the inference API root; the token is pasted in the app")
    return url.rstrip("/")


def _browser_models(manifest: Manifest, include_failed: bool = False) -> list[Artifact]:
    """The bundle's ONNX files a browser should run: logits out, verification not failed, fp32 first."""
    arts = []
    for precision in BROWSER_PRECISIONS:
        if precision not in onnx_precisions(manifest):
            continue
        art = manifest.find("onnx", precision)
        if art.verification.get("status") == "failed" and not include_failed:
            continue  # a phone ships only verified models (same rule as the Gradio demo)
        arts.append(art)
    if not arts:
        raise AppBuildError(f"bundle {manifest.name!r} has no verified ONNX model for the browser; "
                            f"re-export it with `fieldid export --run RUN --formats onnx`")
    return arts


def _check_preprocess(manifest: Manifest, source: Path) -> dict[str, Any]:
    spec = manifest.preprocess_spec
    # preprocess.js implements what fieldid.export.phone.preprocess does, which fixes these three.
    if spec.layout != "NCHW" or spec.color != "RGB" or abs(spec.scale - 1 / 255) > 1e-12:
        raise AppBuildError(f"{source}: preprocessing {spec.layout}/{spec.color}/scale {spec.scale} is not "
                            f"supported by the app (needs NCHW, RGB, 1/255)")
    return {"resize_size": spec.resize_size, "crop_size": spec.crop_size, "interpolation": spec.interpolation,
            "mean": list(spec.mean), "std": list(spec.std)}


def _model_entry(bundle: Path, key: str, art: Artifact, raw: dict[str, Any]) -> dict[str, Any]:
    path = bundle / art.file
    if file_sha256(path) != art.sha256:
        raise AppBuildError(f"{path}: sha256 differs from the manifest; the file is damaged or was replaced, "
                            f"re-export the bundle")
    return {
        "precision": art.precision,
        "file": f"models/{key}/{Path(art.file).name}",
        "sha256": art.sha256,
        "size_bytes": path.stat().st_size,
        "input_name": art.input_name,
        "output_name": art.output_name,
        # Contract 2: the unknown detector's output, "" when the file has none.
        "unknown_output": str(raw.get("unknown_output") or ""),
        "verification": {k: art.verification[k] for k in ("status", "top1_agreement", "max_abs_logit_diff")
                         if k in art.verification},
    }


def _mode_config(mode: AppMode, precision: str,
                 include_failed: bool = False) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """``config.json``'s entry for one mode, and the (source file, build path) pairs to copy."""
    try:
        manifest = load_manifest(mode.bundle_dir)
    except (ManifestError, OSError) as e:
        raise AppBuildError(str(e)) from None
    arts = _browser_models(manifest, include_failed)
    raw_by_file = {a["file"]: a for a in manifest.artifacts}
    models = [_model_entry(mode.bundle_dir, mode.key, a, raw_by_file[a.file]) for a in arts]
    have = [m["precision"] for m in models]
    if precision == "auto":
        default = have[0]
    elif precision in have:
        default = precision
    else:
        raise AppBuildError(f"bundle {manifest.name!r} has no verified {precision} ONNX model (has: {', '.join(have)})")
    unknown = dict(getattr(manifest, "unknown", {}) or {})
    info = MODES[mode.key]
    entry = {
        "key": mode.key, "title": info.title, "tagline": info.tagline, "summary": info.summary, "cue": info.cue,
        "class_notes": {k: v for k, v in info.class_notes.items() if k in manifest.labels},
        "name": manifest.name,
        "model_version": str(getattr(manifest, "model_version", "") or ""),
        "labels": list(manifest.labels),
        "preprocess": _check_preprocess(manifest, mode.bundle_dir / "manifest.json"),
        "temperature": manifest.temperature,
        "fallback_threshold": manifest.fallback_threshold,
        "unknown_threshold": unknown.get("threshold") if isinstance(unknown.get("threshold"), (int, float)) else None,
        "unknown_method": str(unknown.get("method", "")),
        "metrics": {k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float, str))},
        "models": models,
        "default_precision": default,
    }
    copies = [(mode.bundle_dir / a.file, m["file"]) for a, m in zip(arts, models)]
    return entry, copies


def resolve_modes(sources: list[tuple[str, str]]) -> list[AppMode]:
    """``--run``/``--bundle`` values (``[MODE=]PATH``) -> modes, by the Gradio demo's rules.

    A bundle whose classes are the built-in reef fish goes to Dive, wild/farmed to Shop; any
    other fills Dive first, then Shop (:func:`fieldid.edge_demo.cli.assign_modes`).
    """
    from fieldid.edge_demo.cli import assign_modes

    def mode_of(path: Path) -> str | None:
        try:
            return mode_for_labels(load_manifest(bundle_dir_of(path)).labels)
        except (DemoError, ManifestError, OSError, ValueError):
            return None  # reported below when the bundle is resolved

    try:
        assigned = assign_modes(sources, mode_of)
        return [AppMode(key, bundle_dir_of(path)) for key, path in assigned.items()]
    except DemoError as e:
        raise AppBuildError(str(e)) from None
    except ValueError as e:
        raise AppBuildError(str(e)) from None


def load_app_config(app_dir: str | Path) -> dict[str, Any]:
    """Read a build's ``config.json``.

    Raises:
        AppBuildError: the folder is not a ``fieldid app build`` output.
    """
    path = Path(app_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        raise AppBuildError(f"{app_dir}: no readable config.json; build the app first with "
                            f"`fieldid app build --run RUN --out {app_dir}`") from None
    if not isinstance(cfg, dict) or cfg.get("app") != _MARKER:
        raise AppBuildError(f"{app_dir}: config.json is not a fieldid app build")
    return cfg


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier app build (nothing of the user's is lost)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise AppBuildError(f"--out {out} exists and is not a folder")
    if any(out.iterdir()):
        try:
            load_app_config(out)
        except AppBuildError:
            raise AppBuildError(f"--out {out} is a non-empty folder that is not a fieldid app build; "
                                f"choose another folder") from None


def _icons(dest: Path) -> None:
    """Two PNG icons (192, 512 px): what browsers want before offering to install the app."""
    from PIL import Image, ImageDraw

    for size in (192, 512):
        img = Image.new("RGB", (size, size), (11, 79, 108))
        d = ImageDraw.Draw(img)
        s = size / 192  # drawn on a 192 grid: a fish body, tail and eye
        d.ellipse([36 * s, 60 * s, 136 * s, 132 * s], fill=(242, 196, 76))
        d.polygon([(130 * s, 96 * s), (168 * s, 64 * s), (168 * s, 128 * s)], fill=(242, 196, 76))
        d.ellipse([58 * s, 84 * s, 72 * s, 98 * s], fill=(11, 79, 108))
        img.save(dest / f"icon-{size}.png", optimize=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def build_app(modes: list[AppMode], out: str | Path, *, server: str = "", precision: str = "auto",
              ort_dir: str | Path | None = None, top_k: int = 3, timeout_s: float = 5.0,
              progress: bool = True, include_failed: bool = False) -> Path:
    """Build the static web app for ``modes`` into ``out``.

    Args:
        modes: one or two modes (``dive`` / ``shop``) and their bundles (see :func:`resolve_modes`).
        out: the build folder; replaced as a whole when it holds an earlier build.
        server: TorchServe inference API root the app asks when unsure ("" = none; the user can
            set one in the app's settings), or ``"same-origin"``: the app's own host, where a reverse
            proxy (``fieldid app serve --proxy``, nginx) forwards ``/predictions/`` to TorchServe.
        precision: default in-browser ONNX model: ``auto`` (fp32 when present: faster in
            onnxruntime-web), ``fp32`` or ``int8``. The other stays selectable in the app.
        ort_dir: onnxruntime-web's ``dist/`` folder (default: ``app/node_modules``, see ``make app-deps``).
        top_k: classes shown per answer.
        timeout_s: seconds the app waits for the server.
        progress: print one line per step.
        include_failed: also ship ONNX files that failed their verification (the latency
            benchmark measures speed, not accuracy); never for an app people use.

    Returns:
        The build folder.

    Raises:
        AppBuildError: bad arguments, a missing/damaged bundle or onnxruntime-web not installed.

    Example:
        >>> build_app(resolve_modes([("run", "runs/reef"), ("run", "runs/salmon")]), "build/app")  # doctest: +SKIP
        PosixPath('build/app')
    """
    out = Path(out)
    if not modes:
        raise AppBuildError("give a model: --run RUN or --bundle DIR")
    if precision not in ("auto", *BROWSER_PRECISIONS):
        raise AppBuildError(f"precision {precision!r} is not one of: auto, {', '.join(BROWSER_PRECISIONS)}")
    if not 1 <= int(top_k) <= 20 or not 0 < float(timeout_s) <= 120:
        raise AppBuildError("--top-k must be 1..20 and --timeout in (0, 120] seconds")
    server = server if server in ("", SAME_ORIGIN) else check_server_url(server)
    ort_dir = Path(ort_dir) if ort_dir else default_ort_dir()
    missing = [f for f in ORT_FILES if not (ort_dir / f).is_file()]
    if missing:
        raise AppBuildError(f"onnxruntime-web is not installed ({ort_dir / missing[0]} missing); "
                            f"run `make app-deps` (npm ci in app/)")
    _check_out(out)
    say = print if progress else (lambda *a, **k: None)

    entries, copies = [], []
    for i, mode in enumerate(modes, 1):
        entry, files = _mode_config(mode, precision, include_failed)
        entries.append(entry)
        copies += files
        say(f"[{i}/{len(modes)}] {mode.key}: bundle {entry['name']!r} ({mode.bundle_dir}), models "
            f"{', '.join(m['precision'] for m in entry['models'])}, default {entry['default_precision']}", flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name in _SHELL:
            if name.startswith("icons/"):
                continue
            shutil.copy2(_STATIC / name, tmp / name)
        (tmp / "icons").mkdir()
        _icons(tmp / "icons")
        (tmp / "ort").mkdir()
        for f in ORT_FILES:
            shutil.copy2(ort_dir / f, tmp / "ort" / f)
        for n, (src, rel) in enumerate(copies, 1):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
            say(f"  copied {n}/{len(copies)}: {rel} ({src.stat().st_size / 1e6:.1f} MB)", flush=True)
        # The build id names the offline cache: it changes whenever any shipped byte changes, so a
        # phone that saw an older build fetches the new one once and drops the old cache.
        h = hashlib.sha256()
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
            h.update(p.relative_to(tmp).as_posix().encode())
            h.update(file_sha256(p).encode())
        h.update(json.dumps([entries, server, top_k, timeout_s], sort_keys=True).encode())
        build_id = h.hexdigest()[:16]
        default_models = [m["file"] for e in entries for m in e["models"] if m["precision"] == e["default_precision"]]
        config = {
            "app": _MARKER, "schema_version": APP_SCHEMA_VERSION, "build_id": build_id,
            "fieldid_version": __version__, "onnxruntime_web": ort_web_version(ort_dir),
            "server": server, "server_timeout_s": float(timeout_s), "top_k": int(top_k),
            "max_pixels": DEFAULT_MAX_PIXELS, "max_file_bytes": MAX_FILE_BYTES,
            "modes": entries,
            # What the service worker caches on the first visit; the other precision is cached when first used.
            "precache": ["./", *_SHELL, "config.json", *(f"ort/{f}" for f in ORT_FILES), *default_models],
        }
        _write_json(tmp / "config.json", config)
        sw = (_STATIC / "sw.js").read_text().replace("__BUILD_ID__", build_id)
        (tmp / "sw.js").write_text(sw)
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp made 0700; a static host's other users must read it
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        replace_dir(tmp, out)  # the old build is restored if the move fails
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    say(f"app built in {out} ({size / 1e6:.1f} MB, build {build_id}); try it: fieldid app serve {out}", flush=True)
    return out
