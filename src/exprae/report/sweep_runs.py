"""Reading a Hydra sweep directory back: each run's overrides, resolved config, final metrics and curves.

A run is any folder under the sweep with a ``.hydra/`` subfolder (Hydra writes it before the job starts), so
crashed, killed and still-running jobs are found too; they are returned with the reason they cannot be
scored instead of being skipped silently. Everything read is plain YAML/JSON/TensorBoard data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from exprae.constants import METRIC_NAMES
from exprae.runs import rundir

log = logging.getLogger(__name__)

OVERRIDES_FILE = ".hydra/overrides.yaml"  # the job's own overrides, e.g. ["loss=mse", "seed=0"]
STAGES = ("val", "test")
SCORED = ("model", "mean", "pca")  # the model and the two baselines, as in metrics.json
CURVE_TAGS = ("val/cosine", "val/mse")


@dataclass(frozen=True)
class Run:
    """One job of a sweep: where it is, what was overridden, and its final metrics if it finished."""

    path: Path
    name: str  # path relative to the sweep directory, e.g. "3"
    overrides: dict[str, str]
    config: dict[str, Any] = field(repr=False)  # the resolved config, flattened to dotted keys
    metrics: dict[str, Any] | None = field(default=None, repr=False)
    problem: str | None = None  # why the run cannot be scored; None when it finished

    @property
    def finished(self) -> bool:
        return self.problem is None


def find_runs(sweep_dir: str | Path) -> list[Run]:
    """Every run under ``sweep_dir`` (the folder itself if it is a single run), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    run_dirs = [p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir() and ".submitit" not in p.parts]
    return [read_run(d, sweep_dir=sweep_dir) for d in sorted(run_dirs, key=_natural_key)]


def read_run(run_dir: Path, *, sweep_dir: Path) -> Run:
    """Read one run directory; a missing or malformed file becomes the run's ``problem``, never an exception."""
    name = str(run_dir.relative_to(sweep_dir)) if run_dir != sweep_dir else "."
    overrides, config, problem = {}, {}, None
    try:
        overrides = parse_overrides(yaml.safe_load((run_dir / OVERRIDES_FILE).read_text()) or [])
        config = flatten(yaml.safe_load((run_dir / rundir.CONFIG_FILE).read_text()) or {})
    except (OSError, yaml.YAMLError) as err:
        problem = f"unreadable Hydra files ({err.__class__.__name__}: {err})"
    metrics = None
    if problem is None:
        metrics_path = run_dir / rundir.METRICS_FILE
        error_path = run_dir / rundir.ERROR_FILE
        if not metrics_path.is_file() and error_path.is_file():
            problem = f"failed: {error_path.read_text(errors='replace').strip()}"
        elif not metrics_path.is_file():
            problem = "no metrics.json: the run crashed, was killed, or is still running"
        else:
            try:
                metrics = rundir.read_json(metrics_path)
                _check_metrics(metrics)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                metrics, problem = None, f"malformed metrics.json ({err})"
    return Run(path=run_dir, name=name, overrides=overrides, config=config, metrics=metrics, problem=problem)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["loss=mse", "+x=1", "~y"]`` → ``{"loss": "mse", "x": "1"}`` (deletions carry no value and are dropped)."""
    parsed: dict[str, str] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep and not key.startswith("~"):
            parsed[key.lstrip("+")] = value
    return parsed


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"model.latent_dim": 32, ...}``; lists stay whole values."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    """One row per finished run: its name, seed, every override, and ``{stage}/{scored}/{metric}`` columns."""
    rows = []
    for run in runs:
        if not run.finished:
            continue
        row: dict[str, Any] = {"run": run.name, "seed": run.config.get("seed")}  # the seed as a number
        row.update({k: v for k, v in run.overrides.items() if k not in row})
        row["latent_dim"] = run.metrics.get("latent_dim")  # also the PCA baseline's number of components
        row["epochs_trained"] = run.metrics.get("epochs_trained")
        row["best_epoch"] = run.metrics.get("best_epoch")  # counted from 1; 0: the model before training
        row["split_seed"] = run.config.get("data.split_seed")  # which held-out cells: paired comparisons need it
        for stage in STAGES:
            for who in SCORED:
                scores = run.metrics[stage].get(who, {})
                # The usual metrics always (NaN where absent), plus whatever else the run scored: the MCV judge
                # (mcv_*), the synthetic truth (*_to_truth), masked entries, integration scores.
                for metric in [*METRIC_NAMES, *(m for m in scores if m not in METRIC_NAMES)]:
                    value = scores.get(metric)
                    row[f"{stage}/{who}/{metric}"] = float("nan") if value is None else float(value)
        rows.append(row)
    return pd.DataFrame(rows)


def setting_labels(table: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """Each run's setting, e.g. ``loss=mse, model.latent_dim=8``; ``all runs`` when only the seed was swept."""
    values = table[list(keys)].fillna("(default)").astype(str)
    return pd.Series(
        [", ".join(f"{k}={v}" for k, v in row.items()) or "all runs" for _, row in values.iterrows()],
        index=table.index,
        dtype=object,
    )


def read_history(run_dir: Path, *, tags: tuple[str, ...] = CURVE_TAGS) -> pd.DataFrame:
    """Per-epoch validation scores from the run's ``history.csv`` (``epoch, tag, value``; epoch 0: before training)."""
    path = run_dir / rundir.HISTORY_FILE
    if not path.is_file():
        return pd.DataFrame(columns=["epoch", "tag", "value"])
    history = pd.read_csv(path)
    present = [t for t in tags if t in history]
    long = history.melt(id_vars="epoch", value_vars=present, var_name="tag", value_name="value").dropna()
    return long.sort_values(["tag", "epoch"], ignore_index=True)


def read_curves(run_dir: Path, *, tags: tuple[str, ...] = CURVE_TAGS) -> pd.DataFrame:
    """Per-epoch validation scalars from the run's TensorBoard events: columns ``epoch, tag, value``.

    Only event files written during ``fit`` (those with ``train/`` scalars) count: the final
    ``validate``/``test`` calls re-log ``val/...`` for the best checkpoint, which is not an epoch.
    A resumed run has several fit files; the later one wins for an epoch logged twice.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    frames = []
    for path in sorted(run_dir.rglob("events.out.tfevents.*"), key=_event_file_order):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        scalar_tags = set(acc.Tags().get("scalars", []))
        if not any(t.startswith("train/") for t in scalar_tags) or "epoch" not in scalar_tags:
            continue
        epoch_at_step = {e.step: round(e.value) for e in acc.Scalars("epoch")}
        for tag in tags:
            if tag not in scalar_tags:
                continue
            frames.append(
                pd.DataFrame(
                    [
                        {"epoch": epoch_at_step[e.step], "tag": tag, "value": e.value}
                        for e in acc.Scalars(tag)
                        if e.step in epoch_at_step
                    ]
                )
            )
    if not frames:
        return pd.DataFrame(columns=["epoch", "tag", "value"])
    curves = pd.concat(frames, ignore_index=True)
    return curves.drop_duplicates(["epoch", "tag"], keep="last").sort_values(["tag", "epoch"], ignore_index=True)


def _check_metrics(metrics: Any) -> None:
    if not isinstance(metrics, dict):
        raise TypeError("not a JSON object")
    for stage in STAGES:
        if not isinstance(metrics.get(stage), dict) or not isinstance(metrics[stage].get("model"), dict):
            raise KeyError(f"no {stage}/model")
        if "cosine" not in metrics.get(stage, {}).get("model", {}):
            raise KeyError(f"no {stage}/model/cosine")


def _natural_key(path: Path) -> list[Any]:
    """Sort "2" before "10", as Hydra numbers its jobs."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _event_file_order(path: Path) -> tuple[int, int]:
    """events.out.tfevents.<unix time>.<host>.<pid>.<n>: order by time, then by the writer's counter."""
    parts = path.name.split(".")
    time = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
    counter = int(parts[-1]) if parts[-1].isdigit() else 0
    return time, counter
