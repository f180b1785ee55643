"""The built wheel is a working install: it carries the configs, and ``exprae-train`` runs from any directory.

This is what a user on a cluster meets after ``pip install exprae-*.whl`` (or ``pip install .``): no checkout,
no ``configs/`` folder beside the current directory. The wheel is installed into a ``--target`` folder put
first on ``PYTHONPATH``, so the installed copy (not this checkout) is imported; the test asserts that.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A user's own config folder, added with --config-dir: a data config of theirs built on a shipped one.
USER_DATA_CONFIG = """\
defaults:
  - pbmc68k
  - _self_
batch_size: 64
"""


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout exactly as the lead's check builds it."""
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(dist)])
    (built,) = dist.glob("exprae-*.whl")
    return built


def test_wheel_carries_every_config(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n.removeprefix("exprae/configs/") for n in zf.namelist() if n.startswith("exprae/configs/")}
        packages = {str(Path(n).parent) for n in zf.namelist() if n.endswith("__init__.py")}
    in_checkout = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert "train.yaml" in shipped
    assert shipped == in_checkout
    src_packages = {str(p.parent.relative_to(ROOT / "src")) for p in (ROOT / "src" / "exprae").rglob("__init__.py")}
    assert src_packages <= packages, f"packages missing from the wheel: {sorted(src_packages - packages)}"


@pytest.mark.slow
def test_installed_wheel_trains_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)])
    work = tmp_path / "elsewhere"
    (work / "my_configs" / "data").mkdir(parents=True)
    (work / "my_configs" / "data" / "my_pbmc.yaml").write_text(USER_DATA_CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ("EXPRAE_CONFIG_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)  # before site-packages, so the installed copy shadows this checkout's

    where = _run(
        [sys.executable, "-c", "import exprae, exprae.train as t; print(exprae.__file__); print(t.CONFIG_DIR)"],
        cwd=work,
        env=env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where

    run_dir = work / "run"
    _run(
        [
            sys.executable,
            str(site / "bin" / "exprae-train"),
            "--config-dir",
            str(work / "my_configs"),
            "data=my_pbmc",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=work,
        env=env,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 1
    assert math.isfinite(metrics["test"]["model"]["cosine"])
    assert metrics["test"]["pca"]["cosine"] > 0.2  # scored on real cells, not an empty split
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "batch_size: 64" in saved  # the user's config folder was used, on top of the shipped pbmc68k
