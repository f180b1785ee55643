"""The package layout: old flat module paths that saved run configs name still resolve to the moved classes."""

from __future__ import annotations

import pytest
from hydra.utils import get_class

import exprae

OLD_TARGETS = {
    "exprae.module.AutoencoderModule": "exprae.training.AutoencoderModule",
    "exprae.callbacks.DivergenceGuard": "exprae.training.DivergenceGuard",
    "exprae.callbacks.BatchSeed": "exprae.training.BatchSeed",
    "exprae.callbacks.ReconstructionFigures": "exprae.training.ReconstructionFigures",
    "exprae.preprocessing.Preprocessing": "exprae.data.Preprocessing",
    "exprae.runguard.RunDirGuard": "exprae.runs.RunDirGuard",
    "exprae.data.ExpressionDataModule": "exprae.data.datamodule.ExpressionDataModule",
    "exprae.losses.MSELoss": "exprae.losses.expression.MSELoss",
    "exprae.nn.AutoEncoder": "exprae.nn.autoencoder.AutoEncoder",
}


@pytest.mark.parametrize("old", sorted(OLD_TARGETS))
def test_old_target_paths_resolve_to_the_moved_class(old: str) -> None:
    assert get_class(old) is get_class(OLD_TARGETS[old])


def test_every_moved_module_is_listed_once() -> None:
    assert set(exprae.MOVED_MODULES) == {p.rsplit(".", 1)[0] for p in OLD_TARGETS if p.count(".") == 2} - {
        "exprae.data",
        "exprae.losses",
        "exprae.nn",
    }
