"""The image-size rule: small photos train at a crop matched to them, but never below 160 px."""
from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .data import Split
from .models import get_backbone

__all__ = ["MIN_MATCHED_SIZE", "matched_image_size", "choose_image_size"]

# Small photos are upscaled to at least this. On the benchmark's real sets of small photos 160 px
# scored at least as well as 96 px on every set and better on most, and 224 px did not beat 160
# (docs/measured/bench-real-image-size.md): ImageNet features fit objects of roughly that scale, and
# a 96-px input leaves MobileNetV2 a 3x3 last feature map.
MIN_MATCHED_SIZE = 160


_SIZE_SAMPLE = 256  # photos whose header is read to decide the size (headers only: milliseconds)



def matched_image_size(short_sides: list[int], native: int, crop_pct: float) -> tuple[int, str]:
    """The crop size for photos with these shorter sides, and the rule's one-line reason.

    Rule: take the median shorter side ``m`` of the training photos. When ``m * crop_pct``
    (the crop the eval resize would cut from a photo of that size) is clearly below the
    backbone's native size, train at that crop rounded to a multiple of 32, but at least
    ``MIN_MATCHED_SIZE`` (smaller photos are upscaled to it: that measured better on real
    photos than training at their own size); otherwise at the native size.

    Example:
        >>> matched_image_size([100] * 10, 224, 0.875)[1]
        'photos are small (median shorter side 100 px): training at 160 px (upscaled) instead of the native 224 px'
        >>> matched_image_size([220, 230], 224, 0.875)[0]
        192
        >>> matched_image_size([640, 480], 224, 0.875)[0]
        224
    """
    if not short_sides:
        return native, f"no photo size readable: native {native} px"
    m = sorted(short_sides)[len(short_sides) // 2]
    matched = int(round(m * crop_pct / 32)) * 32
    size = max(MIN_MATCHED_SIZE, matched)
    if size >= native:
        return native, f"photos (median shorter side {m} px) are not smaller than the native size: {native} px"
    upscaled = " (upscaled)" if matched < MIN_MATCHED_SIZE else ""
    return size, (f"photos are small (median shorter side {m} px): training at {size} px{upscaled} instead of the "
                  f"native {native} px")


def _short_sides(paths: list[Path], limit: int = _SIZE_SAMPLE) -> list[int]:
    """Shorter sides of up to ``limit`` photos (evenly spread), read from the file headers only."""
    from PIL import Image

    step = max(1, len(paths) // limit)
    sides = []
    for p in paths[::step][:limit]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable files are reported (and skipped) by the decode cache
            continue
    return sides


def choose_image_size(split: Split, cfg: TrainConfig) -> tuple[int | None, str]:
    """``cfg.image_size`` when set (an explicit size always wins), else the size matched to the photos."""
    backbone = get_backbone(cfg.model)
    if cfg.image_size is not None:
        return cfg.image_size, f"--image-size {cfg.image_size} px (explicit)"
    if backbone.fixed_input_size:
        return None, f"{cfg.model} takes only its native {backbone.input_size} px"
    return matched_image_size(_short_sides(split.paths("train")), backbone.input_size, backbone.crop_pct)
