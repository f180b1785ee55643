"""The LightningModule: trains the network with the configured loss, scores it and the baselines per cell."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from exprae.constants import (
    BATCH_KEY,
    EXPECTED_TRUTHS,
    EXTRA_SCORES,
    INDEX_KEY,
    LABEL_KEY,
    MCV_COUNT_SCORE,
    MCV_COUNTS_KEY,
    MCV_TARGET_KEY,
    METRIC_NAMES,
    SIZE_FACTOR_KEY,
    TARGET_KEY,
    TRUTH_KEY,
    X_KEY,
)
from exprae.data.training_data import TrainingData
from exprae.errors import ConfigError
from exprae.losses import CountNLL, ReconstructionLoss, cosine_similarity, reduce_per_cell
from exprae.nn import AutoEncoder
from exprae.nn.baselines import BASELINE_NAMES, DEFAULT_BASELINES, BaselineName, Baselines, ExtraBaselines
from exprae.nn.count_head import InputView, count_parameters, expected_counts
from exprae.scoring.integration import integration_scores
from exprae.scoring.masking import InputMasker, MaskEntries, MaskFill, hidden_entries
from exprae.scoring.mcv import MCVScorer, poisson_nll
from exprae.scoring.metrics import PerBatchMetrics, ReconstructionMetrics, knn_label_accuracy
from exprae.training.fast_step import (
    TrainStep,
    build_optimizer,
    check_compile_mode,
    count_optimizer_step,
    step_epoch_schedulers,
)

log = logging.getLogger(__name__)

EVAL_STAGES = ("val", "test")
BATCH_SCORED = {"mean": "batch_mean", "pca": "batch_pca"}  # per-batch variants, scored with a batch covariate


def scored_baselines(baselines: Sequence[str] | bool) -> tuple[str, ...]:
    """The baselines ``module.baselines`` asks for, in canonical order: ``true`` is mean and PCA, ``false`` none."""
    if isinstance(baselines, bool):
        return DEFAULT_BASELINES if baselines else ()
    unknown = [name for name in baselines if name not in BASELINE_NAMES]
    if unknown:
        raise ConfigError(f"module.baselines names unknown baselines {unknown}; choose from {list(BASELINE_NAMES)}")
    return tuple(name for name in BASELINE_NAMES if name in baselines)


class AutoencoderModule(pl.LightningModule):
    """Owns the loss, the optimizer and the metrics; the network itself is a plain ``nn.Module``.

    Logged keys: ``train/loss`` every ``log_every_n_steps``; each validation epoch ``val/{loss, mse, cosine,
    pearson, cosine_median, cosine_p10}`` for the model and ``baseline/{name}/val/...`` for each baseline in
    ``baselines`` (default mean and PCA; opt-in ``spherical_pca``, ``knn`` smoothing with ``knn_smoothing_k``
    neighbours, and the cell-type ``centroid``, see :mod:`exprae.nn.baselines`); the same under ``test/``.

    With a count likelihood (:class:`exprae.losses.CountNLL`) the loss is fitted to raw counts, but cosine,
    Pearson and MSE compare the model's expected counts mapped into the input representation (normalised,
    log1p'd and scaled like the input) with the input itself, so they are comparable with every other loss;
    ``val/nll`` is the held-out negative log-likelihood per cell, and on data with a known per-gene dispersion
    (``var["true_dispersion"]``) ``{stage}/dispersion_pearson`` and ``dispersion_spearman`` score the learned
    per-gene dispersions (on the log scale).

    When batches carry the noise-free truth (synthetic ``true_mean``) every scored reconstruction also gets
    ``{cosine,pearson,mse,...}_to_truth`` against it, and each method's prediction of the expected preprocessed
    profile (:meth:`expected_profiles`) gets ``{...}_to_expected_truth`` against ``E[T(x)]`` given the NB mean and
    dispersion and ``{...}_to_rate_truth`` given each entry's Poisson rate (:mod:`exprae.data.truth`), where the data
    holds them; with ``mask_fraction > 0`` also
    ``masked_{cosine,pearson,mse,...}`` on entries hidden from the encoder (:mod:`exprae.scoring.masking`:
    drawn over ``mask_entries``, the input re-normalised without them and filled per ``mask_fill``; PCA imputes
    by least squares on the observed entries).

    With an auxiliary latent loss (``aux_loss(z_nk, labels_n)``, e.g. :class:`~exprae.losses.OnlineTripletCosineLoss`)
    the training loss is ``recon + aux_weight · aux``, and ``train/recon`` and ``train/aux`` are logged too.
    When batches carry labels, ``{val,test}/knn_accuracy`` is the leave-one-out kNN label accuracy of the
    latent codes (cosine, ``knn_k`` neighbours) within the stage's cells. Under DDP the validation and test
    cells are sharded across ranks, so each rank finds neighbours within its own shard and the logged value is
    the mean over ranks: an approximation of the single-process value (exact with one process).

    When batches carry covariate codes (``data.batch_key``) the network gets them, the per-batch baselines
    ``baseline/{batch_mean,batch_pca}/...`` are scored next to the plain ones, and cosine, Pearson and MSE are
    also logged per level of the batch (the first covariate) as ``{stage}/batch/{level}/{name}`` (baselines:
    ``baseline/{who}/{stage}/batch/{level}/{name}``); ``batch_levels`` names the levels in code order. The
    held-out latents (the model's, PCA's scores and the per-batch PCA's) then get the scIB integration scores
    (:mod:`exprae.scoring.integration`): ``{stage}/ilisi`` (batch mixing) and, with labels, ``clisi``,
    ``silhouette_label`` and ``silhouette_batch``, on at most ``integration_max_cells`` cells (evenly spaced
    in the stage's order, so the same cells every epoch) with ``integration_k`` neighbours. Under DDP each
    rank scores its own shard, as for the kNN accuracy.
    """

    def __init__(
        self,
        net: AutoEncoder,
        loss: ReconstructionLoss,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_monitor: str = "val/loss",
        baselines: bool | list[BaselineName] = True,
        knn_smoothing_k: int = 15,
        aux_loss: nn.Module | None = None,
        aux_weight: float = 1.0,
        knn_k: int = 15,
        compile: str = "none",
        mask_fraction: float = 0.0,
        mask_seed: int = 0,
        batch_levels: list[str] | None = None,
        integration_k: int = 90,
        integration_max_cells: int = 5000,
        mask_entries: MaskEntries = "all",
        mask_fill: MaskFill = "mean",
    ) -> None:
        super().__init__()
        if int(integration_k) < 1 or int(integration_max_cells) < 2:
            raise ConfigError(
                f"module.integration_k must be >= 1 and module.integration_max_cells >= 2, got {integration_k} "
                f"and {integration_max_cells}"
            )
        self.integration_k, self.integration_max_cells = int(integration_k), int(integration_max_cells)
        # Held-out latents with batch codes (and labels) for the integration scores, per stage.
        self._mixing: dict[str, list[dict[str, torch.Tensor]]] = {stage: [] for stage in EVAL_STAGES}
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_monitor = scheduler_monitor
        # The scored baselines; mean and PCA are fitted whatever this says, for the PCA start.
        self.scored = ("model", *scored_baselines(baselines))
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
        # Rebuilds the encoder input without the hidden entries (re-normalised, filled); fitted in prepare_start.
        self.masker = InputMasker(net.n_genes, fill=mask_fill)
        self.aux_loss, self.aux_weight, self.knn_k = aux_loss, float(aux_weight), knn_k
        self._latents: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {stage: [] for stage in EVAL_STAGES}
        self.count_loss = isinstance(loss, CountNLL)
        if self.count_loss and getattr(net, "count_head", None) is None:
            raise ValueError(
                f"{type(loss).__name__} is a count likelihood: build the network with its output head, "
                "AutoEncoder(..., count_head=loss.head) (exprae.train.build does this)"
            )
        if self.count_loss and net.count_head.spec != loss.head:
            raise ValueError(f"the network's count head {net.count_head.spec} differs from the loss's {loss.head}")
        # Maps expected counts into the input representation; buffers, so it travels with the checkpoint.
        self.input_view = InputView(net.n_genes) if self.count_loss else None
        # none | model (torch.compile) | graph (whole step in a CUDA graph, manual optimization): see fast_step.
        self.compile_mode = check_compile_mode(compile)
        self.automatic_optimization = self.compile_mode != "graph"
        self._train_step: TrainStep | None = None
        self.start_state: dict[str, torch.Tensor] | None = None
        n_batches = net.n_batches[0] if getattr(net, "n_batches", ()) else 0
        self.batch_levels = [str(v) for v in (batch_levels or range(n_batches))]
        if len(self.batch_levels) != n_batches:
            raise ValueError(f"{len(self.batch_levels)} batch_levels for a network with {n_batches} batch levels")
        if n_batches:  # next to the mean profile and PCA, their per-batch variants
            self.scored += tuple(BATCH_SCORED[who] for who in ("mean", "pca") if who in self.scored)
        self.mcv: MCVScorer | None = None  # set by attach_data when the data has a molecule split (data.mcv)
        self.predictive: MCVScorer | None = None  # set by attach_data: a count model's sampled E[T(x)]
        self.data: TrainingData | None = None  # the data's hand-off (attach_data); None when only predicting
        # Baselines are needed for the PCA start even when they are not reported.
        self.baselines = Baselines(net.n_genes, net.latent_dim, n_batches=n_batches)
        self.extra_baselines = ExtraBaselines(net.n_genes, net.latent_dim, self.scored, knn_k=knn_smoothing_k)
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

    # ------------------------------------------------------------------ set-up

    def attach_data(self, data: TrainingData) -> None:
        """Receive what the module needs from the data (``exprae.train.build`` hands it over before fitting).

        With a molecule split (data.mcv) validation and test cells are also scored against the held-out
        molecules x''.
        """
        if data.n_genes != self.net.n_genes:
            raise ValueError(f"the data has {data.n_genes} genes but the network reads {self.net.n_genes}")
        self.data = data
        self.mcv = None if data.mcv is None else MCVScorer(data.mcv, data.preprocess)
        # A count model's expected profile, for MCV and the expected truth: drawn at the depth of x'' (or of x).
        self.predictive = self.mcv or MCVScorer(None, data.preprocess)

    def setup(self, stage: str) -> None:
        """Fit the baselines on the training cells (and start the network at PCA) before the first fit."""
        if stage == "fit" and not bool(self.baselines.fitted):
            self.prepare_start()

    def start_at_pca(self) -> None:
        """Set the network's linear path (and residual units) from the fitted PCA baseline.

        A network whose encoder sees the batch starts at the per-batch PCA baseline instead (per-batch centres,
        components of the per-batch-centred cells), the baseline a model told the batch has to beat.
        """
        b = self.baselines
        if b.n_batches and self.net.encode_covariates:
            self.net.init_from_pca(
                b.mean_g, b.batch_components_kg, variance_g=b.variance_g, batch_center_bg=b.batch_mean_bg - b.mean_g
            )
            return
        self.net.init_from_pca(b.mean_g, b.components_kg, variance_g=b.variance_g)

    def prepare_start(self) -> None:
        """Fit the baselines on the training cells; with ``init="pca"`` the network then starts at PCA."""
        data = self.data
        if data is None:
            raise RuntimeError(
                "the module has no training data: call module.attach_data(datamodule.training_data()) before "
                "fitting (exprae.train.build does)"
            )
        # With a batch covariate the chunks carry batch codes, for the per-batch baselines and start.
        self.baselines.fit(data.train_chunks(with_batches=True))
        if self.extra_baselines.names:
            labels_n = data.train_labels() if "centroid" in self.extra_baselines.names else None
            self.extra_baselines.fit(data.train_chunks, pca=self.baselines, labels_n=labels_n)
        if self.mask_fraction > 0:
            self.masker.fit(data.preprocess, mean_g=self.baselines.mean_g)
        if self.net.init == "pca":
            self.start_at_pca()
        # Where training starts (PCA or the random draw), to report how far it moved (exprae.scoring.pca_gain).
        self.start_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        if self.count_loss:
            self.input_view.fit(data.preprocess)
            if data.mean_log_library is not None:
                self.net.count_head.init_library(data.mean_log_library)

    def configure_optimizers(self) -> Any:
        graph = self.compile_mode == "graph"
        if graph and self._trainer is not None:  # train.py also calls this before fitting, to check the settings
            self._check_graph_supported()
        optimizer = build_optimizer(
            self.optimizer_factory,
            self.parameters(),
            device=self.device,
            capturable=graph and self.device.type == "cuda",
        )
        if self.compile_mode == "model":
            self.net.compile()  # compiles forward in place; parameter names (checkpoints) are unchanged
        self._train_step = None  # a new optimizer needs a new capture
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.scheduler_monitor, "interval": "epoch"},
        }

    # ------------------------------------------------------------------ steps

    def forward(
        self, x_ng: torch.Tensor, batch_nk: torch.Tensor | None = None, *, decode_batch_nk: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return self.net(x_ng, batch_nk, decode_batch_nk=decode_batch_nk)

    def loss_per_cell(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The configured loss of each cell in the batch."""
        if self.count_loss:
            return self.loss.per_cell(count_parameters(out, batch), batch[TARGET_KEY])
        return self.loss.per_cell(out["recon"], batch[TARGET_KEY])

    def reconstruct(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reconstruction in the representation metrics use: the input's, for count likelihoods too."""
        if not self.count_loss:
            return out["recon"]
        return self.input_view(expected_counts(count_parameters(out, batch)), batch.get(SIZE_FACTOR_KEY))

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str, *, log_loss: bool = True) -> torch.Tensor:
        out = self(batch[X_KEY], batch.get(BATCH_KEY))
        loss_n = self.loss_per_cell(out, batch)
        loss = reduce_per_cell(loss_n, None, self.loss.reduction)
        if stage == "train":
            if self.aux_loss is not None:
                loss = self._add_aux(loss, out["z"], batch, log_terms=log_loss)
            if log_loss:
                self._log_train_loss(loss, len(loss_n))
            return loss
        if LABEL_KEY in batch:
            self._latents[stage].append((out["z"].detach().float(), batch[LABEL_KEY]))
        if self.batch_metrics:
            self._keep_latents(out["z"], batch, stage)
        target = self.eval_target(batch)
        recons = {"model": self.reconstruct(out, batch)}
        self.metrics[f"{stage}_model"].update(recons["model"], target, loss_n)
        if self.with_baselines:
            for who, recon in self._baseline_recons(batch[X_KEY].float(), batch).items():
                baseline_loss_n = None if self.count_loss else self.loss.per_cell(recon, target)
                self.metrics[f"{stage}_{who}"].update(recon, target, baseline_loss_n)
                recons[who] = recon
        if self.batch_metrics:
            for who, recon in recons.items():
                self.batch_metrics[f"{stage}_{who}"].update(recon, target, _batch_codes(batch))
        if TRUTH_KEY in batch:
            for who, recon in recons.items():
                self.metrics[f"{stage}_{who}_truth"].update(recon, batch[TRUTH_KEY])
        truths = {extra: batch[key] for extra, key in EXPECTED_TRUTHS.items() if key in batch}
        if truths:
            for who, pred in self.expected_profiles(out, batch, recons).items():
                for extra, truth in truths.items():
                    self.metrics[f"{stage}_{who}_{extra}"].update(pred, truth)
        if self.mcv is not None and MCV_TARGET_KEY in batch:
            self._score_held_out_molecules(out, batch, recons, stage)
        if self.mask_fraction > 0:
            self._score_masked(batch, stage)
        return loss

    def _baseline_recons(self, x_ng: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The scored baselines' reconstructions of ``x_ng`` (the centroid only where cells carry labels, the
        per-batch ones where they carry batch codes)."""
        recons = self.baselines(x_ng, _batch_codes(batch))
        if self.extra_baselines.fitted:  # not after loading a checkpoint: they are refitted, never restored
            recons.update(self.extra_baselines(x_ng, batch.get(LABEL_KEY)))
        return {who: recon for who, recon in recons.items() if who in self.scored}

    def _keep_latents(self, z_nk: torch.Tensor, batch: dict[str, torch.Tensor], stage: str) -> None:
        """Keep the model's and the PCA baselines' latents of held-out cells for the integration scores."""
        codes_n = _batch_codes(batch)
        kept = {"model": z_nk.detach().float().cpu(), "batch": codes_n.cpu()}
        if self.with_baselines:
            kept.update({who: z.cpu() for who, z in self.baselines.latents(batch[X_KEY].float(), codes_n).items()})
        if LABEL_KEY in batch:
            kept["label"] = batch[LABEL_KEY].cpu()
        self._mixing[stage].append(kept)

    def _log_integration(self, stage: str, names: set[str] | None) -> None:
        """Log the scIB integration scores of the held-out latents (model, PCA, per-batch PCA)."""
        parts = self._mixing[stage]
        if not parts:
            return
        kept = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        self._mixing[stage].clear()
        n = len(kept["batch"])
        rows = torch.linspace(0, n - 1, min(n, self.integration_max_cells)).round().long()
        labels = kept["label"][rows] if "label" in kept else None
        for who in ("model", "pca", "batch_pca"):
            if who not in kept or len(rows) < 3:
                continue
            scores = integration_scores(kept[who][rows], kept["batch"][rows], labels, k=self.integration_k)
            prefix = f"{stage}/" if who == "model" else f"baseline/{who}/{stage}/"
            for name, value in scores.items():
                # Per-shard under DDP: the mean over ranks.
                self._log_checked(prefix + name, float(value), names if who == "model" else None, sync_dist=True)

    def eval_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What reconstructions are scored against: the target, or the input for count likelihoods."""
        # Count likelihoods fit raw counts; their metrics (and the baselines') are taken in the input's space.
        return batch[X_KEY] if self.count_loss else batch[TARGET_KEY]

    def mcv_predictions(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], recons: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """MCV: each method's own prediction of x'' and the per-cell Poisson NLL of x'' under its expected counts.

        Count models predict through their predictive distribution (seeded posterior draws, so the same batch
        always gives the same prediction); expression models and baselines through their reconstruction.
        """
        size_factor_n = batch.get(SIZE_FACTOR_KEY)
        predictions = {}
        for who, pred in self.expected_profiles(out, batch, recons).items():
            if who == "model" and self.count_loss:
                mean_ng = self.mcv.count_mean(params=count_parameters(out, batch))
            else:
                mean_ng = self.mcv.count_mean(recon_ng=recons[who], size_factor_n=size_factor_n)
            predictions[who] = (pred, poisson_nll(batch[MCV_COUNTS_KEY], mean_ng))
        return predictions

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

    def _score_held_out_molecules(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], recons: dict[str, torch.Tensor], stage: str
    ) -> None:
        for who, (pred, nll_n) in self.mcv_predictions(out, batch, recons).items():
            self.metrics[f"{stage}_{who}_mcv"].update(pred, batch[MCV_TARGET_KEY], nll_n)

    def _score_masked(self, batch: dict[str, torch.Tensor], stage: str) -> None:
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
        recons = {"model": self.reconstruct(self(x_masked_ng, batch.get(BATCH_KEY)), batch)}
        if self.with_baselines:
            recons.update(self._baseline_recons(x_masked_ng.float(), batch))
            if "pca" in recons:  # PCA imputes by least squares on the observed entries, not through the fill
                recons["pca"] = self.baselines.pca_observed(x_masked_ng.float(), ~hidden_ng)
        target = self.eval_target(batch)
        for who, recon in recons.items():
            self.metrics[f"{stage}_{who}_masked"].update(recon, target, mask_ng=hidden_ng)

    def _add_aux(
        self, recon: torch.Tensor, z_nk: torch.Tensor, batch: dict[str, torch.Tensor], *, log_terms: bool = True
    ) -> torch.Tensor:
        """Log the reconstruction and auxiliary terms; return ``recon + aux_weight · aux``."""
        if LABEL_KEY not in batch:
            raise KeyError("the auxiliary latent loss needs labels: set aux.label_key=<obs column>")
        aux = self.aux_loss(z_nk, batch[LABEL_KEY])
        if log_terms:  # not from inside a captured CUDA graph (module.compile=graph), which cannot log
            self.log("train/recon", recon, on_step=False, on_epoch=True, batch_size=len(z_nk))
            self.log("train/aux", aux, on_step=False, on_epoch=True, batch_size=len(z_nk))
        return recon + self.aux_weight * aux

    def _log_train_loss(self, loss: torch.Tensor, n_cells: int) -> None:
        # Logged every step but read back to the host only every log_every_n_steps. On CUDA it stays off the
        # progress bar, which would read it back (a sync that stalls the kernel queue) every step.
        on_bar = self.device.type != "cuda"
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=on_bar, batch_size=n_cells)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            return self._shared_step(batch, "train")
        if self._train_step is None:
            self._train_step = TrainStep(
                lambda b: self._shared_step(b, "train", log_loss=False),
                self.optimizers().optimizer,
                graph=True,
                backward=self.manual_backward,
            )
            if self.device.type != "cuda":
                log.info("module.compile=graph: CUDA graphs need a CUDA device; running the same step eagerly")
        loss = self._train_step(batch)
        count_optimizer_step(self.trainer)
        self._log_train_loss(loss, batch[X_KEY].shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            step_epoch_schedulers(self.lr_schedulers(), self.trainer.callback_metrics, monitor=self.scheduler_monitor)

    def _check_graph_supported(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            raise ConfigError(
                "module.compile=graph captures a single-device step; with several devices use compile=none or model"
            )
        if str(trainer.precision).startswith("16"):
            raise ConfigError(
                f"module.compile=graph does not support precision={trainer.precision} (its grad scaler checks for "
                "infs on the host every step); use bf16-mixed or 32-true"
            )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self(batch[X_KEY], batch.get(BATCH_KEY))
        result = {"z": out["z"].float(), "recon": self.reconstruct(out, batch).float()}
        if self.count_loss:
            result["expected_counts"] = expected_counts(count_parameters(out, batch)).float()
        return result

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

    def _log_checked(self, key: str, value: Any, names: set[str] | None, **kwargs: Any) -> None:
        """``self.log``, refusing a model key that :meth:`metric_names` does not list (None: nothing to check)."""
        if names is not None and key not in names:
            # A bug, not a user error: the monitor check reads metric_names and would refuse a monitor on this key.
            raise RuntimeError(f"{key} is logged but missing from AutoencoderModule.metric_names(); add it there")
        self.log(key, value, **kwargs)

    def _log_eval(self, stage: str) -> None:
        # Checked where the data was attached (exprae.train.build); a module without it has nothing to check against.
        names = self.metric_names(stage) if self.data is not None else None
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
                values.update(self._dispersion_agreement())
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
                self._log_checked(prefix + name, value, checked, prog_bar=show, sync_dist=True, reduce_fx="max")
            metric.reset()
            self._log_per_batch(stage, who, prefix, checked)
        if self._latents[stage]:
            z_nk, labels_n = (torch.cat(parts) for parts in zip(*self._latents[stage], strict=True))
            accuracy = knn_label_accuracy(z_nk, labels_n, k=self.knn_k)
            # Per-shard under DDP: the mean over ranks.
            self._log_checked(f"{stage}/knn_accuracy", accuracy, names, sync_dist=True)
            self._latents[stage].clear()
        self._log_integration(stage, names)

    def _log_per_batch(self, stage: str, who: str, prefix: str, names: set[str] | None) -> None:
        """Log cosine, Pearson and MSE per batch level (levels without cells in this stage are left out)."""
        metric = self.batch_metrics[f"{stage}_{who}"] if self.batch_metrics else None
        if metric is None or metric.update_count == 0:
            return
        values = metric.compute()
        for code, level in enumerate(self.batch_levels):
            if values["n_cells"][code] > 0:
                for name in PerBatchMetrics.NAMES:
                    key = f"{prefix}batch/{level_key(level)}/{name}"
                    self._log_checked(key, values[name][code], names, sync_dist=True, reduce_fx="max")
        metric.reset()

    def _true_log_dispersion(self) -> torch.Tensor | None:
        """The data's true per-gene log dispersions where the model learns per-gene ones to compare; else None."""
        head = self.net.count_head if self.count_loss else None
        if head is None or head.log_theta_g is None or self.data is None or self.data.true_dispersion_g is None:
            return None
        return torch.as_tensor(self.data.true_dispersion_g).log()

    def _dispersion_agreement(self) -> dict[str, torch.Tensor]:
        """Pearson and Spearman r of learned vs true per-gene log dispersions, where the data knows the truth."""
        true_log_theta_g = self._true_log_dispersion()
        if true_log_theta_g is None:
            return {}
        return dispersion_agreement(self.net.count_head.log_theta_g.detach(), true_log_theta_g)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")


def level_key(level: str) -> str:
    """A batch level as it appears in a logged metric name (no ``/``, which would nest it, nor spaces)."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in str(level))


def _batch_codes(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Each cell's code of the batch (the first covariate), or None when the batch carries no covariates."""
    codes = batch.get(BATCH_KEY)
    return None if codes is None else codes.reshape(codes.shape[0], -1)[:, 0]


def dispersion_agreement(log_theta_g: torch.Tensor, true_log_theta_g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pearson r of two per-gene log dispersions, and Spearman r (Pearson of their ranks); NaN truths skipped."""
    a, b = log_theta_g.double().cpu(), true_log_theta_g.double().cpu()
    keep = torch.isfinite(b)
    a, b = a[keep], b[keep]

    def pearson(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cosine_similarity(u, v, centered=True).float()

    def ranks(u: torch.Tensor) -> torch.Tensor:
        return u.argsort().argsort().double()  # continuous values: ties have probability zero

    return {"dispersion_pearson": pearson(a, b), "dispersion_spearman": pearson(ranks(a), ranks(b))}
