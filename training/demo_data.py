"""Built-in synthetic demo datasets, so fieldid can be tried end to end without any photos.

``make_demo_dataset("reef", "data/reef")`` writes a flat ImageFolder tree
``OUT/<class>/<class>_<i:04d>.jpg`` (RGB JPEG, quality 90); the trainer makes the splits.

* **reef** - nine Caribbean reef-fish species drawn procedurally (body outline, fins, tail and
  colour pattern per species) at random pose and size on underwater backgrounds (water gradient,
  caustics, sand, coral and rocks, distant fish), with turbidity, blur, lighting changes and
  sometimes occlusion. Class counts are deliberately imbalanced, as field data is.
* **salmon** - ``wild`` vs ``farmed`` fillet close-ups. Wild flesh is deep red-orange with thin,
  widely spaced fat lines; farmed flesh is paler with thick, dense white fat bands. A simulated
  phone camera (auto white balance and exposure towards a random target) makes the *global*
  colour statistics of the two classes overlap, so a model has to look at the band structure
  and colour together rather than at the mean colour of the frame.

The images are synthetic and only meant to exercise the pipeline; they are not field data.

Everything is deterministic: image ``i`` of class ``c`` is drawn from
``np.random.default_rng([seed, c, i])``, so the same seed gives byte-identical files and a
smaller ``scale`` gives a prefix of a larger one. Torch-free on purpose (numpy + Pillow only):
``fieldid data demo`` must start fast and run where torch is not installed.
"""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fieldid.cli_common import UsageError

from .records import atomic_write_bytes, atomic_write_json

__all__ = [
    "DEMO_DATASETS",
    "DemoSummary",
    "demo_counts",
    "make_demo_dataset",
    "render_demo_image",
]

DEMO_DATASETS = ("reef", "salmon")

# Bump when the pictures change, so an old demo folder is regenerated instead of reused.
GENERATOR_VERSION = 2  # 2: hard field cases (turbidity, half-hidden, motion blur, orange light)
MARKER_NAME = ".fieldid_demo.json"
JPEG_QUALITY = 90
MIN_PER_CLASS = 3

# Images per class at scale 1.0, in seeding order (the class index seeds the generator).
# Reef is imbalanced on purpose (largest / smallest = 6) like real survey data; salmon is balanced.
_COUNTS: dict[str, dict[str, int]] = {
    "reef": {
        "sergeant_major": 180,
        "blue_tang": 140,
        "yellowtail_snapper": 110,
        "stoplight_parrotfish": 90,
        "foureye_butterflyfish": 70,
        "french_angelfish": 55,
        "queen_angelfish": 45,
        "lionfish": 35,
        "spotted_drum": 30,
    },
    "salmon": {"wild": 300, "farmed": 300},
}

Colour = np.ndarray  # (3,) or (H, W, 3) float32 in [0, 1]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class DemoSummary:
    """What :func:`make_demo_dataset` produced (or found already in place)."""

    name: str
    out: Path
    counts: dict[str, int]
    seed: int


MAX_SCALE = 100.0  # 100x the built-in counts: tens of thousands of photos, a few GB


def demo_counts(name: str, scale: float = 1.0) -> dict[str, int]:
    """Images per class for demo ``name`` at ``scale`` (at least ``MIN_PER_CLASS`` each)."""
    _check_name(name)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        # 1e9 would generate photos until the disk is full.
        raise UsageError(f"scale must be a number in (0, {MAX_SCALE:g}], got {scale!r}")
    return {c: max(MIN_PER_CLASS, int(math.floor(n * scale + 0.5))) for c, n in _COUNTS[name].items()}


def render_demo_image(name: str, class_name: str, rng: np.random.Generator, image_size: int = 192) -> Image.Image:
    """Draw one demo image of ``class_name`` (before JPEG encoding)."""
    _check_name(name)
    if class_name not in _COUNTS[name]:
        raise UsageError(f"unknown class {class_name!r} for demo {name!r}; valid: {', '.join(_COUNTS[name])}")
    arr = _render_reef(class_name, rng, image_size) if name == "reef" else _render_salmon(class_name, rng, image_size)
    return _to_image(arr)


def make_demo_dataset(
    name: str,
    out: str | Path,
    *,
    seed: int = 0,
    scale: float = 1.0,
    image_size: int = 192,
    progress: bool = True,
) -> DemoSummary:
    """Write demo dataset ``name`` as a flat ImageFolder tree under ``out``.

    Idempotent: when ``out`` already holds a complete demo written with the same arguments it
    returns at once. A demo folder written with other arguments (or left half-written by an
    interrupted run) is replaced. Any other non-empty folder is left untouched.

    Raises:
        ValueError: unknown ``name``, bad ``seed``/``scale``/``image_size``, or ``out`` is a
            non-empty folder that this generator did not write.
    """
    counts = demo_counts(name, scale)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 32 <= image_size <= 2048:
        raise UsageError(f"image_size must be an integer in [32, 2048], got {image_size!r}")
    seed, image_size = int(seed), int(image_size)
    out = Path(out)
    summary = DemoSummary(name=name, out=out, counts=counts, seed=seed)
    want = _marker(name, seed, scale, image_size, counts, complete=True)
    if _prepare_out(out, want):
        return summary

    # An in-progress marker first: if this run is interrupted, the next one knows that the
    # half-written folder is ours to replace rather than a user's data to protect.
    atomic_write_json(out / MARKER_NAME, _marker(name, seed, scale, image_size, counts, complete=False))
    report = _Progress(name, sum(counts.values()), enabled=progress)
    for ci, (cls, n) in enumerate(counts.items()):
        (out / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, ci, i])
            img = render_demo_image(name, cls, rng, image_size)
            atomic_write_bytes(out / cls / f"{cls}_{i:04d}.jpg", _jpeg_bytes(img))
            report.step()
    atomic_write_json(out / MARKER_NAME, want)
    report.done(out)
    return summary


# --------------------------------------------------------------------------------------------
# Output folder: marker, idempotency, refusing to overwrite user data
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DEMO_DATASETS:
        raise UsageError(f"unknown demo dataset {name!r}; valid names: {', '.join(DEMO_DATASETS)}")


def _marker(name: str, seed: int, scale: float, image_size: int, counts: dict[str, int], *, complete: bool) -> dict:
    return {
        "generator": "fieldid.demo_data",
        "version": GENERATOR_VERSION,
        "name": name,
        "seed": seed,
        "scale": float(scale),
        "image_size": image_size,
        "counts": counts,
        "complete": complete,
    }


def _read_marker(out: Path) -> dict | None:
    """The marker in ``out`` if there is a well-formed one, else None."""
    try:
        m = json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(m, dict) and m.get("generator") == "fieldid.demo_data" and isinstance(m.get("counts"), dict)):
        return None
    if not all(isinstance(k, str) and "/" not in k and isinstance(v, int) for k, v in m["counts"].items()):
        return None
    return m


def _expected_files(counts: dict[str, int]) -> set[str]:
    return {f"{c}/{c}_{i:04d}.jpg" for c, n in counts.items() for i in range(n)}


def _is_temp(rel: str) -> bool:
    """Leftover of an interrupted atomic write (``.NAME.XXXX.tmp``, see records.atomic_write_bytes)."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp")


def _prepare_out(out: Path, want: dict) -> bool:
    """Make ``out`` ready for writing; True when it already holds exactly the wanted demo."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.iterdir()):
        return False
    old = _read_marker(out)
    if old is None:
        raise UsageError(
            f"{out} is not empty and is not a fieldid demo folder (no valid {MARKER_NAME}); "
            "refusing to overwrite it - choose a new or empty folder"
        )
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MARKER_NAME}
    if old == want and _expected_files(want["counts"]) <= present:
        return True
    # Only files this generator wrote may be replaced; anything else means a user added data.
    foreign = sorted(r for r in present - _expected_files(old["counts"]) if not _is_temp(r))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise UsageError(f"{out} holds files the demo generator did not write ({shown}); refusing to overwrite it")
    (out / MARKER_NAME).unlink()
    for rel in present:
        (out / rel).unlink()
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    return False


class _Progress:
    """A line on stderr about every 10 % (no dependency on tqdm; the output also reads well in CI logs)."""

    def __init__(self, name: str, total: int, *, enabled: bool) -> None:
        self.name, self.total, self.enabled, self.n, self.next_pct = name, total, enabled, 0, 10

    def step(self) -> None:
        self.n += 1
        pct = 100 * self.n // self.total
        if self.enabled and pct >= self.next_pct and self.n < self.total:
            print(f"demo {self.name}: {self.n}/{self.total} images ({pct}%)", file=sys.stderr, flush=True)
            self.next_pct = (pct // 10 + 1) * 10

    def done(self, out: Path) -> None:
        if self.enabled:
            print(f"demo {self.name}: {self.total} images written to {out}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Shared drawing helpers (float32 images in [0, 1], shape (S, S, 3))
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y); read-only because the cache shares them."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _smoothstep(e0: float | np.ndarray, e1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``e0`` to 1 at ``e1`` (``e0 > e1`` gives a falling step)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _coverage(dist_px: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) -> anti-aliased opacity."""
    return np.clip(0.5 - dist_px, 0.0, 1.0).astype(np.float32)


def _over(img: np.ndarray, colour: Colour, alpha: np.ndarray) -> np.ndarray:
    """Composite ``colour`` over ``img`` with per-pixel ``alpha``."""
    return img + (np.asarray(colour, dtype=np.float32) - img) * alpha[..., None]


def _mix(a: Colour, b: Colour, t: np.ndarray | float) -> np.ndarray:
    t = np.asarray(t, dtype=np.float32)
    if t.ndim:
        t = t[..., None]
    a = np.asarray(a, dtype=np.float32)
    return a + (np.asarray(b, dtype=np.float32) - a) * t


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field, roughly unit variance, with ``cells`` bumps across the image."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _noise_1d(rng: np.random.Generator, x: np.ndarray, knots: int, extent: float) -> np.ndarray:
    """Smooth random curve over ``[0, extent]`` evaluated at ``x`` (values ~N(0, 1))."""
    kx = np.linspace(0.0, extent, knots)
    return np.interp(x, kx, rng.standard_normal(knots)).astype(np.float32)


def _jitter(rng: np.random.Generator, rgb: Sequence[float], sd: float = 0.05) -> np.ndarray:
    """Per-individual colour variation around a species / product colour."""
    return np.clip(np.asarray(rgb, np.float32) * (1.0 + rng.normal(0.0, sd, 3)), 0.0, 1.0).astype(np.float32)


def _blob_distance(rng: np.random.Generator, size: int, cx: float, cy: float, r: float,
                   squash: float = 1.0) -> np.ndarray:
    """Signed distance (px) to an irregular blob: a circle with random low harmonics."""
    x, y = _grid(size)
    dx, dy = x - cx, (y - cy) / squash
    theta = np.arctan2(dy, dx)
    radius = np.full_like(dx, r)
    for k in range(2, 7):
        radius += r * rng.uniform(0.0, 0.22) / math.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return np.hypot(dx, dy) - radius


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# Share of photos that are hard the way the field has them (see _hard_case): enough that a good
# model is unsure on some held-out photos, so the fallback threshold rises above its floor and
# the demo shows photos going to the server by themselves.
HARD_CASE_SHARE = 0.18


def _motion_blur(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A camera (or fish) moving during the exposure: a line kernel at a random angle."""
    size = arr.shape[0]
    length = max(3, int(rng.uniform(0.04, 0.09) * size))
    angle = rng.uniform(0, np.pi)
    out = np.zeros_like(arr)
    for t in np.linspace(-0.5, 0.5, length):
        dx, dy = int(round(t * length * np.cos(angle))), int(round(t * length * np.sin(angle)))
        out += np.roll(arr, (dy, dx), axis=(0, 1))
    return out / length


def _hard_case(img: np.ndarray, water: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """One field difficulty: strong turbidity (reef), or motion blur; for fillets: orange light."""
    kind = rng.integers(0, 2)
    if water is not None and kind == 0:
        return _mix(img, water, rng.uniform(0.5, 0.7))  # murky water: the fish fades into it
    if water is None and kind == 0:
        # Orange market light (sodium / warm LEDs), beyond what auto white balance corrects.
        return img * np.array([rng.uniform(1.05, 1.2), rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.55)], np.float32)
    return _motion_blur(img, rng)


def _camera_finish(arr: np.ndarray, rng: np.random.Generator, blur_max: float) -> np.ndarray:
    """Sensor side of a phone camera: slight lens blur, then sensor noise."""
    s = arr.shape[0] / 192.0
    if rng.random() < 0.7:
        img = _to_image(arr).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, blur_max) * s))
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr + rng.normal(0.0, rng.uniform(0.004, 0.025), arr.shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Reef: fish geometry
# --------------------------------------------------------------------------------------------
#
# Each fish is drawn analytically in its own coordinate frame: ``u`` runs along the body from the
# snout (u = -1) to the tail base (u = +1), ``v`` points to the belly; both are in units of half
# the body length. A species is an outline (body profile, tail, fins) plus a paint function that
# colours every pixel from (u, v). Working per pixel gives anti-aliased edges and lets a pattern
# follow the body (stripes bend with it) at no extra cost.


@dataclass(frozen=True)
class Fin:
    """A dorsal (side=-1) or anal (side=+1) fin: heights above the body edge along ``u``."""

    points: tuple[tuple[float, float], ...]
    side: int = -1
    spines: int = 0  # > 0: the edge is cut into this many spines (lionfish, drum)
    notch: float = 0.0  # how deep the cuts between spines go (fraction of the height)


@dataclass(frozen=True)
class BodyShape:
    """Outline of a species, in half-body-length units."""

    depth: float  # largest half-height of the body
    head: float  # profile exponent at the snout; < 0.6 gives a blunt head
    rear: float  # profile exponent towards the tail; larger = slimmer rear
    peduncle: float  # half-height at the tail base, relative to depth
    arch: float  # the back bulges more than the belly by this fraction
    tail: str  # "fork", "lunate", "round" or "truncate"
    tail_len: float
    tail_spread: float  # half-height of the tail at its tip
    fork: float  # depth of the fork / crescent, as a fraction of tail_len
    fins: tuple[Fin, ...]
    pectoral: tuple[float, float, float, float, float]  # centre u, v, radii u, v, angle (rad)
    eye: tuple[float, float, float]  # u, height as a fraction of the back half-height, radius


@dataclass
class FishCoords:
    """Per-pixel coordinates of one fish, handed to the species' paint function."""

    u: np.ndarray
    v: np.ndarray
    vn: np.ndarray  # v relative to the body: -1 at the back edge, 0 mid-line, +1 at the belly
    htop: np.ndarray  # half-heights of the body above / below the mid-line at each u
    hbot: np.ndarray
    px: float  # pixels per unit (for anti-aliasing)
    depth: float
    fin_frac: np.ndarray  # 0 at a fin's base .. 1 at its edge
    fin_id: np.ndarray  # index into BodyShape.fins (-1 outside fins)
    tail_w: np.ndarray  # 0 at the tail base .. 1 at its tip
    tail_vr: np.ndarray  # 0 on the tail's mid-line .. 1 at its upper/lower edge
    pect_r: np.ndarray  # 0 at the pectoral fin's centre .. 1 at its edge
    pect_a: np.ndarray  # angle seen from the pectoral fin's base (for radial fin rays)

    def ellipse(self, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        """Anti-aliased opacity of an ellipse painted in fish coordinates."""
        rr = np.hypot((self.u - cu) / ru, (self.v - cv) / rv)
        return _coverage((rr - 1.0) * min(ru, rv) * self.px)

    def band(self, coord: np.ndarray, centre: float | np.ndarray, half_width: float | np.ndarray) -> np.ndarray:
        """Anti-aliased opacity of ``|coord - centre| < half_width`` (coord in fish units)."""
        return _coverage((np.abs(coord - centre) - half_width) * self.px)

    def scales(self, size: float) -> np.ndarray:
        """0..1 pattern of overlapping scale edges (crescents), for scaled species."""
        cu = self.u / size
        col = np.floor(cu)
        cq = self.v / size + 0.5 * (col % 2)
        fu, fq = cu - col, cq - np.floor(cq)
        # The exposed rear rim of each scale: a crescent that stops short of the cell's top and
        # bottom, so neighbouring rims read as separate scales rather than continuous lines.
        r = np.hypot(fu, fq - 0.5)
        rim = _smoothstep(0.14, 0.04, np.abs(r - 0.6)) * _smoothstep(0.48, 0.3, np.abs(fq - 0.5))
        return rim.astype(np.float32)


@dataclass
class FishPaint:
    """Colours (per pixel or constant) for the parts of one fish."""

    body: Colour
    fins: Colour
    tail: Colour
    pectoral: Colour | None = None  # default: the fin colour
    eye_ring: Colour = field(default_factory=lambda: np.array([0.75, 0.7, 0.4], np.float32))
    fin_opacity: float = 0.9


@dataclass(frozen=True)
class Species:
    shape: BodyShape
    paint: Callable[[FishCoords, np.random.Generator], FishPaint]


def _half_height(b: BodyShape, u: np.ndarray, depth: float) -> np.ndarray:
    """Body half-height along ``u``: a beta-like profile that keeps a peduncle at the tail."""
    t = np.clip((u + 1.0) * 0.5, 0.0, 1.0)
    tp = b.head / (b.head + b.rear)
    peak = tp**b.head * (1.0 - tp) ** b.rear
    base = t**b.head * (1.0 - t) ** b.rear / peak
    return (depth * (base * (1.0 - b.peduncle) + b.peduncle * t * t)).astype(np.float32)


@dataclass
class _Pose:
    cx: float
    cy: float
    length: float  # half body length in px
    angle: float
    facing_right: bool
    squeeze: float  # < 1: fish turned slightly away, looks shorter
    bend: float  # body curvature (swimming)
    flick: float  # extra sideways bend of the tail
    depth_scale: float  # individual variation of body depth


def _fish_geometry(b: BodyShape, pose: _Pose, size: int) -> tuple[FishCoords, dict[str, np.ndarray]]:
    """Fish-frame coordinates and the opacity of body, fins, tail and pectoral fin."""
    x, y = _grid(size)
    dx, dy = x - pose.cx, y - pose.cy
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    u = (dx * c + dy * s) / (pose.length * pose.squeeze)
    v = (-dx * s + dy * c) / pose.length
    if pose.facing_right:
        u = -u
    v = v - pose.bend * u * u - pose.flick * np.maximum(u - 0.3, 0.0) ** 2
    px = pose.length * min(1.0, pose.squeeze)
    depth = b.depth * pose.depth_scale

    h = _half_height(b, u, depth)
    htop, hbot = h * (1.0 + b.arch), h * (1.0 - b.arch)
    body = _coverage(np.maximum.reduce([-v - htop, v - hbot, u - 1.0, -1.0 - u]) * px)
    vn = np.where(v < 0, v / np.maximum(htop, 1e-3), v / np.maximum(hbot, 1e-3)).astype(np.float32)

    # Tail: widens from the peduncle to its tip; the trailing edge sets the tail type.
    u0, ped = 0.9, depth * b.peduncle * 1.15
    w = (u - u0) / b.tail_len
    hs = ped + (b.tail_spread - ped) * np.clip(w, 0.0, 1.0) ** 0.8
    vr = np.abs(v + b.arch * ped) / hs
    edge = np.clip(1.0 - vr, 0.0, 1.0)
    end = {
        "fork": 1.0 - b.fork * edge,
        "lunate": 1.0 - b.fork * (1.0 - np.clip(vr, 0, 1) ** 2),
        "round": 1.0 - 0.3 * (1.0 - np.sqrt(np.clip(1.0 - vr * vr, 0.0, 1.0))),
        "truncate": 1.0 - 0.05 * vr,
    }[b.tail]
    tail = _coverage(np.maximum.reduce([(vr - 1.0) * hs, (w - end) * b.tail_len, -w * b.tail_len]) * px)

    # Fins sit on the body edge; measured from the edge at a clamped u so that trailing
    # filaments behind the tail base stay attached to the peduncle.
    hc = _half_height(b, np.clip(u, -1.0, 0.97), depth)
    fins = np.zeros_like(u)
    fin_frac = np.zeros_like(u)
    fin_id = np.full(u.shape, -1, np.int8)
    for k, fin in enumerate(b.fins):
        fu, fh = (np.array(a, np.float32) for a in zip(*fin.points))
        hf = np.interp(u, fu, fh, left=0.0, right=0.0).astype(np.float32)
        if fin.spines:
            ww = (u - fu[0]) / (fu[-1] - fu[0])
            tips = (0.5 + 0.5 * np.cos(2 * math.pi * fin.spines * ww)) ** 4
            hf = hf * (1.0 - fin.notch * (1.0 - tips))
        e = (-v - hc * (1.0 + b.arch)) if fin.side < 0 else (v - hc * (1.0 - b.arch))
        a = _coverage(np.maximum(e - hf, -e - 0.12) * px) * (hf > 1e-3)
        take = a > fins
        fins = np.where(take, a, fins)
        fin_frac = np.where(take, np.clip(e / np.maximum(hf, 1e-3), 0.0, 1.0), fin_frac)
        fin_id = np.where(take, np.int8(k), fin_id)

    pu, pv, ru, rv, pa = b.pectoral
    du, dv = u - pu, v - pv * depth
    cp, sp = math.cos(pa), math.sin(pa)
    lu, lv = (du * cp + dv * sp) / ru, (-du * sp + dv * cp) / rv
    pr = np.hypot(lu, lv)
    pang = np.arctan2(lv, lu + 1.0).astype(np.float32)
    pect = _coverage((pr - 1.0) * min(ru, rv) * px)

    coords = FishCoords(u=u, v=v, vn=vn, htop=htop, hbot=hbot, px=px, depth=depth, fin_frac=fin_frac,
                        fin_id=fin_id, tail_w=np.clip(w, 0.0, 1.0), tail_vr=np.clip(vr, 0.0, 1.0), pect_r=pr,
                         pect_a=pang)
    return coords, {"body": body, "fins": fins, "tail": tail, "pectoral": pect}


def _draw_fish(img: np.ndarray, sp: Species, pose: _Pose, rng: np.random.Generator) -> np.ndarray:
    """Composite one fish (fins and tail behind the body, pectoral fin and eye on top)."""
    b = sp.shape
    f, alpha = _fish_geometry(b, pose, img.shape[0])
    paint = sp.paint(f, rng)
    op = paint.fin_opacity
    # Fin rays: faint stripes that make fins read as fins rather than flat shapes.
    rays = 0.82 + 0.18 * np.cos(2 * math.pi * f.u * 22.0)
    img = _over(img, paint.fins, alpha["fins"] * op * rays)
    tail_rays = 0.82 + 0.18 * np.cos(2 * math.pi * f.tail_vr * 5.0)
    img = _over(img, paint.tail, alpha["tail"] * op * tail_rays)

    # Round-body shading: darker rims, a soft highlight along the upper flank.
    vn = np.clip(f.vn, -1.0, 1.0)
    shade = 1.0 - 0.38 * np.abs(vn) ** 3 + 0.10 * np.exp(-(((vn + 0.35) / 0.3) ** 2))
    shade = shade * (1.0 + 0.05 * _smooth_noise(rng, img.shape[0], 9))
    body = np.asarray(paint.body, np.float32) * shade[..., None]
    img = _over(img, body, alpha["body"])

    # Gill cover: a darker arc behind the head.
    gill = f.band(f.u + 0.25 * vn * vn, -0.5, 0.018) * alpha["body"] * (np.abs(vn) < 0.85)
    img = _over(img, np.zeros(3, np.float32), gill * 0.35)

    pect = paint.pectoral if paint.pectoral is not None else paint.fins
    img = _over(img, pect, alpha["pectoral"] * 0.75 * (0.8 + 0.2 * np.cos(f.pect_a * 24.0)))

    eu, eh, er = b.eye
    ev = -eh * float(_half_height(b, np.array([eu], np.float32), f.depth)[0]) * (1.0 + b.arch)
    img = _over(img, paint.eye_ring, f.ellipse(eu, ev, er, er))
    img = _over(img, np.array([0.03, 0.03, 0.05], np.float32), f.ellipse(eu, ev, er * 0.6, er * 0.6))
    img = _over(img, np.ones(3, np.float32), f.ellipse(eu - er * 0.2, ev - er * 0.25, er * 0.18, er * 0.18) * 0.8)
    return img


# --------------------------------------------------------------------------------------------
# Reef: species (outline + colour pattern)
# --------------------------------------------------------------------------------------------


def _paint_blue_tang(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    blue = _jitter(rng, (0.10, 0.24, 0.72))
    electric = np.array([0.35, 0.72, 1.0], np.float32)
    wavy = 0.5 + 0.5 * np.sin(f.v * 26.0 / f.depth + 1.6 * np.sin(f.u * 6.0))
    body = _mix(blue, blue * 0.5, 0.55 * _smoothstep(0.7, 0.95, wavy))
    body = _mix(body, _jitter(rng, (0.98, 0.86, 0.25)), f.ellipse(0.86, -0.02, 0.1, 0.045))  # caudal spine
    fins = _mix(blue * 0.7, electric, _smoothstep(0.78, 0.92, f.fin_frac))
    tail = _mix(blue * 0.75, electric, _smoothstep(0.8, 1.0, f.tail_w) * 0.8)
    return FishPaint(body, fins, tail, eye_ring=np.array([0.1, 0.15, 0.35], np.float32))


def _paint_french_angelfish(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    black = _jitter(rng, (0.07, 0.07, 0.08), 0.1)
    yellow = _jitter(rng, (0.96, 0.80, 0.16))
    body = _mix(black, yellow, 0.9 * f.scales(0.11) * (f.u > -0.55))
    body = _mix(body, yellow, f.band(f.u, -0.38, 0.035) * (f.vn > -0.6))  # bar at the pectoral base
    body = _mix(body, np.array([0.75, 0.75, 0.72], np.float32), _smoothstep(-0.8, -0.95, f.u))  # pale mouth
    fins = _mix(black, yellow, _smoothstep(0.85, 1.0, f.fin_frac) * (f.u > 0.6))  # yellow filaments
    tail = _mix(black, np.array([0.8, 0.8, 0.7], np.float32), _smoothstep(0.85, 1.0, f.tail_w))
    return FishPaint(body, fins, tail, pectoral=yellow * 0.8, eye_ring=yellow)


def _paint_queen_angelfish(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    teal = _jitter(rng, (0.16, 0.48, 0.56))
    yellow = _jitter(rng, (0.98, 0.84, 0.12))
    electric = np.array([0.2, 0.55, 1.0], np.float32)
    body = _mix(_mix(teal, yellow, 0.25), yellow, f.scales(0.1) * 0.8)  # yellow-rimmed blue-green scales
    body = _mix(body, yellow, _smoothstep(0.6, 0.95, np.abs(f.vn)) * 0.6 + _smoothstep(-0.65, -0.9, f.u) * 0.6)
    cu, cv = -0.42, -0.62 * f.depth
    crown = f.ellipse(cu, cv, 0.13, 0.13)  # the "crown": dark spot ringed with electric blue
    body = _mix(body, electric, crown)
    body = _mix(body, np.array([0.05, 0.1, 0.3], np.float32), f.ellipse(cu, cv, 0.085, 0.085))
    fins = _mix(teal * 0.9, yellow, _smoothstep(0.6, 0.95, f.fin_frac))
    fins = _mix(fins, electric, f.band(f.fin_frac, 0.1, 0.08) * 0.6)
    return FishPaint(body, fins, yellow, pectoral=yellow, eye_ring=electric)


def _paint_sergeant_major(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    yellow = _jitter(rng, (0.90, 0.82, 0.28))
    silver = _jitter(rng, (0.82, 0.86, 0.88), 0.03)
    body = _mix(yellow, silver, _smoothstep(-0.2, 0.35, f.vn))
    bars = np.zeros_like(f.u)
    for k, uc in enumerate((-0.52, -0.2, 0.12, 0.42, 0.72)):
        uc += rng.normal(0.0, 0.02)
        # Bars lean back a little and thin out towards the belly.
        bars = np.maximum(bars, f.band(f.u - 0.08 * f.vn, uc, 0.075 - 0.02 * np.clip(f.vn, 0, 1) - 0.008 * k))
    body = _mix(body, np.array([0.05, 0.06, 0.08], np.float32), bars * (0.95 - 0.25 * np.clip(f.vn, 0, 1)))
    fins = _mix(yellow * 0.8, silver * 0.7, 0.5)
    tail = _mix(silver * 0.8, np.array([0.2, 0.22, 0.25], np.float32), _smoothstep(0.6, 1.0, f.tail_vr) * 0.5)
    return FishPaint(body, fins, tail, eye_ring=yellow * 0.8)


def _paint_foureye_butterflyfish(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    white = _jitter(rng, (0.88, 0.88, 0.84), 0.03)
    dark = np.array([0.30, 0.30, 0.33], np.float32)
    up = (f.u * 0.77 + f.v * 0.64) / 0.085  # thin lines sloping one way above the mid-line,
    lo = (f.u * 0.77 - f.v * 0.64) / 0.085  # the other way below: chevrons pointing forward
    line = np.where(f.v < 0, np.abs(up - np.round(up)), np.abs(lo - np.round(lo)))
    body = _mix(white, dark, _smoothstep(0.16, 0.06, line) * 0.8)
    eu, eh = 0.55, -0.5 * f.depth
    body = _mix(body, np.ones(3, np.float32), f.ellipse(eu, eh, 0.15, 0.15))  # the false "eye"
    body = _mix(body, np.array([0.03, 0.03, 0.04], np.float32), f.ellipse(eu, eh, 0.115, 0.115))
    body = _mix(body, np.array([0.05, 0.05, 0.06], np.float32), f.band(f.u, -0.72, 0.06))  # bar through the eye
    pale_yellow = _jitter(rng, (0.95, 0.86, 0.5))
    fins = _mix(pale_yellow, dark, f.band(f.fin_frac, 0.8, 0.05))
    tail = _mix(white * 0.9, pale_yellow, 0.4)
    return FishPaint(body, fins, tail, eye_ring=np.array([0.1, 0.1, 0.1], np.float32))


def _paint_stoplight_parrotfish(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    green = _jitter(rng, (0.12, 0.62, 0.45))
    orange = _jitter(rng, (0.96, 0.50, 0.40))
    yellow = _jitter(rng, (0.98, 0.86, 0.18))
    body = _mix(green, green * 0.55, f.scales(0.09) * 0.8)
    body = _mix(body, green * 0.7 + np.float32(0.15), _smoothstep(0.3, 1.0, f.vn) * 0.5)
    head = f.u < -0.45
    for off in (-0.35, 0.05):  # two orange stripes across the cheek
        body = _mix(body, orange, f.band(f.v - 0.6 * (f.u + 0.7), off * f.depth, 0.03) * head)
    body = _mix(body, yellow, f.ellipse(-0.3, -0.55 * f.depth, 0.07, 0.06))  # the "stoplight" spot
    body = _mix(body, yellow, f.band(f.u, 0.93, 0.04) * 0.8)
    body = _mix(body, np.array([0.85, 0.85, 0.8], np.float32), _smoothstep(-0.88, -0.98, f.u))  # beak
    fins = _mix(green * 0.8, orange, _smoothstep(0.7, 0.95, f.fin_frac))
    tail = _mix(green * 0.85, orange, f.band(f.tail_w, 0.65, 0.09) + _smoothstep(0.8, 1.0, f.tail_vr) * 0.6)
    return FishPaint(body, fins, tail, eye_ring=orange)


def _paint_spotted_drum(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    black = _jitter(rng, (0.06, 0.06, 0.07), 0.1)
    white = _jitter(rng, (0.93, 0.93, 0.9), 0.02)
    s = f.vn * 2.1 + 0.02 * f.u
    stripes = _smoothstep(0.14, 0.07, np.abs(s - np.round(s) - 0.0)) * (np.abs(f.vn) < 0.9)
    body = _mix(black, white, stripes * (f.u > -0.45))
    body = _mix(body, white, f.band(f.u - 0.1 * f.vn, -0.83, 0.03) + f.band(f.u - 0.1 * f.vn, -0.55, 0.03))
    dots = np.hypot((f.u * 16.0) % 1.0 - 0.5, (f.v * 16.0) % 1.0 - 0.5)
    fins = _mix(black, white, _smoothstep(0.22, 0.12, dots) * 0.9)
    return FishPaint(body, fins, fins, eye_ring=white * 0.6)


def _paint_yellowtail_snapper(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    back = _jitter(rng, (0.45, 0.55, 0.70))
    silver = _jitter(rng, (0.88, 0.88, 0.90), 0.03)
    yellow = _jitter(rng, (0.98, 0.84, 0.18))
    body = _mix(back, silver, _smoothstep(-0.3, 0.3, f.vn))
    spots = np.hypot((f.u * 9.0) % 1.0 - 0.5, (f.v * 9.0 + 0.5 * np.floor(f.u * 9.0)) % 1.0 - 0.5)
    body = _mix(body, yellow, _smoothstep(0.3, 0.18, spots) * (f.vn < -0.35) * 0.85)
    # Mid-line stripe from the snout through the eye, widening into the yellow tail.
    body = _mix(body, yellow, f.band(f.vn, -0.05, 0.13 + 0.12 * np.clip(f.u, 0.0, 1.0)))
    fins = _mix(yellow, silver, 0.3)
    return FishPaint(body, fins, yellow, eye_ring=np.array([0.85, 0.25, 0.2], np.float32))


def _paint_lionfish(f: FishCoords, rng: np.random.Generator) -> FishPaint:
    red = _jitter(rng, (0.62, 0.18, 0.10))
    cream = _jitter(rng, (0.95, 0.88, 0.80), 0.03)
    phase = (f.u + 0.3 * f.vn * f.vn) * 7.0
    stripes = _smoothstep(0.15, -0.15, np.cos(2 * math.pi * phase))
    body = _mix(red, cream, stripes * 0.9)
    body = _mix(body, red * 0.7, _smoothstep(0.92, 1.0, np.cos(2 * math.pi * (phase + 0.5))) * 0.5)
    fins = _mix(red, cream, _smoothstep(-0.2, 0.2, np.cos(2 * math.pi * f.fin_frac * 4.0)))  # banded spines
    tail = _mix(cream * 0.8, red, _smoothstep(0.25, 0.1, np.abs((f.tail_w * 5.0) % 1.0 - 0.5)) * 0.8)
    # Feathery fan: red-banded rays radiating from the fin base.
    rays = _smoothstep(0.2, 0.7, np.cos(f.pect_a * 30.0)) * _smoothstep(-0.3, 0.3, np.cos(f.pect_r * 16.0))
    pect = _mix(cream * 0.85, red, rays)
    return FishPaint(body, fins, tail, pectoral=pect, eye_ring=red, fin_opacity=0.8)


def _fin(points: Sequence[tuple[float, float]], side: int = -1, spines: int = 0, notch: float = 0.0) -> Fin:
    return Fin(tuple(points), side, spines, notch)


REEF_SPECIES: dict[str, Species] = {
    "sergeant_major": Species(BodyShape(
        depth=0.56, head=0.55, rear=0.75, peduncle=0.22, arch=0.12, tail="fork", tail_len=0.38,
        tail_spread=0.38, fork=0.55,
        fins=(_fin([(-0.45, 0.0), (-0.3, 0.14), (0.5, 0.12), (0.8, 0.2), (0.9, 0.0)]),
              _fin([(0.1, 0.0), (0.35, 0.2), (0.8, 0.12), (0.9, 0.0)], side=1)),
        pectoral=(-0.3, 0.2, 0.2, 0.07, 0.5), eye=(-0.68, 0.35, 0.085)), _paint_sergeant_major),
    "blue_tang": Species(BodyShape(
        depth=0.66, head=0.5, rear=0.7, peduncle=0.15, arch=0.05, tail="lunate", tail_len=0.32,
        tail_spread=0.42, fork=0.45,
        fins=(_fin([(-0.5, 0.0), (-0.35, 0.12), (0.85, 0.13), (0.95, 0.0)]),
              _fin([(-0.05, 0.0), (0.1, 0.12), (0.85, 0.12), (0.95, 0.0)], side=1)),
        pectoral=(-0.3, 0.1, 0.19, 0.07, 0.4), eye=(-0.62, 0.45, 0.08)), _paint_blue_tang),
    "yellowtail_snapper": Species(BodyShape(
        depth=0.36, head=0.6, rear=0.95, peduncle=0.3, arch=0.1, tail="fork", tail_len=0.55,
        tail_spread=0.42, fork=0.75,
        fins=(_fin([(-0.35, 0.0), (-0.2, 0.12), (0.3, 0.08), (0.75, 0.08), (0.82, 0.0)]),
              _fin([(0.3, 0.0), (0.45, 0.12), (0.75, 0.07), (0.8, 0.0)], side=1)),
        pectoral=(-0.35, 0.25, 0.2, 0.05, 0.3), eye=(-0.72, 0.3, 0.075)), _paint_yellowtail_snapper),
    "stoplight_parrotfish": Species(BodyShape(
        depth=0.44, head=0.45, rear=0.9, peduncle=0.38, arch=0.05, tail="lunate", tail_len=0.3,
        tail_spread=0.36, fork=0.3,
        fins=(_fin([(-0.4, 0.0), (-0.3, 0.07), (0.85, 0.07), (0.92, 0.0)]),
              _fin([(0.2, 0.0), (0.3, 0.07), (0.85, 0.06), (0.92, 0.0)], side=1)),
        pectoral=(-0.32, 0.1, 0.17, 0.06, 0.2), eye=(-0.7, 0.35, 0.06)), _paint_stoplight_parrotfish),
    "foureye_butterflyfish": Species(BodyShape(
        depth=0.78, head=0.7, rear=0.55, peduncle=0.2, arch=0.0, tail="truncate", tail_len=0.25,
        tail_spread=0.3, fork=0.0,
        fins=(_fin([(-0.35, 0.0), (-0.1, 0.15), (0.7, 0.2), (0.9, 0.12), (0.95, 0.0)]),
              _fin([(0.0, 0.0), (0.3, 0.15), (0.8, 0.17), (0.95, 0.0)], side=1)),
        pectoral=(-0.25, 0.1, 0.15, 0.06, 0.5), eye=(-0.72, 0.3, 0.06)), _paint_foureye_butterflyfish),
    "french_angelfish": Species(BodyShape(
        depth=0.92, head=0.6, rear=0.6, peduncle=0.17, arch=0.0, tail="round", tail_len=0.3,
        tail_spread=0.38, fork=0.0,
        fins=(_fin([(-0.25, 0.0), (0.2, 0.25), (0.8, 0.45), (1.25, 0.12), (1.3, 0.0)]),
              _fin([(-0.1, 0.0), (0.3, 0.25), (0.8, 0.4), (1.2, 0.1), (1.25, 0.0)], side=1)),
        pectoral=(-0.35, 0.05, 0.16, 0.07, 0.6), eye=(-0.66, 0.35, 0.075)), _paint_french_angelfish),
    "queen_angelfish": Species(BodyShape(
        depth=0.88, head=0.6, rear=0.6, peduncle=0.17, arch=0.0, tail="round", tail_len=0.3,
        tail_spread=0.4, fork=0.0,
        fins=(_fin([(-0.25, 0.0), (0.2, 0.22), (0.8, 0.45), (1.35, 0.08), (1.4, 0.0)]),
              _fin([(-0.1, 0.0), (0.3, 0.22), (0.8, 0.42), (1.3, 0.08), (1.35, 0.0)], side=1)),
        pectoral=(-0.35, 0.05, 0.16, 0.07, 0.6), eye=(-0.66, 0.35, 0.075)), _paint_queen_angelfish),
    "lionfish": Species(BodyShape(
        depth=0.42, head=0.5, rear=0.85, peduncle=0.3, arch=0.1, tail="round", tail_len=0.32,
        tail_spread=0.34, fork=0.0,
        fins=(_fin([(-0.6, 0.0), (-0.55, 0.75), (0.2, 0.85), (0.45, 0.5), (0.5, 0.0)], spines=7, notch=0.7),
              _fin([(0.45, 0.0), (0.55, 0.25), (0.9, 0.25), (0.95, 0.0)]),
              _fin([(0.35, 0.0), (0.5, 0.22), (0.85, 0.2), (0.9, 0.0)], side=1)),
        pectoral=(-0.05, 0.35, 0.55, 0.26, 0.5), eye=(-0.68, 0.45, 0.08)), _paint_lionfish),
    "spotted_drum": Species(BodyShape(
        depth=0.4, head=0.5, rear=0.8, peduncle=0.22, arch=0.15, tail="round", tail_len=0.3,
        tail_spread=0.28, fork=0.0,
        fins=(_fin([(-0.48, 0.0), (-0.42, 1.05), (-0.1, 0.35), (-0.05, 0.0)], spines=3, notch=0.3),
              _fin([(-0.05, 0.0), (0.05, 0.16), (0.85, 0.14), (0.92, 0.0)]),
              _fin([(0.35, 0.0), (0.45, 0.18), (0.8, 0.14), (0.85, 0.0)], side=1)),
        pectoral=(-0.3, 0.2, 0.16, 0.06, 0.4), eye=(-0.72, 0.35, 0.075)), _paint_spotted_drum),
}
assert set(REEF_SPECIES) == set(_COUNTS["reef"])


# --------------------------------------------------------------------------------------------
# Reef: scene
# --------------------------------------------------------------------------------------------


def _water(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Open-water backdrop (gradient + caustics); returns the image and the mid-water colour."""
    x, y = _grid(size)
    green = rng.uniform(-1.0, 1.0)  # from deep blue to green, murky water
    top = np.array([0.22, 0.62 + 0.08 * green, 0.80 - 0.1 * green], np.float32) * rng.uniform(0.85, 1.1)
    bottom = np.array([0.02, 0.22 + 0.06 * green, 0.42 - 0.08 * green], np.float32) * rng.uniform(0.7, 1.15)
    g = np.clip(y / size + rng.uniform(-0.2, 0.2) * (x / size - 0.5), 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    img = _mix(top, bottom, g)
    # Caustics: light focused by surface waves; bright where a few waves nearly cancel out.
    warp = _smooth_noise(rng, size, 4) * 2.0
    k = rng.uniform(12.0, 24.0) / size * 2 * math.pi
    waves = sum(np.sin((x * math.cos(a) + y * math.sin(a)) * k + rng.uniform(0, 6.3) + warp)
                for a in rng.uniform(0, math.pi, 3))
    caustic = np.exp(-((waves / 0.45) ** 2)) * rng.uniform(0.04, 0.16) * (1.0 - g)
    img = img + caustic[..., None] * np.array([0.8, 1.0, 1.0], np.float32)
    return img, _mix(top, bottom, 0.5)


def _textured(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Colour field for a rock or coral head."""
    x, y = _grid(size)
    n1, n2 = _smooth_noise(rng, size, 12), _smooth_noise(rng, size, 30)
    if kind == "brain":
        base = _jitter(rng, (0.70, 0.60, 0.40), 0.1)
        a = rng.uniform(0, math.pi)
        grooves = np.sin((x * math.cos(a) + y * math.sin(a)) * (0.5 * 192 / size) + 3.0 * n1)
        return _mix(base, base * 0.45, _smoothstep(0.4, 0.9, grooves))
    if kind == "sponge":
        base = _jitter(rng, (0.80, 0.42, 0.20) if rng.random() < 0.5 else (0.50, 0.25, 0.55), 0.1)
        pores = np.hypot((x / size * 14) % 1 - 0.5, (y / size * 14) % 1 - 0.5)
        return _mix(base * (1.0 + 0.12 * n1[..., None]), base * 0.4, _smoothstep(0.2, 0.1, pores))
    base = _jitter(rng, (0.45, 0.42, 0.37), 0.12)  # rock
    return base * (1.0 + 0.18 * n1 + 0.1 * n2)[..., None]


def _seabed(img: np.ndarray, water: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sand with ripples towards the bottom and a few hazy coral heads / rocks on it."""
    size = img.shape[0]
    x, y = _grid(size)
    horizon = size * rng.uniform(0.55, 0.9) + size * 0.05 * _noise_1d(rng, x, 5, size)
    if rng.random() < 0.7:
        sand = _jitter(rng, (0.74, 0.70, 0.55), 0.08)
        ripples = np.sin(y * (0.9 * 192 / size) + 2.5 * _smooth_noise(rng, size, 5))
        sand_img = sand * (1.0 + 0.06 * ripples + 0.05 * _smooth_noise(rng, size, 40))[..., None]
        haze = np.clip(1.0 - (y - horizon) / (size * 0.5), 0.25, 0.85)  # distance fades the sand
        img = _over(img, _mix(sand_img, water, haze), _coverage((horizon - y) * 0.7))
    for _ in range(rng.integers(0, 4)):
        r = size * rng.uniform(0.08, 0.22)
        cx, cy = rng.uniform(0, size), horizon.mean() + rng.uniform(-0.05, 0.15) * size
        d = _blob_distance(rng, size, cx, cy, r, squash=rng.uniform(0.5, 1.0))
        colour = _mix(_textured(rng, size, str(rng.choice(["rock", "brain", "sponge"]))), water, rng.uniform(0.3, 0.7))
        img = _over(img, colour, _coverage(d))
    return img


def _distant_fish(img: np.ndarray, water: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small school of hazy silhouettes far behind the subject."""
    size = img.shape[0]
    x, y = _grid(size)
    cx0, cy0 = rng.uniform(0.1, 0.9, 2) * size
    facing = rng.choice([-1.0, 1.0])
    for _ in range(rng.integers(2, 8)):
        cx, cy = cx0 + rng.normal(0, 0.12) * size, cy0 + rng.normal(0, 0.06) * size
        r = size * rng.uniform(0.02, 0.045)
        du, dv = (x - cx) * facing / r, (y - cy) / (0.4 * r)
        body = _coverage((np.hypot(du, dv) - 1.0) * 0.4 * r)
        tail = _coverage((np.maximum(np.abs(dv) * 0.4 - (du - 0.8) * 0.9, du - 1.6)) * r)
        img = _over(img, water * rng.uniform(0.4, 0.75), np.maximum(body, tail) * rng.uniform(0.4, 0.8))
    return img


def _random_pose(b: BodyShape, rng: np.random.Generator, size: int) -> _Pose:
    """Random size, placement and attitude; sometimes the fish runs off the frame edge."""
    extent_u = 2.0 + b.tail_len
    fin_up = max([max(h for _, h in f.points) for f in b.fins if f.side < 0] + [0.0])
    fin_dn = max([max(h for _, h in f.points) for f in b.fins if f.side > 0] + [0.0])
    extent_v = 2.0 * b.depth + fin_up + fin_dn
    length = size * rng.uniform(0.55, 0.9) / max(extent_u, extent_v)
    angle = rng.normal(0.0, 0.22)
    facing_right = bool(rng.random() < 0.5)
    # Place the centre of the fish's bounding box, then step back to the body centre.
    slack = 0.5 * size - 0.5 * length * np.array([extent_u, extent_v])
    off_edge = 0.25 * length * np.array([extent_u, extent_v]) if rng.random() < 0.15 else 0.0
    bx, by = size / 2 + rng.uniform(-1, 1, 2) * (np.maximum(slack, 0.0) + off_edge)
    shift = 0.5 * b.tail_len * length * (-1.0 if facing_right else 1.0)
    return _Pose(cx=float(bx - shift * math.cos(angle)), cy=float(by - shift * math.sin(angle)), length=float(length),
                 angle=float(angle), facing_right=facing_right, squeeze=float(rng.uniform(0.8, 1.0)),
                 bend=float(rng.normal(0.0, 0.05)), flick=float(rng.normal(0.0, 0.12)),
                 depth_scale=float(rng.uniform(0.92, 1.08)))


def _foreground_occluder(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rock or coral head in front of the fish, entering from an image edge."""
    size = img.shape[0]
    side = rng.integers(0, 4)
    t = rng.uniform(0.1, 0.9) * size
    depth_in = rng.uniform(0.0, 0.12) * size
    cx, cy = [(depth_in, t), (size - depth_in, t), (t, size - depth_in), (t, size + 0.05 * size)][side]
    d = _blob_distance(rng, size, cx, cy, size * rng.uniform(0.18, 0.3))
    return _over(img, _textured(rng, size, str(rng.choice(["rock", "brain", "sponge"]))), _coverage(d))


def _marine_snow(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Suspended particles lit by the sun: tiny soft white dots (drawn in small windows, for speed)."""
    size = img.shape[0]
    alpha = np.zeros(img.shape[:2], np.float32)
    for cx, cy in rng.uniform(0, size, (int(rng.integers(5, 30)), 2)):
        r = rng.uniform(0.4, 1.2) * size / 192.0
        x0, x1 = max(0, int(cx - r - 2)), min(size, int(cx + r + 3))
        y0, y1 = max(0, int(cy - r - 2)), min(size, int(cy + r + 3))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + np.float32(0.5)
        dot = _coverage(np.hypot(xx - cx, yy - cy) - r) * rng.uniform(0.3, 0.6)
        alpha[y0:y1, x0:x1] = np.maximum(alpha[y0:y1, x0:x1], dot)
    return _over(img, np.ones(3, np.float32), alpha)


def _render_reef(class_name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    img, water = _water(rng, size)
    img = _seabed(img, water, rng)
    if rng.random() < 0.4:
        img = _distant_fish(img, water, rng)
    sp = REEF_SPECIES[class_name]
    img = _draw_fish(img, sp, _random_pose(sp.shape, rng, size), rng)
    hard = rng.random() < HARD_CASE_SHARE
    if rng.random() < 0.2 or (hard and rng.random() < 0.35):
        img = _foreground_occluder(img, rng)
        if hard:  # half-hidden fish: a second rock or coral head from another side
            img = _foreground_occluder(img, rng)
    if hard:
        img = _hard_case(img, water, rng)
    # Water between camera and fish: turbidity, red absorbed with depth, uneven light.
    img = _mix(img, water, rng.uniform(0.03, 0.3))
    img = img * np.array([rng.uniform(0.8, 1.0), 1.0, rng.uniform(0.95, 1.08)], np.float32)
    x, y = _grid(size)
    r2 = ((x / size - rng.uniform(0.3, 0.7)) ** 2 + (y / size - rng.uniform(0.2, 0.6)) ** 2)
    img = img * (rng.uniform(0.75, 1.2) * (1.0 - rng.uniform(0.0, 0.8) * r2))[..., None]
    if rng.random() < 0.5:
        img = _marine_snow(img, rng)
    return _camera_finish(img, rng, blur_max=1.3)


# --------------------------------------------------------------------------------------------
# Salmon
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FilletLook:
    flesh: tuple[float, float, float]
    fat: tuple[float, float, float]
    fat_alpha: tuple[float, float]
    period: tuple[float, float]  # px between fat lines at 192 px
    width: tuple[float, float]  # px width of a fat line at 192 px


_FILLET = {
    # Wild: deep red-orange, thin widely spaced lines that are more pink than white.
    "wild": _FilletLook((0.80, 0.26, 0.14), (0.95, 0.78, 0.70), (0.6, 0.85), (22.0, 34.0), (1.3, 2.6)),
    # Farmed: paler pink-orange, thick dense bright-white fat bands.
    "farmed": _FilletLook((0.96, 0.55, 0.40), (0.97, 0.93, 0.89), (0.85, 1.0), (11.0, 17.0), (4.0, 7.0)),
}


def _fillet(look: _FilletLook, rng: np.random.Generator, size: int) -> np.ndarray:
    """Flesh with wavy diagonal fat bands (myosepta), muscle-fibre striation and mottling."""
    x, y = _grid(size)
    zoom = rng.uniform(0.8, 1.25) * size / 192.0
    period = rng.uniform(*look.period) * zoom
    width = rng.uniform(*look.width) * zoom
    a = rng.uniform(0.0, math.pi)
    xc, yc = x - size / 2, y - size / 2
    along, across = xc * math.cos(a) + yc * math.sin(a), -xc * math.sin(a) + yc * math.cos(a)
    # Myosepta run as shallow chevrons / arcs; the noise makes each band wander a little.
    bend = rng.uniform(-0.5, 0.5)
    s = along + bend * np.sqrt((across - rng.uniform(-0.3, 0.3) * size) ** 2 + (0.1 * size) ** 2)
    # A few px of low-frequency wander: bands stay roughly parallel, as in a real fillet.
    s = s + _smooth_noise(rng, size, 3) * rng.uniform(2.0, 4.0) * zoom
    d = np.abs((s / period) % 1.0 - 0.5) * period
    local_w = width * np.clip(1.0 + 0.35 * _smooth_noise(rng, size, 7), 0.4, 1.8)
    fat = _smoothstep(local_w / 2 + 0.8, local_w / 2 - 0.8, d)

    flesh = _jitter(rng, look.flesh, 0.05)
    fibre = np.sin((along * 0.5 + across * 0.87) * (1.6 * 192 / size) + 2.0 * _smooth_noise(rng, size, 10))
    tex = 1.0 + 0.07 * _smooth_noise(rng, size, 6) + 0.035 * fibre + rng.normal(0, 0.02, fibre.shape)
    img = flesh * tex[..., None].astype(np.float32)
    fat_colour = _jitter(rng, look.fat, 0.02) * (1.0 + 0.04 * _smooth_noise(rng, size, 20))[..., None]
    return _over(img, fat_colour, fat * rng.uniform(*look.fat_alpha))


def _fillet_edge(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sometimes the fillet ends inside the frame: a board, plate or counter shows behind it."""
    size = img.shape[0]
    x, y = _grid(size)
    a = rng.uniform(0, 2 * math.pi)
    dist = (x - size / 2) * math.cos(a) + (y - size / 2) * math.sin(a)
    edge = size * rng.uniform(0.3, 0.48) + size * 0.04 * _noise_1d(rng, (x + y).ravel(), 6, 2 * size).reshape(x.shape)
    surface = [(0.62, 0.45, 0.28), (0.92, 0.92, 0.9), (0.15, 0.15, 0.16)][int(rng.integers(0, 3))]
    bg = _jitter(rng, surface, 0.06) * (1.0 + 0.06 * _smooth_noise(rng, size, 16))[..., None]
    # The flesh darkens towards the cut edge where it curves away from the light.
    img = img * (1.0 - 0.25 * _smoothstep(edge - 0.08 * size, edge, dist))[..., None]
    return _over(img, bg, _coverage(edge - dist))


def _tray(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Packaging tray rim along one or two edges."""
    size = img.shape[0]
    x, y = _grid(size)
    colour = _jitter(rng, [(0.08, 0.08, 0.09), (0.9, 0.9, 0.88), (0.93, 0.9, 0.75)][int(rng.integers(0, 3))], 0.05)
    for side in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        w = size * rng.uniform(0.06, 0.18)
        d = [x, size - x, y, size - y][side]
        bevel = 1.0 - 0.3 * _smoothstep(w * 0.5, w, d)  # inner lip in shadow
        img = _over(img, colour * bevel[..., None], _coverage(d - w))
    return img


def _wrap_sheen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cling-film: broad soft reflections plus thin bright wrinkles."""
    size = img.shape[0]
    x, y = _grid(size)
    a = rng.uniform(0, math.pi)
    t = (x * math.cos(a) + y * math.sin(a)) / size
    broad = np.clip(np.sin(t * rng.uniform(4, 9) + 2.0 * _smooth_noise(rng, size, 3)), 0, 1) ** 2
    wr = np.sin(t * rng.uniform(25, 45) + 1.5 * _smooth_noise(rng, size, 4))
    wrinkles = _smoothstep(0.93, 1.0, wr)
    glow = np.clip(broad * rng.uniform(0.1, 0.3) + wrinkles * rng.uniform(0.2, 0.45), 0, 1)
    return img + (1.0 - img) * glow[..., None]


def _glare(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Specular highlights on the wet surface: elongated soft white spots."""
    size = img.shape[0]
    x, y = _grid(size)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, size, 2)
        a, rl, rs = rng.uniform(0, math.pi), size * rng.uniform(0.03, 0.12), size * rng.uniform(0.01, 0.04)
        du, dv = (x - cx) * math.cos(a) + (y - cy) * math.sin(a), -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
        spot = np.exp(-((du / rl) ** 2 + (dv / rs) ** 2)) * rng.uniform(0.4, 0.95)
        img = img + (1.0 - img) * spot[..., None]
    return img


def _sticker(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A price / weight label with a barcode and lines of 'text', stuck on at an angle."""
    size = img.shape[0]
    w, h = int(size * rng.uniform(0.3, 0.45)), int(size * rng.uniform(0.18, 0.28))
    paper = [(245, 245, 240), (250, 230, 90), (240, 120, 60)][int(rng.integers(0, 3))]
    label = Image.new("RGBA", (w, h), paper + (255,))
    draw = ImageDraw.Draw(label)
    draw.rectangle([0, 0, w, h // 5], fill=(40, 60, 140, 255))  # store-brand header
    bx = int(w * 0.08)
    while bx < w * 0.55:  # barcode
        bw = int(rng.integers(1, 3))
        draw.rectangle([bx, int(h * 0.45), bx + bw - 1, int(h * 0.9)], fill=(20, 20, 20, 255))
        bx += bw + int(rng.integers(1, 3))
    for row in range(3):  # text lines
        ty = int(h * (0.3 + 0.2 * row))
        draw.rectangle([int(w * 0.62), ty, int(w * rng.uniform(0.75, 0.93)), ty + max(1, h // 14)], fill=(30, 30, 30, 255))
    label = label.rotate(float(rng.uniform(-35, 35)), resample=Image.Resampling.BILINEAR, expand=True)
    lab = np.asarray(label, dtype=np.float32) / np.float32(255.0)
    x0, y0 = (int(v) for v in rng.integers(-label.width // 3, size - label.width * 2 // 3, 2))
    # Paste with clipping at the frame edges (stickers are often cut off by the frame).
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    cw, ch = min(lab.shape[1] - sx0, size - dx0), min(lab.shape[0] - sy0, size - dy0)
    if cw > 0 and ch > 0:
        patch = lab[sy0:sy0 + ch, sx0:sx0 + cw]
        region = img[dy0:dy0 + ch, dx0:dx0 + cw]
        img[dy0:dy0 + ch, dx0:dx0 + cw] = _over(region, patch[..., :3], patch[..., 3])
    return img


def _auto_white_balance(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Phone auto white balance + exposure, pulling the frame mean towards a random target.

    The target is drawn independently of the class, so the camera, not the fish, decides the
    frame's mean colour and brightness: a one-number rule (mean red, R/G, ...) cannot separate
    wild from farmed. What survives is the *relative* colour of flesh and fat and the band
    structure, which is what a person looks at too.
    """
    mean = img.reshape(-1, 3).mean(axis=0) + 1e-3
    target_r = rng.uniform(0.55, 0.9)
    target = np.array([target_r, target_r * rng.uniform(0.42, 0.8), 0.0], np.float32)
    target[2] = target[1] * rng.uniform(0.55, 0.95)
    strength = rng.uniform(0.75, 1.0)  # AWB does not fully correct every frame
    gains = (target / mean) ** strength * rng.uniform(0.95, 1.05, 3)
    return img * gains.astype(np.float32)


def _render_salmon(class_name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    img = _fillet(_FILLET[class_name], rng, size)
    if rng.random() < 0.3:
        img = _fillet_edge(img, rng)
    if rng.random() < 0.25:
        img = _tray(img, rng)
    if rng.random() < 0.3:
        img = _wrap_sheen(img, rng)
    if rng.random() < 0.55:
        img = _glare(img, rng)
    if rng.random() < 0.2:
        img = _sticker(img, rng)
    img = _auto_white_balance(img, rng)
    if rng.random() < HARD_CASE_SHARE:
        img = _hard_case(img, None, rng)
    return _camera_finish(img, rng, blur_max=0.9)
