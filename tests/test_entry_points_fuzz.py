"""Hostile inputs, generated: every entry point either works or raises an ``ExpraeError`` (its paragraph).

hypothesis draws a damaged count matrix (a dtype, NaN/inf/huge/negative values, a missing ``X``, duplicated
names, all-zero or constant data, too few cells) together with odd settings, and drives ``exprae-train``
(``train(cfg)`` on the composed config, what the command runs), ``exprae-predict`` (``predict.main``) and
``exprae-compare`` (``compare.main``) with it. Any exception that is not one of the errors the entry point
reports as a user error is a bug and fails the test. Derandomised and few examples, so the run is
repeatable and bounded in time.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exprae import compare, predict
from exprae.train import USER_ERRORS, train

FUZZ = settings(
    max_examples=12,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

DAMAGE = st.sampled_from(
    [
        "none",
        "bool",
        "int32",
        "float16",
        "float64_huge",
        "nan",
        "inf",
        "negative",
        "x_none",
        "duplicate_cells",
        "duplicate_genes",
        "all_zero",
        "constant",
        "object_strings",
        "four_cells",
    ]
)


def damaged(kind: str, *, sparse: bool, seed: int = 0) -> ad.AnnData:
    """A seeded 120 x 60 Poisson count matrix with one kind of damage."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.0, (120, 60)).astype(np.float32)
    adata = ad.AnnData(X=x)
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    if kind == "bool":
        adata.X = x > 1
    elif kind == "int32":
        adata.X = x.astype(np.int32)
    elif kind == "float16":
        adata.X = x.astype(np.float16)
    elif kind == "float64_huge":
        adata.X = x.astype(np.float64)
        adata.X[3, 4] = 1e300
    elif kind in ("nan", "inf", "negative"):
        adata.X[5, 6] = {"nan": np.nan, "inf": np.inf, "negative": -2.0}[kind]
    elif kind == "x_none":
        adata.layers["counts"] = x
        adata.X = None
    elif kind == "duplicate_cells":
        adata.obs_names = [f"cell{i % 100}" for i in range(adata.n_obs)]
    elif kind == "duplicate_genes":
        adata.var_names = [f"gene{i % 50}" for i in range(adata.n_vars)]
    elif kind == "all_zero":
        adata.X = np.zeros_like(x)
    elif kind == "constant":
        adata.X = np.full_like(x, 2.0)
    elif kind == "object_strings":
        adata.X = np.full(x.shape, "a", dtype=object)
    elif kind == "four_cells":
        adata = adata[:4].copy()
    if sparse and isinstance(adata.X, np.ndarray) and adata.X.dtype.kind in "biuf" and adata.X.dtype != np.float16:
        adata.X = sp.csr_matrix(adata.X)
    return adata


def write(adata: ad.AnnData, path: Path) -> Path | None:
    """Write ``adata``; None when anndata itself cannot store it (then there is no file to feed exprae)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(path)
    except Exception:
        return None
    return path


def _user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS)


@pytest.mark.slow  # a dozen short trainings
@FUZZ
@given(
    kind=DAMAGE,
    sparse=st.booleans(),
    preprocess=st.sampled_from(
        [
            [],
            ["data.preprocess.normalize_total=null", "data.preprocess.log1p=false"],
            ["data.preprocess.scale=true", "data.preprocess.normalize_total=null", "data.preprocess.log1p=false"],
        ]
    ),
    n_top_genes=st.sampled_from(["null", "20"]),
    split=st.sampled_from([[], ["data.val_fraction=0.45", "data.test_fraction=0.45"], ["data.split_seed=-1"]]),
    batch_size=st.sampled_from(["16", "0", "1000"]),
    backed=st.booleans(),
)
def test_exprae_train_raises_only_user_errors(
    compose_cfg, tmp_path_factory, kind, sparse, preprocess, n_top_genes, split, batch_size, backed
):
    folder = tmp_path_factory.mktemp("fuzz_train")
    path = write(damaged(kind, sparse=sparse), folder / "cells.h5ad")
    if path is None:
        return
    cfg = compose_cfg(
        "data=h5ad",
        f"data.path={path}",
        f"data.preprocess.n_top_genes={n_top_genes}",
        f"data.batch_size={batch_size}",
        f"data.backed={str(backed).lower()}",
        *preprocess,
        *split,
        "trainer.fast_dev_run=true",
        "model.latent_dim=2",
        "model.hidden_dims=[8]",
        "logger=none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            metrics = train(cfg)
        except Exception as e:
            assert _user_error(e), f"{kind}: {type(e).__name__} is not a user error: {e}"
            return
    json.dumps(metrics)  # what was returned is plain data


KEYS = st.one_of(
    st.sampled_from(["exprae", "a/b", "", ".", "ok_2", "x\x00y", "../up", "é"]),
    st.text(min_size=0, max_size=6),
)


@pytest.mark.slow  # a dozen model loads
@FUZZ
@given(
    kind=DAMAGE,
    sparse=st.booleans(),
    key=KEYS,
    batch_size=st.sampled_from(["1", "0", "-3", "64"]),
    out=st.sampled_from(["out.h5ad", "out.csv", "missing/out.h5ad", "/proc/out.h5ad", "."]),
    extra=st.sampled_from([[], ["allow_missing_genes=true"], ["baselines=true"], ["device=cpu"], ["data.layer=raw"]]),
)
def test_exprae_predict_raises_only_user_errors(pbmc_run, tmp_path_factory, kind, sparse, key, batch_size, out, extra):
    folder = tmp_path_factory.mktemp("fuzz_predict")
    path = write(damaged(kind, sparse=sparse), folder / "cells.h5ad")
    if path is None:
        return
    target = folder / out if not out.startswith("/") else Path(out)
    args = [f"ckpt={pbmc_run}", f"data.path={path}", f"out={target}", f"batch_size={batch_size}", *extra]
    args.append(f"key_added={key}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = predict.main(args)  # any exception escaping main is a bug
    assert code in (0, 1, 2)
    # pbmc_run knows pbmc68k's genes, none of which these cells have: nothing can be embedded or written.
    assert code != 0
    assert not [p for p in folder.rglob("*.h5ad") if p.name != "cells.h5ad"]


SWEEP_DAMAGE = st.sampled_from(
    ["missing", "a_file", "empty", "bad_yaml", "binary_metrics", "null_stage", "nan_metrics", "no_metrics", "error"]
)


@FUZZ
@given(damage=st.lists(SWEEP_DAMAGE, min_size=1, max_size=3), stage=st.sampled_from(["val", "test"]))
def test_exprae_compare_raises_only_user_errors(tmp_path_factory, damage, stage, capsys):
    sweep = tmp_path_factory.mktemp("fuzz_sweep") / "sweep"
    if damage[0] == "a_file":
        sweep.write_text("not a sweep")
    elif damage[0] != "missing":
        sweep.mkdir()
        for i, what in enumerate(damage):
            run = sweep / str(i)
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(f"- seed={i}\n" if what != "bad_yaml" else "- [unclosed\n")
            (run / ".hydra" / "config.yaml").write_text("seed: 0\nloss: {_target_: exprae.losses.MSELoss}\n")
            metrics = run / "metrics.json"
            if what == "binary_metrics":
                metrics.write_bytes(b"\xff\xfe\x00garbage")
            elif what == "null_stage":
                metrics.write_text(json.dumps({"val": None, "test": {"model": None}}))
            elif what == "nan_metrics":
                metrics.write_text('{"val": {"model": {"cosine": NaN}}, "test": {"model": {"cosine": null}}}')
            elif what == "error":
                (run / "error.txt").write_text("DataError: the data is bad\n")
    code = compare.main([str(sweep), "--stage", stage, "--no-plots"])  # any exception escaping main is a bug
    assert code in (0, 1)
    if "error" in damage and code == 0:
        assert "DataError: the data is bad" in capsys.readouterr().out
