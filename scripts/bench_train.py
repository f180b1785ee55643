"""Training-speed benchmark: exprae's paths, a plain per-cell DataLoader, and scvi-tools, side by side.

    python scripts/bench_train.py                                  # CPU-sized defaults
    python scripts/bench_train.py --sizes 1e6x2000 --batch-sizes 1024 4096 --epochs 5   # on a GPU

For every data size and batch size, all paths train the same MLP widths on the same synthetic counts
(normalize_total 1e4 + log1p, the same train/val split), in one process, each after a short warm-up fit.
Per path it reports training cells/s, seconds per epoch including validation, peak GPU memory, peak host
RSS, seconds from the start of the fit until val/cosine first reaches 99% of the best value of the run,
and val/cosine after the cells seen. Writes ``bench.csv`` and ``bench.md`` to ``--out`` and prints the table.

Paths:
  exprae-graph  exprae with data resident on the device and module.compile=graph (the fast path)
  exprae        exprae's default config (data resident on a GPU when it fits; eager Lightning step)
  exprae-host   exprae with data.on_device=false (batched sparse slicing on the host)
  exprae-model  exprae with module.compile=model (torch.compile; not run unless asked: compile time)
  dataloader    the same LightningModule fed by a torch DataLoader with per-cell __getitem__ (the usual way)
  scvi          scvi-tools SCVI, n_layers=2 x n_hidden=<first hidden width>, n_latent matched (optional extra)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from exprae import compose
from exprae.constants import INDEX_KEY, TARGET_KEY, X_KEY
from exprae.data import ExpressionDataModule
from exprae.data.datasets import synthetic_counts_sparse
from exprae.losses import cosine_similarity
from exprae.nn.baselines import Baselines

ALL_PATHS = ("exprae-graph", "exprae", "exprae-host", "exprae-model", "dataloader", "scvi")
DEFAULT_PATHS = ("exprae-graph", "exprae", "exprae-host", "dataloader", "scvi")
EXPRAE_OVERRIDES = {
    "exprae-graph": ["module.compile=graph"],
    "exprae": [],
    "exprae-host": ["data.on_device=false"],
    "exprae-model": ["module.compile=model"],
    "dataloader": [],
}
PLATEAU_FRACTION = 0.99
SCVI_VAL_CELLS = 20_000


# ---------------------------------------------------------------- measuring


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the maximum while active."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux
            import psutil

            return psutil.Process().memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Clock:
    """Per-epoch timings and val/cosine of one fit, from its start."""

    n_train: int
    start: float = field(default_factory=time.perf_counter)
    train_s: list[float] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    elapsed_s: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)
    resident_mb: float = math.nan  # device bytes of the resident train+val matrices, where resident
    _epoch0: float = 0.0
    _val0: float | None = None

    def epoch_start(self) -> None:
        _sync()
        self._epoch0, self._val0 = time.perf_counter(), None

    def val_start(self) -> None:
        _sync()
        self._val0 = time.perf_counter()

    def epoch_end(self, cosine: float, cells: int) -> None:
        _sync()
        now = time.perf_counter()
        self.train_s.append((self._val0 or now) - self._epoch0)
        self.epoch_s.append(now - self._epoch0)
        self.elapsed_s.append(now - self.start)
        self.cosine.append(cosine)
        self.cells.append(cells)

    def summary(self) -> dict[str, Any]:
        """Steady-state numbers: epochs after the first where there are several (the first pays set-up)."""
        steady = slice(1, None) if len(self.train_s) > 1 else slice(None)
        train_s = float(np.sum(self.train_s[steady]))
        cells = float(np.sum(np.diff([0, *self.cells])[steady]))
        best = max(self.cosine) if self.cosine else math.nan
        reached = next(
            (t for t, c in zip(self.elapsed_s, self.cosine, strict=True) if c >= PLATEAU_FRACTION * best), None
        )
        return {
            "epochs": len(self.epoch_s),
            "cells_seen": self.cells[-1] if self.cells else 0,
            "train_cells_per_s": cells / train_s if train_s > 0 else math.nan,
            "s_per_epoch": float(np.median(self.epoch_s[steady])) if self.epoch_s else math.nan,
            "s_to_99pct_plateau": reached if reached is not None else math.nan,
            "val_cosine": self.cosine[-1] if self.cosine else math.nan,
        }


class ClockCallback(pl.Callback):
    """Feeds a :class:`Clock` from Lightning's hooks (validation runs before ``on_train_epoch_end``)."""

    def __init__(self, clock: Clock, *, batch_size: int) -> None:
        self.clock, self.batch_size, self.cells = clock, batch_size, 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.epoch_start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.cells += batch[X_KEY].shape[0]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.clock.val_start()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.epoch_end(float(trainer.callback_metrics.get("val/cosine", math.nan)), self.cells)


# ---------------------------------------------------------------- data


class PerCellDataset(Dataset):
    """The usual way: one cell per ``__getitem__``, densified alone, batched by the default collate."""

    def __init__(self, x: sp.csr_matrix | np.ndarray) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.x[i]
        x_g = torch.from_numpy(np.asarray(row.toarray() if sp.issparse(row) else row, dtype=np.float32).ravel())
        return {X_KEY: x_g, TARGET_KEY: x_g, INDEX_KEY: torch.tensor(i)}


def parse_size(text: str) -> tuple[int, int]:
    """``"1e5x2000"`` -> (100000, 2000)."""
    try:
        cells, genes = text.lower().split("x")
        return int(float(cells)), int(float(genes))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must look like 1e5x2000 (cells x genes), got {text!r}") from e


def make_cfg(overrides: list[str]) -> Any:
    """The real configs, composed as exprae-train would (nothing is written: no logger, no checkpoints)."""
    return compose(overrides)


def make_datamodule(adata: Any, cfg: Any) -> ExpressionDataModule:
    """The configured datamodule, on the generated AnnData in memory instead of a file."""
    dm: ExpressionDataModule = instantiate(cfg.data, dataset=None, path=None, in_memory=adata)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------- paths


@dataclass
class Setting:
    n_cells: int
    n_genes: int
    batch_size: int
    epochs: int
    hidden: list[int]
    latent: int
    accelerator: str
    epoch_cap_s: float
    seed: int = 0


def base_overrides(s: Setting) -> list[str]:
    gpu = s.accelerator == "gpu"
    return [
        f"trainer={'gpu' if gpu else 'cpu'}",
        f"data.batch_size={s.batch_size}",
        # the benchmark's synthetic cells replace pbmc68k, whose bulk_labels the default split stratifies by
        "data.stratify_key=null",
        "data.preprocess.normalize_total=1e4",
        "data.preprocess.log1p=true",
        f"model.hidden_dims=[{','.join(map(str, s.hidden))}]",
        f"model.latent_dim={s.latent}",
        "loss=cosine",
        f"seed={s.seed}",
    ]


def build_trainer(cfg: Any, s: Setting, *, callbacks: list[pl.Callback], **limits: Any) -> pl.Trainer:
    settings = {
        "default_root_dir": None,
        "max_epochs": s.epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": False,
    }
    return instantiate(cfg.trainer, callbacks=callbacks, **{**settings, **limits})


def run_exprae(path: str, dm: ExpressionDataModule, s: Setting, baselines: dict[str, torch.Tensor], *, warm: bool):
    """Fit one exprae path (or its warm-up); return the clock."""
    cfg = make_cfg([*base_overrides(s), *EXPRAE_OVERRIDES[path]])
    pl.seed_everything(s.seed, workers=True)
    dm.on_device = cfg.data.on_device
    dm.release_device_data()  # each path pays its own upload
    net = instantiate(cfg.model, n_genes=dm.n_genes)
    module = instantiate(
        cfg.module, net=net, loss=instantiate(cfg.loss), optimizer=instantiate(cfg.optimizer), scheduler=None
    )
    module.attach_data(dm.training_data())
    # PCA baselines fitted once per data set and shared: what module.setup would compute, identically.
    module.baselines.load_state_dict(baselines)
    module.start_at_pca()
    n_train = len(dm.splits["train"])
    clock = Clock(n_train)
    limits = {"max_epochs": 1, "limit_train_batches": 12, "limit_val_batches": 2} if warm else {}
    if not warm:
        limits = cap_batches(path, s, n_train)
    trainer = build_trainer(cfg, s, callbacks=[ClockCallback(clock, batch_size=s.batch_size)], **limits)
    if path == "dataloader":
        workers = int(os.environ.get("BENCH_LOADER_WORKERS", "0"))
        train_dl = DataLoader(
            PerCellDataset(dm.split_dataset("train").x), batch_size=s.batch_size, shuffle=True, num_workers=workers
        )
        val_dl = DataLoader(PerCellDataset(dm.split_dataset("val").x), batch_size=s.batch_size, num_workers=workers)
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    else:
        trainer.fit(module, datamodule=dm)
    clock.resident_mb = dm.device_nbytes / 2**20
    return clock


_RATES: dict[tuple[str, int, int, int], float] = {}  # warm-up cells/s, to cap the slow paths' epochs


def cap_batches(path: str, s: Setting, n_train: int) -> dict[str, Any]:
    """Shorten epochs of a slow path so one takes about ``epoch_cap_s`` (its cells/s is still exact)."""
    rate = _RATES.get((path, s.n_cells, s.n_genes, s.batch_size))
    if not rate or n_train / rate <= s.epoch_cap_s:
        return {}
    return {"limit_train_batches": max(4, int(s.epoch_cap_s * rate / s.batch_size))}


def run_scvi(adata: Any, dm: ExpressionDataModule, s: Setting, *, warm: bool) -> Clock:
    """Fit scvi-tools' SCVI on the training cells' counts; score val/cosine on the preprocessed val cells."""
    import scvi

    scvi.settings.seed = s.seed
    train_ad = adata[dm.splits["train"]].copy()
    # scvi's get_normalized_expression is slow; score it on a fixed random subset of the val cells.
    val_idx = np.random.default_rng(s.seed).permutation(dm.splits["val"])[:SCVI_VAL_CELLS]
    val_ad = adata[np.sort(val_idx)].copy()
    target = torch.as_tensor(_dense(dm.adata[np.sort(val_idx)].X))
    scvi.model.SCVI.setup_anndata(train_ad)
    model = scvi.model.SCVI(train_ad, n_hidden=s.hidden[0], n_layers=len(s.hidden), n_latent=s.latent)
    clock = Clock(train_ad.n_obs)

    class ScviClock(pl.Callback):
        cells = 0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            clock.epoch_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.cells += batch["X"].shape[0]

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            clock.val_start()
            was_training = pl_module.training
            with torch.inference_mode():
                rho = model.get_normalized_expression(
                    val_ad, library_size=1e4, batch_size=s.batch_size, return_numpy=True
                )
            pl_module.train(was_training)
            recon = torch.log1p(torch.as_tensor(np.asarray(rho, dtype=np.float32)))
            clock.epoch_end(float(cosine_similarity(recon, target).mean()), self.cells)

    n_train = train_ad.n_obs
    limits = {"max_epochs": 1, "limit_train_batches": 12} if warm else {"max_epochs": s.epochs}
    if not warm:
        limits.update(cap_batches("scvi", s, n_train))
    model.train(
        accelerator=s.accelerator,
        devices=1,
        train_size=1.0,
        batch_size=s.batch_size,
        early_stopping=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[ScviClock()],
        **limits,
    )
    return clock


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def scvi_available() -> str | None:
    """None when scvi-tools can be imported, else why not."""
    try:
        import scvi  # noqa: F401
    except Exception as e:  # ImportError, or a broken install of its many dependencies
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------- driver


def bench_one(path: str, adata: Any, dm: ExpressionDataModule, s: Setting, baselines: dict) -> dict[str, Any]:
    """Warm up, then measure one path on one setting."""
    run = (lambda warm: run_scvi(adata, dm, s, warm=warm)) if path == "scvi" else None
    if run is None:

        def run(warm: bool) -> Clock:
            return run_exprae(path, dm, s, baselines, warm=warm)

    warm_clock = run(True)
    if warm_clock.train_s:
        cells = warm_clock.cells[-1]
        _RATES[(path, s.n_cells, s.n_genes, s.batch_size)] = cells / max(warm_clock.train_s[-1], 1e-9)
    dm.release_device_data()  # the warm-up's upload must not count in the measured run's peak
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        clock = run(False)
    row = {
        "cells": s.n_cells,
        "genes": s.n_genes,
        "batch": s.batch_size,
        "path": path,
        **clock.summary(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else math.nan,
        "peak_rss_mb": rss.peak_mb,
        "resident_data_mb": clock.resident_mb if clock.resident_mb else math.nan,
    }
    return row


def markdown(df: pd.DataFrame) -> str:
    """The results as a markdown table, with speed-ups against the DataLoader path and scvi-tools."""
    cols = [
        ("cells", "cells", "{:.0e}"),
        ("genes", "genes", "{:d}"),
        ("batch", "batch", "{:d}"),
        ("path", "path", "{}"),
        ("train_cells_per_s", "train cells/s", "{:,.0f}"),
        ("x_dataloader", "× DataLoader", "{:.1f}"),
        ("x_scvi", "× scvi", "{:.1f}"),
        ("s_per_epoch", "s/epoch (+val)", "{:.2f}"),
        ("s_to_99pct_plateau", "s to 99% plateau", "{:.1f}"),
        ("cells_seen", "cells seen", "{:,d}"),
        ("val_cosine", "val/cosine", "{:.4f}"),
        ("peak_gpu_mb", "peak GPU MB", "{:,.0f}"),
        ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
        ("resident_data_mb", "data on device MB", "{:,.0f}"),
    ]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            else:
                cells.append(fmt.format(int(v) if fmt in ("{:d}", "{:,d}") else v))
        lines.append("| " + " | ".join(cells) + " |")
    if "error" in df:
        failed = df[df["error"].notna()]
        lines += [
            "",
            *(
                f"- {r.path} ({r.cells:.0e} x {r.genes}, batch {r.batch}) failed: {r.error}"
                for r in failed.itertuples()
            ),
        ]
    return "\n".join(lines)


def add_ratios(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for ref, col in (("dataloader", "x_dataloader"), ("scvi", "x_scvi")):
        rates = df[df.path == ref].set_index(["cells", "genes", "batch"])["train_cells_per_s"]
        key = list(zip(df.cells, df.genes, df.batch, strict=True))
        df[col] = [r / rates.get(k, math.nan) for r, k in zip(df.train_cells_per_s, key, strict=True)]
    return df


def main(argv: list[str] | None = None) -> pd.DataFrame:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None, help="cells x genes, e.g. 1e5x2000")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1024])
    p.add_argument("--epochs", type=int, default=None, help="epochs per path (same cells seen for every path)")
    p.add_argument("--paths", nargs="+", choices=ALL_PATHS, default=list(DEFAULT_PATHS))
    p.add_argument("--hidden", nargs="+", type=int, default=[512, 256])
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--epoch-cap-s", type=float, default=30.0, help="shorten slow paths' epochs to about this")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (on a shared machine: 1)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = ("gpu" if cuda else "cpu") if args.accelerator == "auto" else args.accelerator
    sizes = args.sizes or ([(10**4, 2000), (10**5, 2000), (10**6, 2000), (10**5, 30000)] if cuda else [(10**4, 2000)])
    epochs = args.epochs or (5 if accelerator == "gpu" else 3)
    paths = list(args.paths)
    if "scvi" in paths and (why := scvi_available()) is not None:
        print(f"scvi-tools is not installed ({why}); skipping the scvi path. pip install 'exprae[bench]'")
        paths.remove("scvi")
    torch.set_float32_matmul_precision("high")
    device = torch.cuda.get_device_name() if accelerator == "gpu" else f"CPU ({torch.get_num_threads()} torch threads)"
    print(f"exprae bench on {device}; torch {torch.__version__}; sizes {sizes}; batches {args.batch_sizes}")
    rows = []
    for n_cells, n_genes in sizes:
        t = time.perf_counter()
        adata = synthetic_counts_sparse(n_cells, n_genes, seed=args.seed)
        density = adata.X.nnz / (n_cells * n_genes)
        print(f"generated {n_cells:,} x {n_genes:,} ({density:.1%} non-zero) in {time.perf_counter() - t:.1f}s")
        dm, state = None, None
        for batch_size in args.batch_sizes:
            s = Setting(
                n_cells, n_genes, batch_size, epochs, args.hidden, args.latent, accelerator, args.epoch_cap_s, args.seed
            )
            if dm is None:  # preprocessing, split and PCA baselines once per data size
                t = time.perf_counter()
                dm = make_datamodule(adata, make_cfg(base_overrides(s)))
                baselines = Baselines(dm.n_genes, s.latent)
                device_t = torch.device("cuda" if accelerator == "gpu" else "cpu")
                baselines.fit(chunk.to(device_t) for chunk in dm.train_chunks())
                state = {k: v.cpu() for k, v in baselines.state_dict().items()}
                print(f"preprocessed, split and fitted the PCA baselines in {time.perf_counter() - t:.1f}s")
            dm.batch_size = batch_size
            for path in paths:
                t = time.perf_counter()
                try:
                    row = bench_one(path, adata, dm, s, state)
                except Exception as e:  # one failing path must not lose the others' numbers
                    traceback.print_exc()
                    row = {"cells": n_cells, "genes": n_genes, "batch": batch_size, "path": path}
                    row |= {"error": f"{type(e).__name__}: {e}"[:200], "train_cells_per_s": math.nan}
                    row |= {"val_cosine": math.nan, "cells_seen": 0}
                row["wall_s"] = time.perf_counter() - t
                rows.append(row)
                print(
                    f"  {path:<13} batch {batch_size:>5}: {row['train_cells_per_s']:>12,.0f} cells/s, "
                    f"val/cosine {row['val_cosine']:.4f} after {row['cells_seen']:,} cells ({row['wall_s']:.0f}s)",
                    flush=True,
                )
        del dm
        gc.collect()
    df = add_ratios(pd.DataFrame(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "bench.csv", index=False)
    header = (
        f"exprae training benchmark — {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, "
        f"MLP {n_genes_label(sizes)} -> {' -> '.join(map(str, args.hidden))} -> {args.latent} and back, "
        f"{epochs} epochs per path, command: `python {' '.join(sys.argv)}`"
    )
    table = markdown(df)
    (args.out / "bench.md").write_text(f"{header}\n\n{table}\n")
    print(f"\n{header}\n\n{table}\n\nwrote {args.out / 'bench.csv'} and {args.out / 'bench.md'}")
    return df


def n_genes_label(sizes: list[tuple[int, int]]) -> str:
    return "/".join(sorted({str(g) for _, g in sizes}))


if __name__ == "__main__":
    main()
