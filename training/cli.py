"""CLI for training/: ``fieldid train``, ``evaluate`` and ``data``. Torch-free at import time."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register", "add_train_args", "train_overrides", "HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where a flag has a real default (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


_D = HelpFormatter


def add_train_args(p: argparse.ArgumentParser, *, require_data: bool = True) -> None:
    """Training flags; reused by ``fieldid tune`` so both accept the same knobs."""
    p.add_argument("--data", type=Path, default=None, help="ImageFolder dataset root (flat or train/val/test)")
    p.add_argument("--model", default=None, help="backbone: mobilenet_v2, efficientnet_lite0 or timm/<name> (default from config: mobilenet_v2)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs incl. head-only ones (default from config: 5)")
    p.add_argument("--image-size", type=int, default=None, help="crop size in pixels (default: matched to the photos when they are smaller than the backbone's native size, else native)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default from config: 32)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default from config: 1e-3)")
    p.add_argument("--config", type=Path, default=None, help="YAML file with TrainConfig keys")
    p.add_argument("--seed", type=int, default=None, help="random seed (default from config: 0)")
    p.add_argument("--weights", default=None, help="local state-dict file for the backbone (overrides the default source)")
    p.add_argument("--no-pretrained", action="store_true", help="random init instead of ImageNet weights")
    p.add_argument("--no-hue", action="store_true", help="turn hue jitter off (use when colour is the signal)")
    p.add_argument("--no-cache", action="store_true", help="decode images from disk every epoch instead of the uint8 cache")
    p.add_argument("--accelerator", default=None, help="cpu, gpu, auto ... (Lightning; default auto)")
    p.add_argument("--devices", default=None, help="devices per node, e.g. 1, 2 or auto (Lightning; default 1)")
    p.add_argument("--strategy", default=None, help="auto, ddp, ddp_spawn ... (Lightning; default auto)")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes for multi-node DDP via torchrun/SLURM (default 1)")
    p.add_argument("--precision", default=None, help="32-true, 16-mixed, bf16-mixed (default: AMP on GPU, 32-true on CPU)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="decode/augmentation worker processes (default: half the cores on CPU, up to 8 on GPU)")


def train_overrides(args: argparse.Namespace) -> dict:
    """CLI flags that override config values (unset flags are ``None`` and change nothing)."""
    return {
        "model": args.model, "epochs": args.epochs, "image_size": args.image_size,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "weights": args.weights,
        "pretrained": False if args.no_pretrained else None, "augment.hue": 0.0 if args.no_hue else None,
        "cache": False if args.no_cache else None, "accelerator": args.accelerator,
        "devices": args.devices, "strategy": args.strategy, "num_nodes": args.num_nodes,
        "precision": args.precision, "num_workers": args.num_workers,
    }


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, load_config
    from .train import train

    if args.resume is not None:
        extra = [f for f, v in (("--data", args.data), ("--out", args.out), ("--config", args.config)) if v is not None]
        if extra:
            raise ValueError(f"--resume continues the run with its own {', '.join(extra)}; drop {', '.join(extra)}")
        rec = train(None, None, resume=args.resume, resume_overrides=train_overrides(args))
    else:
        if args.data is None or args.out is None:
            raise ValueError("need --data DIR and --out RUN (or --resume RUN)")
        cfg = load_config(args.config) if args.config else TrainConfig()
        cfg = cfg.replace(**train_overrides(args))
        rec = train(args.data, args.out, cfg)
    if rec.status != "trained":
        return 0  # a DDP rank other than 0: rank 0 finalises the run and prints the summary
    print(json.dumps({"run": str(args.resume or args.out), "test_accuracy": rec.extra.get("test_accuracy"),
                      "test_macro_f1": rec.extra.get("test_macro_f1"), "temperature": rec.temperature,
                      "fallback_threshold": rec.fallback_threshold}))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate

    m = evaluate(args.run, args.data, out=args.out)
    print(json.dumps({"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "split": m["split"],
                      "num_images": m["num_images"], "ece_calibrated": m["ece_calibrated"],
                      "metrics_file": m["metrics_file"]}))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .datacheck import main_check

    argv = [str(args.dir), "--near-threshold", str(args.near_threshold), "--min-side", str(args.min_side)]
    if args.json:
        argv += ["--json", str(args.json)]
    return main_check(argv)


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from .demo_data import make_demo_dataset

    s = make_demo_dataset(args.name, args.out, seed=args.seed, scale=args.scale)
    print(json.dumps({"name": s.name, "out": str(s.out), "counts": s.counts}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a backbone on an ImageFolder dataset", formatter_class=_D)
    add_train_args(p)
    p.add_argument("--out", type=Path, default=None, help="new run directory")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue an interrupted run directory with its own settings; only --epochs, --num-workers, "
                        "--no-cache, --accelerator and --precision may change (others are refused)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix and calibration of a run", formatter_class=_D)
    p.add_argument("--run", type=Path, required=True, help="run directory")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: the run's own held-out test split)")
    p.add_argument("--out", type=Path, default=None,
                   help="metrics file to write (default: RUN/metrics.json for the run's own held-out split, "
                        "RUN/metrics-<folder>.json for any other folder)")
    p.set_defaults(func=_cmd_evaluate)

    from .tune import register_tune  # torch-free: optuna and lightning load only when it runs

    register_tune(sub)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    c = dsub.add_parser("check", help="counts, imbalance, unreadable files, duplicates, leakage", formatter_class=_D)
    c.add_argument("dir", type=Path, help="ImageFolder dataset root")
    c.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    c.add_argument("--near-threshold", type=int, default=4, help="perceptual-hash Hamming distance for near duplicates")
    c.add_argument("--min-side", type=int, default=32, help="images with a smaller side are reported as tiny")
    c.set_defaults(func=_cmd_data_check)
    d = dsub.add_parser("demo", help="generate a built-in synthetic demo dataset", formatter_class=_D)
    d.add_argument("name", choices=["reef", "salmon"], help="which demo dataset")
    d.add_argument("out", type=Path, help="output folder")
    d.add_argument("--seed", type=int, default=0, help="generator seed")
    d.add_argument("--scale", type=float, default=1.0, help="multiply the per-class image counts")
    d.set_defaults(func=_cmd_data_demo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `fieldid` command")
