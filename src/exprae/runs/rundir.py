"""The run directory: what a training run writes next to its checkpoints, and how it is read back safely.

Everything here is plain data (JSON, CSV, YAML): reading a run never executes code from it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from exprae.errors import DataError, DataFileNotFoundError

CONTRACT_FILE = "data_contract.json"  # genes, matrix and preprocessing the model expects
SPLIT_FILE = "split.csv"  # which cells were train / val / test
METRICS_FILE = "metrics.json"  # final val/test metrics of the model and the baselines
HISTORY_FILE = "history.csv"  # one row per epoch: train/val metrics, learning rate, seconds
CELLS_FILE = "cells.csv"  # per-cell val/test scores of the final model and the baselines
ENVIRONMENT_FILE = "environment.json"  # versions and git commit, for reproducibility
CONFIG_FILE = ".hydra/config.yaml"  # Hydra's resolved-at-compose config
ERROR_FILE = "error.txt"  # why a run that left its directory failed (exprae-compare shows it)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; a run's files follow the umask like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def new_file_mode() -> int:
    """The permissions ``open()`` would give a new file under the current umask (0o666 minus the umask)."""
    try:  # Linux >= 4.7 reports the umask without changing it (os.umask would, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, strict JSON: a NaN or infinite number is written as ``null``.

    ``json.dumps`` would write ``NaN``/``Infinity``, which is not JSON (``jq``, JavaScript and most JSON
    readers refuse the file); in a metrics file ``null`` means "not defined for this run".
    """
    text = json.dumps(_strict(obj), indent=2, sort_keys=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def _strict(o: Any) -> Any:
    """``o`` as plain JSON data: numpy scalars and arrays unpacked, non-finite floats replaced by None."""
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (str, int, bool)):
        return o
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return _strict(o.tolist())
    if hasattr(o, "item"):
        return _strict(o.item())
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
        raise DataFileNotFoundError(f"{path} not found: is this an exprae run directory?")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} could not be read as JSON (truncated or edited?): {e}") from e


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
