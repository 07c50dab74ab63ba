"""``make bench-train``: training images/s with and without the decode-once uint8 cache.

    python -m fieldid.training.bench --data data/reef [--model mobilenet_v2] [--image-size 128] [--batches 12]

Each row runs real optimisation steps (forward, backward, AdamW) through the same
DataLoader settings training uses; only where pixels come from differs. A second column
times the DataLoader alone (decode/resize or cache lookup, augmentation, batching), which is
what the cache changes: on a 2-core CPU the backward pass of the model can hide it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .config import TrainConfig
from .data import CachedImageDataset, ImageCache, make_split, train_transform
from .models import create_model, get_backbone
from .records import atomic_write_json

__all__ = ["bench_train"]


def _images_per_second(dataset: CachedImageDataset, cfg: TrainConfig, batches: int) -> float:
    torch.manual_seed(0)
    model = create_model(cfg.model, len(set(dataset.cache.targets)), pretrained=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        drop_last=True)
    seen, t0 = 0, None
    it = iter(loader)
    for step in range(batches + 1):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            t0 = time.perf_counter()  # first step warms up allocators and kernels
        else:
            seen += len(y)
    return seen / (time.perf_counter() - t0)


def _loader_images_per_second(dataset: CachedImageDataset, cfg: TrainConfig, batches: int) -> float:
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        drop_last=True)
    seen, t0, it = 0, time.perf_counter(), iter(loader)
    for _ in range(batches):
        try:
            _, y = next(it)
        except StopIteration:
            it = iter(loader)
            _, y = next(it)
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def bench_train(data: str | Path, *, model: str = "mobilenet_v2", image_size: int = 128, batch_size: int = 32,
                batches: int = 12) -> list[dict]:
    """Rows of ``{"mode", "setup_s", "images_per_s", "loader_images_per_s"}`` for cache off and on, then the ratios."""
    cfg = TrainConfig(model=model, image_size=image_size, batch_size=batch_size)
    spec = get_backbone(model).preprocess(image_size)
    split = make_split(data, seed=0)
    rows = []
    for enabled in (False, True):
        t0 = time.perf_counter()
        cache = ImageCache(split.paths("train"), split.targets("train"), resize_size=spec.resize_size,
                           interpolation=spec.interpolation, enabled=enabled)
        setup = time.perf_counter() - t0
        dataset = CachedImageDataset(cache, train_transform(spec, cfg.augment))
        loader_ips = _loader_images_per_second(dataset, cfg, batches)
        ips = _images_per_second(dataset, cfg, batches)
        rows.append({"mode": "uint8 cache" if enabled else "decode every epoch", "setup_s": round(setup, 2),
                     "images_per_s": round(ips, 1), "loader_images_per_s": round(loader_ips, 1),
                     "cache_mb": round(cache.nbytes / 1e6, 1)})
        print(f"  {rows[-1]['mode']:<20} {ips:7.1f} img/s training, {loader_ips:7.1f} img/s loader alone", flush=True)
    rows.append({"mode": "ratio cache/no-cache", "images_per_s": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 2),
                 "loader_images_per_s": round(rows[1]["loader_images_per_s"] / rows[0]["loader_images_per_s"], 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="ImageFolder dataset")
    p.add_argument("--model", default="mobilenet_v2", help="backbone (default: mobilenet_v2)")
    p.add_argument("--image-size", type=int, default=128, help="crop size (default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--batches", type=int, default=12, help="timed steps per mode (default: 12)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = bench_train(args.data, model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                       batches=args.batches)
    print("\n| mode | setup s | train images/s | loader alone images/s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r.get('setup_s', '')} | {r['images_per_s']} | {r['loader_images_per_s']} |")
    if args.json:
        atomic_write_json(args.json, rows)
    print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
