"""Reading a checkpoint back: the one place exprae opens a ``.ckpt`` (resume, ``exprae.load``, ``exprae-predict``).

Checkpoints are read with ``torch.load(weights_only=True)``, which refuses a pickle that would run code, so
a checkpoint from an untrusted source can be opened without executing anything from it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from exprae.errors import DataError, DataFileNotFoundError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt")  # tried in this order for a run directory


class UnsafeCheckpointError(DataError):
    """A checkpoint (or a saved config) holds more than tensors and plain data, so loading it could run code."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as plain data (``weights_only=True``), with its ``state_dict`` checked to be there."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains Python objects other than tensors and plain data, which "
            f"could execute code when unpickled (torch.load(weights_only=True) said: {str(e).splitlines()[0]}). "
            "Only load checkpoints written by exprae-train from a source you trust."
        ) from e
    except FileNotFoundError as e:
        raise DataFileNotFoundError(f"checkpoint {path} does not exist") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated, or not a torch file at all
        raise DataError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(f"{path} has no 'state_dict': not a Lightning checkpoint written by exprae-train")
    return ckpt


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` for a run directory (best, else last checkpoint) or a checkpoint file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(f"{path} does not exist: pass a run directory or a .ckpt file inside one")
    if not path.is_dir():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return run_dir, path
    folder = path / CHECKPOINT_DIR
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return path, folder / name
    found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    raise DataFileNotFoundError(
        f"no checkpoint in {folder} (looked for {', '.join(CHECKPOINT_NAMES)}; found {found or 'none'}); "
        "was the run trained with callbacks=none?"
    )
