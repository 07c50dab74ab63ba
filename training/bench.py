"""``make bench-train``: fieldid's training defaults against a plain fine-tune, and the speed choices.

    fieldid bench train compare [--work runs/bench-train] [--sets digits,faces,textures,reef,salmon]
    fieldid bench train augment [--work runs/bench-train] [--variants defaults,strong,none]
    fieldid bench train choices            # fp32 / bf16 autocast / channels-last step and inference times
    fieldid bench train cache --data data/reef [--model mobilenet_v2] [--image-size 128] [--steps 12]

``compare`` builds small real datasets from images that installed packages ship
(scikit-learn's handwritten digits, scikit-image's LFW face/non-face patches and its texture
photos) plus the two demo sets, then runs, on the same split and one after the other,
the reference (:mod:`fieldid.training.bench_reference`: 3 epochs, AdamW 3e-4, 160 px, no
augmentation) and ``fieldid train`` with its defaults, and prints test accuracy, wall time
and their ratio. Goal: fieldid >= reference accuracy in <= 2x its wall time.

``augment`` trains ``fieldid train`` on the same datasets once per augmentation variant
(:data:`AUGMENT_VARIANTS`: the shipped defaults, the strong kind they replaced, none) and prints
test accuracy per dataset and variant: the measurement the defaults are chosen by.

``cache`` is the decode-cache benchmark:

Each row runs real optimisation steps (forward, backward, AdamW) through the same
DataLoader settings training uses; only where pixels come from differs. A second column
times the DataLoader alone (decode/resize or cache lookup, augmentation, batching), which is
what the cache changes: on a 2-core CPU the backward pass of the model can hide it.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import torch
from torch.utils.data import DataLoader

from fieldid.cli_common import UsageError, is_bad_input, require_extra

from .config import TrainConfig
from .data import CachedImageDataset, ImageCache, make_split, train_transform
from .models import create_model, fast_layout, get_backbone
from .benchrun import fieldid_train, timed_run
from .records import atomic_write_json

__all__ = ["bench_train", "bench_compare", "bench_augment", "bench_choices", "make_bench_datasets", "BENCH_SETS",
           "AUGMENT_VARIANTS", "run_bench_compare", "run_bench_augment", "run_bench_choices", "run_bench_cache"]

BENCH_SETS = ("digits", "faces", "textures", "reef", "salmon")


def _images_per_second(dataset: CachedImageDataset, cfg: TrainConfig, batches: int) -> float:
    torch.manual_seed(0)
    model = fast_layout(create_model(cfg.model, len(set(dataset.cache.targets)), pretrained=False)).train()
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


def bench_train(data: str | Path, *, model: str = "mobilenet_v2", image_size: int | None = None,
                batch_size: int = 32, batches: int = 12) -> list[dict]:
    """Rows of ``{"mode", "setup_s", "images_per_s", "loader_images_per_s"}`` for cache off and on, then the ratios.

    ``image_size`` None: the size ``fieldid train`` picks for these photos."""
    from .image_size import choose_image_size

    cfg = TrainConfig(model=model, image_size=image_size, batch_size=batch_size)
    split = make_split(data, seed=0)
    image_size, _ = choose_image_size(split, cfg)
    spec = get_backbone(model).preprocess(image_size)
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


# --------------------------------------------------------------------------- datasets
def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert("RGB").save(path)


def _digits(out: Path, per_class: tuple[int, int] = (12, 6)) -> None:
    """scikit-learn's 8x8 handwritten digits (real scans, 16 grey levels), saved as 32-px photos."""
    from PIL import Image

    d = require_extra("sklearn.datasets", "bench", "the digits bench set").load_digits()
    seen: dict[tuple[str, int], int] = {}
    for img, y in zip(d.images, d.target):
        for part, quota in zip(("train", "test"), per_class):
            if seen.get((part, y), 0) < quota:
                seen[(part, y)] = seen.get((part, y), 0) + 1
                arr = (255 - img * (255 / 16)).astype(np.uint8)  # dark ink on paper
                big = np.asarray(Image.fromarray(arr).resize((32, 32), Image.Resampling.BILINEAR))
                _save(big, out / part / str(y) / f"{y}_{seen[(part, y)]:03d}.png")
                break


def _faces(out: Path, per_class: tuple[int, int] = (40, 20)) -> None:
    """scikit-image's LFW subset: 100 real 25x25 face crops and 100 non-face patches."""
    data = require_extra("skimage.data", "bench", "the faces bench set")

    imgs = data.lfw_subset()
    for cls, block in (("face", imgs[:100]), ("not_face", imgs[100:])):
        for i, img in enumerate(block[:sum(per_class)]):
            part = "train" if i < per_class[0] else "test"
            _save((img * 255).astype(np.uint8), out / part / cls / f"{cls}_{i:03d}.png")


def _textures(out: Path, per_class: tuple[int, int] = (20, 10), size: int = 64, seed: int = 0) -> None:
    """Crops of scikit-image's texture photos; train crops from the top 70% of each photo, test from
    the rest, so no test pixel was seen in training."""
    from PIL import Image

    data = require_extra("skimage.data", "bench", "the textures bench set")
    rng = np.random.default_rng(seed)
    for cls in ("brick", "grass", "gravel", "moon"):
        photo = getattr(data, cls)()
        h, w = photo.shape[:2]
        cut = int(h * 0.7)
        for part, quota, (lo, hi) in (("train", per_class[0], (0, cut)), ("test", per_class[1], (cut, h))):
            for i in range(quota):
                side = int(rng.integers(48, min(128, hi - lo) + 1))
                y0 = int(rng.integers(lo, hi - side + 1))
                x0 = int(rng.integers(0, w - side + 1))
                crop = Image.fromarray(photo[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.Resampling.BILINEAR)
                _save(np.asarray(crop), out / part / cls / f"{cls}_{i:03d}.png")


def make_bench_datasets(root: str | Path, names: tuple[str, ...] = BENCH_SETS, *, demo_scale: float = 0.12) -> dict[str, Path]:
    """Build (once) the benchmark's datasets under ``root``; returns name -> folder."""
    from .demo_data import make_demo_dataset

    root = Path(root)
    builders = {"digits": _digits, "faces": _faces, "textures": _textures}
    out = {}
    for name in names:
        folder = root / name
        if name in ("reef", "salmon"):
            make_demo_dataset(name, folder, scale=demo_scale, progress=False)
        elif name in builders:
            if not (folder / ".complete").is_file():
                import shutil

                shutil.rmtree(folder, ignore_errors=True)
                builders[name](folder)
                (folder / ".complete").touch()
        else:
            raise UsageError(f"unknown bench dataset {name!r}; valid: {', '.join(BENCH_SETS)}")
        out[name] = folder
    return out


# --------------------------------------------------------------------------- compare
def bench_compare(work: str | Path, names: tuple[str, ...] = BENCH_SETS, *, demo_scale: float = 0.12,
                  train_args: list[str] | None = None) -> list[dict]:
    """Reference vs ``fieldid train`` (defaults) on each dataset, same split, one after the other."""
    from .data import make_split

    work = Path(work)
    sets = make_bench_datasets(work / "data", names, demo_scale=demo_scale)
    rows = []
    for name, folder in sets.items():
        split = make_split(folder, seed=0)  # the split `fieldid train` makes with its default seed
        split_file = atomic_write_json(work / f"{name}-split.json", {
            "labels": split.labels,
            "train": [[str(p), y] for p, y in zip(split.paths("train"), split.targets("train"))],
            "test": [[str(p), y] for p, y in zip(split.paths("test"), split.targets("test"))]})
        print(f"[{name}] reference fine-tune ...", flush=True)
        ref_s, ref_out = timed_run([sys.executable, "-m", "fieldid.training.bench_reference", str(split_file)],
                                work / f"{name}-reference.log")
        ref = json.loads(ref_out.strip().splitlines()[-1])
        print(f"[{name}] fieldid train (defaults) ...", flush=True)
        ours_s, metrics, record = fieldid_train(folder, work / "runs" / name, train_args or [],
                                                 work / f"{name}-fieldid.log")
        row = {"dataset": name, "train": len(split.files["train"]), "val": len(split.files["val"]),
               "test": len(split.files["test"]), "classes": len(split.labels),
               "reference_accuracy": round(ref["test_accuracy"], 4), "reference_s": round(ref_s, 1),
               "fieldid_accuracy": round(metrics["accuracy"], 4), "fieldid_s": round(ours_s, 1),
               "fieldid_image_size": record["extra"].get("image_size"),
               "fieldid_epochs": metrics["training"]["epochs"],
               "time_ratio": round(ours_s / ref_s, 2)}
        row["goal_met"] = row["fieldid_accuracy"] >= row["reference_accuracy"] and row["time_ratio"] <= 2.0
        rows.append(row)
        print(f"[{name}] reference {row['reference_accuracy']:.3f} in {ref_s:.0f} s, fieldid "
              f"{row['fieldid_accuracy']:.3f} in {ours_s:.0f} s (x{row['time_ratio']})", flush=True)
        atomic_write_json(work / "bench-train.json", rows)
    return rows


def format_compare(rows: list[dict]) -> str:
    lines = ["| dataset | train/val/test | classes | reference acc | reference s | fieldid acc | fieldid s "
             "| fieldid px | epochs | time ratio | goal |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['train']}/{r['val']}/{r['test']} | {r['classes']} | "
                     f"{r['reference_accuracy']:.3f} | {r['reference_s']:.0f} | {r['fieldid_accuracy']:.3f} | "
                     f"{r['fieldid_s']:.0f} | {r['fieldid_image_size']} | {r['fieldid_epochs']} | "
                     f"{r['time_ratio']:.2f} | {'met' if r['goal_met'] else 'NOT met'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- augmentation sweep
# ``augment:`` overrides of each variant (AugmentConfig keys; {} = the shipped defaults).
AUGMENT_VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # The kind the defaults replaced: crops down to 35% of the area, more rotation and blur.
    "strong": {"scale_min": 0.35, "rotate_degrees": 15.0, "blur_prob": 0.3},
    # Full-area crops only (RandomResizedCrop still varies the aspect ratio a little).
    "none": {"scale_min": 1.0, "hflip": False, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
             "blur_prob": 0.0, "rotate_degrees": 0.0},
}


def _variant_config(work: Path, name: str) -> list[str]:
    """``fieldid train`` flags for variant ``name``: a YAML with its ``augment`` overrides."""
    overrides = AUGMENT_VARIANTS[name]
    if not overrides:
        return []
    import yaml

    path = work / f"augment-{name}.yaml"
    path.write_text(yaml.safe_dump({"augment": overrides}, sort_keys=True))
    return ["--config", str(path)]


def bench_augment(work: str | Path, names: tuple[str, ...] = BENCH_SETS, variants: tuple[str, ...] = tuple(AUGMENT_VARIANTS),
                  *, demo_scale: float = 0.12) -> list[dict]:
    """``fieldid train`` per dataset and augmentation variant, everything else at its defaults."""
    unknown = [v for v in variants if v not in AUGMENT_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(AUGMENT_VARIANTS)}")
    work = Path(work)
    sets = make_bench_datasets(work / "data", names, demo_scale=demo_scale)
    flags = {v: _variant_config(work, v) for v in variants}  # one YAML per variant, shared by every dataset
    rows = []
    for name, folder in sets.items():
        for variant in variants:
            print(f"[{name}] fieldid train, augmentation {variant} ...", flush=True)
            secs, metrics, _ = fieldid_train(folder, work / "augment-runs" / variant / name, flags[variant],
                                              work / f"{name}-augment-{variant}.log")
            rows.append({"dataset": name, "variant": variant, "test": metrics["num_images"],
                         "accuracy": round(metrics["accuracy"], 4), "val_accuracy": round(metrics["val"]["accuracy"], 4),
                         "seconds": round(secs, 1), "epochs": metrics["training"]["epochs"]})
            print(f"[{name}] {variant}: test accuracy {rows[-1]['accuracy']:.3f} in {secs:.0f} s", flush=True)
            atomic_write_json(work / "bench-augment.json", rows)
    return rows


def format_augment(rows: list[dict]) -> str:
    """Test accuracy (and seconds) per dataset and variant, the mean per variant, and the best one."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    sets = list(dict.fromkeys(r["dataset"] for r in rows))
    cell = {(r["dataset"], r["variant"]): r for r in rows}
    lines = ["| dataset | test images | " + " | ".join(f"{v} acc (s)" for v in variants) + " |",
             "|---|---:|" + "---:|" * len(variants)]
    for d in sets:
        n = next(r["test"] for r in rows if r["dataset"] == d)
        lines.append(f"| {d} | {n} | " + " | ".join(
            f"{cell[d, v]['accuracy']:.3f} ({cell[d, v]['seconds']:.0f})" if (d, v) in cell else "-" for v in variants) + " |")
    means = {v: float(np.mean([cell[d, v]["accuracy"] for d in sets if (d, v) in cell])) for v in variants}
    lines.append("| mean | | " + " | ".join(f"{means[v]:.3f}" for v in variants) + " |")
    best = max(means, key=means.get)
    lines.append(f"best mean test accuracy: {best} ({means[best]:.3f})"
                 + ("" if best == "defaults" or "defaults" not in means else
                    f"; the shipped defaults: {means['defaults']:.3f}"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- speed choices
def _timed_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *, bf16: bool = False,
                 counter: Callable[[], int] | None = None) -> tuple[list[float], list[int]]:
    """Seconds (and ``counter``'s increase, e.g. page faults) of ``steps`` training steps (forward, backward,
    AdamW), after one more that is dropped: the first step warms up kernels and the heap."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times, counts = [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), counter() if counter else 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
            counts.append(counter() - c0 if counter else 0)
    return times, counts


def _timed_passes(model: torch.nn.Module, x: torch.Tensor, passes: int, *, bf16: bool = False) -> list[float]:
    """Seconds of ``passes`` inference passes (eval mode, no gradients), after one more that is dropped."""
    model.eval()
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(passes + 1):
            t0 = time.perf_counter()
            model(x)
            if i:
                times.append(time.perf_counter() - t0)
    return times


def bench_choices(*, image_size: int = 160, batch_size: int = 32, steps: int = 4) -> list[dict]:
    """Seconds per training step of MobileNetV2 under each CPU setting training could pick, and per
    inference pass over the same batch (eval mode, no gradients: the run's evaluation and feature passes)."""
    from .compute import cpu_supports_bf16

    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))
    rows = []
    for name, channels_last, bf16 in (("fp32", False, False), ("fp32 channels-last", True, False),
                                      ("bf16 autocast", False, True), ("bf16 autocast channels-last", True, True)):
        model = create_model("mobilenet_v2", 10, pretrained=False)
        if channels_last:  # the weights only, as training lays them out (fast_layout): the input stays as loaded
            model = fast_layout(model)
        times, _ = _timed_steps(model, x, y, steps, bf16=bf16)
        # a pass is a fifth of a step: more of them for a steady median
        passes = _timed_passes(model, x, 3 * steps, bf16=bf16)
        rows.append({"setting": name, "s_per_step": float(np.median(times)),
                     "s_per_inference": float(np.median(passes))})
        print(f"  {name:<28} {rows[-1]['s_per_step']:.3f} s/step, {rows[-1]['s_per_inference']:.3f} s/inference pass",
              flush=True)
    base, base_inf = rows[0]["s_per_step"], rows[0]["s_per_inference"]
    for r in rows:  # the ratios of the unrounded medians (a small pass can round to 0.000 s)
        r["vs_fp32"] = round(r["s_per_step"] / base, 2)
        r["inference_vs_fp32"] = round(r["s_per_inference"] / base_inf, 2)
        r["s_per_step"], r["s_per_inference"] = round(r["s_per_step"], 4), round(r["s_per_inference"], 4)
    rows.append({"setting": f"CPU bf16 support (avx512_bf16/amx_bf16): {'yes' if cpu_supports_bf16() else 'no'}; "
                            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"})
    return rows


def allocator_probe(image_size: int = 224, batch_size: int = 32, steps: int = 4) -> dict:
    """One process's training steps and inference passes (MobileNetV2, fp32 channels-last, as training runs
    on CPU) with the page faults they cost: :func:`bench_allocator` runs it in a fresh process per allocator
    setting, since glibc's malloc settings hold for a whole process."""
    import resource

    from fieldid.machine import keep_freed_memory

    kept = keep_freed_memory()  # a no-op under FIELDID_MALLOC=system, the comparison's other side
    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 3, image_size, image_size), torch.randint(0, 10, (batch_size,))
    model = fast_layout(create_model("mobilenet_v2", 10, pretrained=False))
    times, step_faults = _timed_steps(model, x, y, steps,
                                      counter=lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    passes = _timed_passes(model, x, 2 * steps)
    return {"malloc": "keeps freed memory" if kept else "glibc defaults", "s_per_step": float(np.median(times)),
            "faults_per_step": int(np.median(step_faults)), "s_per_inference": float(np.median(passes)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_allocator(rounds: int = 2) -> list[dict]:
    """:func:`allocator_probe` with glibc's malloc defaults and with fieldid's setting
    (:func:`fieldid.machine.keep_freed_memory`), alternated ``rounds`` times so a drift in the machine's
    speed hits both sides."""
    import os
    import subprocess

    rows = []
    for _ in range(rounds):
        for setting in ("system", "keep"):
            env = {**os.environ, "FIELDID_MALLOC": setting}
            out = subprocess.run([sys.executable, "-c", "import json; from fieldid.training.bench import "
                                  "allocator_probe; print(json.dumps(allocator_probe()))"],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {r['malloc']:<20} {r['s_per_step']:.3f} s/step, {r['faults_per_step']} page faults/step, "
                  f"{r['s_per_inference']:.3f} s/inference pass, peak {r['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def run_bench_compare(work: str | Path, sets: tuple[str, ...] = BENCH_SETS, *, demo_scale: float = 0.12,
                      train_args: list[str] | None = None) -> int:
    """``fieldid bench train compare``: :func:`bench_compare`, then its table; 2 for bad input (one line)."""
    try:
        rows = bench_compare(work, sets, demo_scale=demo_scale, train_args=train_args or [])
    except ValueError as e:  # an unknown set, a missing optional package (MissingExtra)
        if not is_bad_input(e):
            raise
        print(f"bench compare: error: {e}", file=sys.stderr)
        return 2
    print("\n" + format_compare(rows))
    return 0


def run_bench_augment(work: str | Path, sets: tuple[str, ...] = BENCH_SETS,
                      variants: tuple[str, ...] = tuple(AUGMENT_VARIANTS), *, demo_scale: float = 0.12) -> int:
    """``fieldid bench train augment``: :func:`bench_augment`, then its table; 2 for bad input (one line)."""
    try:
        rows = bench_augment(work, sets, variants, demo_scale=demo_scale)
    except ValueError as e:
        print(f"bench augment: error: {e}", file=sys.stderr)
        return 2
    print("\n" + format_augment(rows))
    return 0


def run_bench_choices() -> int:
    """``fieldid bench train choices``: :func:`bench_choices` as a table."""
    rows = bench_choices()
    print("\nMobileNetV2, a batch of 32 photos at 160 px: a training step (forward, backward, AdamW) and an "
          "inference pass (eval mode, no gradients). Training uses fp32 channels-last on CPU.\n")
    print("| setting | s/step | vs fp32 | s/inference pass | vs fp32 |\n|---|---:|---:|---:|---:|")
    for r in rows[:-1]:
        print(f"| {r['setting']} | {r['s_per_step']} | {r['vs_fp32']} | {r['s_per_inference']} | "
              f"{r['inference_vs_fp32']} |")
    print(rows[-1]["setting"])
    print("\nThe allocator (MobileNetV2 fp32 channels-last, a batch of 32 at 224 px, each row a fresh process): "
          "glibc's defaults against fieldid's commands, whose malloc keeps freed memory "
          "(fieldid.machine.keep_freed_memory; FIELDID_MALLOC=system turns it off).\n")
    alloc = bench_allocator()
    print("| malloc | s/step | page faults/step | s/inference pass | peak RSS MB |\n|---|---:|---:|---:|---:|")
    for r in alloc:
        print(f"| {r['malloc']} | {r['s_per_step']:.3f} | {r['faults_per_step']} | {r['s_per_inference']:.3f} | "
              f"{r['peak_rss_mb']:.0f} |")
    sides = {m: [r for r in alloc if r["malloc"] == m] for m in ("glibc defaults", "keeps freed memory")}
    if all(sides.values()):  # off glibc both sides are the defaults: nothing to compare
        (s0, m0), (s1, m1) = ((float(np.mean([r["s_per_step"] for r in rs])),
                               float(np.mean([r["peak_rss_mb"] for r in rs]))) for rs in sides.values())
        print(f"kept freed memory: {s1 / s0:.2f}x the seconds per training step, {m1 / m0:.2f}x the peak RSS")
    return 0


def run_bench_cache(data: str | Path, *, model: str = "mobilenet_v2", image_size: int | None = None,
                    batch_size: int = 32, steps: int = 12, json_out: Path | None = None) -> int:
    """``fieldid bench train cache``: :func:`bench_train` (cache off and on) as a table; the rows also go to
    ``json_out``."""
    rows = bench_train(data, model=model, image_size=image_size, batch_size=batch_size, batches=steps)
    print("\n| mode | setup s | train images/s | loader alone images/s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r.get('setup_s', '')} | {r['images_per_s']} | {r['loader_images_per_s']} |")
    if json_out:
        atomic_write_json(json_out, rows)
    print(json.dumps(rows[-1]))
    return 0
