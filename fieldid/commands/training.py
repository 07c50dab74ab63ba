"""`fieldid train`, `evaluate`, `tune` and `data` (the training stage's commands). Torch-free at import time."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fieldid.cli_common import HelpFormatter, UsageError

# The training flags, in their own module: `fieldid train` and `fieldid tune` (both registered here)
# take the same knobs.
from .train_args import add_train_args, train_overrides

__all__ = ["register", "add_train_args", "train_overrides", "HelpFormatter"]


_D = HelpFormatter


def _cmd_train(args: argparse.Namespace) -> int:
    from fieldid.api import train

    from fieldid.training.datacheck import check_notice
    from fieldid.training.exclusions import excluding

    if args.resume is not None:
        extra = [f for f, v in (("--data", args.data), ("--out", args.out), ("--config", args.config),
                                ("--exclude", args.exclude)) if v is not None]
        if extra:
            raise UsageError(f"--resume continues the run with its own {', '.join(extra)}; drop {', '.join(extra)}")
        rec = train(None, None, resume=args.resume, **train_overrides(args)).record
    else:
        if args.data is None or args.out is None:
            raise UsageError("need --data DIR and --out RUN (or --resume RUN)")
        # Only the summary a previous `fieldid data check` left: training never adds a feature pass for it.
        notice = check_notice(args.data)
        if notice:
            print(f"fieldid: {notice}" + (f" (--exclude {args.exclude} given)" if args.exclude else ""),
                  file=sys.stderr, flush=True)
        # make_split (inside train) drops the listed photos after splitting and records them in split.json.
        with excluding(args.exclude):
            rec = train(args.data, args.out, config=args.config, **train_overrides(args)).record
    if rec.status != "trained":
        return 0  # a DDP rank other than 0: rank 0 finalises the run and prints the summary
    print(json.dumps({"run": str(args.resume or args.out), "test_accuracy": rec.extra.get("test_accuracy"),
                      "test_macro_f1": rec.extra.get("test_macro_f1"), "temperature": rec.temperature,
                      "fallback_threshold": rec.fallback_threshold, "shipped": rec.extra.get("shipped"),
                      "val_baselines": rec.extra.get("baselines_val")}))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fieldid.api import evaluate

    m = evaluate(args.run, args.data, out=args.out)
    print(json.dumps({"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "split": m["split"],
                      "num_images": m["num_images"], "ece_calibrated": m["ece_calibrated"],
                      "metrics_file": m["metrics_file"],
                      # What the run checked itself against on val (majority, linear probe, fine-tuned).
                      "shipped": m.get("training", {}).get("shipped"),
                      "val_baselines": m.get("training", {}).get("baselines")}))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data_check import run_check

    return run_check(args)


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from fieldid.training.demo_data import make_demo_dataset

    s = make_demo_dataset(args.name, args.out, seed=args.seed, scale=args.scale)
    print(json.dumps({"name": s.name, "out": str(s.out), "counts": s.counts}))
    return 0


def _cmd_data_ood(args: argparse.Namespace) -> int:
    from fieldid.training.negatives import make_ood_set

    counts = make_ood_set(args.out, unseen=args.unseen, other=args.other, generated=args.generated)
    print(json.dumps({"out": str(args.out), "counts": counts}))
    return 0


# --------------------------------------------------------------------------- fieldid tune
def _cmd_tune(args: argparse.Namespace) -> int:
    from fieldid.training.config import TrainConfig, load_config
    from fieldid.training.tune import TuneError, format_table, load_space, tune

    if args.data is None:
        raise TuneError("need --data DIR")
    overrides = train_overrides(args)
    base = (load_config(args.config) if args.config else TrainConfig()).replace(**overrides)
    # A flag given on the command line fixes that knob for every trial instead of searching it.
    space = load_space(args.space, pinned=[k for k, v in overrides.items() if v is not None])
    r = tune(args.data, args.trials, base=base, space=space, out_dir=args.out, storage=args.storage,
             study_name=args.study, pruner=args.pruner, heartbeat=args.heartbeat, sampler_seed=args.sampler_seed)
    print(format_table(r.rows))
    print(json.dumps({"study": r.study, "storage": r.storage, "best_trial": r.best_trial,
                      "best_val_macro_f1": r.best_value, "best_params": r.best_params,
                      "best_config": str(r.best_config), "best_run": r.best_run, "plot": str(r.plot),
                      "trials": r.counts}))
    return 0


def _register_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter search with Optuna (resumable, multi-process)",
                       formatter_class=HelpFormatter,
                       description="Searches lr, weight decay, label smoothing, dropout, head-only epochs, "
                                   "image size and backbone. Training flags set here are fixed for every "
                                   "trial and not searched. Processes sharing --storage and --study "
                                   "cooperate; rerunning an interrupted command resumes the study.")
    add_train_args(p)
    p.add_argument("--trials", type=int, required=True,
                   help="finished trials the study should reach (shared by every cooperating process)")
    p.add_argument("--out", type=Path, default=None,
                   help="trial runs, best.yaml, search.png, trials.csv (default: runs/tune-<study>)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL: sqlite:///FILE for one machine, postgresql://... or "
                        "mysql+pymysql://... for many (default: sqlite:///<out>/study.db)")
    p.add_argument("--study", default=None, help="study name (default: the dataset folder's name)")
    p.add_argument("--space", type=Path, default=None,
                   help="YAML search space: key: {type: float|int|categorical, low, high, log | choices} "
                        "(default: the built-in space)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="how bad trials are stopped early on their per-epoch val macro-F1")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a trial's heartbeats; a trial silent for twice this is "
                        "failed and retried from its last checkpoint")
    p.add_argument("--sampler-seed", type=int, default=None,
                   help="TPE sampler seed (leave unset when several processes share a study)")
    p.set_defaults(func=_cmd_tune)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a backbone on an ImageFolder dataset", formatter_class=_D)
    add_train_args(p)
    p.add_argument("--out", type=Path, default=None, help="new run directory")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue an interrupted run directory with its own settings; only --epochs, --num-workers, "
                        "--no-cache, --accelerator and --train-precision may change (others are refused)")
    p.add_argument("--exclude", type=Path, default=None, metavar="FILE",
                   help="leave out the photos listed in FILE (one path relative to --data per line, '# reason' "
                        "after it; `fieldid data check --write-exclude` writes one); recorded in split.json "
                        "(default: none)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix and calibration of a run", formatter_class=_D)
    p.add_argument("--run", type=Path, required=True, help="run directory")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: the run's own held-out test split)")
    p.add_argument("--out", type=Path, default=None,
                   help="metrics file to write (default: RUN/metrics.json for the run's own held-out split, "
                        "RUN/metrics-<folder>.json for any other folder)")
    p.set_defaults(func=_cmd_evaluate)

    _register_tune(sub)  # torch-free: optuna and lightning load only when it runs

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    from .data_check import add_check_args  # torch-free

    c = dsub.add_parser("check", help="label issues, duplicates, leakage, outliers, photo quality, unreadable files; "
                                      "an HTML report and an exclude list for training", formatter_class=_D)
    add_check_args(c)
    c.set_defaults(func=_cmd_data_check)
    d = dsub.add_parser("demo", help="generate a built-in synthetic demo dataset", formatter_class=_D)
    d.add_argument("name", choices=["reef", "salmon"], help="which demo dataset")
    d.add_argument("out", type=Path, help="output folder")
    d.add_argument("--seed", type=int, default=0, help="generator seed")
    d.add_argument("--scale", type=float, default=1.0, help="multiply the per-class image counts")
    d.set_defaults(func=_cmd_data_demo)
    o = dsub.add_parser("ood", help="the folder `fieldid bench ood --dir` measures the unknown answer on",
                        formatter_class=_D)
    o.add_argument("out", type=Path, help="output folder (gets other/ and unseen/)")
    o.add_argument("--unseen", type=Path, nargs="*", default=[],
                   help="class folders of the same kind that the model was not trained on")
    o.add_argument("--other", type=Path, nargs="*", default=[], help="folders of other datasets")
    o.add_argument("--generated", type=int, default=120, help="generated gradient / noise / stripe images")
    o.set_defaults(func=_cmd_data_ood)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `fieldid` command")
