"""Where and how a run computes: CPU features, decode workers, precision, and the Lightning
devices / strategy / Trainer built from the config (mistakes there are one-line ConfigErrors)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fieldid.cli_common import first_line

from .config import ConfigError, TrainConfig

__all__ = ["cpu_supports_bf16", "resolve_num_workers", "resolve_precision", "lightning_devices",
           "lightning_strategy", "launch_rank", "make_trainer"]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX-512 BF16 or AMX), as oneDNN needs for fast bf16."""
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_num_workers(cfg: TrainConfig) -> int:
    """``--num-workers``, else from the core count: half the cores on CPU (the model's threads need
    the rest), up to 8 when a GPU trains (decoding must keep it fed)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    from .data import default_num_threads

    cores = default_num_threads()
    on_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return min(8, cores - 1) if on_gpu else min(4, cores // 2)


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision:
        return cfg.precision
    on_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    # bf16 autocast on CPU was measured slower than fp32 for MobileNet-style training, even
    # with AMX (make bench-train, "precision" rows), so fp32 stays the CPU default.
    return "32-true"


def lightning_devices(cfg: TrainConfig) -> Any:
    d = str(cfg.devices)
    return int(d) if d.isdigit() else d


def lightning_strategy(cfg: TrainConfig) -> str:
    """Lightning strategy name, with DDP told that the head-only epochs leave parameters unused.

    DDP registers every parameter when it wraps the model; freezing the backbone afterwards
    (head-only epochs) makes it fail at the next step unless it looks for unused parameters.
    """
    from lightning.fabric.utilities.imports import _IS_INTERACTIVE

    name = cfg.strategy
    devices = lightning_devices(cfg)
    if isinstance(devices, str):
        devices = len(devices.strip(",").split(",")) if "," in devices else (
            torch.cuda.device_count() if devices in ("-1", "auto") and cfg.accelerator != "cpu" else 1)
    if name == "auto" and (devices > 1 or cfg.num_nodes > 1):
        name = "ddp_notebook" if _IS_INTERACTIVE else "ddp"  # what Lightning's "auto" would pick
    if cfg.head_epochs > 0 and name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        return f"{name}_find_unused_parameters_true"
    return name


def launch_rank() -> int:
    """Global rank given by a launcher (Lightning's DDP re-exec, torchrun, SLURM); 0 when alone.

    Known before the Trainer exists, so only the first process creates the run directory.
    """
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var, "0")
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def make_trainer(**kwargs: Any) -> Any:
    """``lightning.Trainer(**kwargs)``, with accelerator/device/strategy/precision mistakes as a ConfigError."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as e:
        # Lightning's own checks of --accelerator/--devices/--strategy/--precision/--num-nodes;
        # a missing optional package (deepspeed, transformer_engine) arrives as an ImportError.
        msg = first_line(e)
        flags = " ".join(f"--{k.replace('_', '-')} {kwargs.get(k)}"
                         for k in ("accelerator", "devices", "strategy", "precision", "num_nodes"))
        raise ConfigError(f"Lightning rejects {flags}: {msg}") from None
