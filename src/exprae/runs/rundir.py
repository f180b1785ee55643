"""The run directory: what a training run writes next to its checkpoints, and how it is read back safely.

Everything here is plain data (JSON, CSV, YAML): reading a run never executes code from it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

CONTRACT_FILE = "data_contract.json"  # genes, matrix and preprocessing the model expects
SPLIT_FILE = "split.csv"  # which cells were train / val / test
METRICS_FILE = "metrics.json"  # final val/test metrics of the model and the baselines
HISTORY_FILE = "history.csv"  # one row per epoch: train/val metrics, learning rate, seconds
CELLS_FILE = "cells.csv"  # per-cell val/test scores of the final model and the baselines
ENVIRONMENT_FILE = "environment.json"  # versions and git commit, for reproducibility
CONFIG_FILE = ".hydra/config.yaml"  # Hydra's resolved-at-compose config


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def write_config(out_dir: str | Path, cfg: Any) -> Path | None:
    """Save the composed config as ``.hydra/config.yaml`` when Hydra did not (a run started from Python).

    ``exprae.load`` rebuilds the network from this file, so a run trained with ``train(cfg)`` in a notebook
    is as loadable as one from ``exprae-train``. An existing file (Hydra's own) is left untouched.
    """
    from omegaconf import OmegaConf

    path = Path(out_dir) / CONFIG_FILE
    if path.exists():
        return None
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)  # Hydra keeps its own settings in hydra.yaml, not config.yaml
    return write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(container)))


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`write_json`, with an error that names a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this an exprae run directory?")
    return json.loads(path.read_text())


def environment() -> dict[str, Any]:
    """Versions of the libraries that decide the numbers, and the project's git commit if known."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def _version(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
                check=False,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "exprae": _version("exprae"),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": _version("pytorch-lightning"),
        "anndata": _version("anndata"),
        "scanpy": _version("scanpy"),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
