"""The full data check: label issues, aligned near-duplicates, outliers, quality, the HTML report, the
exclude list and `fieldid train --exclude`. Real MobileNetV2 features on tiny sets (64 px shapes,
scikit-image photos), shared per module so the backbone runs over each set once."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from helpers import make_shapes_dataset

skimage_data = pytest.importorskip("skimage.data")

from fieldid.cli import main as fieldid_main  # noqa: E402
from fieldid.training.datacheck import (DataReport, DeepOptions, check_dataset, check_notice,  # noqa: E402
                                        exclusions, format_report)
from fieldid.training.exclusions import read_exclude_file, write_exclude_file  # noqa: E402

# Photos moved into another class folder: (where it lies now, where it belongs).
FLIPS = {"square/circle_003.png": "circle", "triangle/square_005.png": "square", "circle/triangle_007.png": "triangle"}
SIZE = 64  # crop size of the feature pass: fast, and what the assertions below were written against
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick", "gravel",
          "immunohistochemistry", "hubble_deep_field", "clock")


def _flipped_shapes(root: Path) -> Path:
    make_shapes_dataset(root)
    for now, true in FLIPS.items():
        cls, name = now.split("/")
        shutil.move(root / true / name, root / cls / name)
    return root


@pytest.fixture(scope="module")
def flipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataReport]:
    """3 shape classes x 24 photos with three labels flipped, and its full check."""
    root = _flipped_shapes(tmp_path_factory.mktemp("flips") / "shapes")
    return root, check_dataset(root, deep=DeepOptions(image_size=SIZE), progress=False)


def _photo(name: str, side: int = 160) -> Image.Image:
    arr = getattr(skimage_data, name)()
    im = Image.fromarray(arr).convert("RGB")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def _messenger_copy(im: Image.Image) -> Image.Image:
    """Trimmed 4 % left / 1 % top / 2 % right / 5 % bottom, 70 % size, JPEG quality 60: phash misses it."""
    w, h = im.size
    im = im.crop((round(0.04 * w), round(0.01 * h), w - round(0.02 * w), h - round(0.05 * h)))
    im = im.resize((round(im.width * 0.7), round(im.height * 0.7)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataReport]:
    """train/ and test/ of distinct real photos, plus a messenger copy of a test photo in train/."""
    root = tmp_path_factory.mktemp("leak") / "photos"
    for i, name in enumerate(PHOTOS):
        part = "test" if i % 4 == 3 else "train"
        cls = "a" if i % 2 else "b"
        (root / part / cls).mkdir(parents=True, exist_ok=True)
        _photo(name).save(root / part / cls / f"{name}.png")
    # coffee (i=2) -> train/b; rocket (i=3) -> test/a: its copy goes into train/a.
    _messenger_copy(_photo("rocket")).save(root / "train" / "a" / "rocket_whatsapp.jpg", quality=60)
    return root, check_dataset(root, deep=DeepOptions(), progress=False)


# -- label issues -------------------------------------------------------------------------------

def test_planted_flips_are_the_top_label_issues(flipped: tuple[Path, DataReport]) -> None:
    _, report = flipped
    top = report.label_issues[:len(FLIPS)]
    assert {r["file"] for r in top} == set(FLIPS)
    assert all(r["suggested"] == FLIPS[r["file"]] and r["given"] == r["file"].split("/")[0] for r in top)
    assert all(0.5 < r["score"] <= 1 for r in top)
    # Everything else the probe flags scores lower than every planted flip.
    assert all(r["score"] < min(t["score"] for t in top) for r in report.label_issues[len(FLIPS):])
    assert report.deep is not None and report.deep["image_size"] == SIZE and report.deep["probe"]["folds"] == 5
    text = format_report(report)
    assert "circle/triangle_007.png: given circle, suggested triangle" in text


def test_confused_pairs_need_both_directions_above_chance() -> None:
    from fieldid.training.labelissues import confused_pairs

    names = ["g0", "g1", "g2", "g3"]
    counts = [100, 100, 100, 100]
    ordinal = np.diag([80, 80, 80, 80])
    ordinal[0, 1], ordinal[1, 0] = 12, 10  # grades 0 and 1 mixed up both ways
    ordinal[2, 3], ordinal[1, 2], ordinal[3, 0] = 1, 1, 1
    pairs = confused_pairs(ordinal, counts, names)
    assert [p["classes"] for p in pairs] == [["g0", "g1"]] and pairs[0]["counts"] == [12, 10]
    one_way = ordinal.copy()
    one_way[1, 0] = 0  # only g0 -> g1: a systematic slip, not an unclear boundary
    assert confused_pairs(one_way, counts, names) == []
    uniform = np.diag([80] * 4) + 2 - np.diag([2] * 4)  # every off-diagonal cell the same: chance
    assert confused_pairs(uniform, counts, names) == []


# -- near-duplicates ----------------------------------------------------------------------------

def test_near_duplicate_across_splits_found(leaky: tuple[Path, DataReport]) -> None:
    _, report = leaky
    pair = ("train/a/rocket_whatsapp.jpg", "test/a/rocket.png")
    leaks = [r for r in report.leakage if {r["a"], r["b"]} == set(pair)]
    assert len(leaks) == 1 and leaks[0]["match"] == "aligned" and leaks[0]["kinds"] == ["cross-split"]
    assert report.near_duplicates == []  # the perceptual hash alone misses this copy
    # Nothing else: the other photos are all different.
    assert [{r["a"], r["b"]} for r in report.duplicate_pairs] == [set(pair)]
    assert [r for r in report.leakage if {r["a"], r["b"]} != set(pair)] == []


def test_bench_data_counts_the_sets_own_pairs_in_any_split(leaky: tuple[Path, DataReport], tmp_path: Path) -> None:
    """bench data: a pair the unplanted check linked is the set's own wherever the planted run's val draw puts it."""
    from fieldid.training.bench_data import SHEET_SIDE, count_dups, linked_pairs, pairs_sheet

    root, report = leaky
    own = linked_pairs(report)
    assert frozenset(("train/a/rocket_whatsapp.jpg", "test/a/rocket.png")) in own
    fs = frozenset
    # Unplanted: x and y were a pair inside train/ (not cross-split). Planted: val took y, and the copy c of x
    # matched x (planted), y (x's own duplicate) and z (nothing the check ever linked).
    set_pairs = {fs(("train/x", "train/y"))}
    reported = {fs(("train/x", "val/c")), fs(("train/x", "train/y")), fs(("val/c", "train/y")), fs(("val/c", "t/z"))}
    row = count_dups(reported, {fs(("train/x", "val/c"))}, {"val/c": "train/x"}, set_pairs)
    assert row["found"] == 1.0 and row["own_pairs"] == 2
    assert row["false_pairs"] == 0.75 and row["false_pairs_new"] == 0.5  # 1 of the 2 not the set's own
    assert row["copy_matches"] == 3 and row["copy_false"] == round(1 / 3, 3)
    # The sheet a person judges the set's own pairs by: one row per reported cross-split pair.
    sheet = pairs_sheet(root, [r for r in report.leakage if "cross-split" in r["kinds"]], tmp_path / "own.jpg")
    assert sheet is not None
    with Image.open(sheet) as im:
        assert im.format == "JPEG" and im.size == (2 * SHEET_SIDE + 8, SHEET_SIDE + 26)


def test_near_duplicate_pairs_unit() -> None:
    from fieldid.training.datacheck import DeepOptions as Opts
    from fieldid.training.neighbours import DEFAULT_DUP_SIMILARITY, near_duplicate_pairs, thumbnail

    assert Opts().dup_similarity == DEFAULT_DUP_SIMILARITY  # one default, two modules (one torch-free)
    photos = [_photo(n) for n in PHOTOS[:6]]
    copies = [_messenger_copy(photos[1]), photos[4].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    thumbs = np.stack([thumbnail(im) for im in photos + copies])
    assert [(i, j) for i, j, _, _ in near_duplicate_pairs(thumbs)] == [(1, 6), (4, 7)]


def test_near_duplicate_with_its_frame_trimmed_off() -> None:
    """A faint photo in a dark frame (a solar cell, a scan) and a copy cropped inside the frame.

    The copy's exposure differs from the whole original (the frame was most of its contrast), and
    its crop falls between the coarse trims: the match must be judged on the aligned window.
    """
    from fieldid.training.neighbours import near_duplicate_pairs, thumbnail

    def framed(name: str) -> Image.Image:
        inner = np.asarray(_photo(name, 150).convert("L").resize((150, 150)), dtype=np.float32)
        faint = 150 + (inner - inner.mean()) * 0.6  # a low-contrast subject, like a cell's surface
        out = np.full((166, 166), 20.0)
        out[8:158, 8:158] = faint
        return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).convert("RGB")

    photos = [framed(n) for n in (*PHOTOS[:6], PHOTOS[9], PHOTOS[11])]  # moon and brick: nearly flat at 0.6x
    inside = photos[2].crop((9, 10, 157, 158))  # the frame trimmed off: 5.4-6 % per side
    inside = inside.resize((110, 110), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    inside.save(buf, "JPEG", quality=70)
    copy = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    thumbs = np.stack([thumbnail(im) for im in [*photos, copy]])
    assert [(i, j) for i, j, _, _ in near_duplicate_pairs(thumbs)] == [(2, 8)]


def test_two_copies_of_one_photo_both_pair_with_it() -> None:
    """An original, a near-lossless copy and a messenger copy: all three pairs, though the
    original's best match is the first copy (a leak through the second must not go unseen)."""
    from fieldid.training.neighbours import copy_thumbnail, near_duplicate_pairs, thumbnail

    photos = [_photo(n) for n in PHOTOS[:6]]
    x = photos[1]
    w, h = x.size
    copies_of_x = []
    for quality, scale, trim in ((95, 1.0, 0), (50, 0.6, 0.04)):
        im = x.crop((round(trim * w), 0, w, h - round(trim * h)))
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        copies_of_x.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    ims = [*photos, *copies_of_x]
    thumbs, copies = np.stack([thumbnail(im) for im in ims]), np.stack([copy_thumbnail(im) for im in ims])
    assert [(i, j) for i, j, _, _ in near_duplicate_pairs(thumbs, copies=copies)] == [(1, 6), (1, 7), (6, 7)]


def _cell(seed: int, side: int = 192) -> Image.Image:
    """A solar cell of one module: the layout every cell shares (shading, three busbars) and its own fine grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = 60 + 120 * xx + 60 * yy
    for y in (0.25, 0.5, 0.75):
        base = base - 100 * (np.abs(yy - y) < 0.015)
    grain = np.asarray(Image.fromarray(rng.uniform(0, 255, (96, 96)).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(base + 8 * (grain - 128) / 128, 0, 255).astype(np.uint8)).convert("RGB")


def test_full_check_keeps_a_phash_match_only_when_the_fine_detail_agrees(tmp_path: Path) -> None:
    """Cells of one module match by pHash (the layout); the full check keeps only the soft re-shot of the same cell."""
    root = tmp_path / "cells"
    for k in range(26):
        part, cls = ("test" if k >= 24 else "train"), ("a" if k % 2 else "b")
        (root / part / cls).mkdir(parents=True, exist_ok=True)
        _cell(k).save(root / part / cls / f"cell{k:02d}.png")
    _cell(0).filter(ImageFilter.GaussianBlur(1.0)).save(root / "test" / "b" / "cell00_soft.png")
    fast = check_dataset(root, near_threshold=24, progress=False)
    assert sum(len(g) for g in fast.near_duplicates) > 10  # the layout alone links most cells by pHash
    full = check_dataset(root, near_threshold=24, deep=DeepOptions(image_size=SIZE), progress=False)
    assert full.near_duplicates == [["train/b/cell00.png", "test/b/cell00_soft.png"]]
    assert full.deep is not None and full.deep["phash_not_confirmed"] > 10
    assert {frozenset((r["a"], r["b"])) for r in full.leakage} == {
        frozenset(("test/b/cell00_soft.png", "train/b/cell00.png"))}  # no conflict between two different cells
    assert "pHash matches left out" in format_report(full)


def test_flat_photos_confirm_no_phash_match() -> None:
    """Two blank frames of different grey share a pHash; with no detail they are not confirmed."""
    from fieldid.training.neighbours import PHASH_DETAIL, THUMB_SIDE, detail_similarity, thumbnail

    thumbs = np.stack([np.full((THUMB_SIDE, THUMB_SIDE, 3), grey, np.uint8) for grey in (90, 160)]
                      + [thumbnail(_cell(k)) for k in range(22)])
    sims = detail_similarity(thumbs, [(0, 1), (2, 3)])
    assert sims[0] < PHASH_DETAIL and sims[1] < PHASH_DETAIL  # two different cells: no match either
    assert detail_similarity(thumbs, [(2, 2)])[0] > 0.99  # a photo and itself


def test_flat_photos_match_nothing() -> None:
    """Blank frames have no structure to correlate; with the set's mean subtracted (20 photos or
    more) they would otherwise all look alike, whatever their grey."""
    from fieldid.training.neighbours import MIN_CENTRED, near_duplicate_pairs

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (MIN_CENTRED, 48, 48, 3)).astype(np.uint8)  # 20 unrelated frames
    greys = np.stack([np.full((48, 48, 3), g, dtype=np.uint8) for g in (120, 136)])
    assert near_duplicate_pairs(np.concatenate([noise, greys])) == []


def test_a_large_photo_is_held_to_its_own_copy_standard() -> None:
    """A 300-px photo keeps >= 0.99 to a messenger copy of itself; a look-alike of it (a sixth of
    its middle replaced) reaches the 0.95 threshold but not that standard, while a real messenger
    copy does."""
    from fieldid.training.neighbours import copy_thumbnail, near_duplicate_pairs, thumbnail

    photos = [_photo(n, 300) for n in PHOTOS[:6]]
    x = photos[1]
    w, h = x.size
    look_alike = x.copy()
    look_alike.paste(_photo("camera", 300).resize(x.size).crop((w // 3, h // 3, w // 3 + w // 6, h // 3 + h // 6)),
                     (w // 3, h // 3))
    for extra, expected in ((look_alike, []), (_messenger_copy(x), [(1, 6)])):
        ims = [*photos, extra]
        thumbs, copies = np.stack([thumbnail(im) for im in ims]), np.stack([copy_thumbnail(im) for im in ims])
        assert [(i, j) for i, j, _, _ in near_duplicate_pairs(thumbs)] == [(1, 6)]  # the threshold alone: both
        assert [(i, j) for i, j, _, _ in near_duplicate_pairs(thumbs, copies=copies)] == expected


# -- outliers and quality -----------------------------------------------------------------------

def test_outlier_far_from_every_class() -> None:
    from fieldid.training.neighbours import knn_outliers

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 3
    y = np.repeat([0, 1, 2], 30)
    x = centres[y] + rng.normal(size=(90, 64))
    x = np.vstack([x, rng.normal(size=(1, 64)) * 3 - centres.mean(0) * 4])  # a photo of something else
    y = np.append(y, 1)
    found = knn_outliers(np.abs(x), y)
    assert [r["index"] for r in found] == [90]


def test_quality_flags_blurry_and_dark_photos() -> None:
    from fieldid.training.quality import flag_quality, measure

    base = _photo("astronaut", 512)
    crops = [base.crop((x, y, x + 160, y + 160)) for x in range(0, 320, 45) for y in range(0, 320, 80)]
    assert len(crops) >= 24
    blurred = crops[3].filter(ImageFilter.GaussianBlur(6))
    dark = ImageEnhance.Brightness(crops[5]).enhance(0.12)
    flags = flag_quality([measure(im) for im in [*crops, blurred, dark]])
    n = len(crops)
    assert n in {r["index"] for r in flags["blurry"]}
    assert {r["index"] for r in flags["dark"]} == {n + 1}
    assert flags["bright"] == [] and flags["odd_size"] == [] and flags["odd_aspect"] == []


# -- the feature cache --------------------------------------------------------------------------

def test_feature_cache_is_reused_and_keyed_by_file(flipped: tuple[Path, DataReport], tmp_path: Path) -> None:
    src, first = flipped
    assert first.deep["features_computed"] == 72 and first.deep["features_from_cache"] == 0
    # The dataset moved elsewhere with its hidden cache (copy2 keeps mtimes): nothing is recomputed.
    root = tmp_path / "shapes"
    shutil.copytree(src, root, copy_function=shutil.copy2)
    again = check_dataset(root, deep=DeepOptions(image_size=SIZE), progress=False)
    assert (again.deep["features_from_cache"], again.deep["features_computed"]) == (72, 0)
    assert Path(again.deep["cache_file"]) == root / ".fieldid-cache" / f"features-mobilenet_v2-{SIZE}.npz"
    assert [(r["file"], r["suggested"]) for r in again.label_issues] == [(r["file"], r["suggested"])
                                                                         for r in first.label_issues]
    edited = root / "circle" / "circle_000.png"
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    third = check_dataset(root, deep=DeepOptions(image_size=SIZE), progress=False)
    assert (third.deep["features_from_cache"], third.deep["features_computed"]) == (71, 1)


def test_cached_features_equal_the_training_pipeline(flipped: tuple[Path, DataReport], tmp_path: Path) -> None:
    """load_or_compute_features == what training's decode cache + eval transform feed the backbone."""
    import torch

    from fieldid.training.data import CachedImageDataset, ImageCache, eval_transform
    from fieldid.training.features import load_or_compute_features
    from fieldid.training.models import classifier_modules, create_model, get_backbone

    root, _ = flipped
    paths = sorted(root.rglob("*.png"))[:6]
    ours = load_or_compute_features(paths, "mobilenet_v2", SIZE, root=root, cache_dir=tmp_path / "cache")
    again = load_or_compute_features(paths, "mobilenet_v2", SIZE, root=root, cache_dir=tmp_path / "cache")
    spec = get_backbone("mobilenet_v2").preprocess(SIZE)
    ds = CachedImageDataset(ImageCache(paths, [0] * len(paths), resize_size=spec.resize_size,
                                       interpolation=spec.interpolation), eval_transform(spec))
    model = create_model("mobilenet_v2", None).eval()
    seen: list[torch.Tensor] = []
    head = model.get_submodule(classifier_modules(model)[0][0])
    hook = head.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(torch.stack([ds[i][0] for i in range(len(ds))]))
    hook.remove()
    np.testing.assert_allclose(ours, seen[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ours, again)


# -- acting on it: exclude list, relabel CSV, training ------------------------------------------

def test_exclusions_keep_the_test_copy_and_both_conflicts(leaky: tuple[Path, DataReport]) -> None:
    _, report = leaky
    ex = exclusions(report, ["duplicate"])
    assert list(ex) == ["train/a/rocket_whatsapp.jpg"]  # the test photo stays: the test set is unchanged
    assert ex["train/a/rocket_whatsapp.jpg"].startswith("duplicate of test/a/rocket.png")
    with pytest.raises(ValueError, match="unknown exclude kind"):
        exclusions(report, ["typo"])


def test_probe_at_chance_level_is_not_acted_on(leaky: tuple[Path, DataReport]) -> None:
    """The leaky set's classes a/b are arbitrary: the probe cannot beat the majority answer, so its
    disagreements are shown with a warning but never written to an exclude list."""
    _, report = leaky
    assert report.deep["probe"]["better_than_majority"] is False and report.label_issues
    assert exclusions(report, ["label"]) == {}
    assert "no better than always answering the commonest class" in format_report(report)


def test_exclude_file_round_trip(tmp_path: Path) -> None:
    f = write_exclude_file(tmp_path / "x.txt", {"a/1.jpg": "blurry (sharpness 3.1)", "b/2 #1.jpg": "x", "c/3.jpg": ""},
                           header="two lines\nof header")
    assert f.read_text().splitlines()[:2] == ["# two lines", "# of header"]
    # A name the format cannot hold (" #") is left out rather than misread later.
    assert read_exclude_file(f) == {"a/1.jpg": "blurry (sharpness 3.1)", "c/3.jpg": ""}


def test_make_split_exclude_keeps_every_other_split(flipped: tuple[Path, DataReport]) -> None:
    from fieldid.training.data import make_split
    from fieldid.training.images import DataError

    root, _ = flipped
    plain = make_split(root, exclude={})
    drop = {"circle/circle_000.png": "blurry", "square/circle_003.png": "label issue"}
    split = make_split(root, exclude=drop)
    where = {p: k for k, rows in plain.files.items() for p, _ in rows}
    assert {e["file"]: e["reason"] for e in split.excluded} == drop
    assert all(e["split"] == where[e["file"]] for e in split.excluded)
    assert {k: [r for r in rows if r[0] not in drop] for k, rows in plain.files.items()} == split.files
    with pytest.raises(DataError, match="none of its 1 path"):
        make_split(root, exclude={"elsewhere/x.jpg": ""})


def test_excluded_photos_left_out_of_training_and_recorded(flipped: tuple[Path, DataReport], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from fieldid.training.data import load_split

    src, _ = flipped
    root = tmp_path / "shapes"
    shutil.copytree(src, root, copy_function=shutil.copy2)
    ex, relabel = tmp_path / "exclude.txt", tmp_path / "relabel.csv"
    assert fieldid_main(["data", "check", str(root), "--image-size", str(SIZE), "--write-exclude", str(ex),
                         "--exclude-kinds", "label", "--write-relabel", str(relabel), "--json",
                         str(tmp_path / "r.json")]) == 0
    listed = read_exclude_file(ex)
    assert set(FLIPS) <= set(listed) and all(listed[f].startswith("label issue: given") for f in FLIPS)
    assert relabel.read_text().splitlines()[0] == "file,given_label,suggested_label,score,self_confidence,unclear_boundary"
    capsys.readouterr()
    run = tmp_path / "run"
    assert fieldid_main(["train", "--data", str(root), "--out", str(run), "--exclude", str(ex), "--epochs", "1",
                         "--image-size", "32", "--batch-size", "16", "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    notice = [ln for ln in err.splitlines() if "data check of" in ln]
    assert len(notice) == 1 and f"{len(listed)} label issues" in notice[0] and "--exclude" in notice[0]
    split = load_split(run / "split.json")
    used = {p for rows in split.files.values() for p, _ in rows}
    assert not used & set(listed)
    assert {e["file"]: e["reason"] for e in split.excluded} == listed
    assert len(used) == 72 - len(listed)


def test_check_notice_only_when_many_issues(tmp_path: Path) -> None:
    assert check_notice(tmp_path) is None  # no check ran: nothing read, nothing said
    cache = tmp_path / ".fieldid-cache"
    cache.mkdir()
    summary = {"date": "2026-12-05T10:00:00", "photos": 1000, "suspected": {"label issues": 5, "outliers": 2}}
    (cache / "check-summary.json").write_text(json.dumps(summary))
    assert check_notice(tmp_path) is None  # 0.7 % of the photos
    summary["suspected"]["label issues"] = 30
    (cache / "check-summary.json").write_text(json.dumps(summary))
    assert check_notice(tmp_path).startswith("data check of 2026-12-05: 30 label issues, 2 outliers among 1000 photos")


# -- the report ---------------------------------------------------------------------------------

@pytest.mark.browser
def test_report_renders_in_chromium(flipped: tuple[Path, DataReport], leaky: tuple[Path, DataReport],
                                    browser: object, tmp_path: Path) -> None:
    from fieldid.training.datareport import write_html_report

    for name, (_, report) in (("flips", flipped), ("leak", leaky)):
        page_file = write_html_report(report, tmp_path / f"{name}.html")
        html = page_file.read_text()
        assert "http://" not in html and "https://" not in html  # no CDN, nothing to fetch
        page = browser.new_page(viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
        outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else outside.append(r.url))
        page.goto(page_file.resolve().as_uri())
        count = lambda sid: int(page.get_attribute(f"section#{sid}", "data-count"))  # noqa: E731
        cards = lambda sid: page.locator(f"section#{sid} .card").count()  # noqa: E731
        assert count("label-issues") == len(report.label_issues) == cards("label-issues")
        assert page.locator("td[data-summary=label-issues]").inner_text() == str(len(report.label_issues))
        assert count("leakage") == len(report.leakage) == page.locator("section#leakage table.leaks tr").count() - 1
        bars = page.locator("#class-chart rect.bar")
        assert bars.count() == sum(1 for split in report.counts.values() for n in split.values() if n)
        assert sum(int(bars.nth(i).get_attribute("data-count")) for i in range(bars.count())) == \
            sum(sum(split.values()) for split in report.counts.values())
        images = page.locator("img")
        assert images.count() > 0 and all(
            page.evaluate("(i) => document.images[i].complete && document.images[i].naturalWidth > 0", i)
            for i in range(images.count()))
        shot = tmp_path / f"report-{name}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert outside == []
        page.close()
    _, flips_report = flipped
    assert len(flips_report.label_issues) >= len(FLIPS)


# -- bad input ----------------------------------------------------------------------------------

def _empty_class(root: Path) -> None:
    make_shapes_dataset(root, {"circle": 4, "square": 4})
    (root / "triangle").mkdir()


def _single_class(root: Path) -> None:
    make_shapes_dataset(root, {"circle": 4})


def _unreadable_class(root: Path) -> None:
    make_shapes_dataset(root, {"circle": 4, "square": 4})
    (root / "triangle").mkdir()
    for i in range(3):
        (root / "triangle" / f"t{i}.png").write_bytes(b"not a png at all")


@pytest.mark.parametrize("make, words", [(_empty_class, "class folder has no images"),
                                         (_single_class, "need at least 2 classes"),
                                         (_unreadable_class, "at least 2 readable photos per class")])
def test_bad_input_one_line_exit_2(make: object, words: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    make(root)  # type: ignore[operator]
    assert fieldid_main(["data", "check", str(root), "--image-size", "32"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and words in err


def test_bad_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_shapes_dataset(tmp_path / "data", {"circle": 3, "square": 3})
    for flags, words in ((["--exclude-kinds", "label,typo"], "unknown kind(s) typo"),
                         (["--report", str(tmp_path)], "is a folder"),
                         (["--model", "nonet"], "unknown model 'nonet'")):
        assert fieldid_main(["data", "check", str(root), *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and words in err


def test_some_unreadable_photos_are_listed_and_the_check_runs(tmp_path: Path) -> None:
    root = make_shapes_dataset(tmp_path / "data", {"circle": 6, "square": 6})
    (root / "square" / "broken.png").write_bytes(b"\x89PNG broken")
    report = check_dataset(root, deep=DeepOptions(image_size=32), progress=False)
    assert [s["file"] for s in report.skipped] == ["square/broken.png"]
    assert report.deep is not None and report.deep["features_computed"] == 12
