"""Tests for training.datacheck on tiny datasets built from scikit-image's real photos."""
from __future__ import annotations

import hashlib
import io
import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

skimage_data = pytest.importorskip("skimage.data")

from fieldid.training import datacheck  # noqa: E402
from fieldid.commands.data_check import main_check  # noqa: E402
from fieldid.training.datacheck import DataReport, check_dataset, format_report, hamming_pairs  # noqa: E402

# Real photos whose phashes are far apart (pairwise Hamming distance >= 20 at this size), so any
# near-duplicate the check reports among them would be a false positive.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick", "gravel",
          "immunohistochemistry", "hubble_deep_field", "clock")
SIDE = 128  # small files keep the whole module well under a second per test


@cache
def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB PIL image, longer side ``SIDE`` px."""
    arr = getattr(skimage_data, name)()
    im = Image.fromarray(arr).convert("RGB")
    im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return im


def save(im: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def near_copy(im: Image.Image) -> Image.Image:
    """The same photo re-shot by a messenger app: 90 % size, 10 % brighter, JPEG quality 40."""
    small = im.resize((int(im.width * 0.9), int(im.height * 0.9)), Image.Resampling.LANCZOS)
    bright = ImageEnhance.Brightness(small).enhance(1.1)
    buf = io.BytesIO()
    bright.save(buf, "JPEG", quality=40)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file below ``root``: proves the check is read-only."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_clean_flat(root: Path) -> None:
    """Flat tree, 3 classes (3/2/2 images), every photo distinct."""
    layout = {"cat": ["chelsea", "astronaut", "coffee"], "dog": ["rocket", "camera"], "owl": ["coins", "moon"]}
    for label, names in layout.items():
        for n in names:
            save(photo(n), root / label / f"{n}.jpg", quality=90)


# -- clean data: counts right, nothing flagged ------------------------------------------------

def test_clean_flat_dataset_has_no_findings(tmp_path: Path) -> None:
    make_clean_flat(tmp_path)
    before = snapshot(tmp_path)
    report = check_dataset(tmp_path, progress=False)
    assert snapshot(tmp_path) == before, "the check must not modify the dataset"
    assert not report.presplit
    assert report.counts == {"all": {"cat": 3, "dog": 2, "owl": 2}}
    assert report.imbalance_ratio == pytest.approx(1.5)
    assert report.unreadable == report.exact_duplicates == report.near_duplicates == []
    assert report.leakage == [] and report.tiny_images == []
    assert report.ok


def test_distinct_photos_are_never_near_duplicates(tmp_path: Path) -> None:
    # Every sample photo plus two disjoint crops of one photo: all must stay apart at threshold 4.
    for i, n in enumerate(PHOTOS):
        save(photo(n), tmp_path / ("a" if i % 2 else "b") / f"{n}.png")
    big = Image.fromarray(skimage_data.astronaut())
    save(big.crop((0, 0, 256, 256)), tmp_path / "a" / "astro_top_left.png")
    save(big.crop((256, 256, 512, 512)), tmp_path / "b" / "astro_bottom_right.png")
    report = check_dataset(tmp_path, progress=False)
    assert report.near_duplicates == [] and report.exact_duplicates == [] and report.leakage == []
    assert report.ok


# -- each planted problem is found, and nothing else --------------------------------------------

def test_flat_dataset_findings(tmp_path: Path) -> None:
    make_clean_flat(tmp_path)
    # exact duplicate within a class
    (tmp_path / "cat" / "chelsea_copy.jpg").write_bytes((tmp_path / "cat" / "chelsea.jpg").read_bytes())
    # near duplicate within a class
    save(near_copy(photo("rocket")), tmp_path / "dog" / "rocket_whatsapp.jpg", quality=40)
    # the same photo filed under two classes (conflicting labels, exact match)
    (tmp_path / "owl" / "coffee.jpg").write_bytes((tmp_path / "cat" / "coffee.jpg").read_bytes())
    # corrupt files: random bytes, and a JPEG cut in half
    (tmp_path / "owl" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    jpeg = io.BytesIO()
    photo("brick").save(jpeg, "JPEG", quality=90)
    (tmp_path / "dog" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    # a tiny image (shorter side 20 px)
    save(photo("gravel").resize((40, 20)), tmp_path / "owl" / "tiny.png")
    before = snapshot(tmp_path)

    report = check_dataset(tmp_path, progress=False)

    assert snapshot(tmp_path) == before
    assert report.counts == {"all": {"cat": 4, "dog": 3, "owl": 4}}  # unreadable files not counted
    assert report.imbalance_ratio == pytest.approx(4 / 3)
    assert [u.split(":")[0] for u in report.unreadable] == ["dog/truncated.jpg", "owl/random.jpg"]
    assert all(": " in u and str(tmp_path) not in u for u in report.unreadable)  # reason, relative path
    assert report.exact_duplicates == [["cat/chelsea.jpg", "cat/chelsea_copy.jpg"],
                                       ["cat/coffee.jpg", "owl/coffee.jpg"]]
    assert report.near_duplicates == [["dog/rocket.jpg", "dog/rocket_whatsapp.jpg"]]
    assert report.leakage == [{"kinds": ["conflicting-labels"], "match": "exact", "distance": 0,
                               "a": "cat/coffee.jpg", "b": "owl/coffee.jpg",
                               "splits": ["all", "all"], "labels": ["cat", "owl"]}]
    assert report.tiny_images == ["owl/tiny.png"]
    assert not report.ok


def test_presplit_cross_split_leakage(tmp_path: Path) -> None:
    train, test = tmp_path / "train", tmp_path / "test"
    for label, names in {"cat": ["chelsea", "astronaut", "coffee"], "dog": ["rocket"]}.items():
        for n in names:
            save(photo(n), train / label / f"{n}.png")
    save(photo("camera"), test / "cat" / "camera.png")
    save(photo("coins"), test / "dog" / "coins.png")
    # exact leak: a train photo copied into test
    (test / "cat" / "astronaut.png").write_bytes((train / "cat" / "astronaut.png").read_bytes())
    # near leak: a re-encoded train photo in test
    save(near_copy(photo("rocket")), test / "dog" / "rocket_small.jpg", quality=40)

    report = check_dataset(tmp_path, progress=False)

    assert report.presplit
    assert report.counts == {"train": {"cat": 3, "dog": 1}, "test": {"cat": 2, "dog": 2}}
    assert report.imbalance_ratio == pytest.approx(3.0)  # from train only
    # Files are listed in dataset order: train before test.
    assert report.exact_duplicates == [["train/cat/astronaut.png", "test/cat/astronaut.png"]]
    assert report.near_duplicates == [["train/dog/rocket.png", "test/dog/rocket_small.jpg"]]
    leaks = {(r["a"], r["b"]): r for r in report.leakage}
    assert list(leaks) == [("train/cat/astronaut.png", "test/cat/astronaut.png"),
                           ("train/dog/rocket.png", "test/dog/rocket_small.jpg")]
    assert all(r["kinds"] == ["cross-split"] for r in report.leakage)
    assert all(r["splits"] == ["train", "test"] for r in report.leakage)
    assert leaks[("train/cat/astronaut.png", "test/cat/astronaut.png")]["match"] == "exact"
    near = leaks[("train/dog/rocket.png", "test/dog/rocket_small.jpg")]
    assert near["match"] == "near" and 0 <= near["distance"] <= 4
    assert report.unreadable == [] and report.tiny_images == []
    assert not report.ok


def test_near_match_covers_every_exact_copy(tmp_path: Path) -> None:
    """A near duplicate of a photo that also has a byte copy in another split leaks via the copy."""
    save(photo("coffee"), tmp_path / "train" / "a" / "coffee.png")
    save(photo("chelsea"), tmp_path / "train" / "b" / "chelsea.png")
    save(near_copy(photo("coffee")), tmp_path / "train" / "a" / "coffee_small.jpg")
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "coffee.png").write_bytes((tmp_path / "train" / "a" / "coffee.png").read_bytes())

    report = check_dataset(tmp_path, progress=False)

    # The near group holds the representative only; the exact group lists the copies.
    assert report.near_duplicates == [["train/a/coffee.png", "train/a/coffee_small.jpg"]]
    assert report.exact_duplicates == [["train/a/coffee.png", "val/a/coffee.png"]]
    pairs = {(r["a"], r["b"], r["match"]) for r in report.leakage}
    assert pairs == {("train/a/coffee.png", "val/a/coffee.png", "exact"),
                     ("train/a/coffee_small.jpg", "val/a/coffee.png", "near")}
    assert all(r["kinds"] == ["cross-split"] for r in report.leakage)


def test_class_with_no_readable_image_gives_infinite_ratio(tmp_path: Path) -> None:
    save(photo("coffee"), tmp_path / "good" / "coffee.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    report = check_dataset(tmp_path, progress=False)
    assert report.counts == {"all": {"bad": 0, "good": 1}}
    assert math.isinf(report.imbalance_ratio)
    d = report.to_dict()
    assert d["imbalance_ratio"] is None
    json.dumps(d, allow_nan=False)  # strict JSON
    assert "inf" in format_report(report)


def test_missing_dir_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(datacheck.DataError):
        check_dataset(tmp_path / "nope", progress=False)


def test_progress_goes_to_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    make_clean_flat(tmp_path)  # 7 files
    monkeypatch.setattr(datacheck, "PROGRESS_EVERY", 3)
    check_dataset(tmp_path, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["datacheck: read 3/7", "datacheck: read 6/7", "datacheck: read 7/7"]
    check_dataset(tmp_path, progress=False)
    assert capsys.readouterr() == ("", "")


# -- the vectorised Hamming search ---------------------------------------------------------------

def test_hamming_pairs_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, size=60, dtype=np.uint64)
    # Plant close hashes: flip 1..6 bits of some bases.
    close = [int(base[i]) ^ sum(1 << int(b) for b in rng.choice(64, size=k, replace=False))
             for i, k in zip(range(0, 30, 3), range(1, 11))]
    hashes = [int(h) for h in base] + close + [int(base[5])]
    brute = sorted((i, j, bin(hashes[i] ^ hashes[j]).count("1"))
                   for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                   if bin(hashes[i] ^ hashes[j]).count("1") <= 6)
    assert brute, "the planted pairs must be found"
    assert sorted(hamming_pairs(hashes, 6)) == brute
    monkeypatch.setattr(datacheck, "_BLOCK_ELEMENTS", 50)  # force many small row blocks
    assert sorted(hamming_pairs(hashes, 6)) == brute
    assert hamming_pairs(hashes[:1], 64) == [] and hamming_pairs([], 4) == []


def test_swar_popcount_matches_numpy() -> None:
    x = np.random.default_rng(2).integers(0, 2**64 - 1, size=1000, dtype=np.uint64, endpoint=True)
    x[:3] = [0, 2**64 - 1, 1 << 63]
    expected = np.array([bin(int(v)).count("1") for v in x])
    assert np.array_equal(datacheck._popcount64_swar(x).astype(int), expected)
    assert np.array_equal(datacheck._popcount64(x).astype(int), expected)


# -- report formatting and the CLI helper ----------------------------------------------------------

def test_format_report_table(tmp_path: Path) -> None:
    make_clean_flat(tmp_path)
    text = format_report(check_dataset(tmp_path, progress=False))
    lines = text.splitlines()
    assert any(ln.split() == ["cat", "3"] for ln in lines)
    assert any(ln.split() == ["total", "7"] for ln in lines)
    assert "imbalance ratio (all, largest/smallest class): 1.50" in text
    assert "exact duplicate groups: 0" in text
    assert lines[-1] == "OK: no problems found"


def test_main_check_prints_table_then_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_clean_flat(tmp_path)
    (tmp_path / "dog" / "rocket_copy.jpg").write_bytes((tmp_path / "dog" / "rocket.jpg").read_bytes())
    assert main_check([str(tmp_path), "--fast"]) == 0  # findings still mean "the check ran"
    out = capsys.readouterr().out.splitlines()
    data = json.loads(out[-1])
    assert data["counts"] == {"all": {"cat": 3, "dog": 3, "owl": 2}}
    assert data["exact_duplicates"] == [["dog/rocket.jpg", "dog/rocket_copy.jpg"]]
    assert data["ok"] is False
    assert any(ln.split() == ["dog", "3"] for ln in out[:-1])
    assert out[-2] == "PROBLEMS FOUND: review the findings above"


def test_main_check_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    make_clean_flat(data_dir)
    target = out_dir / "report.json"
    assert main_check([str(data_dir), "--fast", "--json", str(target), "--near-threshold", "2", "--min-side", "200"]) == 0
    stdout = capsys.readouterr().out
    assert "{" not in stdout  # the JSON went to the file, not stdout
    saved = json.loads(target.read_text())
    assert saved["near_threshold"] == 2 and saved["min_side"] == 200
    assert len(saved["tiny_images"]) == 7  # every 128 px photo is below 200 px
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.json"]  # no temp file left
    assert saved == DataReport(**saved).to_dict()  # the JSON round-trips into the dataclass


def test_main_check_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_check([str(tmp_path / "missing")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "missing" in err


def test_main_check_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main_check(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 4)" in text and "(default: 32)" in text and "(default: no file;" in text


def test_module_is_torch_free() -> None:
    """``fieldid data check`` must start fast and run where torch is not installed."""
    import subprocess
    import sys

    code = "import sys, fieldid.training.datacheck; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
