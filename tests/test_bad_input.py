"""One test per row of the bad-input table in docs/reliability.md, each on a real file written by the test.

Every refusal is checked three ways: the error type, a message that names the problem, and no run output
left behind. A few rows go through the real ``exprae-train`` command (exit status, one-paragraph message,
no traceback); the rest call ``train(cfg)`` on the composed config.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import scipy.sparse as sp
from hydra.errors import InstantiationException

import exprae
from exprae.data.datasets import synthetic_counts
from exprae.errors import ConfigError, DataError, DataFileNotFoundError, MissingKeyError
from exprae.runs import rundir
from exprae.train import build, train

SRC = Path(exprae.__file__).resolve().parents[1]
# pbmc68k's X is already scaled (it has negative values): no count preprocessing, all 765 genes.
AS_IS = ["data.preprocess.normalize_total=null", "data.preprocess.log1p=false", "data.preprocess.n_top_genes=null"]
SMALL = ["model.latent_dim=4", "model.hidden_dims=[32]", "logger=none"]


def write(adata: ad.AnnData, tmp_path: Path, name: str = "cells.h5ad") -> Path:
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def counts(n_cells: int = 300, n_genes: int = 200) -> ad.AnnData:
    """Seeded negative-binomial counts (non-negative, sparse)."""
    return synthetic_counts(n_cells, n_genes, n_types=4, store_truth=False, seed=0)


def refused(cfg, error: type[BaseException], *fragments: str) -> str:
    """``train(cfg)`` raises ``error`` whose message (or cause's) holds every fragment; no run dir is left."""
    with pytest.raises(error) as info:
        train(cfg)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    text = "\n".join(chain)
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert not Path(cfg.paths.output_dir).exists(), "a failed run left output behind"
    return text


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run ``python -m exprae.train`` (what ``exprae-train`` runs) with outputs under ``tmp_path``."""
    env = {
        **os.environ,
        "EXPRAE_ROOT": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HYDRA_FULL_ERROR", None)
    args = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *overrides]
    return subprocess.run(
        [sys.executable, "-m", "exprae.train", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def cli_refused(tmp_path: Path, *overrides: str, says: tuple[str, ...]) -> str:
    """The command exits 1 with a short message holding ``says``, no traceback, and no run directory."""
    proc = cli(tmp_path, *overrides)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in says:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    leftovers = list((tmp_path / "outputs").rglob("*")) if (tmp_path / "outputs").exists() else []
    assert not leftovers, leftovers
    return proc.stderr


# ---------------------------------------------------------------- the file


def test_path_does_not_exist(tmp_path):
    err = cli_refused(
        tmp_path, "data=h5ad", f"data.path={tmp_path / 'nope.h5ad'}", says=("data file", "nope.h5ad", "does not exist")
    )
    assert len([line for line in err.splitlines() if line.strip()]) <= 5, err  # one paragraph, no traceback


def test_path_is_a_directory(compose_cfg, tmp_path):
    refused(compose_cfg("data=h5ad", f"data.path={tmp_path}"), DataError, "is a directory")


def test_not_an_h5ad(compose_cfg, tmp_path, pbmc):
    csv = tmp_path / "cells.csv"
    pbmc.to_df().iloc[:20, :20].to_csv(csv)
    refused(compose_cfg("data=h5ad", f"data.path={csv}"), DataError, "is not an .h5ad file", "write_h5ad")


def test_hdf5_that_is_not_anndata(compose_cfg, tmp_path):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        f["matrix/data"] = np.ones(10, dtype=np.float32)
    refused(compose_cfg("data=h5ad", f"data.path={path}"), DataError, "not an AnnData", "['matrix']", "read_10x_h5")


def test_truncated_h5ad(compose_cfg, tmp_path, pbmc):
    path = write(pbmc, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(compose_cfg("data=h5ad", f"data.path={path}", *AS_IS), DataError, "truncated or corrupt", str(path))


def test_corrupt_bytes_in_h5ad(compose_cfg, tmp_path, pbmc):
    path = write(pbmc, tmp_path)
    data = bytearray(path.read_bytes())
    data[2000:6000] = bytes(b ^ 0xFF for b in data[2000:6000])  # damage the metadata after the superblock
    path.write_bytes(bytes(data))
    refused(compose_cfg("data=h5ad", f"data.path={path}", *AS_IS), DataError, "could not be read as AnnData")


def test_empty_anndata(compose_cfg, tmp_path, pbmc):
    path = write(pbmc[:0].copy(), tmp_path)
    refused(compose_cfg("data=h5ad", f"data.path={path}", *AS_IS), DataError, "is empty: 0 cells x 765 genes")


# ---------------------------------------------------------------- the matrix


def test_layer_that_does_not_exist_lists_layers(compose_cfg, tmp_path):
    adata = counts()
    adata.layers["counts"] = adata.X.copy()
    adata.layers["spliced"] = adata.X.copy()
    path = write(adata, tmp_path)
    err = refused(compose_cfg("data=h5ad", f"data.path={path}", "data.layer=unspliced"), MissingKeyError, "'unspliced'")
    assert "['counts', 'spliced']" in err and "data.layer=raw" in err


def test_raw_requested_but_absent(compose_cfg, tmp_path, pbmc):
    adata = pbmc.copy()
    del adata.raw
    path = write(adata, tmp_path)
    refused(compose_cfg("data=h5ad", f"data.path={path}", "data.layer=raw", *AS_IS), DataError, "has no .raw")


def test_nan_in_matrix_names_count_cells_and_genes(tmp_path, pbmc):
    adata = pbmc.copy()
    adata.X[[3, 3, 10], [0, 5, 7]] = np.nan
    path = write(adata, tmp_path)
    cells, genes = adata.obs_names[[3, 10]].tolist(), adata.var_names[[0, 5, 7]].tolist()
    err = cli_refused(
        tmp_path,
        "data=h5ad",
        f"data.path={path}",
        *AS_IS,
        says=("3 NaN or infinite values", "in 2 cells and 3 genes", cells[0], cells[1], genes[0]),
    )
    assert len([line for line in err.splitlines() if line.strip()]) <= 5, err  # one paragraph, no traceback


def test_inf_in_sparse_counts(compose_cfg, tmp_path):
    adata = counts()
    x = adata.X.tocsr()
    x.data[:4] = np.inf
    adata.X = x
    path = write(adata, tmp_path)
    refused(
        compose_cfg("data=h5ad", f"data.path={path}", "data.preprocess.n_top_genes=null"),
        DataError,
        "4 NaN or infinite",
    )


def test_negative_values_with_log1p(compose_cfg, tmp_path, pbmc):
    path = write(pbmc, tmp_path)  # pbmc68k's X is z-scored: about half its values are negative
    cfg = compose_cfg("data=h5ad", f"data.path={path}", *AS_IS, "data.preprocess.log1p=true")
    refused(cfg, DataError, "negative values", "log1p/normalize_total need non-negative values", "first cells")


def test_negative_values_with_normalize_total(compose_cfg, tmp_path):
    adata = counts()
    adata.X = adata.X.toarray()
    adata.X[7, 2] = -1.0
    path = write(adata, tmp_path)
    cfg = compose_cfg(
        "data=h5ad", f"data.path={path}", "data.preprocess.log1p=false", "data.preprocess.n_top_genes=null"
    )
    err = refused(cfg, DataError, "1 negative values", adata.obs_names[7], adata.var_names[2])
    assert "in 1 cells and 1 genes" in err


def test_all_zero_cells_warn_and_training_stays_finite(compose_cfg, tmp_path):
    adata = counts()
    x = adata.X.toarray()
    zero = np.arange(0, adata.n_obs, 10)  # 30 cells, so val and test get some too
    x[zero] = 0
    adata.X = sp.csr_matrix(x)
    path = write(adata, tmp_path)
    cfg = compose_cfg(
        "data=h5ad",
        f"data.path={path}",
        "data.preprocess.n_top_genes=null",
        "loss=mixed",
        "trainer.max_epochs=2",
        *SMALL,
    )
    with pytest.warns(UserWarning, match="30 cells have all-zero profiles"):
        metrics = train(cfg)
    split = pd.read_csv(Path(cfg.paths.output_dir) / rundir.SPLIT_FILE)
    assert split["split"].iloc[zero].isin(["val", "test"]).any()
    for stage in ("val", "test"):
        for who in ("model", "mean", "pca"):
            assert all(math.isfinite(v) for v in metrics[stage][who].values()), (stage, who, metrics[stage][who])


def test_all_zero_genes_warn(compose_cfg, tmp_path):
    adata = counts()
    x = adata.X.toarray()
    x[:, [4, 9]] = 0
    adata.X = sp.csr_matrix(x)
    path = write(adata, tmp_path)
    cfg = compose_cfg(
        "data=h5ad", f"data.path={path}", "data.preprocess.n_top_genes=null", "trainer.fast_dev_run=true", *SMALL
    )
    with pytest.warns(UserWarning, match=r"2 genes are zero in every cell, e.g. \['" + adata.var_names[4]) as seen:
        metrics = train(cfg)
    message = next(str(w.message) for w in seen if "zero in every cell" in str(w.message))
    assert "data.preprocess.n_top_genes=2000" in message, message  # unset: the advice is to set it
    assert math.isfinite(metrics["val"]["model"]["cosine"])


def _zero_gene_warnings(tmp_path: Path, n_top_genes: int | None, n_zero: int) -> list[str]:
    """The zero-gene warnings of a datamodule set up on 300 x 200 counts whose first ``n_zero`` genes are zero."""
    from exprae.data import ExpressionDataModule

    adata = counts()
    x = adata.X.toarray()
    x[:, :n_zero] = 0
    adata.X = sp.csr_matrix(x)
    preprocess = {"normalize_total": 1e4, "log1p": True, "n_top_genes": n_top_genes}  # data=h5ad's defaults
    dm = ExpressionDataModule(dataset=None, path=str(write(adata, tmp_path)), batch_size=32, preprocess=preprocess)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dm.setup("fit")
    return [str(w.message) for w in seen if "zero in every cell" in str(w.message)]


def test_zero_genes_dropped_by_gene_selection_are_not_mentioned(tmp_path):
    # n_top_genes=100 of 200: the 5 zero genes have no variance, so the selection drops them; nothing to say.
    assert _zero_gene_warnings(tmp_path, 100, n_zero=5) == []


def test_zero_gene_advice_matches_a_gene_selection_that_keeps_them(tmp_path):
    # n_top_genes=500 of 200 genes keeps all, zero ones included: the advice cannot be "set n_top_genes".
    (message,) = _zero_gene_warnings(tmp_path, 500, n_zero=5)
    assert "5 genes are zero in every cell" in message, message
    assert "data.preprocess.n_top_genes=500 keeps them (200 genes present, so all are kept)" in message, message
    assert "lower n_top_genes or filter them out" in message and "=2000" not in message, message


def test_zero_variance_genes_under_scaling(compose_cfg, tmp_path):
    adata = counts()
    x = adata.X.toarray()
    x[:, 3] = 5.0  # the same value in every cell: its standard deviation is 0
    adata.X = x
    path = write(adata, tmp_path)
    cfg = compose_cfg(
        "data=h5ad",
        f"data.path={path}",
        "data.preprocess.normalize_total=null",
        "data.preprocess.log1p=false",
        "data.preprocess.n_top_genes=null",
        "data.preprocess.scale=true",
        "trainer.fast_dev_run=true",
        *SMALL,
    )
    with pytest.warns(UserWarning, match="1 genes have zero variance in the training cells"):
        metrics = train(cfg)
    assert all(math.isfinite(v) for v in metrics["val"]["model"].values())


def test_duplicated_gene_names(compose_cfg, tmp_path, pbmc):
    adata = pbmc.copy()
    adata.var_names = [*adata.var_names[:-1], adata.var_names[0]]
    path = write(adata, tmp_path)
    refused(
        compose_cfg("data=h5ad", f"data.path={path}", *AS_IS),
        DataError,
        "duplicated gene names",
        "var_names_make_unique",
    )


def test_missing_obs_column(compose_cfg, tmp_path, pbmc):
    path = write(pbmc, tmp_path)
    cfg = compose_cfg("data=h5ad", f"data.path={path}", *AS_IS, "data.stratify_key=celltype")
    err = refused(cfg, MissingKeyError, "obs column 'celltype' not found")
    assert "bulk_labels" in err


# ---------------------------------------------------------------- the split


def test_too_few_cells_for_the_split(compose_cfg, tmp_path, pbmc):
    path = write(pbmc[:4].copy(), tmp_path)
    refused(compose_cfg("data=h5ad", f"data.path={path}", *AS_IS), DataError, "4 cells are too few", "0 val, 0 test")


@pytest.mark.parametrize(
    ("fractions", "says"),
    [
        (["data.val_fraction=0.0"], "data.val_fraction must lie in (0, 1), got 0.0"),
        (["data.val_fraction=0.5", "data.test_fraction=0.5"], "leaves no training cells"),
    ],
)
def test_split_fraction_that_leaves_a_set_empty(compose_cfg, fractions, says):
    refused(compose_cfg(*fractions), ConfigError, says)


def test_batch_size_larger_than_training_set(compose_cfg):
    refused(
        compose_cfg("data.batch_size=1000"), ConfigError, "data.batch_size=1000 is larger than the 560 training cells"
    )


# ---------------------------------------------------------------- the config


def test_config_key_typo(tmp_path):
    cli_refused(
        tmp_path,
        "loss=mixed",
        "loss.alpah=0.5",
        says=("Could not override 'loss.alpah'", "Key 'alpah' is not in struct"),
    )


def test_config_group_typo_lists_choices(tmp_path):
    cli_refused(tmp_path, "loss=cosin", says=("Could not find 'loss/cosin'", "cosine", "mixed", "mse", "pearson"))


def test_negative_latent_dim(tmp_path):
    err = cli_refused(tmp_path, "model.latent_dim=-3", says=("model.latent_dim must be a positive integer, got -3",))
    assert len([line for line in err.splitlines() if line.strip()]) <= 5, err  # one paragraph, no traceback


def test_alpha_outside_unit_interval(compose_cfg):
    refused(
        compose_cfg("loss=mixed", "loss.alpha=1.5"), InstantiationException, "loss.alpha must lie in [0, 1]", "got 1.5"
    )


def test_wrong_type(compose_cfg):
    refused(compose_cfg("model.latent_dim=abc"), ConfigError, "model.latent_dim='abc' is not valid", "expects int")


def test_added_key_that_no_class_takes(compose_cfg):
    refused(compose_cfg("loss=mixed", "+loss.alpah=0.5"), ConfigError, "loss.alpah is not a parameter", "alpha")


def test_option_outside_its_choices(compose_cfg):
    refused(compose_cfg("model.activation=rellu"), ConfigError, "model.activation='rellu'", "'relu', 'gelu'")


def test_latent_dim_larger_than_the_data_allows(compose_cfg):
    refused(compose_cfg("model.latent_dim=1000"), ConfigError, "model.latent_dim=1000 is larger than this data allows")


def test_missing_data_file_is_typed(compose_cfg, tmp_path):
    """The API raises a FileNotFoundError subclass, so existing ``except FileNotFoundError`` code still works."""
    err = refused(compose_cfg("data=h5ad", f"data.path={tmp_path / 'x.h5ad'}"), DataFileNotFoundError, "does not exist")
    assert isinstance(DataFileNotFoundError(err), FileNotFoundError)


def test_optimizer_setting_rejected_before_any_output(compose_cfg):
    refused(compose_cfg("optimizer.lr=-1.0"), ConfigError, "optimizer/scheduler settings were rejected", "-1.0")


def test_batch_size_zero(compose_cfg):
    refused(compose_cfg("data.batch_size=0"), ConfigError, "data.batch_size must be >= 1")


def test_seed_of_the_wrong_type(compose_cfg):
    refused(compose_cfg("seed=abc"), ConfigError, "seed='abc' is not valid")


def test_unknown_hvg_flavor_lists_choices(compose_cfg):
    refused(compose_cfg("data.preprocess.hvg_flavor=seurat3"), ConfigError, "hvg_flavor='seurat3'", "'seurat_v3'")


def test_unknown_builtin_dataset_lists_choices(compose_cfg):
    refused(compose_cfg("data.dataset=pbmc"), ConfigError, "unknown built-in dataset 'pbmc'", "'pbmc68k', 'synthetic'")


def test_monitor_typo_is_refused_before_anything_is_written(compose_cfg):
    cfg = compose_cfg("callbacks.model_checkpoint.monitor=val/cosin")
    with pytest.raises(ConfigError, match=r"monitor='val/cosin' is not a metric exprae logs.*'val/cosine'"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_every_default_monitor_is_accepted(compose_cfg):
    """The valid names are not over-strict: monitoring val/cosine (max) or the cosine p10 trains normally."""
    cfg = compose_cfg(
        "callbacks.model_checkpoint.monitor=val/cosine_p10",
        "callbacks.model_checkpoint.mode=max",
        "trainer.max_epochs=1",
    )
    assert train(cfg)["val"]["model"]["cosine_p10"] > 0


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        (  # every optional metric family at once: count head, masking, labels, ground truth
            "data=synthetic_counts",
            "data.synthetic.n_cells=300",
            "data.synthetic.n_genes=200",
            "loss=nb",
            "module.mask_fraction=0.1",
            "aux=pair_cosine",
            "aux.label_key=cell_type",
        ),
    ],
    ids=["default", "all-optional-metrics"],
)
def test_monitorable_names_are_exactly_what_validation_logs(compose_cfg, overrides):
    """The monitor check's list of names cannot drift from what the module really logs."""
    cfg = compose_cfg(*overrides)
    datamodule, module = build(cfg)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    logged = {k for k in trainer.callback_metrics if k.startswith("val/")}
    assert logged == module.metric_names("val")


# ---------------------------------------------------------------- friction a new user meets on real counts


def test_path_without_data_h5ad_names_the_fix(compose_cfg, tmp_path):
    path = write(counts(), tmp_path)
    refused(compose_cfg(f"data.path={path}", *SMALL), InstantiationException, "data=h5ad", f"data.path={path}")


def test_fewer_genes_than_n_top_genes_keeps_them_all(compose_cfg, tmp_path):
    # The h5ad config asks for 2,000 HVGs; a 200-gene file keeps its 200 genes with a warning (scanpy's way).
    path = write(counts(n_genes=200), tmp_path)
    with pytest.warns(UserWarning, match="n_top_genes=2000 asks for more genes than the 200 present"):
        datamodule, _ = build(compose_cfg("data=h5ad", f"data.path={path}", *SMALL))
    assert datamodule.n_genes == 200


def test_fewer_genes_than_n_top_genes_keeps_them_all_when_backed(compose_cfg, tmp_path):
    path = write(counts(n_genes=200), tmp_path)
    with pytest.warns(UserWarning, match="all 200 are kept"):
        datamodule, _ = build(compose_cfg("data=h5ad", f"data.path={path}", "data.backed=true", *SMALL))
    assert datamodule.n_genes == 200


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], "captures a single-device step"),
        (["trainer.precision=16-mixed"], "does not support trainer.precision=16-mixed"),
    ],
)
def test_graph_step_with_ddp_or_16bit_is_refused_before_anything_is_written(compose_cfg, overrides, fragment):
    refused(compose_cfg("module.compile=graph", *overrides), ConfigError, fragment)
