"""Training entry point (``exprae-train``): compose the config, train, test the best checkpoint, report.

exprae-train loss=cosine model.latent_dim=16
exprae-train -m loss=mse,cosine,mixed seed=0,1,2
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from exprae import rundir
from exprae.data import ExpressionDataModule
from exprae.hparams import log_final_hparams
from exprae.module import AutoencoderModule

log = logging.getLogger(__name__)

# The configs live at the repository's top level (configs/), next to src/; EXPRAE_CONFIG_DIR points elsewhere.
CONFIG_DIR = os.environ.get("EXPRAE_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "configs"))


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` in a callbacks/logger group."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build(cfg: DictConfig) -> tuple[ExpressionDataModule, AutoencoderModule]:
    """Instantiate the datamodule (set up, so the gene count is known) and the LightningModule from ``cfg``."""
    datamodule: ExpressionDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    net = hydra.utils.instantiate(cfg.model, n_genes=datamodule.n_genes)
    loss = hydra.utils.instantiate(cfg.loss)
    module = hydra.utils.instantiate(
        cfg.module,
        net=net,
        loss=loss,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    return datamodule, module


def _stage_metrics(results: list[dict[str, float]], stage: str) -> dict[str, dict[str, float]]:
    """Regroup Lightning's flat ``{stage}/...`` and ``baseline/{who}/{stage}/...`` keys by who was scored."""
    flat = {k: float(v) for r in results for k, v in r.items()}
    grouped: dict[str, dict[str, float]] = {"model": {}, "mean": {}, "pca": {}}
    for key, value in flat.items():
        parts = key.split("/")
        if parts[0] == stage:
            grouped["model"][parts[-1]] = value
        elif parts[0] == "baseline" and parts[2] == stage:
            grouped[parts[1]][parts[-1]] = value
    return {k: v for k, v in grouped.items() if v}


def format_report(metrics: dict[str, Any]) -> str:
    """A plain-text table of val/test cosine, Pearson and MSE for the model and both baselines."""
    names = {
        "model": f"exprae ({metrics.get('loss', 'model')})",
        "mean": "mean profile",
        "pca": f"PCA ({metrics.get('latent_dim', '?')} comps)",
    }
    cols = [(stage, m) for stage in ("val", "test") for m in ("cosine", "pearson", "mse")]
    lines = [f"{'':<22}" + "".join(f"{f'{s}/{m}':>14}" for s, m in cols)]
    for who, label in names.items():
        row = [metrics.get(s, {}).get(who, {}).get(m) for s, m in cols]
        if all(v is None for v in row):
            continue
        lines.append(f"{label:<22}" + "".join(f"{v:>14.4f}" if v is not None else f"{'-':>14}" for v in row))
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate and test one configuration; write the run directory; return the final metrics."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule, module = build(cfg)
    rundir.write_json(out_dir / rundir.CONTRACT_FILE, datamodule.contract())
    rundir.write_text_atomic(out_dir / rundir.SPLIT_FILE, datamodule.split_table().to_csv(index=False))
    rundir.write_json(out_dir / rundir.ENVIRONMENT_FILE, {"seed": cfg.get("seed"), **rundir.environment()})

    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log.info("training on %s: %d cells x %d genes", datamodule.source, datamodule.adata.n_obs, datamodule.n_genes)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    best = (checkpoint.best_model_path or None) if checkpoint is not None else None
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    metrics = {
        "loss": cfg.loss._target_.rsplit(".", 1)[-1],
        "latent_dim": module.net.latent_dim,
        "seed": cfg.get("seed"),
        "n_cells": {split: len(idx) for split, idx in datamodule.splits.items()},
        "n_genes": datamodule.n_genes,
        "epochs_trained": trainer.current_epoch,
        "best_checkpoint": str(Path(best).relative_to(out_dir)) if best else None,
        "val": _stage_metrics(val, "val"),
        "test": _stage_metrics(test, "test"),
    }
    rundir.write_json(out_dir / rundir.METRICS_FILE, metrics)
    log_final_hparams(
        trainer.loggers,
        _flat_hparams(cfg),
        {f"hp/test_{k}": v for k, v in metrics["test"]["model"].items()},
        step=trainer.global_step,
    )
    print(f"\nexprae run {out_dir}\n{format_report(metrics)}\n")
    return metrics


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Scalar hyperparameters of the swappable parts, flattened for TensorBoard's HParams tab."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "loss", "optimizer") if k in cfg}
    flat: dict[str, Any] = {"seed": cfg.get("seed")}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (int, float, str, bool)) or node is None:
            flat[prefix] = "null" if node is None else node
        else:
            flat[prefix] = str(node)

    walk("", keep)
    return flat


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the test cosine so sweepers can optimise it."""
    metrics = train(cfg)
    return metrics["test"]["model"].get("cosine")


if __name__ == "__main__":
    main()
