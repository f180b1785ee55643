"""Training entry point (``exprae-train``): compose the config, train, test the best checkpoint, report.

exprae-train loss=cosine model.latent_dim=16
exprae-train -m loss=mse,cosine,mixed seed=0,1,2
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from exprae.data import ExpressionDataModule
from exprae.errors import CLIError, ConfigError, ExpraeError, RunInterrupted
from exprae.nn.autoencoder import LINEAR_STARTS
from exprae.report.run_report import write_run_report
from exprae.runs import lock as runguard
from exprae.runs import rundir
from exprae.runs.history import keep_logged_history
from exprae.runs.resume import check_resume, recorded_levels, resolve_ckpt_path
from exprae.runs.signals import stop_on_signals
from exprae.scoring.heldout_quality import heldout_quality
from exprae.scoring.metrics import PerBatchMetrics
from exprae.scoring.pca_gain import gain_over_pca
from exprae.training.build import build_module
from exprae.training.config_checks import check_compile, check_config, check_monitors, check_sizes
from exprae.training.console import (
    console_filter,
    emit,
    quiet_lightning,
    resolve_console,
    route_to_logging,
    short_warnings,
)
from exprae.training.history import History
from exprae.training.hparams import log_final_hparams
from exprae.training.module import AutoencoderModule, level_key

BATCH_NAMES = PerBatchMetrics.NAMES

log = logging.getLogger(__name__)


def _config_dir() -> str:
    """Where the Hydra configs are: ``EXPRAE_CONFIG_DIR``, else inside the installed package, else the checkout.

    A wheel (or ``pip install .``) carries the repository's ``configs/`` as ``exprae/configs`` (pyproject.toml
    maps it there at build time); an editable install reads the checkout's top-level ``configs/`` directly.
    A user's own config folder is added with Hydra's ``--config-dir`` (searched before these).
    """
    if os.environ.get("EXPRAE_CONFIG_DIR"):
        return os.environ["EXPRAE_CONFIG_DIR"]
    installed = Path(__file__).resolve().parent / "configs"
    if (installed / "train.yaml").is_file():
        return str(installed)
    return str(Path(__file__).resolve().parents[2] / "configs")


CONFIG_DIR = _config_dir()


def compose(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """The real configs composed with ``overrides``, as ``exprae-train`` would; ready for :func:`train`.

    ``output_dir`` is the run directory :func:`train` writes (default: a new ``outputs/<date>/<time>``, as
    ``exprae-train`` makes). Tests, ``scripts/bench_train.py`` and the notebook train through this function.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        # Outside exprae-train there is no Hydra runtime: name the run directory as Hydra would.
        out = str(output_dir) if output_dir is not None else OmegaConf.select(cfg, "hydra.run.dir")
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(Path(out).expanduser().absolute())
    return cfg


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` in a callbacks/logger group."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build(
    cfg: DictConfig, *, recorded_levels: dict[str, list[str]] | None = None
) -> tuple[ExpressionDataModule, AutoencoderModule]:
    """Instantiate the datamodule (set up, so the gene count is known) and the LightningModule from ``cfg``.

    The module receives what it reads from the data as one object (``datamodule.training_data()``), here.
    ``recorded_levels``: a resumed run's covariate levels, which its cells are coded against by name.
    """
    loss = hydra.utils.instantiate(cfg.loss)
    # A count likelihood's target is raw counts, not the preprocessed input: the datamodule keeps them.
    datamodule: ExpressionDataModule = hydra.utils.instantiate(
        cfg.data, count_target=getattr(loss, "head", None) is not None
    )
    datamodule.recorded_levels = recorded_levels
    datamodule.setup("fit")
    # Covariates (data.batch_key) size the network's one-hot inputs; the module names their levels in its logs.
    module = build_module(
        cfg,
        n_genes=datamodule.n_genes,
        n_batches=datamodule.n_batches,
        batch_levels=datamodule.covariates.categories[datamodule.batch_keys[0]] if datamodule.covariates else None,
        loss=loss,
    )
    module.attach_data(datamodule.training_data())
    check_sizes(module.net, n_train=len(datamodule.splits["train"]))
    if module.aux_loss is not None and datamodule.label_key is None:
        raise ConfigError("an auxiliary latent loss needs labels: set aux.label_key=<obs column>, e.g. bulk_labels")
    if "centroid" in module.scored and datamodule.label_key is None:
        raise ConfigError(
            "module.baselines includes centroid, which predicts each cell's cell-type mean: name the label column "
            "with data.label_key=<obs column>, e.g. bulk_labels"
        )
    return datamodule, module


def _stage_metrics(results: list[dict[str, float]], stage: str) -> dict[str, dict[str, float]]:
    """Regroup Lightning's flat ``{stage}/...`` and ``baseline/{who}/{stage}/...`` keys by who was scored."""
    grouped: dict[str, dict[str, float]] = {"model": {}}
    for who, rest, value in _split_keys(results, stage):
        if len(rest) == 1:
            grouped.setdefault(who, {})[rest[0]] = value
    return {k: v for k, v in grouped.items() if v}


def _split_keys(results: list[dict[str, float]], stage: str) -> list[tuple[str, list[str], float]]:
    """``(who, rest of the key, value)`` for each logged key of ``stage`` (``who``: model or a baseline)."""
    out = []
    for key, value in ((k, float(v)) for r in results for k, v in r.items()):
        parts = key.split("/")
        if parts[0] == stage:
            out.append(("model", parts[1:], value))
        elif parts[0] == "baseline" and len(parts) > 3 and parts[2] == stage:
            out.append((parts[1], parts[3:], value))
    return out


def batch_report(
    results: dict[str, list[dict[str, float]]], datamodule: ExpressionDataModule, levels: list[str]
) -> dict[str, Any] | None:
    """Per-batch scores for metrics.json: cells, cosine/Pearson/MSE per level and their spread (max − min)."""
    if datamodule.covariates is None:
        return None
    key = datamodule.batch_keys[0]
    report: dict[str, Any] = {"key": key, "levels": list(levels), "n_cells": {}, "spread": {}}
    safe = {level_key(level): level for level in levels}
    for stage, stage_results in results.items():
        codes = datamodule.split_batch_codes(stage)[:, 0]
        report["n_cells"][stage] = {level: int((codes == i).sum()) for i, level in enumerate(levels)}
        scores: dict[str, dict[str, dict[str, float]]] = {}
        for who, rest, value in _split_keys(stage_results, stage):
            if len(rest) == 3 and rest[0] == "batch" and rest[1] in safe:
                scores.setdefault(who, {}).setdefault(safe[rest[1]], {})[rest[2]] = value
        report[stage] = scores
        report["spread"][stage] = {
            who: {m: max(v[m] for v in by_level.values()) - min(v[m] for v in by_level.values()) for m in BATCH_NAMES}
            for who, by_level in scores.items()
            if len(by_level) > 1
        }
    return report


def format_report(metrics: dict[str, Any]) -> str:
    """A plain-text table of val/test cosine, Pearson and MSE for the model and each scored baseline.

    With a molecule split (data.mcv) a second table gives the MCV scores against the held-out molecules; with a
    batch covariate, a further table gives the scores per batch level and their spread. Ends with a warning
    when the model reconstructs the test cells worse than the mean-profile baseline (predicting the average
    training cell for every cell), which no useful model does.
    """
    k = metrics.get("latent_dim", "?")
    names = {
        "model": f"exprae ({metrics.get('loss', 'model')})",
        "mean": "mean profile",
        "pca": f"PCA ({k} comps)",
        "spherical_pca": f"spherical PCA ({k})",
        "knn": f"kNN smoothing (k={metrics.get('knn_smoothing_k', '?')})",
        "centroid": "cell-type centroid",
        "batch_mean": "per-batch mean",
        "batch_pca": "per-batch PCA",
    }
    width = max(len(label) for label in names.values()) + 2  # long loss names must not push numbers out of line
    tables = [("cosine", "pearson", "mse")]
    if "mcv_mse" in metrics.get("test", {}).get("model", {}):
        tables.append(("mcv_mse", "mcv_cosine", "mcv_poisson"))
    lines = []
    for scores in tables:
        cols = [(stage, m) for stage in ("val", "test") for m in scores]
        lines.append(" " * width + "".join(f"{f'{s}/{m}':>{_column(m)}}" for s, m in cols))
        for who, label in names.items():
            row = [(m, metrics.get(s, {}).get(who, {}).get(m)) for s, m in cols]
            if all(v is None for _, v in row):
                continue
            lines.append(f"{label:<{width}}" + "".join(_cell(v, _column(m)) for m, v in row))
    gain = metrics.get("gain_over_pca")
    if gain:
        k_equiv = gain["components"]
        worth = f"PCA-{k_equiv:.1f}" if k_equiv is not None else f"more than PCA-{gain['max_components']}"
        moved = gain["relative_weight_change"]
        lines.append(
            f"on val cosine exprae-{gain['latent_dim']} is worth {worth}"
            + ("" if moved is None else f"; its weights moved {100 * moved:.1f} % from their start")
        )
    mixing = ("ilisi", "clisi", "silhouette_label", "silhouette_batch")
    present = [m for m in mixing if any(m in metrics.get("test", {}).get(who, {}) for who in names)]
    if present:
        lines.append("\nintegration of the test cells' latents (scIB scores, 0-1, higher is better)")
        lines.append(f"{'':<{width}}" + "".join(f"{m:>18}" for m in present))
        for who in ("model", "pca", "batch_pca"):
            row = [metrics.get("test", {}).get(who, {}).get(m) for m in present]
            if any(v is not None for v in row):
                lines.append(
                    f"{names[who]:<{width}}" + "".join(f"{v:>18.4f}" if v is not None else f"{'-':>18}" for v in row)
                )
    by_batch = metrics.get("by_batch")
    if by_batch:
        base_cols = [(stage, m) for stage in ("val", "test") for m in ("cosine", "pearson", "mse")]
        rows = []
        for who in ("model", "pca", "batch_pca"):
            for level in [*by_batch["levels"], "spread"]:
                if level == "spread":
                    row = [by_batch["spread"].get(s, {}).get(who, {}).get(m) for s, m in base_cols]
                else:
                    row = [by_batch.get(s, {}).get(who, {}).get(level, {}).get(m) for s, m in base_cols]
                if any(v is not None for v in row):
                    rows.append((f"{names[who].split(' (')[0]} [{level}]", row))
        width = max([22, *(len(label) + 2 for label, _ in rows)])
        lines.append(f"\nper {by_batch['key']} (held-out cells of each level; spread = max - min over levels)")
        lines.append(f"{'':<{width}}" + "".join(f"{f'{s}/{m}':>14}" for s, m in base_cols))
        for label, row in rows:
            lines.append(f"{label:<{width}}" + "".join(_cell(v) for v in row))
    return "\n".join([*lines, *_worse_than_mean(metrics.get("test", {}))])


def _cell(value: float | None, width: int = 14) -> str:
    """One table cell: fixed-point for ordinary values, exponent notation so large ones still fit."""
    if value is None or value != value:  # missing, or NaN written as null
        return f"{'-':>{width}}"
    return f"{value:>{width}.4f}" if abs(value) < 1e5 else f"{value:>{width}.4e}"


def _worse_than_mean(test: dict[str, dict[str, float]]) -> list[str]:
    """Warning lines when the model is worse on test cells than the mean-profile baseline."""
    model, mean = test.get("model", {}), test.get("mean", {})
    worse = []
    if model.get("mse") is not None and mean.get("mse") is not None and model["mse"] > mean["mse"]:
        worse.append(f"test MSE {model['mse']:.4g} vs {mean['mse']:.4g}")
    if model.get("cosine") is not None and mean.get("cosine") is not None and model["cosine"] < mean["cosine"]:
        worse.append(f"test cosine {model['cosine']:.4f} vs {mean['cosine']:.4f}")
    if not worse:
        return []
    return [
        f"WARNING: the model reconstructs test cells worse than the mean-profile baseline ({'; '.join(worse)}): "
        "it has not learned the data (too few epochs, a learning rate too high, or a diverged run?)"
    ]


def _check_trainer(cfg: DictConfig) -> None:
    """Refuse trainer settings that would train nothing, or ask for a GPU this machine does not have."""
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_epochs") == 0 or trainer.get("max_steps") == 0:
        raise ConfigError(
            f"trainer.max_epochs={trainer.get('max_epochs')}, trainer.max_steps={trainer.get('max_steps')} trains "
            "nothing: no checkpoint and no trained model would be written; set trainer.max_epochs >= 1"
        )
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} asks for a GPU, but torch sees no CUDA GPU on this machine; use "
            "trainer=cpu (or trainer.accelerator=cpu), or trainer.accelerator=auto to use a GPU where there is one"
        )


def _column(metric: str) -> int:
    return max(14, len(metric) + 7)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate and test one configuration; write the run directory; return the final metrics.

    Everything that can be wrong with the config or the data is checked before the first file is written,
    and a run that fails before then leaves no run directory (see :mod:`exprae.runs.lock`). SIGTERM and
    SIGINT stop the run with :class:`~exprae.errors.RunInterrupted`, which says how to resume it.
    """
    out_dir = Path(cfg.paths.output_dir)
    try:  # a refused config leaves no directory, even one Hydra created before the task started
        check_config(cfg)
        check_compile(cfg)
        _check_trainer(cfg)
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    except BaseException as e:
        _record_failure(out_dir, e, owned=runguard.created_here(out_dir))
        raise
    console = resolve_console(cfg.get("console", "auto"), progress_bar=bool(cfg.trainer.get("enable_progress_bar")))
    with runguard.claim(out_dir, resume=ckpt_path is not None), quiet_lightning(), console_filter(console):
        try:
            with stop_on_signals(lambda name: _stopped_message(name, out_dir)):
                metrics = _train(cfg, out_dir, ckpt_path, console=console)
        except BaseException as e:
            _record_failure(out_dir, e, owned=True)  # this process holds the directory's lock
            raise
    (out_dir / rundir.ERROR_FILE).unlink(missing_ok=True)  # a resumed run that finished has no error left
    return metrics


def _record_failure(out_dir: Path, error: BaseException, *, owned: bool) -> None:
    """Leave no directory behind for a run that wrote nothing; otherwise say in ``error.txt`` why it failed.

    A job of a sweep (``-m``) keeps its directory either way, so that ``exprae-compare`` can list it with
    the reason it failed instead of not at all. Only a directory this run owns gets an ``error.txt``: a
    refused run pointed at another run's directory leaves that directory as it was.
    """
    if not _in_sweep() and runguard.discard_if_unused(out_dir):
        return
    if owned and out_dir.is_dir():
        text = str(error) or type(error).__name__
        with contextlib.suppress(OSError):  # never hide the error itself behind a second one
            rundir.write_text_atomic(out_dir / rundir.ERROR_FILE, f"{type(error).__name__}: {text}\n")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _stopped_message(signal_name: str, out_dir: Path) -> str:
    """What a run stopped by a signal says: it did not finish, and how to resume it."""
    last = out_dir / "checkpoints" / "last.ckpt"
    head = f"the run in {out_dir} was stopped by {signal_name} before it finished; metrics.json was not written."
    if last.is_file():
        return (
            f"{head} Its last checkpoint is {last}; resume it with `exprae-train hydra.run.dir={out_dir} "
            "ckpt_path=last` plus the overrides it was started with (listed in its .hydra/overrides.yaml)"
        )
    return f"{head} No checkpoint had been written yet, so there is nothing to resume: start the run again"


def _train(cfg: DictConfig, out_dir: Path, ckpt_path: str | None, *, console: str) -> dict[str, Any]:
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build(cfg, recorded_levels=recorded_levels(ckpt_path, out_dir) if ckpt_path else None)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger; with logger=none there is nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    history = next((c for c in callbacks if isinstance(c, History)), None)
    if history is not None:
        history.show_epochs = console != "bar"  # quiet: the lines reach train.log only (console_filter)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_progress_bar=console == "bar"
    )
    if ckpt_path is not None:
        keep_logged_history(loggers, ckpt_path)
    try:  # a bad optimizer or scheduler setting (optimizer.lr=-1) fails here, before any file is written
        module.configure_optimizers()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the optimizer/scheduler settings were rejected: {e}") from e
    if ckpt_path is not None:
        check_resume(ckpt_path, module=module, contract=datamodule.contract(), out_dir=out_dir)
    monitors = {f"callbacks.{name}.monitor": c.get("monitor") for name, c in (cfg.get("callbacks") or {}).items() if c}
    if cfg.get("scheduler"):
        monitors["module.scheduler_monitor"] = module.scheduler_monitor
    check_monitors(monitors, module.metric_names("val"))

    # Under DDP every rank runs this function; the run directory is written once, by global rank 0.
    if trainer.is_global_zero:
        rundir.write_json(out_dir / rundir.CONTRACT_FILE, datamodule.contract())
        rundir.write_text_atomic(out_dir / rundir.SPLIT_FILE, datamodule.split_table().to_csv(index=False))
        rundir.write_json(out_dir / rundir.ENVIRONMENT_FILE, {"seed": cfg.get("seed"), **rundir.environment()})
        rundir.write_config(out_dir, cfg)  # train(cfg) from Python: keep the run loadable by exprae.load
    if trainer.is_global_zero:
        emit(_header(cfg, datamodule, module, out_dir))
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    start = None
    if ckpt_path is None and module.net.init in LINEAR_STARTS and checkpoint is not None and checkpoint.monitor:
        start = _score_start(trainer, module, datamodule, checkpoint)
    # weights_only: resuming reads tensors and plain data only, never code from the checkpoint.
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    best = (checkpoint.best_model_path or None) if checkpoint is not None else None
    start_kept = (
        start is not None and best is not None and _keep_start_if_better(trainer, module, checkpoint, start, best)
    )
    # Not logged again: the best checkpoint's validation scores under the val/* tags would draw a false last
    # point on every TensorBoard curve (a jump back to the best epoch's value at the final step).
    with _without_loggers(trainer):
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    metrics = {
        "loss": cfg.loss._target_.rsplit(".", 1)[-1],
        "latent_dim": module.net.latent_dim,
        "seed": cfg.get("seed"),
        "n_cells": {split: len(idx) for split, idx in datamodule.splits.items()},
        "n_genes": datamodule.n_genes,
        "epochs_trained": trainer.current_epoch,
        # Counted from 1; 0 is the model before training (the PCA start). None without a history callback.
        "best_epoch": _best_epoch(history, trainer),
        "stopped": history.stopped if history is not None else None,
        "best_checkpoint": _inside(best, out_dir) if best else None,
        # The PCA start's validation score; "kept": no epoch beat it, so best_checkpoint holds the start.
        "start": None if start is None else {"monitor": checkpoint.monitor, "score": start[1], "kept": start_kept},
        "val": _stage_metrics(val, "val"),
        "test": _stage_metrics(test, "test"),
        "by_batch": batch_report({"val": val, "test": test}, datamodule, module.batch_levels),
    }
    if "knn" in module.scored:
        metrics["knn_smoothing_k"] = module.extra_baselines.knn_k
    if "pca" in module.scored and "cosine" in metrics["val"].get("model", {}):
        # Equivalent PCA components and distance from the start; a resumed run's start is re-derived, not read.
        metrics["gain_over_pca"] = gain_over_pca(module, datamodule, metrics["val"]["model"])
    if datamodule.label_key is not None:  # latent and marker evaluations need labels independent of the input
        metrics["heldout_quality"] = heldout_quality(module, datamodule, stage="test")
    if trainer.is_global_zero:
        rundir.write_json(out_dir / rundir.METRICS_FILE, metrics)
        try:  # a figure that cannot be drawn must not fail a finished run: its results are already written
            write_run_report(out_dir)
        except (OSError, ValueError, KeyError) as e:
            log.warning("report.html was not written: %s", e)
    log_final_hparams(  # Lightning's loggers write on rank 0 only
        trainer.loggers,
        _flat_hparams(cfg),
        {f"hp/test_{k}": v for k, v in metrics["test"]["model"].items()},
        step=trainer.global_step,
    )
    if trainer.is_global_zero:
        emit(f"\nexprae run {out_dir}\n{format_report(metrics)}\n")
    return metrics


def _header(cfg: DictConfig, datamodule: ExpressionDataModule, module: AutoencoderModule, out_dir: Path) -> str:
    """The first line of a run: data, cells per split, the model's size, the loss, where results go."""
    n = {split: len(idx) for split, idx in datamodule.splits.items()}
    params = sum(p.numel() for p in module.net.parameters())
    return (
        f"exprae-train: {datamodule.source} ({datamodule.layer_name}), {sum(n.values())} cells x {datamodule.n_genes} "
        f"genes ({n.get('train', 0)} train / {n.get('val', 0)} val / {n.get('test', 0)} test); "
        f"{type(module.net).__name__} {params:,} parameters, latent {module.net.latent_dim}, "
        f"loss {cfg.loss._target_.rsplit('.', 1)[-1]}, seed {cfg.get('seed')}\nrun directory: {out_dir}"
    )


def _best_epoch(history: History | None, trainer: pl.Trainer) -> int | None:
    best = history.best(trainer) if history is not None else None
    return None if best is None else int(best["epoch"])


@contextlib.contextmanager
def _without_loggers(trainer: pl.Trainer) -> Iterator[None]:
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.loggers = loggers


def _inside(path: str, out_dir: Path) -> str:
    """``path`` relative to the run directory (both resolved, so symlinks such as /tmp -> /private/tmp agree)."""
    return os.path.relpath(os.path.realpath(path), os.path.realpath(out_dir))


def _score_start(
    trainer: pl.Trainer, module: AutoencoderModule, datamodule: ExpressionDataModule, checkpoint: ModelCheckpoint
) -> tuple[dict[str, torch.Tensor], float]:
    """Score the PCA start on the validation cells and keep its weights, so that it competes with every epoch.

    ModelCheckpoint only sees the weights after an epoch of training; where the first epoch already moves
    away from PCA's optimum (log-normalised pbmc68k), the start itself must be a candidate for "best".
    """
    module.prepare_start()
    trainer.validate(module, datamodule=datamodule, verbose=False)
    score = float(trainer.callback_metrics[checkpoint.monitor])
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, score


def _keep_start_if_better(
    trainer: pl.Trainer,
    module: AutoencoderModule,
    checkpoint: ModelCheckpoint,
    start: tuple[dict[str, torch.Tensor], float],
    best: str,
) -> bool:
    """Write the PCA start as ``best.ckpt`` if no epoch beat it on the monitored metric; return whether it did."""
    start_state, start_score = start
    best_score = float(checkpoint.best_model_score)
    improved = best_score < start_score if checkpoint.mode == "min" else best_score > start_score
    if improved:
        return False
    log.info(
        "no epoch improved %s on the PCA start (%.6g vs %.6g): best.ckpt holds the start",
        checkpoint.monitor,
        start_score,
        best_score,
    )
    module.load_state_dict(start_state)
    trainer.save_checkpoint(best, weights_only=True)  # every rank calls it; rank 0 writes
    return True


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Scalar hyperparameters of the swappable parts, flattened for TensorBoard's HParams tab.

    ``x._target_`` becomes ``x`` = the class name (``loss=MSELoss``), ``_partial_`` is left out, booleans are
    written as "true"/"false" (TensorBoard's number type would show them as 1.0/0.0); the trainer, the
    checkpoint/early-stopping settings, the scheduler and the module's settings are included.
    """
    parts = ("data", "model", "loss", "aux", "module", "optimizer", "scheduler", "trainer")
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in parts if k in cfg and cfg[k] is not None}
    for name in ("model_checkpoint", "early_stopping"):
        if (cfg.get("callbacks") or {}).get(name) is not None:
            keep[f"callbacks.{name}"] = OmegaConf.to_container(cfg.callbacks[name], resolve=True)
    flat: dict[str, Any] = {"seed": cfg.get("seed")}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "_partial_" or (prefix.startswith("trainer") and k in ("callbacks", "logger")):
                    continue
                if k == "_target_":
                    flat[prefix] = str(v).rsplit(".", 1)[-1]
                    continue
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, bool):
            flat[prefix] = "true" if node else "false"
        elif isinstance(node, (int, float, str)) or node is None:
            flat[prefix] = "null" if node is None else node
        else:
            flat[prefix] = str(node)

    walk("", keep)
    return {k: v for k, v in flat.items() if not k.endswith(("dirpath", "default_root_dir"))}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the test cosine so sweepers can optimise it."""
    short_warnings()
    route_to_logging()
    try:
        metrics = train(cfg)
    except RunInterrupted as e:
        # Hydra would report exit status 1; a stopped run exits as a shell reports the signal (143, 130).
        sys.stderr.write(f"exprae-train: {e}\n")
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        raise CLIError(_user_message(e)) from e
    return metrics["test"]["model"].get("cosine")


# Errors that mean the input or the config is wrong: exprae-train prints them without a traceback.
USER_ERRORS = (ExpraeError, InstantiationException, MisconfigurationException)


def _user_message(e: BaseException) -> str:
    """One paragraph for the terminal: exprae's own message where instantiation wrapped one."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ExpraeError):
        cause = cause.__cause__
    text = str(cause if cause is not None else e)
    return f"exprae-train: {text}"


if __name__ == "__main__":
    main()
