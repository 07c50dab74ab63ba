"""Small, fast, deterministic datasets for tests (real training steps, not mocks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def _draw(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    bg = tuple(int(x) for x in rng.integers(0, 90, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    col = tuple(int(x) for x in rng.integers(150, 256, 3))
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    noise = rng.normal(0, 8, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_shapes_dataset(root: Path, counts: dict[str, int] | None = None, *, size: int = 72, seed: int = 0) -> Path:
    """Flat ImageFolder of coloured shapes: ``root/<shape>/<i>.png``. Learnable in a few steps."""
    counts = counts or {k: 24 for k in SHAPES}
    for ci, (kind, n) in enumerate(sorted(counts.items())):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, ci, i])
            _draw(kind, rng, size).save(root / kind / f"{kind}_{i:03d}.png")
    return root
