"""Checkpoints: written atomically, loaded without running code from them (``weights_only=True``)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .records import atomic_write_bytes
from .rundir import RunError

__all__ = ["CheckpointError", "atomic_checkpoint_io", "load_checkpoint", "write_state_dict"]


class CheckpointError(RunError):
    """A checkpoint that is missing, truncated or not a fieldid checkpoint."""


def atomic_checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Temp file + rename, so ``kill -9`` mid-save never leaves a half-written checkpoint."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            atomic_write_bytes(path, buf.getvalue())

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
            return load_checkpoint(path)

    return AtomicCheckpointIO()


def _checkpoint_safe_globals() -> list[Any]:
    """Classes allowed in a checkpoint besides tensors and plain containers (``weights_only=True``).

    fieldid's own checkpoints (state dict, optimizer/scheduler state, the callbacks' and loops'
    state) load with none; Lightning's hyper-parameter container is the one class a Lightning
    checkpoint of a module that saves hyper-parameters adds.
    """
    from lightning.fabric.utilities.data import AttributeDict

    return [AttributeDict]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint without running code from it (``torch.load(weights_only=True)``).

    A corrupt or foreign file, and one carrying a pickled callable or any class outside the
    allow-list (:func:`_checkpoint_safe_globals`), is a one-line :class:`CheckpointError`.
    """
    import pickle
    import re

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Runs live on shared disks: a planted checkpoint must not be able to run code on load.
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A class or callable outside the allow-list is named as "GLOBAL module.name"; any other
        # unpickling failure (random bytes, a cut file) is damage, not a planted object.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path}: refused: the checkpoint holds {found.group(1)}, which is not a tensor or "
                                  "an allowed type (checkpoints are loaded with weights_only=True)") from None
        raise CheckpointError(f"{path}: corrupt or half-written checkpoint (UnpicklingError)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or half-written checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a fieldid/Lightning checkpoint")
    return ckpt


def write_state_dict(model: torch.nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
