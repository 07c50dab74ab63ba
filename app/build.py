"""``fieldid app build``: export bundle(s) -> a static, installable web app that runs the model on the phone.

The build folder holds everything the phone needs and nothing it would fetch elsewhere:

* the page (``index.html``, ``app.js``, ``preprocess.js``, ``style.css``), a service worker
  (``sw.js``) that caches the app and its default models for offline use, a web app manifest and
  icons (installable);
* onnxruntime-web's WebAssembly build (``ort/``), copied from the pinned npm package in
  ``app/node_modules`` (``make app-deps`` runs ``npm ci``);
* per model (a tab of the app) the bundle's verified ONNX files under ``models/<key>/``;
* ``config.json``: labels, preprocessing, temperature, thresholds, unknown detector and model
  files -- all copied from the bundle's ``manifest.json`` -- and the words the app shows
  (title, description, class notes: :mod:`fieldid.appmeta`). The server's inference token is
  never written: the user pastes it into the app, which keeps it in local storage.

Which ONNX file the app runs by default is the phone contract's answer
(:func:`fieldid.export.phone.select_artifact`: the verified int8 model, else fp32), the same file
the Gradio demo, ``fieldid predict`` and the cascade bench run; the other precision ships too and
stays selectable in the app's settings.

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
from fieldid.cli_common import UsageError, http_url
from fieldid.appmeta import KEY_PATTERN, AppMeta, MetaError, apply_meta, default_meta, load_meta, preset_for_labels
from fieldid.export.manifest import Artifact, Manifest, ManifestError, bundle_dir_of, file_sha256, load_manifest
from fieldid.export.phone import (DEFAULT_MAX_PIXELS, MAX_FILE_BYTES, PhoneError, checked_file, onnx_precisions,
                                  select_artifact)
from fieldid.records import replace_dir

__all__ = ["AppBuildError", "AppMode", "APP_SCHEMA_VERSION", "SAME_ORIGIN", "check_server_url", "resolve_modes", "BROWSER_PRECISIONS", "ORT_FILES", "build_app",
           "default_ort_dir", "ort_web_version", "load_app_config"]

APP_SCHEMA_VERSION = 1
# The ONNX precisions the app ships (the default is select_artifact's; the other stays selectable:
# onnxruntime-web's WebAssembly int8 kernels can be slower than fp32, `fieldid bench app` measures both).
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
    """One model of the app (a tab): its key, the bundle folder that feeds it and the words it shows."""

    key: str
    bundle_dir: Path
    meta: AppMeta


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
    try:
        http_url(url, flag)
    except UsageError as e:
        raise AppBuildError(str(e)) from None
    u = urllib.parse.urlsplit(url)
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
            continue  # a phone ships only verified models (the phone contract's rule)
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


def _model_entry(bundle: Path, key: str, art: Artifact) -> dict[str, Any]:
    try:
        path = checked_file(bundle, art)
    except PhoneError as e:
        raise AppBuildError(str(e)) from None
    return {
        "precision": art.precision,
        "file": f"models/{key}/{Path(art.file).name}",
        "sha256": art.sha256,
        "size_bytes": path.stat().st_size,
        "input_name": art.input_name,
        "output_name": art.output_name,
        # Contract 2: the unknown detector's output, "" when the file has none.
        "unknown_output": art.unknown_output or "",
        "verification": {k: art.verification[k] for k in ("status", "top1_agreement", "max_abs_logit_diff")
                         if k in art.verification},
    }


def default_precision(manifest: Manifest, shipped: list[str], precision: str = "auto") -> str:
    """The precision the app runs first: ``precision`` when named, else the phone contract's choice
    (:func:`fieldid.export.phone.select_artifact`: verified int8, else fp32).

    Raises:
        AppBuildError: ``precision`` is not among the ``shipped`` models.
    """
    if precision != "auto":
        if precision not in shipped:
            raise AppBuildError(f"bundle {manifest.name!r} has no verified {precision} ONNX model "
                                f"(has: {', '.join(shipped)})")
        return precision
    chosen = select_artifact(manifest, "auto")[0].precision
    return chosen if chosen in shipped else shipped[0]


def _mode_config(mode: AppMode, precision: str,
                 include_failed: bool = False) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """``config.json``'s entry for one mode, and the (source file, build path) pairs to copy."""
    try:
        manifest = load_manifest(mode.bundle_dir)
    except (ManifestError, OSError) as e:
        raise AppBuildError(str(e)) from None
    arts = _browser_models(manifest, include_failed)
    models = [_model_entry(mode.bundle_dir, mode.key, a) for a in arts]
    default = default_precision(manifest, [m["precision"] for m in models], precision)
    unknown = dict(manifest.unknown or {})
    info = mode.meta
    entry = {
        # "tagline" is the description line under the title (its name in the app's page).
        "key": mode.key, "title": info.title, "tagline": info.description, "summary": info.summary, "cue": info.cue,
        "class_notes": {k: v for k, v in info.class_notes.items() if k in manifest.labels},
        "name": manifest.name,
        "model_version": str(manifest.model_version or ""),
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


def _split_key(value: str) -> tuple[str | None, str]:
    """``"KEY=PATH"`` -> ``(KEY, PATH)``; a value whose part before ``=`` is no key (``runs/a=b``) is a path."""
    key, sep, rest = value.partition("=")
    if sep and KEY_PATTERN.match(key.lower()):
        return key.lower(), rest
    return None, value


def _slug(name: str) -> str:
    s = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return (s or "model")[:40]


def resolve_modes(sources: list[tuple[str, str]], *, meta: list[str] | None = None, title: str | None = None,
                  description: str | None = None) -> list[AppMode]:
    """``--run``/``--bundle`` values (``[KEY=]PATH``) and the words options -> the app's modes (tabs).

    Keys: ``KEY=`` when given, else ``dive`` / ``shop`` for the two demo models (their classes are
    a demo preset's), else the model's name. Words: :mod:`fieldid.appmeta` (the model's own --
    defaults, ``app.yaml`` in the bundle or run folder, ``meta`` files, then ``title`` and
    ``description``); only the demo models get the Dive/Shop words.

    Args:
        sources: ``(kind, "[KEY=]PATH")`` pairs in command-line order (a run folder means its bundle).
        meta: ``[KEY=]FILE`` YAML files of words (``KEY=`` may be left out with one model).
        title / description: the words of the one model (only with a single model).

    Raises:
        AppBuildError: no model, a key given twice, a meta file that cannot be used, ...

    Example:
        >>> [m.key for m in resolve_modes([("run", "runs/reef"), ("run", "runs/salmon")])]  # doctest: +SKIP
        ['dive', 'shop']
    """
    if not sources:
        raise AppBuildError("give a model: --run RUN or --bundle DIR (e.g. --run runs/textures)")
    found: list[tuple[str, str, Path, Manifest]] = []
    for kind, value in sources:
        key, path = _split_key(value)
        try:
            bundle = bundle_dir_of(path)
            manifest = load_manifest(bundle)
        except (ManifestError, OSError) as e:
            raise AppBuildError(str(e)) from None
        key = key or preset_for_labels(manifest.labels) or _slug(manifest.name)
        if key in [f[0] for f in found]:
            raise AppBuildError(f"model key {key!r} is given twice (--{kind} {value}); name them: --{kind} KEY=PATH")
        found.append((key, value, bundle, manifest))
    keys = [f[0] for f in found]
    files: dict[str, Path] = {}
    for item in meta or []:
        key, path = _split_key(item)
        if key is None and len(found) == 1:
            key = keys[0]
        if key not in keys:
            raise AppBuildError(f"--meta {item}: name the model it describes, KEY=FILE with KEY one of: "
                                f"{', '.join(keys)}")
        files[key] = Path(path)
    flags = {k: v for k, v in (("title", title), ("description", description)) if v}
    if flags and len(found) != 1:
        raise AppBuildError("--title and --description describe one model; with several, use --meta KEY=FILE")
    modes = []
    for key, _value, bundle, manifest in found:
        labels = list(manifest.labels)
        words = default_meta(key, manifest.name, labels)
        try:
            own = [bundle / "app.yaml"] + ([bundle.parent / "app.yaml"] if (bundle.parent / "run.json").is_file() else [])
            for f in [f for f in own if f.is_file()][:1]:  # the bundle's, else its run's
                words = apply_meta(words, load_meta(f), labels, str(f))
            if key in files:
                words = apply_meta(words, load_meta(files[key]), labels, str(files[key]))
            words = apply_meta(words, flags, labels, "--title/--description")
        except MetaError as e:
            raise AppBuildError(str(e)) from None
        modes.append(AppMode(key, bundle, words))
    return modes


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
        modes: the app's models (tabs), their bundles and words (see :func:`resolve_modes`).
        out: the build folder; replaced as a whole when it holds an earlier build.
        server: TorchServe inference API root the app asks when unsure ("" = none; the user can
            set one in the app's settings), or ``"same-origin"``: the app's own host, where a reverse
            proxy (``fieldid app serve --proxy``, nginx) forwards ``/predictions/`` to TorchServe.
        precision: default in-browser ONNX model: ``auto`` (the phone contract's choice: the verified
            int8 model, else fp32), ``fp32`` or ``int8``. The other stays selectable in the app.
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
    if not 1 <= int(top_k) <= 20:
        raise AppBuildError(f"--top-k must be 1..20 (got {top_k})")
    if not 0 < float(timeout_s) <= 120:
        raise AppBuildError(f"--timeout must be in (0, 120] seconds (got {timeout_s})")
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

    out = Path(os.path.abspath(out))  # `--out .` inside an earlier build: the new one is made beside it
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
