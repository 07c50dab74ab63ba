"""Near-duplicates (aligned thumbnails, candidates from backbone features) and outliers (k-NN in
feature space). Only the full check uses this module (numpy, Pillow and torch's CPU products).

**Near-duplicates** (:func:`near_duplicate_pairs`). Feature cosine alone does not separate copies
from look-alikes: measured on the benchmark sets (docs/data-check.md), a resized, re-encoded,
slightly cropped copy kept a MobileNetV2 cosine of only 0.43-0.92 to its original, while different
photos of one class reached 0.94-0.98. So:

1. *candidates*: for every photo its :data:`CANDIDATES` nearest photos by backbone-feature cosine
   (when features are given), by a whole-frame thumbnail descriptor and by a descriptor of the
   frame's middle (which a crop of a few % barely moves);
2. *coarse verification*: the best normalised correlation of 12-px colour thumbnails over the
   crops a copy may have had (each side trimmed by 0, 2.5 or 5 %, in either photo) and a
   horizontal flip (training flips photos, so a mirrored copy leaks too);
3. *alignment*: pairs that reach :data:`REFINE_FROM` there have their crop searched finely
   (each side's trim a step either way, 1.25 % then 0.625 %, up to 6.25 %), and the aligned
   correlation decides. Same pixels in the same place correlate >= 0.95 after resizing and JPEG;
   different photos of the same scene rarely do. The coarse grid alone left a copy up to 1.25 %
   of a side out of place, which on low-contrast photos (solar cells) cost a third of the
   planted copies (docs/data-check.md);
4. *the photo's own standard*: the pair must also be about as similar as a messenger copy of the
   photo is to the photo itself (:func:`copy_thumbnail`, less :data:`SELF_MARGIN`; the lower of
   the two photos' bars) — a large photo survives resizing and JPEG almost intact, so its
   look-alikes (the other cells of a solar module) no longer pass, where a tiny photo's own copy
   would not. (A rule that kept only each photo's best match did little more on the benchmark and
   dropped a second copy of a photo altogether: its original's best match is the first copy.)

**pHash confirmation** (:func:`detail_similarity`): the full check keeps a pHash match only when
the aligned pair's fine detail correlates (:data:`PHASH_DETAIL`): a pHash sees the layout, which
every cell of a solar module shares.

The set's mean descriptor is subtracted first (sets of 20 photos or more): in a set of aligned photos (solar cells, faces,
scans) the shared layout would otherwise make every pair look alike (on the solar-cell set it
halved the look-alike pairs; on the other sets it changed nothing measurable). Each channel of a
descriptor is made zero-mean and the descriptor unit-length, so the
correlation ignores brightness and contrast; the pair must therefore also agree on them
(mean of each channel within :data:`MAX_MEAN_SHIFT` of 255, contrast within a factor
:data:`MAX_CONTRAST_RATIO`), or a dark and a bright photo with the same layout would match (the
benchmark's featureless "not a face" patches did). The aligned window is what is compared, not
the whole photo: a copy cropped inside a dark frame has lost most of the frame's contrast. A flat
photo (thumbnail spread under :data:`FLAT_SPREAD` grey levels) matches nothing here: it has no
structure to correlate, and after the set's mean is subtracted all flat photos would look the same
(byte copies of it are still exact duplicates).

The matrix products run in torch on one thread: they are many small products, and on a busy
CPU a BLAS thread pool waits for its other threads far longer than it computes (measured on 2
loaded cores: 0.24 s per photo's views with numpy's threaded OpenBLAS, 0.007 s on one thread).

**Outliers** (:func:`knn_outliers`): for every photo and every class, the mean cosine distance to
its ``k`` nearest photos of that class; a photo is far from a class when that distance is above
what the class's own photos show (robust z-score against the class's distribution). A photo far
from *every* class (a photo of something else, another domain, a blank frame) is an outlier; its
score is the smallest of those z-scores.

All-pairs work runs in row blocks, so memory stays flat with thousands of photos.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["CANDIDATES", "DEFAULT_DUP_SIMILARITY", "DEFAULT_OUTLIER_Z", "PHASH_DETAIL", "copy_thumbnail",
           "detail_similarity", "knn_outliers",
           "near_duplicate_pairs",
           "one_thread", "thumbnail", "unit_rows"]

DEFAULT_DUP_SIMILARITY = 0.95
DEFAULT_OUTLIER_Z = 5.0
# Nearest photos per photo and per descriptor that are verified. 20 left 2 of elpv's 33 planted copies
# unverified: low-contrast solar cells, trimmed up to 5 % per side, whose originals ranked 28th and
# 32nd by the frame's middle (98th and 147th by the whole frame); with 40 all 33 are verified. On those
# 2,657 thumbnails (no features) near_duplicate_pairs took 11.2 s with 20 and with 40, timed once each.
CANDIDATES = 40
THUMB_SIDE = 48  # stored per photo (uint8 RGB, 6.9 kB)
VIEW_SIDE = 12  # the coarse pass: cheap, and forgiving of a misaligned crop
TRIM_UNIT = 0.00625  # trims are whole multiples of this fraction of a side
CROP_STEPS = (0.0, 0.025, 0.05)  # coarse trims off each side, independently
REFINE_UNITS = (2, 1)  # then each side's trim is searched a step either way: 1.25 %, then 0.625 %
MAX_TRIM_UNITS = 10  # 6.25 % per side at most
COPY_SCALE, COPY_SCALE_SMALL, COPY_QUALITY = 0.6, 1.3, 50  # the copy of copy_thumbnail
COPY_FROM_SIDE = 512
SELF_MARGIN = 0.015  # a pair must reach its photos' self-copy similarity less this (alignment is never exact)
FLAT_SPREAD = 0.25  # grey levels of standard deviation below which a thumbnail is flat (no structure survives)
DETAIL_CELL = THUMB_SIDE // VIEW_SIDE  # the detail is each pixel less the mean of its 4 x 4 square
PHASH_DETAIL = 0.7  # fine-detail correlation a pHash match must reach in the full check (:func:`detail_similarity`)
REFINE_FROM = 0.85  # coarse similarity below which no planted copy was seen (lowest: 0.89, on the solar cells)
CENTRE_TRIM = 0.05  # the middle used to draw candidates: the frame less 5 % per side
MIN_CENTRED = 20  # photos needed before the set's mean descriptor is subtracted
MAX_MEAN_SHIFT = 20.0  # grey levels a copy's channel means may move (re-encoding, a mild edit)
MAX_CONTRAST_RATIO = 1.5
_KNN = 5
_MIN_CLASS = 4  # a class with fewer photos has no distribution to compare against
_BLOCK_ELEMENTS = 1 << 23


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block (small products: see the module docstring)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float32 through torch (call inside :func:`one_thread`)."""
    return (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            @ torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))).numpy()


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero)."""
    x = np.asarray(features, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def thumbnail(image: Image.Image) -> np.ndarray:
    """The whole frame as a ``THUMB_SIDE`` square (aspect squashed, box filter), uint8 RGB."""
    return np.asarray(image.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), dtype=np.uint8)


def copy_thumbnail(image: Image.Image) -> np.ndarray:
    """:func:`thumbnail` of the copy a messenger app would make of ``image``: 60 % size (130 % under
    64 px, which no app shrinks further), JPEG quality 50. How similar a photo stays to such a copy
    of itself sets how similar a pair of its must be (:func:`near_duplicate_pairs`)."""
    import io

    im = image.convert("RGB")
    if max(im.size) > COPY_FROM_SIDE:  # a 12-MP photo: copy a 512-px version (no less degraded, far cheaper)
        im.thumbnail((COPY_FROM_SIDE, COPY_FROM_SIDE), Image.Resampling.BOX)
    scale = COPY_SCALE if min(im.size) >= 64 else COPY_SCALE_SMALL
    im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=COPY_QUALITY)
    buf.seek(0)
    with Image.open(buf) as copy:
        return thumbnail(copy)


def _sampling(lo: float, hi: float, n_out: int = VIEW_SIDE, n_in: int = THUMB_SIDE) -> np.ndarray:
    """Matrix that box-averages the fraction ``[lo, hi]`` of ``n_in`` samples into ``n_out`` cells."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for k in range(n_out):
        a = (lo + (hi - lo) * k / n_out) * n_in
        b = (lo + (hi - lo) * (k + 1) / n_out) * n_in
        for j in range(int(np.floor(a)), min(n_in, int(np.ceil(b)))):
            m[k, j] = max(0.0, min(b, j + 1) - max(a, j))
        m[k] /= m[k].sum()
    return m


# One (lo, hi) window per pair of trims; window 0 is the whole frame.
_WINDOWS = np.stack([_sampling(a, 1.0 - b) for a in CROP_STEPS for b in CROP_STEPS])
_COARSE_VIEWS = 2 * len(_WINDOWS) ** 2
_CROP_UNITS = tuple(round(c / TRIM_UNIT) for c in CROP_STEPS)


def _trim_table(n_out: int) -> np.ndarray:
    """``[lo, hi]``: the ``(n_out, THUMB_SIDE)`` window that trims lo and hi :data:`TRIM_UNIT` off the two
    ends of a side (``n_out`` cells: the fine search's views, or the full thumbnail)."""
    return np.stack([np.stack([_sampling(lo * TRIM_UNIT, 1.0 - hi * TRIM_UNIT, n_out)
                               for hi in range(MAX_TRIM_UNITS + 1)]) for lo in range(MAX_TRIM_UNITS + 1)])


_TRIM_TABLE = _trim_table(VIEW_SIDE)


def _normalise(v: np.ndarray) -> np.ndarray:
    """``(n, side, side, channels)`` -> unit rows, each channel zero-mean first."""
    v = v - v.mean(axis=(1, 2), keepdims=True)
    flat = v.reshape(len(v), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


def _resample(images: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """``(n, T, T, C)`` images -> ``(n, Wy, Wx, V, V, C)``: every row window x every column window."""
    n, t, _, c = images.shape
    k, side = windows.shape[:2]
    flat = windows.reshape(-1, t)  # (k*V, T)
    rows = _mm(flat, images.transpose(1, 0, 2, 3).reshape(t, -1))  # (k*V, n*T*C): rows resampled
    rows = rows.reshape(k * side, n, t, c).transpose(2, 1, 0, 3).reshape(t, -1)  # (T, n*k*V*C)
    both = _mm(flat, rows).reshape(k, side, n, k, side, c)  # (x, w, n, y, v, c)
    return both.transpose(2, 3, 0, 4, 1, 5)  # (n, y, x, v, w, c)


def _window_views(thumbs: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``(n, V, V, C)``: one window (``(1, V, T)``, the same on both axes) of every thumbnail, not normalised."""
    out = [_resample(thumbs[i:i + 256].astype(np.float32), window) for i in range(0, len(thumbs), 256)]
    v = np.concatenate(out)
    return v.reshape(len(v), VIEW_SIDE, VIEW_SIDE, v.shape[-1])


def _whole(thumbs: np.ndarray) -> np.ndarray:
    """Whole-frame descriptors of ``(n, T, T, 3)`` thumbnails."""
    return _normalise(_window_views(thumbs, _WINDOWS[:1]))


def _centres(thumbs: np.ndarray, centred: bool) -> np.ndarray:
    """Descriptors of each thumbnail's middle (:data:`CENTRE_TRIM` off every side), minus their mean when ``centred``.

    A crop of a few % moves the whole frame's edges but barely the middle: on the solar cells
    this ranked a copy's original among its nearest photos where the whole frame did not.
    """
    v = _normalise(_window_views(thumbs, _sampling(CENTRE_TRIM, 1.0 - CENTRE_TRIM)[None]))
    return _residual(v, v.mean(axis=0)) if centred else v


def _views(thumbs: np.ndarray) -> np.ndarray:
    """``(n, views, dim)``: every trimmed window of each thumbnail and of its mirror image."""
    t = thumbs.astype(np.float32)
    both = np.concatenate([_resample(t, _WINDOWS), _resample(t[:, :, ::-1], _WINDOWS)], axis=1)
    n, c = len(t), t.shape[-1]
    flat = _normalise(both.reshape(-1, VIEW_SIDE, VIEW_SIDE, c))
    return flat.reshape(n, -1, flat.shape[-1])


def _residual(desc: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Descriptors minus the set's mean descriptor, unit length again."""
    r = desc - mean
    return r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-6)


def _whole_descriptors(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(whole_raw, whole, mean, centred)``: each thumbnail's whole-frame view before normalising, its
    descriptor less the set's mean, that mean, and whether it was subtracted (:data:`MIN_CENTRED` photos or more).
    """
    whole_raw = _window_views(thumbs, _WINDOWS[:1])
    raw = _normalise(whole_raw)
    # A mean of a few photos is mostly those photos (of two, centring makes them opposites).
    centred = len(thumbs) >= MIN_CENTRED
    mean = raw.mean(axis=0) if centred else np.zeros(raw.shape[1], dtype=np.float32)
    return whole_raw, _residual(raw, mean), mean, centred


def _flat(thumbs: np.ndarray) -> np.ndarray:
    """Per thumbnail: its spread is under :data:`FLAT_SPREAD` (no structure to match or confirm)."""
    return thumbs.reshape(len(thumbs), -1).std(axis=1) < FLAT_SPREAD


def _top_neighbours(unit: np.ndarray, m: int) -> np.ndarray:
    """Indices of each row's ``m`` most similar other rows (by dot product)."""
    n = len(unit)
    m = min(m, n - 1)
    out = np.zeros((n, m), dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // max(1, n))
    for start in range(0, n, rows):
        sims = _mm(unit[start:start + rows], unit.T)
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start:start + rows] = np.argpartition(-sims, m - 1, axis=1)[:, :m]
    return out


def _unit_views(raw: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(..., V, V, C)`` views -> unit descriptors minus the set's mean (as :func:`_normalise` + :func:`_residual`)."""
    v = raw - raw.mean(dim=(-3, -2), keepdim=True)
    v = v.flatten(-3)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6) - mean
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _refine(thumbs: np.ndarray, pairs: list[tuple[int, int, int]], whole_raw: np.ndarray, whole: np.ndarray,
            mean: np.ndarray) -> list[tuple[float, bool, tuple[int, int, int, int], bool]]:
    """Similarity of each ``(i, j, coarse view)`` after aligning the crop finely, and whether the two agree in exposure.

    Starts from the coarse view's trims and mirror and searches the trims a step either way
    (:data:`REFINE_UNITS`: 1.25 %, then 0.625 %): both ends of the rows, then both ends of the
    columns (a crop's rows and columns are independent). The best window of ``i`` is compared
    with the whole of ``j`` at :data:`VIEW_SIDE` (``whole``; ``whole_raw`` the same views before
    normalising); the exposure check (channel means within
    :data:`MAX_MEAN_SHIFT`, contrast within :data:`MAX_CONTRAST_RATIO`) compares that window,
    not the whole of ``i``: trimming a dark border off a copy changes its contrast a lot. Also returns
    the trims (``lo_y, hi_y, lo_x, hi_x`` in :data:`TRIM_UNIT`) and whether ``i`` was mirrored.
    """
    out: list[tuple[float, bool, tuple[int, int, int, int], bool]] = []
    table = torch.from_numpy(_TRIM_TABLE)
    mean_t = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32))
    whole_t = torch.from_numpy(np.ascontiguousarray(whole, dtype=np.float32))
    mirror = _COARSE_VIEWS // 2
    for start in range(0, len(pairs), 256):
        chunk = pairs[start:start + 256]
        b = len(chunk)
        rows = np.arange(b)
        x = torch.from_numpy(np.stack([thumbs[i] if v < mirror else thumbs[i][:, ::-1]
                                       for i, _, v in chunk]).astype(np.float32))
        target = whole_t[[j for _, j, _ in chunk]]
        trims = np.array([_coarse_trims(v % mirror) for _, _, v in chunk], dtype=np.int64)  # lo_y, hi_y, lo_x, hi_x
        raw = None
        for step in REFINE_UNITS:
            for axis in (0, 2):  # rows, then columns
                opts = np.clip(trims[:, axis:axis + 2, None] + np.array([-step, 0, step]), 0, MAX_TRIM_UNITS)
                search = table[opts[:, 0, :, None], opts[:, 1, None, :]].reshape(b, 9, VIEW_SIDE, THUMB_SIDE)
                other = axis ^ 2
                fixed = table[trims[:, other], trims[:, other + 1]].unsqueeze(1)  # (b, 1, V, T)
                wy, wx = (search, fixed) if axis == 0 else (fixed, search)
                r = torch.einsum("bkvt,btsc->bkvsc", wy, x)  # rows resampled
                views = torch.einsum("blws,bkvsc->bklvwc", wx, r).reshape(b, 9, VIEW_SIDE, VIEW_SIDE, -1)
                sims = torch.einsum("bkd,bd->bk", _unit_views(views, mean_t), target)
                k = sims.argmax(dim=1).numpy()
                trims[:, axis] = opts[rows, 0, k // 3]
                trims[:, axis + 1] = opts[rows, 1, k % 3]
                raw = views[rows, k]
        best = torch.einsum("bd,bd->b", _unit_views(raw, mean_t), target).numpy()
        raw_np = raw.numpy()
        for m, (_, j, v) in enumerate(chunk):
            out.append((float(best[m]), _same_exposure(raw_np[m], whole_raw[j]),
                        (int(trims[m, 0]), int(trims[m, 1]), int(trims[m, 2]), int(trims[m, 3])), v >= mirror))
    return out


def _detail_rows(x: torch.Tensor) -> torch.Tensor:
    """``(b, T, T, C)`` -> unit rows of the fine detail: each pixel less the mean of its :data:`DETAIL_CELL` square
    (what the :data:`VIEW_SIDE` views keep is taken out)."""
    b, t, _, c = x.shape
    k = t // DETAIL_CELL
    cells = x.reshape(b, k, DETAIL_CELL, k, DETAIL_CELL, c)
    d = (cells - cells.mean(dim=(2, 4), keepdim=True)).reshape(b, -1)
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def detail_similarity(thumbs: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Correlation of the fine detail of each pair at :data:`THUMB_SIDE` px, after aligning the pair.

    The pair is aligned the way :func:`near_duplicate_pairs` aligns a copy (the best trimmed or mirrored
    coarse view either way, then the fine crop search); the detail is each pixel less the mean of its
    4 x 4 square, less the set's mean detail (sets of :data:`MIN_CENTRED` photos or more: the busbars or
    frame every photo shares), and the correlation is that of the two unit rows. It is what tells two
    photos with the same layout apart: different solar cells of one module share busbars and a pHash
    within 4 bits, but not their cracks, grain and busbar segments. A soft and a sharp photo of the
    same cell still correlate (blur lowers the detail on both sides alike); a different photo does not.
    """
    n = len(thumbs)
    if not len(pairs):
        return np.zeros(0, dtype=np.float32)
    with one_thread():
        whole_raw, whole, mean, centred = _whole_descriptors(thumbs)
        todo: list[tuple[int, int, int]] = []
        for i, j in pairs:
            best: tuple[float, tuple[int, int, int]] = (-np.inf, (i, j, 0))
            for a, b in ((i, j), (j, i)):
                s = _residual(_views(thumbs[a:a + 1])[0], mean) @ whole[b]
                k = int(s.argmax())
                if s[k] > best[0]:
                    best = (float(s[k]), (a, b, k))
            todo.append(best[1])
        fine = _refine(thumbs, todo, whole_raw, whole, mean)
        t = torch.from_numpy(thumbs.astype(np.float32))
        dmean = torch.zeros(1)
        if centred:
            dmean = sum(_detail_rows(t[k:k + 256]).sum(dim=0) for k in range(0, n, 256)) / n
        table = torch.from_numpy(_trim_table(THUMB_SIDE))  # the same windows as the fine search, at full size
        out = np.zeros(len(todo), dtype=np.float32)
        for start in range(0, len(todo), 256):  # bounded memory: 256 aligned 48-px views at a time
            chunk, fine_c = todo[start:start + 256], fine[start:start + 256]
            x = torch.stack([t[a].flip(1) if flip else t[a] for (a, _, _), (_, _, _, flip) in zip(chunk, fine_c)])
            tr = torch.tensor([trims for _, _, trims, _ in fine_c])
            view = torch.einsum("bvt,btsc,bws->bvwc", table[tr[:, 0], tr[:, 1]], x, table[tr[:, 2], tr[:, 3]])
            a_rows = _unit(_detail_rows(view) - dmean)
            b_rows = _unit(_detail_rows(t[[b for _, b, _ in chunk]]) - dmean)
            out[start:start + len(chunk)] = (a_rows * b_rows).sum(dim=1).numpy()
    # A flat photo has no detail to compare (its row would be the set's mean, or rounding noise):
    # it confirms nothing, as it matches nothing in near_duplicate_pairs (byte copies stay exact duplicates).
    flat = _flat(thumbs)
    out[[bool(flat[i] or flat[j]) for i, j in pairs]] = 0.0
    return out


def _same_exposure(a: np.ndarray, b: np.ndarray) -> bool:
    """Channel means within :data:`MAX_MEAN_SHIFT` grey levels and contrast within :data:`MAX_CONTRAST_RATIO`."""
    shift = np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))).max()
    ca, cb = float(a.std()) + 1.0, float(b.std()) + 1.0
    return bool(shift <= MAX_MEAN_SHIFT and max(ca, cb) <= MAX_CONTRAST_RATIO * min(ca, cb))


def _coarse_trims(view: int) -> tuple[int, int, int, int]:
    """``(lo_y, hi_y, lo_x, hi_x)`` trims (in :data:`TRIM_UNIT`) of an unmirrored coarse view index."""
    per_axis = len(CROP_STEPS) ** 2
    wy, wx = divmod(view, per_axis)
    n = len(CROP_STEPS)
    return (_CROP_UNITS[wy // n], _CROP_UNITS[wy % n], _CROP_UNITS[wx // n], _CROP_UNITS[wx % n])


def near_duplicate_pairs(thumbs: np.ndarray, features: np.ndarray | None = None, *,
                         threshold: float = DEFAULT_DUP_SIMILARITY, candidates: int = CANDIDATES,
                         copies: np.ndarray | None = None) -> list[tuple[int, int, float, float | None]]:
    """Photo pairs that are the same photo up to resizing, re-encoding, a slight crop or a mirror.

    Args:
        thumbs: ``(n, THUMB_SIDE, THUMB_SIDE, 3)`` uint8 from :func:`thumbnail`.
        features: backbone features ``(n, dim)`` to draw candidates from too (None: thumbnails only).
        threshold: aligned-thumbnail similarity at or above which a pair is a near-duplicate.
        candidates: nearest photos per photo (by features and by thumbnail) that are verified.
        copies: :func:`copy_thumbnail` of every photo (None: ``threshold`` alone decides). A pair
            must then also reach the lower of its two photos' similarity to their own copies, less
            :data:`SELF_MARGIN`: a 300-px photo keeps 0.99 to a messenger copy of itself and its
            look-alikes (other cells of a solar module) reach 0.95-0.98, while a 25-px photo keeps
            only 0.95-0.98 to its own copy.

    Returns:
        ``(i, j, similarity, cosine)`` with ``i < j``, sorted; ``cosine`` is the feature cosine
        (None without features).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> t = rng.integers(0, 255, (3, THUMB_SIDE, THUMB_SIDE, 3)).astype(np.uint8)
        >>> t[1] = t[0][:, ::-1]  # a mirrored copy
        >>> [(i, j) for i, j, _, _ in near_duplicate_pairs(t)]
        [(0, 1)]
    """
    n = len(thumbs)
    if copies is not None and copies.shape != thumbs.shape:
        raise ValueError(f"copies {copies.shape} must match thumbs {thumbs.shape}")
    if n < 2:
        return []
    with one_thread():
        whole_raw, whole, mean, centred = _whole_descriptors(thumbs)
        partners: list[set[int]] = [set() for _ in range(n)]
        sources = [whole, _centres(thumbs, centred)] + ([unit_rows(features)] if features is not None else [])
        flat = _flat(thumbs)
        for unit in sources:
            for i, row in enumerate(_top_neighbours(unit, candidates)):
                for j in row:
                    if not (flat[i] or flat[j]):
                        partners[i].add(int(j))
                        partners[int(j)].add(i)
        # Coarse: best[i, j] = (similarity, view) of the best trimmed/mirrored view of i against the whole of j.
        best: dict[tuple[int, int], tuple[float, int]] = {}
        batch = 32  # photos whose views are made in one product (bounded memory, few calls)
        for start in range(0, n, batch):
            views = _views(thumbs[start:start + batch])
            for k, v in enumerate(views):
                v = _residual(v, mean)
                i = start + k
                others = sorted(partners[i])
                if others:
                    s = _mm(v, whole[others].T)
                    for j, view, sim in zip(others, s.argmax(axis=0), s.max(axis=0)):
                        best[(i, j)] = (float(sim), int(view))
        # Fine: the pairs the coarse pass cannot rule out, in the direction that matched best.
        todo: list[tuple[int, int, int]] = []
        for (i, j), (s, view) in best.items():
            if i < j:
                back = best.get((j, i), (-1.0, 0))
                if max(s, back[0]) >= REFINE_FROM:
                    todo.append((i, j, view) if s >= back[0] else (j, i, back[1]))
        fine = _refine(thumbs, todo, whole_raw, whole, mean)
    need = np.full(n, threshold)
    if copies is not None:
        with one_thread():
            own = (whole * _residual(_whole(copies), mean)).sum(axis=1)  # each photo vs its own copy
        need = np.maximum(threshold, own - SELF_MARGIN)
    unit_f = unit_rows(features) if features is not None else None
    out = []
    for (a, b, _), (sim, same_light, _, _) in zip(todo, fine):
        if sim >= min(need[a], need[b]) and same_light:
            i, j = min(a, b), max(a, b)
            cos = round(float(unit_f[i] @ unit_f[j]), 4) if unit_f is not None else None
            out.append((i, j, round(sim, 4), cos))
    out.sort()
    return out


def _class_knn_distance(u: np.ndarray, labels: np.ndarray, classes: Sequence[int], k: int) -> np.ndarray:
    """``d[i, c]``: mean cosine distance of photo ``i`` to its ``k`` nearest photos of class ``c`` (itself excluded)."""
    n = len(u)
    d = np.full((n, len(classes)), np.nan)
    members = [np.flatnonzero(labels == c) for c in classes]
    rows = max(1, _BLOCK_ELEMENTS // max(1, n))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = _mm(u[start:stop], u.T)
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never your own neighbour
        for ci, idx in enumerate(members):
            kk = min(k, len(idx) - 1)
            if kk < 1:
                continue
            part = sims[:, idx]
            top = -np.partition(-part, kk - 1, axis=1)[:, :kk]
            # A photo of this class has one member fewer to choose from (itself): -inf is dropped.
            top = np.where(np.isfinite(top), top, np.nan)
            d[start:stop, ci] = 1.0 - np.nanmean(top, axis=1)
    return d


def knn_outliers(features: np.ndarray, labels: Sequence[int], *, z_limit: float = DEFAULT_OUTLIER_Z,
                 k: int = _KNN) -> list[dict[str, Any]]:
    """Photos far from every class: ``{"index", "score", "nearest_class"}``, highest score first.

    ``score`` is the smallest robust z-score of the photo's k-NN distance over the classes with at
    least 4 photos (z of class ``c`` = (distance to ``c`` - median of ``c``'s own photos'
    distances) / (1.4826 x their MAD)); ``nearest_class`` is the class where that minimum falls.
    """
    y = np.asarray(labels, dtype=np.int64)
    classes = [c for c in np.unique(y) if (y == c).sum() >= _MIN_CLASS]
    if not classes:
        return []
    u = unit_rows(features)
    with one_thread():
        d = _class_knn_distance(u, y, classes, k)
    z = np.full_like(d, np.nan)
    for ci, c in enumerate(classes):
        own = d[y == c, ci]
        med = float(np.median(own))
        scale = max(1.4826 * float(np.median(np.abs(own - med))), 1e-3)
        z[:, ci] = (d[:, ci] - med) / scale
    score = np.nanmin(z, axis=1)
    nearest = np.nanargmin(z, axis=1)
    out = [{"index": int(i), "score": round(float(score[i]), 2), "nearest_class": int(classes[nearest[i]])}
           for i in np.flatnonzero(score > z_limit)]
    out.sort(key=lambda r: (-r["score"], r["index"]))
    return out
