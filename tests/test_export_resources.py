"""Export memory and data flow (issues 9, 11, 12): streamed int8 calibration, the memory refusal,
``export_stats``, a run that exports without its dataset, ``--out`` safety, bench's held-out
split on the run's own dataset, and manifest paths that must stay inside the bundle."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fixtures_export import copy_run

FIELDID = [sys.executable, "-m", "fieldid"]


# --------------------------------------------------------------------------- streamed calibration
def _tiny_onnx(tmp_path: Path) -> Path:
    """A small real conv net exported to ONNX and pre-processed for quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    fp32 = tmp_path / "tiny.onnx"
    # Batch 1 is all calibration feeds it (one image per reader call).
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(fp32), input_names=["input"], output_names=["logits"],
                      opset_version=18, dynamo=True, external_data=False, verbose=False)
    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    return pre


def _photos(n: int):
    """``n`` real 32-px crops of scikit-image photos, as lazily read PhoneImages."""
    from skimage import data as sk

    from fieldid.export.inputs import PhoneImages
    from fieldid.training.records import PreprocessSpec

    spec = PreprocessSpec.for_crop(32, 0.875)
    photos = [sk.chelsea(), sk.coffee(), sk.astronaut(), sk.rocket()]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - 32), rng.integers(0, img.shape[1] - 32)
        rows.append(img[y:y + 32, x:x + 32, :3])
    return PhoneImages.from_array(np.stack(rows).astype(np.uint8), spec)


def _ranges(path: Path) -> dict[str, tuple[float, float]]:
    """The activation ranges ONNX Runtime wrote (read back with its own loader)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(path).data
    return {name: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1]))) for name, t in data.items()}


@pytest.mark.parametrize("method, tolerance", [("MinMax", 0.0), ("Percentile", 1e-3)])
def test_streamed_calibration_gives_the_in_memory_ranges(tmp_path: Path, method: str, tolerance: float) -> None:
    """Windows of 3 images (streamed) vs all 23 at once (in memory), same real ORT calibrator.

    MinMax merges exactly (min of mins): identical ranges. Percentile's absolute-value histogram
    grows by whole bins of the first window's width, so its percentile lands within a bin of the
    one-pass one: within 1e-3 of the range width (a quarter of one uint8 step, 1/255). Entropy,
    which moved ranges by 17-43% of the width at windows of 8 to 1 images, is no longer a candidate.
    """
    from fieldid.export.onnx_export import OnnxInt8Recipe, calibration_ranges

    pre = _tiny_onnx(tmp_path)
    imgs = _photos(23)  # not a multiple of the window: the last window is short
    recipe = OnnxInt8Recipe(method, 99.999 if method == "Percentile" else None)
    streamed = _ranges(calibration_ranges(pre, imgs, recipe, tmp_path / "streamed.json", window=3))
    in_memory = _ranges(calibration_ranges(pre, imgs, recipe, tmp_path / "memory.json", window=None))
    assert streamed.keys() == in_memory.keys() and len(streamed) >= 4
    for name, (lo, hi) in in_memory.items():
        s_lo, s_hi = streamed[name]
        width = max(hi - lo, 1e-6)
        assert abs(s_lo - lo) <= tolerance * width and abs(s_hi - hi) <= tolerance * width, (name, lo, hi, s_lo, s_hi)


def test_calibration_window_is_bounded_by_its_budget() -> None:
    from fieldid.export.onnx_export import calibration_window

    assert calibration_window(25.0, 256) == 3  # MobileNetV2 at 224 px: ~25 MB of layer outputs per image
    assert calibration_window(1000.0, 256) == 1
    assert calibration_window(0.5, 256) == 170


# --------------------------------------------------------------------------- memory refusal, export_stats
def test_export_refuses_in_one_line_when_told_memory_is_short(tiny_run: Path, tmp_path: Path) -> None:
    """FIELDID_MEMORY_LIMIT_MB below what the export holds: exit 2, one line naming what to lower, nothing written."""
    out = tmp_path / "bundle"
    env = {**os.environ, "FIELDID_MEMORY_LIMIT_MB": "300"}
    proc = subprocess.run(FIELDID + ["export", "--run", str(tiny_run), "--formats", "onnx,torchscript", "--out",
                                     str(out)], capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "needs about" in lines[0] and "MB is free" in lines[0] and "--formats" in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]


def test_memory_limit_argument_and_stats_in_the_manifest(tiny_run: Path, tmp_path: Path) -> None:
    from fieldid.export import ExportError, export_run

    with pytest.raises(ExportError, match=r"^exporting pytorch needs about \d+ MB but only \d+ MB is free; lower "):
        export_run(tiny_run, formats="torchscript", out=tmp_path / "a", memory_limit_mb=1)
    m = export_run(tiny_run, formats="torchscript", out=tmp_path / "b", memory_limit_mb=64_000)
    stats = json.loads((tmp_path / "b" / "manifest.json").read_text())["export_stats"]
    assert m.export_stats == stats
    assert {"inputs", "pytorch", "torchscript", "total"} <= set(stats)
    for step in ("inputs", "pytorch", "torchscript"):
        st = stats[step]
        assert st["seconds"] >= 0 and st["peak_rss_mb"] >= st["rss_before_mb"] * 0.5 > 0, (step, st)
        assert st["peak_scope"] in ("step", "process")
    assert stats["torchscript"]["estimate_mb"] > 0
    assert stats["total"]["peak_rss_mb"] == max(stats[s]["peak_rss_mb"] for s in ("inputs", "pytorch", "torchscript"))


# --------------------------------------------------------------------------- a run without its dataset
def _run_with_own_dataset(tiny_run: Path, shapes_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run whose split points at a private copy of the dataset (which the test may delete)."""
    data = tmp_path / "dataset"
    shutil.copytree(shapes_dir, data)
    run = copy_run(tiny_run, tmp_path / "run")
    split = json.loads((run / "split.json").read_text())
    split["root"] = str(data.resolve())
    (run / "split.json").write_text(json.dumps(split))
    return run, data


def test_a_moved_run_exports_without_its_dataset(tiny_run: Path, shapes_dir: Path, tmp_path: Path) -> None:
    run, data = _run_with_own_dataset(tiny_run, shapes_dir, tmp_path)
    index = json.loads((run / "samples" / "samples.json").read_text())
    rec = json.loads((run / "run.json").read_text())
    assert rec["extra"]["samples"] == "samples/samples.json"
    split = json.loads((run / "split.json").read_text())
    assert index["groups"]["heldout"]["count"] == len(split["files"]["test"])
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    shutil.rmtree(data)
    proc = subprocess.run(FIELDID + ["export", "--run", str(moved), "--formats", "onnx"], capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((moved / "export" / "manifest.json").read_text())
    # The fp32 file passes; the int8 one passes or is the one file marked (a good int8 file still misses
    # its 99 % bar now and then, export/verify.py): what this test checks is that no dataset was needed.
    missed = {x["file"]: x["why"] for x in m["verification_summary"]["missed"]}
    assert set(missed) <= {"model.int8.onnx"}
    assert m["verification_summary"]["status"] == ("partial" if missed else "passed")
    # A miss is a bar missed after calibrating on the stored training photos, not a broken path.
    assert all("missed its bar" in why for why in missed.values())
    assert m["export_stats"]["total"]["calibration_images"] > 0
    assert next(a for a in m["artifacts"] if a["file"] == "model.onnx")["verification"]["status"] == "passed"
    assert "run samples" in m["export_stats"]["total"]["images_source"]
    onnx = next(a for a in m["artifacts"] if a["file"] == "model.onnx")
    # The bar is decided on the stored held-out photos, topped up to 300 images (stored val photos and
    # augmented views of them): no dataset was read.
    decided = m["verification_summary"]["decided_on"]
    assert decided["heldout"] == len(split["files"]["test"]) and onnx["verification"]["num_images"] == decided["images"]
    assert decided["images"] >= 300
    # bench reads the same stored held-out images.
    proc = subprocess.run(FIELDID + ["bench", "bundle", "--run", str(moved), "--iters", "1", "--batches", "1", "--settle", "0"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["images"] == len(split["files"]["test"])


def test_stored_samples_equal_the_photos_through_the_phone_preprocessing(tiny_run: Path) -> None:
    from fieldid.export.inputs import heldout_from_run, load_arrays, samples_index
    from fieldid.training.data import load_split
    from fieldid.training.records import load_record

    rec = load_record(tiny_run)
    x, y, split_name = heldout_from_run(samples_index(tiny_run, rec), rec.preprocess_spec)
    split = load_split(tiny_run / "split.json")
    ref, kept = load_arrays(split.paths("test"), rec.preprocess_spec)
    assert split_name == "test" and np.array_equal(y, np.asarray(split.targets("test"))[kept])
    assert np.array_equal(x, ref)  # bit for bit: the same crop, the same normalisation


def test_data_overrides_the_stored_samples_and_a_run_without_either_says_so(tiny_run: Path, shapes_dir: Path,
                                                                             tmp_path: Path) -> None:
    from fieldid.export import ExportError, export_run

    run, data = _run_with_own_dataset(tiny_run, shapes_dir, tmp_path)
    shutil.rmtree(run / "samples")  # a run trained before runs kept samples
    rec = json.loads((run / "run.json").read_text())
    del rec["extra"]["samples"]
    (run / "run.json").write_text(json.dumps(rec))
    moved = tmp_path / "moved_data"
    shutil.move(str(data), str(moved))
    with pytest.raises(ExportError, match=r"dataset .* is gone and the run kept no samples .*give --data DIR"):
        export_run(run, formats="torchscript", out=tmp_path / "b0")
    m = export_run(run, formats="torchscript", out=tmp_path / "b1", data=moved)
    assert m.export_stats["total"]["images_source"] == str(moved.resolve())
    assert m.verification_summary["status"] == "passed"


# --------------------------------------------------------------------------- --out, bench --data, manifest paths
def test_out_with_a_foreign_manifest_is_refused_and_untouched(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "someone_elses"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    (out / "index.html").write_text("<html></html>")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run(FIELDID + ["export", "--run", str(tiny_run), "--formats", "torchscript", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not a fieldid bundle" in proc.stderr and "nothing was changed" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bench_data_on_the_runs_own_dataset_uses_the_held_out_split(tiny_run: Path, tiny_bundle: Path,
                                                                    shapes_dir: Path, tmp_path: Path) -> None:
    from fieldid.export import bench_run

    split = json.loads((tiny_run / "split.json").read_text())
    r = bench_run(tiny_run, bundle=tiny_bundle, data=shapes_dir, out=tmp_path, iters=1, batches=1, settle_s=0)
    assert r["meta"]["images"] == len(split["files"]["test"]) < sum(len(v) for v in split["files"].values())
    assert "test split, no training image" in r["meta"]["data"]


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "sub/../../x.onnx", "C:\\\\model.onnx"])
def test_manifest_paths_must_stay_inside_the_bundle(tiny_bundle: Path, tmp_path: Path, bad: str) -> None:
    from fieldid.export import ManifestError, load_manifest

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["artifacts"][0]["file"] = bad
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="must stay inside the bundle"):
        load_manifest(bundle)


def test_bench_export_table_lists_what_failed_verification() -> None:
    """bench-export keeps what passed (the export default) so its table prints; a kept failure is named under it."""
    from fieldid.export.bench_export import _failed_artifacts, export_stats_table

    manifest = {"artifacts": [
        {"file": "model.onnx", "verification": {"status": "passed"}},
        {"file": "model.mlpackage", "verification": {"status": "structure_only", "reason": "Core ML runs only on macOS"}},
        {"file": "model.int8.pte", "verification": {"status": "failed", "unknown_score": {"status": "failed"}}},
        {"file": "model.int8.onnx", "verification": {"status": "failed"}}],
        "verification_summary": {"status": "failed", "failures": [
            "model.int8.pte unknown_score missed its bar: decision agreement 90.80%"]}}
    failed = _failed_artifacts(manifest)
    assert failed == ["model.int8.pte unknown_score missed its bar: decision agreement 90.80%",
                      "model.int8.onnx failed verification"]
    stats = {"inputs": {"seconds": 7.0, "peak_rss_mb": 1300}, "total": {"seconds": 262.0, "peak_rss_mb": 2260,
                                                                       "calibration_images": 200}}
    info = {"name": "reef224", "backbone": "mobilenetv2_100", "px": 224, "train_images": 1058, "train_s": 534.0}
    table = export_stats_table([{"info": info, "stats": stats, "failed": failed}])
    assert "0.49x the training time (534 s) -> met" in table and "peak RSS 2260 MB (goal <= 3000 MB) -> met" in table
    assert "reef224: kept but failed verification: model.int8.pte unknown_score missed" in table
