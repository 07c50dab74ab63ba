"""Bundle -> TorchServe model archive (``<name>.mar``) with torch-model-archiver. Torch-free.

The archive holds only what the handler needs: the bundle's verified ONNX fp32 file (plus a
verified ONNX fp16 file when the bundle has one, for GPU workers), a manifest reduced to those
artifacts, and the thin TorchServe adapter ``fieldid_handler.py``. The inference code
itself (:mod:`fieldid.serve.engine`) is imported from the installed fieldid package, so the workers
must run with the Python that has fieldid installed (``fieldid serve start`` sees to that).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fieldid.export.manifest import Artifact, Manifest, ManifestError, check_pair, load_manifest
from fieldid.export.manifest import bundle_dir_of as find_bundle

__all__ = ["ServeError", "archive_bundle", "build_model_store", "check_device_pairs", "bundle_dir_of", "bundle_version", "served_artifact",
           "has_verified", "HANDLER_FILE"]

log = logging.getLogger("fieldid.serve")

HANDLER_FILE = Path(__file__).with_name("fieldid_handler.py")
# TorchServe puts the name in URLs (/predictions/<name>) and file names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ServeError(ValueError):
    """Serving cannot be done as asked (bad bundle, no Java, server not running, ...)."""


def bundle_dir_of(path: str | Path) -> Path:
    """A bundle folder, or a run folder -> its ``export/`` bundle (:func:`fieldid.export.manifest.bundle_dir_of`).

    Raises:
        ServeError: neither holds a ``manifest.json``.
    """
    try:
        return find_bundle(path)
    except ManifestError as e:
        raise ServeError(str(e)) from None


def bundle_version(manifest: Manifest) -> str:
    """The model version reported in answers: the first 12 hex digits of the fp32 weights' sha256
    (the bundle's ``model.pth``; the ONNX fp32 file's when a bundle has no state dict).

    It changes exactly when the trained weights change, and it is the same on every machine.

    Example:
        >>> bundle_version(load_manifest("runs/reef"))  # doctest: +SKIP
        'd03c1bc17670'
    """
    for fmt in ("pytorch", "onnx"):
        try:
            return manifest.find(fmt, "fp32").sha256[:12]
        except ManifestError:
            continue
    raise ServeError(f"bundle {manifest.name!r} has neither a pytorch nor an ONNX fp32 artifact")


def _verified(art: Artifact) -> bool:
    return art.verification.get("status") == "passed"


def has_verified(manifest: Manifest, fmt: str, precision: str) -> bool:
    """Does the bundle hold a ``fmt``/``precision`` artifact whose verification passed?"""
    return any(a.format == fmt and a.precision == precision and _verified(a) for a in manifest.artifact_list())


def served_artifact(manifest: Manifest, precision: str = "fp32") -> Artifact:
    """The bundle's verified ONNX artifact of ``precision`` (what the server runs).

    Raises:
        ServeError: the bundle has no such ONNX file, or its verification did not pass.

    Example:
        >>> served_artifact(load_manifest("runs/reef")).file  # doctest: +SKIP
        'model.onnx'
    """
    try:
        art = manifest.find("onnx", precision)
    except ManifestError as e:
        raise ServeError(f"{e}; the server runs the bundle's verified ONNX {precision} model: "
                         f"export it with `fieldid export --run RUN --formats onnx`") from None
    if not _verified(art):
        raise ServeError(f"bundle {manifest.name!r}: {art.file} did not pass verification "
                         f"({art.verification.get('status', 'not verified')}); the server only runs verified files")
    return art


def _archiver() -> list[str]:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("torch-model-archiver")
    if found is None:
        raise ServeError("torch-model-archiver not found: pip install 'fieldid[serve]' (torch-model-archiver==0.12.0)")
    return [found]


def archive_bundle(bundle: str | Path, store: str | Path) -> Path:
    """Write ``STORE/<name>.mar`` for one bundle (replacing an older one atomically).

    Args:
        bundle: export bundle folder (or a run folder).
        store: model-store folder (created if missing).

    Returns:
        Path of the ``.mar`` file.

    Example:
        >>> archive_bundle("runs/reef", "runs/reef/serve/model-store")  # doctest: +SKIP
        PosixPath('runs/reef/serve/model-store/reef.mar')
    """
    bundle = bundle_dir_of(bundle)
    try:
        m = load_manifest(bundle)
        version = bundle_version(m)
        arts = [served_artifact(m, "fp32")] + ([served_artifact(m, "fp16")] if has_verified(m, "onnx", "fp16") else [])
    except ManifestError as e:
        raise ServeError(str(e)) from None
    if not _NAME_RE.match(m.name):
        raise ServeError(f"bundle name {m.name!r} cannot be a TorchServe model name (letters, digits, _ . -)")
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    # torch-model-archiver splits --extra-files on commas: stage them where the path has none
    # (the system temp dir), whatever the store's path holds. The output goes to the store.
    with tempfile.TemporaryDirectory(prefix="fieldid-archive-") as tmp, \
            tempfile.TemporaryDirectory(prefix=".archive-", dir=store) as out_tmp:
        staging = Path(tmp)
        if "," in str(staging):
            raise ServeError(f"the temp folder {staging} has a comma in its path, which torch-model-archiver "
                             f"cannot take; set TMPDIR to another folder")
        # The archive carries only the files it serves: the reduced manifest names just them.
        files = {a.file for a in arts}
        small = Manifest.from_dict({**m.to_dict(), "artifacts": [a for a in m.artifacts if a["file"] in files]})
        small.to_json(staging / "manifest.json")
        extra = [staging / "manifest.json"]
        for a in arts[1:]:
            os.symlink((bundle / a.file).resolve(), staging / a.file)
            extra.append(staging / a.file)
        out = Path(out_tmp)
        cmd = _archiver() + [
            "--model-name", m.name, "--version", version, "--handler", str(HANDLER_FILE),
            "--serialized-file", str(bundle / arts[0].file), "--extra-files", ",".join(map(str, extra)),
            "--export-path", str(out), "--force",
        ]
        # torch-model-archiver copies the files to TMP/<model name>, deleting whatever folder of that
        # name was there first: a user's /tmp/reef, or another archiving of a same-named model at the
        # same time (two `fieldid serve start` of runs named alike met there). A private TMPDIR keeps
        # that folder ours.
        private = staging / "archiver-tmp"
        private.mkdir()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(private)})
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ServeError(f"torch-model-archiver failed for {m.name}: {last}")
        target = store / f"{m.name}.mar"
        os.replace(out / f"{m.name}.mar", target)
    log.info("archived %s -> %s", bundle, target)
    return target


def check_device_pairs(bundles: list[str | Path], devices: list[str | Path]) -> None:
    """Refuse to serve a server model for a device model whose labels differ (content or order).

    ``devices[i]`` is the device model (bundle or run) whose fallback ``bundles[i]`` answers
    (``--device-run``, in the order of ``--run``): an app maps the server's class indices onto
    the device's, so one label list must hold for both (:func:`fieldid.export.manifest.check_pair`).

    Raises:
        ServeError: counts differ, a bundle is unreadable, or labels differ (one line).

    Example:
        >>> check_device_pairs(["runs/reef-server"], ["runs/reef"])  # doctest: +SKIP
    """
    if len(devices) != len(bundles):
        raise ServeError(f"{len(devices)} device models for {len(bundles)} served models: give one --device-run per "
                         f"--run, in the same order")
    try:
        for served, device in zip(bundles, devices):
            check_pair(load_manifest(bundle_dir_of(device)), load_manifest(bundle_dir_of(served)))
    except ManifestError as e:
        raise ServeError(str(e)) from None


def build_model_store(bundles: list[str | Path], store: str | Path, *,
                      devices: list[str | Path] | None = None) -> dict[str, Path]:
    """Archive several bundles into one model store; names must be unique.

    Args:
        bundles: the bundles (or runs) to serve.
        store: the model-store folder.
        devices: the device models they answer for, one per bundle (:func:`check_device_pairs`);
            checked before anything is written.

    Returns:
        ``{model name: .mar path}`` in the given order.
    """
    if devices:
        check_device_pairs(bundles, devices)
    out: dict[str, Path] = {}
    for b in bundles:
        name = load_manifest(bundle_dir_of(b)).name
        if name in out:
            raise ServeError(f"two bundles are both named {name!r}; serve models with distinct names")
        out[name] = archive_bundle(b, store)
    return out
