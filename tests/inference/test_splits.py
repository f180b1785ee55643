"""Split marks: embed and predict say which cells the model was trained on, and no summary mixes them in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import exprae
from exprae import predict
from exprae.inference.splits import split_marks, summary
from exprae.runs import rundir


def test_marks_follow_the_split_table_by_name(tmp_path):
    pd.DataFrame({"obs_name": ["a", "b", "c", "d", "d"], "split": ["train", "val", "test", "train", "val"]}).to_csv(
        tmp_path / rundir.SPLIT_FILE, index=False
    )
    marks = split_marks(["c", "zz", "a", "b", "d"], tmp_path)
    # "d" is listed under two splits (duplicated cell names in training): neither claim is trusted.
    assert list(marks) == ["test", "new", "train", "val", "ambiguous"]


def test_a_run_without_split_table_marks_unknown_and_warns(tmp_path):
    with pytest.warns(UserWarning, match="unknown which cells the model was trained on"):
        marks = split_marks(["a", "b"], tmp_path)
    assert list(marks) == ["unknown", "unknown"]


@pytest.fixture(scope="module")
def embedded(pbmc_run, pbmc):
    model = exprae.load(pbmc_run, device="cpu")
    return exprae.embed(model, pbmc, baselines=True, copy=True)


def test_embed_marks_each_cell_as_the_run_split_it(embedded, pbmc_run):
    table = pd.read_csv(pbmc_run / rundir.SPLIT_FILE).set_index("obs_name")["split"]
    marks = embedded.obs["exprae_split"].astype(str)
    assert (marks == table.loc[embedded.obs_names].to_numpy()).all()
    assert embedded.uns["exprae"]["n_cells_per_split"] == {"train": 560, "val": 70, "test": 70}
    # On pbmc68k the training cells reconstruct better: exactly why they must not be mixed into a quality score.
    cos = embedded.obs["exprae_cosine"]
    assert cos[marks == "train"].median() > cos[marks.isin(["val", "test"])].median()


def test_renamed_cells_are_new(pbmc_run, pbmc):
    model = exprae.load(pbmc_run, device="cpu")
    other = pbmc[:50].copy()
    other.obs_names = [f"other-{name}" for name in other.obs_names]
    exprae.embed(model, other)
    assert (other.obs["exprae_split"] == "new").all()
    assert other.uns["exprae"]["n_cells_per_split"] == {"new": 50}


def test_gene_r_covers_only_cells_the_model_was_not_trained_on(embedded, pbmc):
    held = (embedded.obs["exprae_split"].astype(str) != "train").to_numpy()
    recon = embedded.layers["exprae_recon"]
    for g in (0, 100, 764):
        expected = np.corrcoef(pbmc.X[held, g], recon[held, g])[0, 1]
        assert embedded.var["exprae_gene_r"].iloc[g] == pytest.approx(expected, abs=1e-5)
    assert embedded.uns["exprae"]["gene_r_cells"].startswith("140 cells not in the run's training set")


def test_summary_reports_held_out_and_training_cells_on_separate_rows(embedded):
    text = summary(embedded)
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()[1:]}
    assert set(rows) == {"held-out (val+test)", "training"}
    marks = embedded.obs["exprae_split"].astype(str)
    held = embedded.obs.loc[marks.isin(["val", "test"]).to_numpy()]
    numbers = rows["held-out (val+test)"].split()
    assert numbers[2] == "140"
    assert float(numbers[3]) == pytest.approx(held["exprae_cosine"].median(), abs=1e-4)
    assert float(numbers[5]) == pytest.approx(held["exprae_pca_cosine"].median(), abs=1e-4)
    assert "not a quality score" in rows["training"]
    assert "PCA median" in text.splitlines()[0] and "mean profile median" in text.splitlines()[0]


def test_predict_prints_which_cells_each_number_covers(pbmc_run, pbmc, tmp_path, capsys):
    path = tmp_path / "in.h5ad"
    pbmc.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    assert predict.main([f"ckpt={pbmc_run}", f"data.path={path}", f"out={out}", "baselines=true"]) == 0
    printed = capsys.readouterr().out
    assert "held-out (val+test)      140" in printed
    assert "training                 560" in printed and "not a quality score" in printed
    assert "PCA median" in printed
