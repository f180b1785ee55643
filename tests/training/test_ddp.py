"""DDP through Lightning: disjoint shards per rank, exact global validation metrics, one writer of the run files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import scipy.sparse as sp

from exprae.constants import INDEX_KEY
from exprae.data import CellBatchSampler
from exprae.train import _stage_metrics, build

ROOT = Path(__file__).resolve().parents[2]


class RecordBatches(pl.Callback):
    """Writes, per rank, the split positions of every training batch (per epoch) and of validate()'s batches."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.train: dict[int, list[list[int]]] = {}
        self.val: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.setdefault(trainer.current_epoch, []).append(batch[INDEX_KEY].tolist())

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # keep the last validate() only: the PCA start is scored by one too
            self.val = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "validate":
            self.val.extend(batch[INDEX_KEY].tolist())

    def teardown(self, trainer, pl_module, stage) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "train": self.train, "val": self.val}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("n_cells, world", [(532, 2), (91, 2), (100, 3), (7, 4)])
def test_sampler_shards_are_disjoint_and_cover(n_cells, world):
    """Training shards: equal batch counts, together every cell, repeats only the padding; eval shards: a partition."""
    train = [CellBatchSampler(n_cells, 16, shuffle=True, seed=3, num_replicas=world, rank=r) for r in range(world)]
    assert len({len(s) for s in train}) == 1  # equal epoch length on every rank, or DDP would hang
    cells = [np.concatenate(list(s)) for s in train]
    assert set(np.concatenate(cells)) == set(range(n_cells))
    assert sum(map(len, cells)) - n_cells == -n_cells % world
    evals = [
        np.concatenate(list(CellBatchSampler(n_cells, 16, shuffle=False, num_replicas=world, rank=r, pad=False)))
        for r in range(world)
    ]
    assert np.array_equal(np.sort(np.concatenate(evals)), np.arange(n_cells))
    assert max(map(len, evals)) - min(map(len, evals)) <= 1


@pytest.fixture(scope="module")
def pbmc_h5ad(tmp_path_factory, pbmc) -> Path:
    """pbmc68k's log-normalised matrix as a CSR .h5ad, so both data paths can read the same file."""
    path = tmp_path_factory.mktemp("ddp") / "pbmc_lognorm.h5ad"
    ad.AnnData(
        X=sp.csr_matrix(pbmc.raw.X, dtype=np.float32),
        obs=pbmc.obs[["bulk_labels"]].copy(),
        var=pd.DataFrame(index=pbmc.raw.var_names.copy()),
    ).write_h5ad(path)
    return path


def _data_overrides(path: Path, backed: bool) -> list[str]:
    # 700 cells: 91 validation cells (odd, so the two ranks hold 46 and 45 and a mean of per-rank means
    # would differ from the global mean), 77 test, 532 training.
    return [
        "data.dataset=null",
        f"data.path={path}",
        "data.val_fraction=0.13",
        "data.test_fraction=0.11",
        "data.batch_size=64",
        f"data.backed={str(backed).lower()}",
        "data.chunk_size=64",
        "data.buffer_chunks=2",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("backed", [False, True], ids=["in_memory", "backed"])
def test_ddp_two_cpu_processes(tmp_path, compose_cfg, pbmc_h5ad, backed):
    """The Hydra CLI with trainer=ddp on 2 CPU processes (gloo): shards, exact val metrics, one writer."""
    run, record = tmp_path / "run", tmp_path / "record"
    cmd = [
        sys.executable,
        "-m",
        "exprae.train",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.deterministic=true",
        *_data_overrides(pbmc_h5ad, backed),
        "+callbacks.record._target_=test_ddp.RecordBatches",
        f"+callbacks.record.out={record}",
        f"hydra.run.dir={run}",
    ]
    # Lightning's DDP launcher re-runs this command for rank 1 with the same environment.
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "training"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    # Two processes ran; the report and metrics.json come from rank 0 only.
    assert (run / "train_ddp_process_1.log").is_file()
    assert proc.stdout.count("exprae run") == 1
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)

    # Each epoch: equal batch counts per rank, disjoint shards covering every training cell.
    for epoch in ("0", "1"):
        batches = [r["train"][epoch] for r in ranks]
        assert len(batches[0]) == len(batches[1])
        shards = [{i for b in rank_batches for i in b} for rank_batches in batches]
        assert not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(range(532))
    assert ranks[0]["train"]["0"] != ranks[0]["train"]["1"]  # reshuffled per epoch

    # validate(): each validation cell scored exactly once, on one rank.
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(91))
    assert sorted(map(len, (ranks[0]["val"], ranks[1]["val"]))) == [45, 46]

    # The same weights validated in one process give the same numbers: exact global means and quantiles.
    saved = json.loads((run / "metrics.json").read_text())["val"]
    cfg = compose_cfg("callbacks=none", "logger=none", *_data_overrides(pbmc_h5ad, backed))
    datamodule, module = build(cfg)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    single = _stage_metrics(
        trainer.validate(module, datamodule=datamodule, ckpt_path=run / "checkpoints" / "best.ckpt", verbose=False),
        "val",
    )
    assert set(single) == set(saved) == {"model", "mean", "pca"}
    for who, values in single.items():
        assert set(values) == set(saved[who])
        for name, value in values.items():
            assert saved[who][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (who, name)


def test_multinode_slurm_config_composes(compose_cfg):
    """The documented multi-node command composes: 2 nodes x 4 GPUs, one SLURM task per GPU."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the [launchers] extra")
    cfg = compose_cfg(
        "trainer=ddp",
        "trainer.accelerator=gpu",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.gpus_per_node=4",
        fast=False,
    )
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes * cfg.trainer.devices == 8
    launcher = cfg.hydra.launcher
    assert launcher.nodes * launcher.tasks_per_node == cfg.trainer.num_nodes * cfg.trainer.devices
    assert cfg.trainer.use_distributed_sampler is False  # exprae's samplers shard; Lightning's must not
