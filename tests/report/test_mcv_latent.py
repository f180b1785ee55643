"""exprae-compare names, per loss, the latent size with the best MCV score and whether its lead is real."""

from __future__ import annotations

import pandas as pd
import pytest

from exprae.compare import decide, summarize
from exprae.report.mcv_latent import latent_verdicts, markdown_section, pca_best_latent

# mcv_mse per (loss, latent), three seeds each: mse is clearly best at 16; nb's best (32) leads 16 by noise only.
SCORES = {
    ("mse", 8): [0.100, 0.101, 0.099],
    ("mse", 16): [0.090, 0.0905, 0.0895],
    ("mse", 32): [0.095, 0.096, 0.094],
    ("nb", 8): [0.120, 0.110, 0.130],
    ("nb", 16): [0.100, 0.110, 0.090],
    ("nb", 32): [0.099, 0.109, 0.089],
}
PCA = {8: 0.101, 16: 0.092, 32: 0.097}


def table() -> pd.DataFrame:
    rows = []
    for (loss, latent), values in SCORES.items():
        for seed, value in enumerate(values):
            rows.append(
                {
                    "run": f"{loss}{latent}{seed}",
                    "seed": seed,
                    "loss": loss,
                    "model.latent_dim": latent,
                    "latent_dim": latent,
                    "test/model/mcv_mse": value,
                    "test/pca/mcv_mse": PCA[latent],
                }
            )
    return pd.DataFrame(rows)


def test_best_latent_per_loss_and_whether_it_exceeds_the_seed_spread():
    keys = ["loss", "model.latent_dim"]
    verdicts = {v.panel: v for v in latent_verdicts(summarize(table(), keys), keys, stage="test", decide=decide)}
    mse, nb = verdicts["loss=mse"], verdicts["loss=nb"]
    assert mse.best == "model.latent_dim=16" and mse.exceeds_spread is True
    assert mse.runner_up.setting == "model.latent_dim=32"
    assert nb.best == "model.latent_dim=32" and nb.exceeds_spread is False
    assert pca_best_latent(summarize(table(), keys), stage="test") == ("16", pytest.approx(0.092))
    text = "\n".join(markdown_section(summarize(table(), keys), keys, stage="test", decide=decide))
    assert "| loss=mse | 16 | 0.0900 ± 0.0005 | 32 | 0.0950 ± 0.0010 | yes |" in text
    assert "| loss=nb | 32 |" in text and "| no |" in text
    assert "PCA on the same cells is best by MCV at 16 components" in text


def test_no_section_without_mcv_scores_or_a_latent_sweep():
    keys = ["loss", "model.latent_dim"]
    no_mcv = table().drop(columns=["test/model/mcv_mse", "test/pca/mcv_mse"]).assign(**{"test/model/mse": 0.1})
    assert markdown_section(summarize(no_mcv, keys), keys, stage="test", decide=decide) == []
    one_latent = table()[table()["model.latent_dim"] == 16]
    assert markdown_section(summarize(one_latent, ["loss"]), ["loss"], stage="test", decide=decide) == []
