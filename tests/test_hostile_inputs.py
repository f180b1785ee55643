"""The second round of hostile inputs (issue 17): one test per row of docs/reliability.md's newer tables.

Like ``test_bad_input.py``, each refusal is checked for its error type, a message naming the problem and no
output left behind; the inputs are real files the tests write (seeded Poisson counts, pbmc68k, and where
present the real pbmc4k count matrix).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import hydra
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import train_run
from exprae import compare, predict
from exprae.data import ExpressionDataModule, Preprocessing, split_cells
from exprae.errors import ConfigError, DataError, OutputError, TrainingDivergedError
from exprae.runs import rundir
from exprae.train import format_report, train
from test_bad_input import SMALL, SRC, cli_refused, counts, refused, write

COUNTS = ["data=h5ad", "data.preprocess.n_top_genes=null"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- silent wrong results


def test_a_stratify_column_with_missing_labels_splits_the_same_every_time():
    labels = np.array(["a", "b", None, "c", np.nan] * 40, dtype=object)
    splits = [split_cells(200, val_fraction=0.2, test_fraction=0.2, seed=5, stratify=labels) for _ in range(6)]
    for other in splits[1:]:
        for name in ("train", "val", "test"):
            np.testing.assert_array_equal(other[name], splits[0][name])
    # The unlabelled cells are a stratum of their own: held-out sets get their share of them.
    missing = pd.isna(labels)
    assert missing[splits[0]["val"]].sum() == pytest.approx(0.4 * 40, abs=2)
    assert sorted(np.concatenate(list(splits[0].values())).tolist()) == list(range(200))


def test_missing_stratify_labels_warn(compose_cfg, tmp_path):
    adata = counts()
    adata.obs["kind"] = pd.Categorical(["x", "y", None] * 100)
    cfg = compose_cfg(*COUNTS, f"data.path={write(adata, tmp_path)}", "data.stratify_key=kind")
    with pytest.warns(UserWarning, match="100 cells .* have no 'kind' label .* one more stratum"):
        hydra.utils.instantiate(cfg.data).setup("fit")


def test_a_value_beyond_float32_is_refused_after_the_cast(compose_cfg, tmp_path):
    adata = counts()
    x = adata.X.toarray().astype(np.float64)
    x[4, 7] = 1e39  # finite in float64, inf in the model's float32
    adata.X = x
    cfg = compose_cfg(*COUNTS, f"data.path={write(adata, tmp_path)}", "data.preprocess.log1p=false")
    refused(cfg, DataError, "1 too large for float32", adata.obs_names[4], adata.var_names[7])


def test_an_all_missing_aux_label_column_is_refused(compose_cfg, tmp_path):
    adata = counts()
    adata.obs["celltype"] = np.full(adata.n_obs, np.nan)
    cfg = compose_cfg(*COUNTS, f"data.path={write(adata, tmp_path)}", "aux=triplet_cosine", "aux.label_key=celltype")
    refused(cfg, DataError, "'celltype'", "all 300 values are missing", "aux=none")


def test_metrics_json_is_strict_json_with_null_for_undefined_values(tmp_path):
    path = rundir.write_json(
        tmp_path / "m.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan"), "d": np.int64(3)}
    )

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [None, 1.5], "c": None, "d": 3}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_run_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = rundir.write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_predict_output_follows_the_umask(tmp_path, umask):
    adata = ad.AnnData(X=np.ones((3, 2), dtype=np.float32))
    old = os.umask(umask)
    try:
        out = predict.write_h5ad_atomic(adata, tmp_path / "out.h5ad", overwrite=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_finite_explosion_stops_the_run(compose_cfg, tmp_path):
    cfg = compose_cfg(
        *COUNTS,
        f"data.path={write(counts(), tmp_path)}",
        "model.init=random",
        "optimizer.lr=1e3",
        "trainer.max_epochs=3",
        "callbacks.divergence_guard.check_every_n_steps=1",
        *SMALL,
    )
    with pytest.raises(TrainingDivergedError, match=r"exploded to .* times the first step's loss"):
        train(cfg)
    run = Path(cfg.paths.output_dir)
    assert not (run / rundir.METRICS_FILE).exists()
    # The run had started writing, so its directory stays, saying why it failed; exprae-compare shows that.
    assert (run / rundir.ERROR_FILE).read_text().startswith("TrainingDivergedError: training diverged")
    from exprae.report.sweep_runs import find_runs

    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=1e3\n")
    [found] = find_runs(run)
    assert found.problem.startswith("failed: TrainingDivergedError: training diverged")


def test_the_report_warns_when_the_model_is_worse_than_the_mean_profile():
    metrics = {
        "loss": "MSELoss",
        "latent_dim": 4,
        "test": {
            "model": {"cosine": 0.1, "pearson": 0.0, "mse": 7.3e11},
            "mean": {"cosine": 0.8, "pearson": 0.0, "mse": 0.92},
        },
    }
    report = format_report(metrics)
    assert "WARNING: the model reconstructs test cells worse than the mean-profile baseline" in report
    assert "7.3e+11 vs 0.92" in report
    model_row = next(line for line in report.splitlines() if line.startswith("exprae"))
    assert "7.3000e+11" in model_row
    assert len(model_row) == len(report.splitlines()[0]), model_row  # large values keep their column
    metrics["test"]["model"] = {"cosine": 0.9, "pearson": 0.5, "mse": 0.5}
    assert "WARNING" not in format_report(metrics)


# ---------------------------------------------------------------- raw tracebacks, now one paragraph


@pytest.mark.parametrize("sparse", [False, True])
def test_boolean_x_trains_as_zeros_and_ones(compose_cfg, tmp_path, sparse):
    adata = counts()
    x_bool = adata.X.toarray() > 1
    adata.X = sp.csr_matrix(x_bool) if sparse else x_bool
    path = write(adata, tmp_path)
    as_is = ["data.preprocess.normalize_total=null", "data.preprocess.log1p=false"]
    data = hydra.utils.instantiate(compose_cfg(*COUNTS, f"data.path={path}", *as_is).data)
    data.setup("fit")
    x = data.adata.X.toarray() if sp.issparse(data.adata.X) else data.adata.X
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, x_bool.astype(np.float32))
    cfg = compose_cfg(*COUNTS, f"data.path={path}", "trainer.fast_dev_run=true", *SMALL)
    metrics = train(cfg)
    assert math.isfinite(metrics["val"]["model"]["mse"])


@pytest.mark.parametrize("backed", ["false", "true"])  # one gate: streaming from disk says the same
def test_x_none_names_the_layers_there_are(compose_cfg, tmp_path, backed):
    adata = counts()
    adata.layers["counts"] = adata.X.copy()
    adata.X = None
    cfg = compose_cfg(*COUNTS, f"data.path={write(adata, tmp_path)}", f"data.backed={backed}")
    refused(cfg, DataError, "X is None", "['counts']")


# 200 x 100 constant counts: after normalize_total and log1p, float32 moments made all 100 genes "vary".
@pytest.mark.parametrize(("value", "shape"), [(0.0, (300, 200)), (3.0, (300, 200)), (3.0, (200, 100))])
def test_hvg_on_data_where_no_gene_varies_is_refused(compose_cfg, tmp_path, value, shape):
    adata = counts(*shape)
    adata.X = np.full(adata.shape, value, dtype=np.float32)
    cfg = compose_cfg("data=h5ad", f"data.path={write(adata, tmp_path)}", "data.preprocess.n_top_genes=50")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-zero cells and genes warn first
        refused(cfg, DataError, "no gene varies", "n_top_genes=null")


def test_duplicated_cell_names_are_refused(compose_cfg, tmp_path):
    adata = counts()
    adata.obs_names = [f"cell{i % 150}" for i in range(adata.n_obs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning about non-unique names
        path = write(adata, tmp_path)
    refused(compose_cfg(*COUNTS, f"data.path={path}"), DataError, "duplicated cell names", "obs_names_make_unique")


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(compose_cfg, tmp_path):
    cfg = compose_cfg(*COUNTS, f"data.path={write(counts(), tmp_path)}")
    cfg.paths.output_dir = "/proc/exprae-run"  # refuses writes even for root
    refused(cfg, OutputError, "/proc/exprae-run is not writable")


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.split_seed=-1", "data.split_seed must be a non-negative integer, got -1"),
        ("seed=-1", "seed=-1 is not valid"),
        ("trainer.max_epochs=0", "trains nothing"),
    ],
)
def test_settings_that_cannot_work_are_refused(compose_cfg, override, says):
    refused(compose_cfg(override), ConfigError, says)


def test_a_value_of_the_wrong_type_leaves_no_run_directory(tmp_path):
    cli_refused(tmp_path, "data.batch_size=1.5", says=("data.batch_size=1.5 is not valid",))


@pytest.mark.slow  # a real `exprae-train -m` (two jobs, each refused after reading pbmc68k)
def test_failed_sweep_jobs_keep_their_directory_with_the_reason(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    env = {
        **os.environ,
        "EXPRAE_ROOT": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    args = ["-m", "trainer.accelerator=cpu", "data.batch_size=1000,2000", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(
        [sys.executable, "-m", "exprae.train", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for job, size in (("0", 1000), ("1", 2000)):
        reason = (sweep / job / rundir.ERROR_FILE).read_text()
        assert reason.startswith(f"ConfigError: data.batch_size={size} is larger than the 560 training cells"), reason
    # A single run refused the same way leaves nothing (test_bad_input); a sweep's job stays, so compare says why.
    assert compare.main([str(sweep), "--no-plots"]) == 1  # no job finished: nothing to rank, but it says why
    err = capsys.readouterr().err
    assert "2 run(s), none finished" in err and "1: failed: ConfigError: data.batch_size=2000 is larger than" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, so trainer=gpu is valid here")
def test_trainer_gpu_without_a_gpu_suggests_trainer_cpu(compose_cfg):
    refused(compose_cfg("trainer=gpu", fast=False), ConfigError, "no CUDA GPU", "trainer=cpu")


def test_a_single_held_out_cell_warns(pbmc):
    data = ExpressionDataModule(dataset="pbmc68k", val_fraction=0.0015, test_fraction=0.1, batch_size=32)
    with pytest.warns(UserWarning, match="only 1 val cells; metrics averaged over fewer than 10"):
        data.setup("fit")


# ---------------------------------------------------------------- exprae-predict


@pytest.fixture
def pbmc_path(pbmc, tmp_path) -> Path:
    path = tmp_path / "new.h5ad"
    pbmc.write_h5ad(path)
    return path


def test_predict_refuses_a_key_an_h5ad_cannot_store(pbmc_run, pbmc_path, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    assert predict.main([f"ckpt={pbmc_run}", f"data.path={pbmc_path}", f"out={out}", "key_added=a/b"]) == 1
    assert "key_added='a/b' cannot be stored in an .h5ad file" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_predict_out_an_existing_directory_is_refused_even_with_overwrite(pbmc_run, pbmc_path, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    args = [f"ckpt={pbmc_run}", f"data.path={pbmc_path}", f"out={folder}", "overwrite=true"]
    assert predict.main(args) == 1
    err = capsys.readouterr().err
    assert "is a directory; name a .h5ad file to write" in err and "pass overwrite" not in err
    assert folder.is_dir() and not any(folder.iterdir())


def test_predict_into_an_unwritable_folder_fails_before_loading(pbmc_run, pbmc_path, capsys, monkeypatch):
    embed_module = importlib.import_module("exprae.inference")  # where exprae-predict takes load from
    monkeypatch.setattr(
        embed_module, "load", lambda *a, **k: pytest.fail("the model was loaded before the output check")
    )
    assert predict.main([f"ckpt={pbmc_run}", f"data.path={pbmc_path}", "out=/proc/cells.h5ad"]) == 1
    assert "output folder /proc is not writable" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so device=cuda is valid here")
def test_predict_on_cuda_without_cuda(pbmc_run, pbmc_path, tmp_path, capsys):
    assert (
        predict.main([f"ckpt={pbmc_run}", f"data.path={pbmc_path}", f"out={tmp_path / 'o.h5ad'}", "device=cuda"]) == 1
    )
    assert "device=cuda was asked for, but torch sees no CUDA GPU here; use device=cpu" in capsys.readouterr().err


def test_predict_x_none_names_the_layers(pbmc_run, pbmc, tmp_path, capsys):
    adata = pbmc.copy()
    adata.layers["scaled"] = adata.X.copy()
    adata.X = None
    path = write(adata, tmp_path, "nox.h5ad")
    assert predict.main([f"ckpt={pbmc_run}", f"data.path={path}", f"out={tmp_path / 'o.h5ad'}"]) == 1
    assert "X is None" in (err := capsys.readouterr().err) and "['scaled']" in err


def test_predict_removes_the_temporary_file_a_killed_predict_left(pbmc_run, pbmc_path, tmp_path):
    out = tmp_path / "out.h5ad"
    stale = tmp_path / f".out.h5ad.{2**22 + 12345}.x1y2.tmp.h5ad"  # above pid_max's default: no such process
    stale.write_bytes(b"half a file")
    live = tmp_path / f".out.h5ad.{os.getpid()}.z9.tmp.h5ad"  # a writer still running: left alone
    live.write_bytes(b"being written")
    assert predict.main([f"ckpt={pbmc_run}", f"data.path={pbmc_path}", f"out={out}"]) == 0
    assert not stale.exists() and live.exists() and out.is_file()


# ---------------------------------------------------------------- library size at predict time


def _normalised_run(tmp_path: Path, adata: ad.AnnData, *extra: str) -> Path:
    path = write(adata, tmp_path, "train.h5ad")
    return train_run(
        tmp_path / "run",
        "data=h5ad",
        f"data.path={path}",
        "data.preprocess.normalize_total=1e4",
        "data.preprocess.log1p=true",
        "trainer.max_epochs=1",
        *SMALL,
        *extra,
    )


def _latents(run: Path, adata: ad.AnnData, **kwargs) -> np.ndarray:
    import exprae

    return exprae.embed(exprae.load(run, device="cpu"), adata.copy(), **kwargs).obsm["X_exprae"]


def test_library_size_sums_the_training_genes_at_predict_time(tmp_path):
    adata = counts()
    run = _normalised_run(tmp_path, adata, "data.preprocess.n_top_genes=40")
    reference = _latents(run, adata)

    # Genes the training data did not have do not count towards a cell's library size.
    extra = ad.AnnData(
        X=sp.hstack([adata.X, sp.csr_matrix(np.full((adata.n_obs, 5), 50.0, dtype=np.float32))], format="csr"),
        obs=adata.obs,
        var=pd.DataFrame(index=[*adata.var_names, *(f"new{i}" for i in range(5))]),
    )
    np.testing.assert_allclose(_latents(run, extra), reference, rtol=1e-5, atol=1e-6)

    # Data cut down to the model's genes would shift every cell: refused, or normalised over what is there.
    model_genes = json.loads((run / rundir.CONTRACT_FILE).read_text())["var_names"]
    cut = adata[:, model_genes].copy()
    with pytest.raises(DataError, match=r"lacks 160 of the 200 genes .* normalize_total .* allow_missing_genes"):
        _latents(run, cut)
    with pytest.warns(UserWarning, match="normalising over the 40 present"):
        shifted = _latents(run, cut, allow_missing_genes=True)
    assert not np.allclose(shifted, reference, atol=1e-3)  # what the refusal protects against


def test_the_library_gene_check_reads_the_data_genes_once():
    """A 10x matrix has ~33,700 genes: looked up in a set built per gene, one predict spent ~10 minutes here."""
    genes = [f"gene{i}" for i in range(2000)]
    preprocess = Preprocessing(normalize_total=1e4, library_genes=genes)

    class CountedNames(list):
        reads = 0

        def __iter__(self):
            CountedNames.reads += 1
            return super().__iter__()

    with pytest.warns(UserWarning, match="normalising over the 1997 present"):
        missing = preprocess.check_library_genes(CountedNames(genes[3:]), allow_missing=True, what="the data")
    assert missing == genes[:3]
    assert CountedNames.reads == 1, f"the data's gene names were read {CountedNames.reads} times"


def test_predict_on_real_counts_cut_to_the_model_genes_is_refused(realdata, tmp_path, capsys):
    full = ad.read_h5ad(realdata("pbmc4k_soupx.h5ad"))
    full = full[:400, np.asarray(full.X[:400].sum(axis=0)).ravel() > 0].copy()  # real counts, genes seen in them
    run = _normalised_run(tmp_path, full, "data.preprocess.n_top_genes=200")
    model_genes = json.loads((run / rundir.CONTRACT_FILE).read_text())["var_names"]
    cut = write(full[:, model_genes].copy(), tmp_path, "cut.h5ad")
    out = tmp_path / "out.h5ad"
    assert predict.main([f"ckpt={run}", f"data.path={cut}", f"out={out}"]) == 1
    err = capsys.readouterr().err
    assert f"lacks {full.n_vars - 200} of the {full.n_vars} genes the model's normalize_total summed" in err
    assert not out.exists()
