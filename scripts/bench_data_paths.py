"""Measure the in-memory and backed (streamed) data paths on one .h5ad: set-up time, loader speed, peak memory.

python scripts/bench_data_paths.py --cells 20000 --genes 2000            # writes a seeded synthetic atlas
python scripts/bench_data_paths.py --path atlas.h5ad --num-workers 4     # your own file

Each path runs in a fresh process, so its memory is its own: ``tracemalloc`` counts numpy/Python
allocations made after the imports (where expression data lives), ``/proc``'s VmHWM the whole process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process image from /proc (ru_maxrss would include the parent before exec)."""
    with open("/proc/self/status") as f:
        return 1024 * int(next(ln for ln in f if ln.startswith(field + ":")).split()[1])


def measure(args: argparse.Namespace) -> dict:
    """Set up one data path and iterate one training epoch of batches (no model), measuring as we go."""
    import tracemalloc

    import scanpy.pp  # noqa: F401  (imported lazily by preprocessing; import first so it is not counted)

    from exprae.data import ExpressionDataModule

    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    rss0 = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    dm = ExpressionDataModule(
        dataset=None,
        path=args.path,
        preprocess={"normalize_total": 1e4, "log1p": True, "n_top_genes": args.n_top_genes},
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        backed=args.mode == "backed",
        chunk_size=args.chunk_size,
        buffer_chunks=args.buffer_chunks,
    )
    dm.setup("fit")
    t_setup = time.perf_counter() - t0
    t0, n = time.perf_counter(), 0
    for batch in dm.train_dataloader():
        n += batch["x"].shape[0]
    t_epoch = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    return {
        "mode": args.mode,
        "setup_s": round(t_setup, 2),
        "epoch_s": round(t_epoch, 2),
        "cells_per_s": round(n / t_epoch),
        "tracemalloc_peak_mib": round((peak - start) / MiB, 1),
        "rss_growth_mib": round((_status_bytes("VmHWM") - rss0) / MiB, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="an .h5ad (default: write a synthetic atlas to a temporary folder)")
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--n-top-genes", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--buffer-chunks", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--mode", choices=["memory", "backed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.path is None:
            import anndata as ad

            from exprae.data.datasets import synthetic_counts

            blocks = [
                synthetic_counts(args.cells // 8, args.genes, seed=s, library_mean=800, store_truth=False)
                for s in range(8)
            ]
            adata = ad.concat(blocks, index_unique="-")
            adata.var_names = blocks[0].var_names
            args.path = str(Path(tmp) / "atlas.h5ad")
            adata.write_h5ad(args.path)
            del adata, blocks
        from exprae.data.backed import BackedMatrix

        n_cells, n_genes = BackedMatrix(args.path, layer=None).shape
        size = Path(args.path).stat().st_size
        print(
            f"{args.path}: {n_cells} cells x {n_genes} genes, file {size / MiB:.1f} MiB, "
            f"dense float32 {n_cells * n_genes * 4 / MiB:.1f} MiB"
        )
        for mode in ("memory", "backed"):
            argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k != "mode"]
            out = subprocess.run(
                [sys.executable, __file__, *argv, f"--mode={mode}"], capture_output=True, text=True, check=True
            )
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
