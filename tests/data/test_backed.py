"""data.backed=true: an .h5ad streamed from disk trains like the in-memory path, in bounded host memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from exprae.constants import INDEX_KEY, LABEL_KEY, X_KEY
from exprae.data import ExpressionDataModule
from exprae.data.backed import BackedMatrix, BufferSampler
from exprae.data.datasets import synthetic_counts
from exprae.data.preprocessing import Preprocessing
from exprae.data.streaming_stats import fit_streaming
from exprae.runs import rundir
from exprae.train import train

SRC = Path(__file__).resolve().parents[2] / "src"
MiB = 2**20


def write_atlas(path: Path, *, n_blocks: int, cells_per_block: int, n_genes: int) -> ad.AnnData:
    """Seeded sparse counts written as CSR .h5ad: blocks of synthetic_counts with their own cell types."""
    parts = [
        synthetic_counts(cells_per_block, n_genes, seed=s, library_mean=800, store_truth=False) for s in range(n_blocks)
    ]
    adata = ad.concat(parts, index_unique="-")
    adata.var_names = parts[0].var_names
    adata.write_h5ad(path)
    return adata


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("backed") / "small.h5ad"
    write_atlas(path, n_blocks=2, cells_per_block=600, n_genes=400)
    return path


def _datamodule(path: Path, **kw) -> ExpressionDataModule:
    preprocess = {"normalize_total": 1e4, "log1p": True, "n_top_genes": 120, "scale": True, "max_value": 10.0}
    dm = ExpressionDataModule(
        dataset=None, path=str(path), preprocess=preprocess, batch_size=32, label_key="cell_type", **kw
    )
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------- streaming statistics


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_streaming_fit_matches_scanpy(flavor):
    """One pass over chunks picks scanpy's highly variable genes and the in-memory scaling statistics."""
    adata = synthetic_counts(1500, 600, seed=3, store_truth=False)
    settings = {"normalize_total": 1e4, "log1p": True, "n_top_genes": 150, "hvg_flavor": flavor, "scale": True}
    in_memory = Preprocessing(**settings)
    per_cell = in_memory.per_cell(adata)
    in_memory.fit(per_cell)  # scanpy's highly_variable_genes
    streamed = Preprocessing(**settings)
    chunks = (per_cell.X[i : i + 128] for i in range(0, per_cell.n_obs, 128))
    fit_streaming(streamed, chunks, var_names=per_cell.var_names)
    assert streamed.genes == in_memory.genes
    # float64 sums against scipy's float32 means: agreement to float32 precision
    np.testing.assert_allclose(streamed.scale_mean, in_memory.scale_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.scale_std, in_memory.scale_std, rtol=1e-5, atol=1e-6)


def test_streaming_fit_refuses_seurat_v3():
    p = Preprocessing(n_top_genes=10, hvg_flavor="seurat_v3")
    with pytest.raises(ValueError, match="cannot be fitted in a streaming pass"):
        fit_streaming(p, [np.ones((4, 20))], var_names=[f"g{i}" for i in range(20)])


# ---------------------------------------------------------------- reading and batching


def test_backed_batches_equal_in_memory(small_h5ad):
    """Same split, genes, preprocessing and cell values as the in-memory path; every cell once per epoch."""
    mem = _datamodule(small_h5ad)
    backed = _datamodule(small_h5ad, backed=True, chunk_size=100, buffer_chunks=2)
    assert backed.var_names == mem.var_names
    assert backed.split_table().equals(mem.split_table())
    assert backed.contract()["preprocess"]["genes"] == mem.contract()["preprocess"]["genes"]

    def gather(dm, split, shuffle):
        batches = list(dm.loader(split, shuffle=shuffle))
        idx = torch.cat([b[INDEX_KEY] for b in batches])
        order = idx.argsort()
        return (
            idx[order],
            torch.cat([b[X_KEY] for b in batches])[order],
            torch.cat([b[LABEL_KEY] for b in batches])[order],
        )

    for split, shuffle in (("val", False), ("train", True)):
        idx_m, x_m, lab_m = gather(mem, split, shuffle)
        idx_b, x_b, lab_b = gather(backed, split, shuffle)
        assert torch.equal(idx_b, torch.arange(len(mem.splits[split])))  # each cell exactly once
        assert torch.equal(idx_b, idx_m) and torch.equal(lab_b, lab_m)
        torch.testing.assert_close(x_b, x_m, rtol=0, atol=1e-4)  # scaling stats agree to float32 precision
    baseline_m = torch.cat(list(mem.train_chunks(256)))
    baseline_b = torch.cat(list(backed.train_chunks(256)))
    torch.testing.assert_close(baseline_b, baseline_m, rtol=0, atol=1e-4)


def test_buffers_shuffle_chunks_and_hold_whole_batches(small_h5ad):
    """Training order changes per epoch, each buffer reads few chunks, and batch counts match len()."""
    dm = _datamodule(small_h5ad, backed=True, chunk_size=100, buffer_chunks=2)
    loader = dm.train_dataloader()
    sampler = loader.sampler
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        orders.append(torch.cat([b[INDEX_KEY] for b in batches]))
        for buffer in sampler:
            # a buffer of 224 cells (two 100-cell chunks rounded to whole batches of 32) spans few chunks
            assert len(np.unique(buffer // sampler.chunk_size)) <= 4
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[0].sort().values, orders[1].sort().values)


def test_backed_matrix_reads_rows_and_refuses_csc(tmp_path):
    x = sp.random(300, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
    ad.AnnData(X=x).write_h5ad(tmp_path / "csr.h5ad")
    rows = np.array([0, 3, 4, 150, 151, 299])
    got = BackedMatrix(tmp_path / "csr.h5ad", layer=None).read(rows, chunk_size=64)
    assert sp.issparse(got) and (got != x[rows]).nnz == 0
    ad.AnnData(X=x.tocsc()).write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="stored as CSC"):
        BackedMatrix(tmp_path / "csc.h5ad", layer=None)
    with pytest.raises(KeyError, match="layers/counts"):
        BackedMatrix(tmp_path / "csr.h5ad", layer="counts")


def test_backed_needs_a_file_and_refuses_what_it_does_not_stream(small_h5ad):
    with pytest.raises(ValueError, match=r"data\.backed=true streams an \.h5ad"):
        ExpressionDataModule(dataset="pbmc68k", backed=True).setup()
    with pytest.raises(ValueError, match=r"count losses and data\.target_layer"):
        ExpressionDataModule(dataset=None, path=str(small_h5ad), backed=True, count_target=True).setup()
    with pytest.raises(ValueError, match="on_device=true"):
        ExpressionDataModule(dataset=None, path=str(small_h5ad), backed=True, on_device=True).setup()


@pytest.mark.parametrize("n_rows, world", [(539, 2), (91, 2), (100, 3), (7, 4)])
def test_buffer_sampler_shards(n_rows, world):
    """Training shards: equal length, covering, overlapping only by the padding; eval shards: a partition."""
    rows = np.sort(np.random.default_rng(0).choice(5 * n_rows, n_rows, replace=False))
    kw = {"chunk_size": 16, "buffer_size": 32, "seed": 1, "num_replicas": world}
    train = [np.concatenate(list(BufferSampler(rows, shuffle=True, rank=r, **kw))) for r in range(world)]
    assert len({len(t) for t in train}) == 1
    assert set(np.concatenate(train)) == set(rows)
    assert sum(len(t) for t in train) - n_rows == -n_rows % world  # only the wrap-around padding repeats
    evals = [np.concatenate(list(BufferSampler(rows, shuffle=False, pad=False, rank=r, **kw))) for r in range(world)]
    assert np.array_equal(np.sort(np.concatenate(evals)), rows)
    assert max(map(len, evals)) - min(map(len, evals)) <= 1


# ---------------------------------------------------------------- a real run, memory measured

PROBE = """
import json, sys, tracemalloc
import scanpy, scanpy.pp  # imported lazily by a run; imported here so their code objects are not counted
from exprae import compose
from exprae.train import train

out, overrides = sys.argv[1], json.loads(sys.argv[2])
cfg = compose(overrides, out)
def status_kib(field):
    # /proc's VmRSS/VmHWM belong to this process image (ru_maxrss would include the forking pytest process)
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1])

rss_before_kib = status_kib("VmRSS")
tracemalloc.start()
start, _ = tracemalloc.get_traced_memory()
metrics = train(cfg)
_, peak = tracemalloc.get_traced_memory()
print("PROBE" + json.dumps({
    "metrics": metrics,
    "tracemalloc_peak": peak - start,
    "rss_before": rss_before_kib * 1024,
    "rss_peak": status_kib("VmHWM") * 1024,
}))
"""


def run_probe(out: Path, overrides: list[str]) -> dict:
    """Train in a fresh process; return its metrics and peak memory (numpy/Python heap via tracemalloc, RSS)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), json.dumps(overrides)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE"))
    return json.loads(line[len("PROBE") :])


@pytest.mark.slow
def test_backed_run_bounded_memory_same_metrics(tmp_path):
    """20000 cells x 2000 genes: the backed run's data memory stays far below the dense matrix, same metrics."""
    path = tmp_path / "atlas.h5ad"
    adata = write_atlas(path, n_blocks=8, cells_per_block=2500, n_genes=2000)
    dense_bytes = adata.n_obs * adata.n_vars * 4
    file_bytes = path.stat().st_size
    del adata
    cap = dense_bytes // 4
    common = [
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.deterministic=true",
        "trainer.max_epochs=1",
        "callbacks=none",
        "logger=none",
        "data=h5ad",
        f"data.path={path}",
        "data.preprocess.n_top_genes=256",
        "data.batch_size=256",
        "data.chunk_size=128",
        "data.buffer_chunks=4",
        "model.latent_dim=16",
        "model.hidden_dims=[64]",
    ]
    backed = run_probe(tmp_path / "backed", [*common, "data.backed=true"])
    in_memory = run_probe(tmp_path / "memory", [*common, "data.backed=false"])
    print(
        f"\nfile {file_bytes / MiB:.1f} MiB, dense {dense_bytes / MiB:.1f} MiB, cap {cap / MiB:.1f} MiB; "
        f"tracemalloc peak backed {backed['tracemalloc_peak'] / MiB:.1f} MiB, "
        f"in-memory {in_memory['tracemalloc_peak'] / MiB:.1f} MiB; peak RSS growth (torch, numba and all) backed "
        f"{(backed['rss_peak'] - backed['rss_before']) / MiB:.1f} MiB, in-memory "
        f"{(in_memory['rss_peak'] - in_memory['rss_before']) / MiB:.1f} MiB"
    )
    # The data lives in numpy/scipy arrays, which tracemalloc counts; a 512-cell buffer keeps them far below
    # the dense matrix, while the in-memory path holds (several copies of) the whole matrix.
    assert backed["tracemalloc_peak"] < cap < in_memory["tracemalloc_peak"]
    assert backed["rss_peak"] - backed["rss_before"] < in_memory["rss_peak"] - in_memory["rss_before"]
    # Same cells, genes and preprocessing: the baselines (order-free) agree to float32 precision; the model,
    # trained for one epoch from the PCA start in a different shuffle order, agrees within a tolerance.
    for stage in ("val", "test"):
        for who in ("mean", "pca"):
            for name, value in in_memory["metrics"][stage][who].items():
                assert backed["metrics"][stage][who][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (stage, who)
        for name in ("cosine", "pearson"):
            assert backed["metrics"][stage]["model"][name] == pytest.approx(
                in_memory["metrics"][stage]["model"][name], abs=0.025
            )
    assert (
        backed["metrics"]["n_cells"] == in_memory["metrics"]["n_cells"] == {"train": 16000, "val": 2000, "test": 2000}
    )
    split_b = (tmp_path / "backed" / rundir.SPLIT_FILE).read_text()
    assert split_b == (tmp_path / "memory" / rundir.SPLIT_FILE).read_text()
    contract = json.loads((tmp_path / "backed" / rundir.CONTRACT_FILE).read_text())
    assert len(contract["preprocess"]["genes"]) == contract["n_genes"] == 256


@pytest.mark.slow
def test_backed_run_writes_the_same_run_directory(compose_cfg, small_h5ad):
    """A short backed fit through train(): split, contract and checkpoints as the in-memory path writes them."""
    cfg = compose_cfg(
        "data=h5ad",
        f"data.path={small_h5ad}",
        "data.preprocess.n_top_genes=100",
        "data.backed=true",
        "data.chunk_size=64",
        "data.batch_size=64",
        "trainer.max_epochs=2",
    )
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "checkpoints" / "best.ckpt").is_file()
    assert metrics["n_cells"] == {"train": 960, "val": 120, "test": 120}
    assert metrics["test"]["model"]["cosine"] >= metrics["test"]["pca"]["cosine"] - 0.01


@pytest.mark.slow  # spawned workers import torch and scanpy afresh
def test_backed_loader_workers_give_the_same_batches(small_h5ad):
    """Buffers read in DataLoader workers (each opening its own file handle) arrive in the same order."""
    batches = {}
    for workers in (0, 2):
        dm = _datamodule(small_h5ad, backed=True, chunk_size=100, buffer_chunks=2, num_workers=workers)
        batches[workers] = list(dm.train_dataloader())
    assert len(batches[0]) == len(batches[2])
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a[INDEX_KEY], b[INDEX_KEY]) and torch.equal(a[X_KEY], b[X_KEY])
