"""Shared fixtures: the real configs composed with Hydra, and small real datasets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import pytest
from hypothesis import settings
from omegaconf import DictConfig

from exprae import compose
from exprae.data.datasets import pbmc68k

# In CI every hypothesis test draws the same examples, so a red build is reproducible and never a lucky draw;
# tests that pass their own settings keep them. Locally the default (random) profile keeps searching.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Overrides that keep a real run short and quiet on 2 CPU cores.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.deterministic=true",
]


# Public raw-count matrices kept beside the project, never committed (their README names the sources).
REALDATA = Path(os.environ.get("EXPRAE_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))


@pytest.fixture(scope="session")
def realdata() -> Callable[[str], Path]:
    """``realdata("pbmc4k_soupx.h5ad")``: the path of a real count matrix, or skip saying which file is absent."""

    def _path(name: str) -> Path:
        path = REALDATA / name
        if not path.is_file():
            pytest.skip(
                f"real count matrix {path} is absent (set EXPRAE_REALDATA to the folder holding it; "
                "sources in docs and that folder's README)"
            )
        return path

    return _path


@pytest.fixture(scope="session")
def pbmc() -> ad.AnnData:
    """scanpy's bundled pbmc68k_reduced (real data, no download); copy before modifying."""
    return pbmc68k()


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``configs/train.yaml`` with overrides; the first run goes to ``tmp_path/run``, later ones to run-1, ..."""
    n_composed = 0

    def _compose(*overrides: str, fast: bool = True) -> DictConfig:
        nonlocal n_composed
        run_dir = tmp_path / ("run" if n_composed == 0 else f"run-{n_composed}")
        n_composed += 1
        return compose([*(FAST if fast else []), *overrides], run_dir)

    return _compose


def train_run(out_dir: Path, *overrides: str) -> Path:
    """Train a short real run into ``out_dir`` (composed from the real configs); return the run directory."""
    from exprae.train import train

    train(compose([*FAST, *overrides], out_dir))
    return out_dir


@pytest.fixture(scope="session")
def pbmc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch pbmc68k run (all 765 genes, X as given), trained once per session; treat as read-only."""
    return train_run(tmp_path_factory.mktemp("pbmc_run"), "trainer.max_epochs=3", "model.latent_dim=8")
