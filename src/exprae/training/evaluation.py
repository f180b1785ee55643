"""Held-out evaluation: every validation and test batch scored for the model and the baselines, logged per epoch.

:class:`HeldOutEvaluation` is owned by :class:`~exprae.training.module.AutoencoderModule`, which hands it each
held-out batch with the model's output and reconstruction, and a way to reconstruct a masked input; at the
epoch's end it logs through the module's ``log``. It owns the scores' state (the torchmetrics objects, the
opt-in baselines, the input masker: the module registers them as its submodules under their old names, so
they move with the device, are reset by Lightning as before and checkpoints keep their keys) and the one list
of the names it logs, :meth:`HeldOutEvaluation.metric_names`. The scores themselves live in
:mod:`exprae.scoring`.

Logged keys: each validation epoch ``val/{loss, mse, cosine, pearson, cosine_median, cosine_p10}`` for the
model and ``baseline/{name}/val/...`` for each baseline in ``module.baselines`` (default mean and PCA; opt-in
``spherical_pca``, ``knn`` smoothing with ``knn_smoothing_k`` neighbours, and the cell-type ``centroid``, see
:mod:`exprae.nn.baselines`); the same under ``test/``.

With a count likelihood (:class:`exprae.losses.CountNLL`) the loss is fitted to raw counts, but cosine,
Pearson and MSE compare the model's expected counts mapped into the input representation (normalised,
log1p'd and scaled like the input) with the input itself, so they are comparable with every other loss;
``val/nll`` is the held-out negative log-likelihood per cell, and on data with a known per-gene dispersion
(``var["true_dispersion"]``) ``{stage}/dispersion_pearson`` and ``dispersion_spearman`` score the learned
per-gene dispersions (on the log scale).

When batches carry the noise-free truth (synthetic ``true_mean``) every scored reconstruction also gets
``{cosine,pearson,mse,...}_to_truth`` against it, and each method's prediction of the expected preprocessed
profile (:meth:`HeldOutEvaluation.expected_profiles`) gets ``{...}_to_expected_truth`` against ``E[T(x)]`` given
the NB mean and dispersion and ``{...}_to_rate_truth`` given each entry's Poisson rate (:mod:`exprae.data.truth`),
where the data holds them; with ``mask_fraction > 0`` also
``masked_{cosine,pearson,mse,...}`` on entries hidden from the encoder (:mod:`exprae.scoring.masking`:
drawn over ``mask_entries``, the input re-normalised without them and filled per ``mask_fill``; PCA imputes
by least squares on the observed entries). With a molecule split (``data.mcv``) also ``mcv_{cosine,...}`` and
``mcv_poisson`` against the held-out molecules x'' (:mod:`exprae.scoring.mcv`).

When batches carry labels, ``{val,test}/knn_accuracy`` is the leave-one-out kNN label accuracy of the
latent codes (cosine, ``knn_k`` neighbours) within the stage's cells. Under DDP the validation and test
cells are sharded across ranks, so each rank finds neighbours within its own shard and the logged value is
the mean over ranks: an approximation of the single-process value (exact with one process).

When batches carry covariate codes (``data.batch_key``) the per-batch baselines
``baseline/{batch_mean,batch_pca}/...`` are scored next to the plain ones, and cosine, Pearson and MSE are
also logged per level of the batch (the first covariate) as ``{stage}/batch/{level}/{name}`` (baselines:
``baseline/{who}/{stage}/batch/{level}/{name}``); ``batch_levels`` names the levels in code order. The
held-out latents (the model's, PCA's scores and the per-batch PCA's) then get the scIB integration scores
(:mod:`exprae.scoring.latent_scores`): ``{stage}/ilisi`` (batch mixing) and, with labels, ``clisi``,
``silhouette_label`` and ``silhouette_batch``, on at most ``integration_max_cells`` cells (evenly spaced
in the stage's order, so the same cells every epoch) with ``integration_k`` neighbours. Under DDP each
rank scores its own shard, as for the kNN accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from exprae.constants import (
    BATCH_KEY,
    EXPECTED_TRUTHS,
    EXTRA_SCORES,
    INDEX_KEY,
    LABEL_KEY,
    MCV_COUNT_SCORE,
    MCV_TARGET_KEY,
    METRIC_NAMES,
    SIZE_FACTOR_KEY,
    TARGET_KEY,
    TRUTH_KEY,
    X_KEY,
)
from exprae.data.training_data import TrainingData
from exprae.errors import ConfigError
from exprae.nn.baselines import BASELINE_NAMES, DEFAULT_BASELINES, BaselineName, Baselines, ExtraBaselines
from exprae.nn.count_head import count_parameters
from exprae.scoring.latent_scores import HeldOutLatents
from exprae.scoring.masking import InputMasker, MaskEntries, MaskFill, hidden_entries
from exprae.scoring.mcv import MCVScorer
from exprae.scoring.metrics import PerBatchMetrics, ReconstructionMetrics, dispersion_agreement

EVAL_STAGES = ("val", "test")
BATCH_SCORED = {"mean": "batch_mean", "pca": "batch_pca"}  # per-batch variants, scored with a batch covariate

# Reconstructs an input (the masked one) with the model, in the representation the metrics use.
Reconstruct = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def scored_baselines(baselines: Sequence[str] | bool) -> tuple[str, ...]:
    """The baselines ``module.baselines`` asks for, in canonical order: ``true`` is mean and PCA, ``false`` none."""
    if isinstance(baselines, bool):
        return DEFAULT_BASELINES if baselines else ()
    unknown = [name for name in baselines if name not in BASELINE_NAMES]
    if unknown:
        raise ConfigError(f"module.baselines names unknown baselines {unknown}; choose from {list(BASELINE_NAMES)}")
    return tuple(name for name in BASELINE_NAMES if name in baselines)


def level_key(level: str) -> str:
    """A batch level as it appears in a logged metric name (no ``/``, which would nest it, nor spaces)."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in str(level))


def batch_codes(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Each cell's code of the batch (the first covariate), or None when the batch carries no covariates."""
    codes = batch.get(BATCH_KEY)
    return None if codes is None else codes.reshape(codes.shape[0], -1)[:, 0]


class HeldOutEvaluation:
    """Scores held-out batches for the model and the baselines, and logs each stage's means at the epoch's end.

    ``baselines`` (mean and PCA, fitted by the module for its PCA start) and ``loss`` (the baselines' loss
    per cell) are the module's; ``count_loss`` says the model's metrics are taken in the input's space with
    the input as target, ``per_gene_dispersion`` that it learns a dispersion per gene (scored against a known
    truth). The ``module.*`` settings are checked here, with the messages a config error gets.
    """

    def __init__(
        self,
        n_genes: int,
        latent_dim: int,
        *,
        loss: nn.Module,
        baselines: Baselines,
        count_loss: bool,
        per_gene_dispersion: bool,
        baseline_names: bool | list[BaselineName],
        knn_smoothing_k: int,
        knn_k: int,
        mask_fraction: float,
        mask_seed: int,
        mask_entries: MaskEntries,
        mask_fill: MaskFill,
        batch_levels: list[str] | None,
        n_batches: int,
        integration_k: int,
        integration_max_cells: int,
    ) -> None:
        if int(integration_k) < 1 or int(integration_max_cells) < 2:
            raise ConfigError(
                f"module.integration_k must be >= 1 and module.integration_max_cells >= 2, got {integration_k} "
                f"and {integration_max_cells}"
            )
        self.loss, self.baselines = loss, baselines
        self.count_loss, self.per_gene_dispersion = count_loss, per_gene_dispersion
        # The scored baselines; mean and PCA are fitted whatever this says, for the PCA start.
        self.scored = ("model", *scored_baselines(baseline_names))
        self.with_baselines = len(self.scored) > 1
        if not 0.0 <= float(mask_fraction) < 1.0:
            raise ConfigError(f"module.mask_fraction must lie in [0, 1), got {mask_fraction}")
        self.mask_fraction, self.mask_seed = float(mask_fraction), int(mask_seed)
        if mask_entries not in ("all", "nonzero") or mask_fill not in ("mean", "zero"):
            raise ConfigError(
                f"module.mask_entries must be all or nonzero and module.mask_fill mean or zero, got {mask_entries!r} "
                f"and {mask_fill!r}"
            )
        self.mask_entries = mask_entries
        # Rebuilds the encoder input without the hidden entries (re-normalised, filled); fitted in fit().
        self.masker = InputMasker(n_genes, fill=mask_fill)
        self.latents = HeldOutLatents(
            EVAL_STAGES, knn_k=knn_k, integration_k=int(integration_k), max_cells=int(integration_max_cells)
        )
        self.batch_levels = [str(v) for v in (batch_levels or range(n_batches))]
        if len(self.batch_levels) != n_batches:
            raise ValueError(f"{len(self.batch_levels)} batch_levels for a network with {n_batches} batch levels")
        if n_batches:  # next to the mean profile and PCA, their per-batch variants
            self.scored += tuple(BATCH_SCORED[who] for who in ("mean", "pca") if who in self.scored)
        self.extra_baselines = ExtraBaselines(n_genes, latent_dim, self.scored, knn_k=knn_smoothing_k)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{who}{suffix}": ReconstructionMetrics()
                for stage in EVAL_STAGES
                for who in self.scored
                for suffix in ("", *(f"_{extra}" for extra in EXTRA_SCORES))
            }
        )
        self.batch_metrics = nn.ModuleDict(
            {f"{stage}_{who}": PerBatchMetrics(n_batches) for stage in EVAL_STAGES for who in self.scored}
            if n_batches
            else {}
        )
        self.data: TrainingData | None = None  # attach(): what the scores need to know about the data
        self.mcv: MCVScorer | None = None  # attach(), when the data has a molecule split (data.mcv)
        self.predictive: MCVScorer | None = None  # attach(): a count model's sampled E[T(x)]

    # ------------------------------------------------------------------ set-up

    def attach(self, data: TrainingData) -> None:
        """Receive the data's hand-off: labels, truth and dispersions known, and the molecule split for MCV."""
        self.data = data
        self.mcv = None if data.mcv is None else MCVScorer(data.mcv, data.preprocess)
        # A count model's expected profile, for MCV and the expected truth: drawn at the depth of x'' (or of x).
        self.predictive = self.mcv or MCVScorer(None, data.preprocess)

    def fit(self, data: TrainingData) -> None:
        """Fit the opt-in baselines and the masker on the training cells (after the module fitted ``baselines``)."""
        if self.extra_baselines.names:
            labels_n = data.train_labels() if "centroid" in self.extra_baselines.names else None
            self.extra_baselines.fit(data.train_chunks, pca=self.baselines, labels_n=labels_n)
        if self.mask_fraction > 0:
            self.masker.fit(data.preprocess, mean_g=self.baselines.mean_g)

    # ------------------------------------------------------------------ per batch

    def eval_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What reconstructions are scored against: the target, or the input for count likelihoods."""
        # Count likelihoods fit raw counts; their metrics (and the baselines') are taken in the input's space.
        return batch[X_KEY] if self.count_loss else batch[TARGET_KEY]

    def baseline_recons(self, x_ng: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The scored baselines' reconstructions of ``x_ng`` (the centroid only where cells carry labels, the
        per-batch ones where they carry batch codes)."""
        recons = self.baselines(x_ng, batch_codes(batch))
        if self.extra_baselines.fitted:  # not after loading a checkpoint: they are refitted, never restored
            recons.update(self.extra_baselines(x_ng, batch.get(LABEL_KEY)))
        return {who: recon for who, recon in recons.items() if who in self.scored}

    def update(
        self,
        stage: str,
        batch: dict[str, torch.Tensor],
        *,
        out: dict[str, torch.Tensor],
        recon: torch.Tensor,
        loss_n: torch.Tensor,
        reconstruct: Reconstruct,
    ) -> None:
        """Score one held-out batch: ``out`` is the network's output, ``recon`` the model's reconstruction in the
        metrics' representation, ``loss_n`` its loss per cell; ``reconstruct`` re-runs the model (masking)."""
        if LABEL_KEY in batch:
            self.latents.keep_labelled(stage, out["z"], batch[LABEL_KEY])
        if self.batch_metrics:
            codes_n = batch_codes(batch)
            baseline_z = self.baselines.latents(batch[X_KEY].float(), codes_n) if self.with_baselines else {}
            self.latents.keep_mixing(stage, out["z"], codes_n, baseline_z=baseline_z, labels_n=batch.get(LABEL_KEY))
        target = self.eval_target(batch)
        recons = {"model": recon}
        self.metrics[f"{stage}_model"].update(recon, target, loss_n)
        if self.with_baselines:
            for who, baseline_recon in self.baseline_recons(batch[X_KEY].float(), batch).items():
                baseline_loss_n = None if self.count_loss else self.loss.per_cell(baseline_recon, target)
                self.metrics[f"{stage}_{who}"].update(baseline_recon, target, baseline_loss_n)
                recons[who] = baseline_recon
        if self.batch_metrics:
            for who, r in recons.items():
                self.batch_metrics[f"{stage}_{who}"].update(r, target, batch_codes(batch))
        if TRUTH_KEY in batch:
            for who, r in recons.items():
                self.metrics[f"{stage}_{who}_truth"].update(r, batch[TRUTH_KEY])
        truths = {extra: batch[key] for extra, key in EXPECTED_TRUTHS.items() if key in batch}
        if truths:
            for who, pred in self.expected_profiles(out, batch, recons).items():
                for extra, truth in truths.items():
                    self.metrics[f"{stage}_{who}_{extra}"].update(pred, truth)
        if self.mcv is not None and MCV_TARGET_KEY in batch:
            for who, (pred, nll_n) in self.mcv_predictions(out, batch, recons).items():
                self.metrics[f"{stage}_{who}_mcv"].update(pred, batch[MCV_TARGET_KEY], nll_n)
        if self.mask_fraction > 0:
            self._score_masked(batch, stage, reconstruct)

    def mcv_predictions(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], recons: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """MCV: each method's own prediction of x'' and its per-cell Poisson NLL (:meth:`MCVScorer.predictions`)."""
        params = count_parameters(out, batch) if self.count_loss else None
        return self.mcv.predictions(recons, self.expected_profiles(out, batch, recons), batch, count_params=params)

    def expected_profiles(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], recons: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each method's prediction of the expected preprocessed profile ``E[T(x)]`` (of x'' under MCV).

        An expression model's is its reconstruction; a count model's is sampled from its predictive distribution
        (seeded draws, so the same batch always gives the same prediction), not ``T`` of its mean.
        """
        if not self.count_loss:
            return recons
        stream = int(batch[INDEX_KEY][0]) if len(batch[INDEX_KEY]) else 0
        params = count_parameters(out, batch)
        return {**recons, "model": self.predictive.expected_view(params, batch.get(SIZE_FACTOR_KEY), stream=stream)}

    def _score_masked(self, batch: dict[str, torch.Tensor], stage: str, reconstruct: Reconstruct) -> None:
        """Hide entries of the input, reconstruct, and score the model and baselines on the hidden ones."""
        x_ng = batch[X_KEY]
        hidden_ng = hidden_entries(
            x_ng,
            batch[INDEX_KEY],
            fraction=self.mask_fraction,
            seed=self.mask_seed,
            stream=stage,
            entries=self.mask_entries,
        )
        x_masked_ng = self.masker(x_ng, hidden_ng)
        recons = {"model": reconstruct(x_masked_ng, batch)}
        if self.with_baselines:
            recons.update(self.baseline_recons(x_masked_ng.float(), batch))
            if "pca" in recons:  # PCA imputes by least squares on the observed entries, not through the fill
                recons["pca"] = self.baselines.pca_observed(x_masked_ng.float(), ~hidden_ng)
        target = self.eval_target(batch)
        for who, recon in recons.items():
            self.metrics[f"{stage}_{who}_masked"].update(recon, target, mask_ng=hidden_ng)

    # ------------------------------------------------------------------ epoch ends

    def metric_names(self, stage: str = "val") -> set[str]:
        """Every ``{stage}/...`` key the model's scores can be logged under, on the attached data.

        The one list of them: the epoch-end logging refuses a model key missing here, and the check of
        ``callbacks.*.monitor`` and ``module.scheduler_monitor`` (``exprae.train``) reads it. A batch level
        without cells in the stage, or too few cells for the integration scores, leaves its keys out of the logs.
        """
        names = set(METRIC_NAMES)
        per_cell = names - {"loss"}
        labels = self.data is not None and self.data.has_labels
        if self.count_loss:
            names.add("nll")
        if self._true_log_dispersion() is not None:
            names |= {"dispersion_pearson", "dispersion_spearman"}
        if self.data is not None and self.data.has_truth:
            names |= {EXTRA_SCORES["truth"].format(n) for n in per_cell}
        for extra in self.data.expected_truths if self.data is not None else ():
            names |= {EXTRA_SCORES[extra].format(n) for n in per_cell}
        if self.mask_fraction > 0:
            names |= {EXTRA_SCORES["masked"].format(n) for n in per_cell}
        if self.mcv is not None:
            names |= {EXTRA_SCORES["mcv"].format(n) for n in per_cell} | {MCV_COUNT_SCORE}
        if labels:
            names.add("knn_accuracy")
        if self.batch_metrics:  # a batch covariate: per-level scores and the integration scores of the latents
            names |= {f"batch/{level_key(level)}/{n}" for level in self.batch_levels for n in PerBatchMetrics.NAMES}
            names |= {"ilisi", "clisi", "silhouette_label", "silhouette_batch"} if labels else {"ilisi"}
        return {f"{stage}/{name}" for name in names}

    def log_epoch(self, stage: str, log: Callable[..., None], *, log_theta_g: torch.Tensor | None = None) -> None:
        """Log the stage's means (model, baselines, per batch level, latent scores) and reset them.

        ``log`` is the LightningModule's; ``log_theta_g`` the learned per-gene log dispersions, if any.
        """
        # Checked where the data was attached (exprae.train.build); a module without it has nothing to check against.
        names = self.metric_names(stage) if self.data is not None else None

        def log_checked(key: str, value: Any, checked: set[str] | None, **kwargs: Any) -> None:
            if checked is not None and key not in checked:
                # A bug, not a user error: the monitor check reads metric_names and would refuse a monitor on it.
                raise RuntimeError(f"{key} is logged but missing from HeldOutEvaluation.metric_names(); add it there")
            log(key, value, **kwargs)

        for who in self.scored:
            metric = self.metrics[f"{stage}_{who}"]
            if who != "model" and metric.update_count == 0:
                continue  # an opt-in baseline that was not fitted in this process, or a centroid without labels
            prefix = f"{stage}/" if who == "model" else f"baseline/{who}/{stage}/"
            # Values are already exact global means (torchmetrics syncs sums), identical on every rank; a "max"
            # sync keeps them bit-exact (a "mean" would re-round) and tells Lightning they are synced.
            values = metric.compute()
            if who == "model" and self.count_loss and "loss" in values:
                values["nll"] = values["loss"]  # the held-out NLL per cell, named for tables across losses
            if who == "model":
                values.update(self._dispersion_agreement(log_theta_g))
            for extra, pattern in EXTRA_SCORES.items():
                scored = self.metrics[f"{stage}_{who}_{extra}"]
                if scored.update_count > 0:  # the same on every rank: the data has a truth layer or not; masking on
                    for k, v in scored.compute().items():
                        # Only MCV passes a per-cell score in the loss slot: the Poisson NLL of x''.
                        values[MCV_COUNT_SCORE if k == "loss" else pattern.format(k)] = v
                scored.reset()
            checked = names if who == "model" else None
            for name, value in values.items():
                show = who == "model" and name in ("loss", "cosine")
                log_checked(prefix + name, value, checked, prog_bar=show, sync_dist=True, reduce_fx="max")
            metric.reset()
            for key, value in self._per_batch(stage, who, prefix):
                log_checked(key, value, checked, sync_dist=True, reduce_fx="max")
        accuracy = self.latents.knn_accuracy(stage)
        if accuracy is not None:  # per-shard under DDP: the mean over ranks
            log_checked(f"{stage}/knn_accuracy", accuracy, names, sync_dist=True)
        for who, scores in self.latents.integration(stage):
            prefix = f"{stage}/" if who == "model" else f"baseline/{who}/{stage}/"
            for name, value in scores.items():  # per-shard under DDP: the mean over ranks
                log_checked(prefix + name, float(value), names if who == "model" else None, sync_dist=True)

    def _per_batch(self, stage: str, who: str, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Cosine, Pearson and MSE per batch level, as logged keys (levels without cells in the stage left out)."""
        metric = self.batch_metrics[f"{stage}_{who}"] if self.batch_metrics else None
        if metric is None or metric.update_count == 0:
            return
        values = metric.compute()
        for code, level in enumerate(self.batch_levels):
            if values["n_cells"][code] > 0:
                for name in PerBatchMetrics.NAMES:
                    yield f"{prefix}batch/{level_key(level)}/{name}", values[name][code]
        metric.reset()

    def _true_log_dispersion(self) -> torch.Tensor | None:
        """The data's true per-gene log dispersions where the model learns per-gene ones to compare; else None."""
        if not self.per_gene_dispersion or self.data is None or self.data.true_dispersion_g is None:
            return None
        return torch.as_tensor(self.data.true_dispersion_g).log()

    def _dispersion_agreement(self, log_theta_g: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Pearson and Spearman r of learned vs true per-gene log dispersions, where the data knows the truth."""
        true_log_theta_g = self._true_log_dispersion()
        if true_log_theta_g is None or log_theta_g is None:
            return {}
        return dispersion_agreement(log_theta_g.detach(), true_log_theta_g)
