"""The ``fieldid train`` flags, shared by ``fieldid train`` and ``fieldid tune`` (training.py). Torch-free."""
from __future__ import annotations

import argparse
from pathlib import Path

from fieldid.cli_vocabulary import add_renamed
from fieldid.training.config import BATCHNORM_MODES, IMBALANCE_MODES, OBJECTIVES  # torch-free

__all__ = ["add_train_args", "train_overrides"]


def add_train_args(p: argparse.ArgumentParser, *, require_data: bool = True) -> None:
    """Training flags; reused by ``fieldid tune`` so both accept the same knobs."""
    p.add_argument("--data", type=Path, default=None, help="ImageFolder dataset root (flat or train/val/test)")
    p.add_argument("--model", default=None, help="backbone: mobilenet_v2, efficientnet_lite0, efficientnet_lite2 or timm/<name> (default from config: mobilenet_v2)")
    p.add_argument("--epochs", type=int, default=None, help="most epochs, incl. head-only ones; early stopping ends sooner on a val plateau (default from config: 8)")
    p.add_argument("--image-size", type=int, default=None, help="crop size in pixels (default: matched to the photos, at least 160, when they are smaller than the backbone's native size, else native)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default from config: 32)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default from config: 3e-4)")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what model selection, early stopping and the probe guard optimise: accuracy on the photos' "
                        "own class mix, or balanced accuracy (every class counts the same) (default from config: accuracy)")
    p.add_argument("--imbalance", choices=IMBALANCE_MODES, default=None,
                   help="class-imbalance handling; auto = none for --objective accuracy, logit adjustment for "
                        "balanced (default from config: auto)")
    p.add_argument("--batchnorm", choices=BATCHNORM_MODES, default=None,
                   help="BatchNorm statistics while fine-tuning: adapt = re-estimated on the training photos, "
                        "train = the pretrained ones updated from each batch, frozen = the pretrained ones kept; "
                        "auto = adapt unless the linear probe scores higher on val with the pretrained ones "
                        "(default from config: auto)")
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
    p.add_argument("--train-precision", dest="precision", default=None,
                   help="Lightning numeric precision of training: 32-true, 16-mixed, bf16-mixed (default: AMP on GPU, "
                        "32-true on CPU); --precision names an exported model's precision elsewhere")
    add_renamed(p, "train")  # the old --precision: refused with a hint for one release
    p.add_argument("--num-workers", type=int, default=None,
                   help="decode/augmentation worker processes (default: half the cores on CPU, up to 8 on GPU)")
    p.add_argument("--teacher", default=None,
                   help="distil from this finished run (the server model; same labels), default: none")
    p.add_argument("--distill-weight", type=float, default=None,
                   help="share of the teacher's soft-label loss (default from config: 0.5)")
    p.add_argument("--distill-temperature", type=float, default=None,
                   help="distillation temperature T (default from config: 2.0)")


def train_overrides(args: argparse.Namespace) -> dict:
    """CLI flags that override config values (unset flags are ``None`` and change nothing)."""
    return {
        "model": args.model, "epochs": args.epochs, "image_size": args.image_size,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "weights": args.weights,
        "objective": args.objective, "imbalance": args.imbalance, "batchnorm": args.batchnorm,
        "pretrained": False if args.no_pretrained else None, "augment.hue": 0.0 if args.no_hue else None,
        "cache": False if args.no_cache else None, "accelerator": args.accelerator,
        "devices": args.devices, "strategy": args.strategy, "num_nodes": args.num_nodes,
        "precision": args.precision, "num_workers": args.num_workers, "teacher": args.teacher, "distill_weight": args.distill_weight,
        "distill_temperature": args.distill_temperature,
    }
