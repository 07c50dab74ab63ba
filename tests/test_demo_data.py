"""Tests for training.demo_data: the synthetic reef / salmon demo datasets (torch-free)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fieldid.training.demo_data import (
    DEMO_DATASETS,
    MARKER_NAME,
    DemoSummary,
    demo_counts,
    make_demo_dataset,
)
from fieldid.training.images import scan_image_folder

TINY = 0.01  # every class gets the minimum of 3 images
FAST = {"scale": TINY, "image_size": 96, "progress": False}  # for tests about files, not pictures


def files(root: Path) -> dict[str, bytes]:
    """Every image under ``root`` by relative path -> its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def best_threshold_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the best rule ``x > t`` (or ``x < t``) for binary labels ``y``."""
    ys = y[np.argsort(x, kind="stable")]
    ones_below = np.concatenate([[0], np.cumsum(ys)])
    k = np.arange(len(ys) + 1)
    correct = (k - ones_below) + (ys.sum() - ones_below)  # zeros below the cut + ones above it
    return float(max(correct.max(), (len(ys) - correct).max()) / len(ys))


def global_stats(path: Path) -> dict[str, float]:
    """One-number summaries of a whole image, the kind a shortcut classifier would use."""
    img = Image.open(path).convert("RGB")
    rgb = np.asarray(img, np.float64) / 255.0
    hsv = np.asarray(img.convert("HSV"), np.float64) / 255.0
    hue = hsv[..., 0] * 2 * np.pi  # circular mean: salmon hues sit on both sides of red = 0
    r, g, b = rgb.reshape(-1, 3).mean(axis=0)
    return {
        "mean_r": r,
        "mean_g": g,
        "mean_b": b,
        "brightness": rgb.mean(),
        "saturation": hsv[..., 1].mean(),
        "hue": float(np.arctan2(np.sin(hue).mean(), np.cos(hue).mean())),
        "r_over_g": r / g,
    }


@pytest.fixture(scope="module", params=DEMO_DATASETS)
def small_demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    """Each demo at scale 0.1, seed 0 (generated once per module: the reef takes a few seconds)."""
    name = request.param
    return make_demo_dataset(name, tmp_path_factory.mktemp("demo") / name, scale=0.1, progress=False)


def test_generates_imagefolder(small_demo: DemoSummary) -> None:
    s, name, out = small_demo, small_demo.name, small_demo.out
    assert isinstance(s, DemoSummary) and s.name == name and s.out == out and s.seed == 0
    assert s.counts == demo_counts(name, 0.1)
    assert all(n >= 3 for n in s.counts.values())
    listing = scan_image_folder(out)  # what training sees: flat tree, no stray files as classes
    assert not listing.presplit
    assert {c: len(ps) for c, ps in listing.splits["all"].items()} == s.counts
    for cls, n in s.counts.items():
        names = sorted(p.name for p in (out / cls).iterdir())
        assert names == [f"{cls}_{i:04d}.jpg" for i in range(n)]
    for p in list(out.rglob("*.jpg"))[::7]:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (192, 192))
            im.load()
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["complete"] and marker["counts"] == s.counts and marker["name"] == name


def test_count_table() -> None:
    reef = demo_counts("reef")
    assert len(reef) >= 7
    assert max(reef.values()) / min(reef.values()) > 2  # imbalanced on purpose
    assert 600 <= sum(reef.values()) <= 900
    assert demo_counts("salmon") == {"wild": 300, "farmed": 300}
    assert demo_counts("reef", 0.001) == {c: 3 for c in reef}
    with pytest.raises(ValueError, match="scale"):
        demo_counts("reef", 0)


def test_image_size(tmp_path: Path) -> None:
    make_demo_dataset("salmon", tmp_path / "s", scale=TINY, image_size=96, progress=False)
    with Image.open(tmp_path / "s" / "wild" / "wild_0000.jpg") as im:
        assert im.size == (96, 96)


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_deterministic(tmp_path: Path, name: str) -> None:
    a = files(make_demo_dataset(name, tmp_path / "a", seed=3, **FAST).out)
    b = files(make_demo_dataset(name, tmp_path / "b", seed=3, **FAST).out)
    c = files(make_demo_dataset(name, tmp_path / "c", seed=4, **FAST).out)
    assert a and a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_smaller_scale_is_a_prefix(small_demo: DemoSummary, tmp_path: Path) -> None:
    tiny = files(make_demo_dataset(small_demo.name, tmp_path / "tiny", scale=TINY, progress=False).out)
    big = files(small_demo.out)
    assert tiny and all(big[k] == v for k, v in tiny.items())


def test_refuses_user_folder(tmp_path: Path) -> None:
    user = tmp_path / "photos"
    (user / "cats").mkdir(parents=True)
    (user / "cats" / "mine.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="refusing"):
        make_demo_dataset("reef", user, **FAST)
    assert (user / "cats" / "mine.jpg").read_bytes() == b"precious"
    assert not (user / MARKER_NAME).exists()

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        make_demo_dataset("reef", not_a_dir, **FAST)


def test_idempotent_and_replaces_own_output(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    make_demo_dataset("salmon", out, **FAST)
    first = out / "wild" / "wild_0000.jpg"
    mtime = first.stat().st_mtime_ns
    again = make_demo_dataset("salmon", out, **FAST)
    assert again.counts == {"wild": 3, "farmed": 3}
    assert first.stat().st_mtime_ns == mtime  # nothing rewritten

    # Other arguments: the old demo output is ours, so it is replaced (old extra files go).
    make_demo_dataset("reef", out, **FAST)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(demo_counts("reef", TINY))
    assert json.loads((out / MARKER_NAME).read_text())["name"] == "reef"

    # A user's file added to a demo folder is not ours to delete.
    (out / "lionfish" / "my_photo.jpg").write_bytes(b"mine")
    with pytest.raises(ValueError, match="my_photo"):
        make_demo_dataset("salmon", out, **FAST)
    assert (out / "lionfish" / "my_photo.jpg").exists()


def test_interrupted_run_is_redone(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    make_demo_dataset("salmon", out, **FAST)
    marker = json.loads((out / MARKER_NAME).read_text())
    (out / MARKER_NAME).write_text(json.dumps({**marker, "complete": False}))
    (out / "farmed" / "farmed_0002.jpg").unlink()
    (out / "farmed" / ".farmed_0002.jpg.abc123.tmp").write_bytes(b"half")
    make_demo_dataset("salmon", out, **FAST)
    assert (out / "farmed" / "farmed_0002.jpg").exists()
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / MARKER_NAME).read_text())["complete"] is True


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reef, salmon"):
        make_demo_dataset("koi", tmp_path / "x")
    with pytest.raises(ValueError, match="seed"):
        make_demo_dataset("reef", tmp_path / "x", seed=-1)
    with pytest.raises(ValueError, match="image_size"):
        make_demo_dataset("reef", tmp_path / "x", image_size=8)
    assert not (tmp_path / "x").exists()


def test_salmon_not_separable_by_a_global_statistic(tmp_path: Path) -> None:
    s = make_demo_dataset("salmon", tmp_path / "salmon", scale=0.2, progress=False)
    rows, labels = [], []
    for label, cls in enumerate(("wild", "farmed")):
        for p in sorted((s.out / cls).glob("*.jpg")):
            rows.append(global_stats(p))
            labels.append(label)
    y = np.array(labels)
    acc = {k: best_threshold_accuracy(np.array([r[k] for r in rows]), y) for k in rows[0]}
    assert all(a < 0.9 for a in acc.values()), acc


def test_threshold_helper() -> None:
    y = np.array([0, 0, 1, 1])
    assert best_threshold_accuracy(np.array([1.0, 2.0, 3.0, 4.0]), y) == 1.0
    assert best_threshold_accuracy(np.array([4.0, 3.0, 2.0, 1.0]), y) == 1.0
    assert best_threshold_accuracy(np.array([1.0, 3.0, 2.0, 4.0]), y) == 0.75
