"""The LightningModule: trains the network with the configured loss; held-out scoring is its evaluation's job."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from exprae.constants import BATCH_KEY, LABEL_KEY, SIZE_FACTOR_KEY, TARGET_KEY, X_KEY
from exprae.data.training_data import TrainingData
from exprae.losses import CountNLL, ReconstructionLoss, reduce_per_cell
from exprae.nn import AutoEncoder
from exprae.nn.autoencoder import LINEAR_STARTS
from exprae.nn.baselines import BaselineName, Baselines, SphericalPCA
from exprae.nn.count_head import InputView, count_parameters, expected_counts
from exprae.scoring.masking import MaskEntries, MaskFill
from exprae.scoring.mcv import MCVScorer
from exprae.scoring.metrics import dispersion_agreement
from exprae.training.evaluation import (
    BATCH_SCORED,
    EVAL_STAGES,
    HeldOutEvaluation,
    batch_codes,
    level_key,
    scored_baselines,
)
from exprae.training.fast_step import (
    TrainStep,
    build_optimizer,
    check_compile_mode,
    check_graph_supported,
    count_optimizer_step,
    step_epoch_schedulers,
)

log = logging.getLogger(__name__)

# Re-exported: defined here before the held-out evaluation moved to exprae.training.evaluation.
__all__ = [
    "BATCH_SCORED",
    "EVAL_STAGES",
    "AutoencoderModule",
    "batch_codes",
    "dispersion_agreement",
    "level_key",
    "scored_baselines",
]


class AutoencoderModule(pl.LightningModule):
    """Owns the loss, the optimizer and the training step; the network itself is a plain ``nn.Module``.

    ``train/loss`` is logged every ``log_every_n_steps``; with an auxiliary latent loss (``aux_loss(z_nk,
    labels_n)``, e.g. :class:`~exprae.losses.OnlineTripletCosineLoss`) the training loss is ``recon + aux_weight
    · aux``, and ``train/recon`` and ``train/aux`` are logged too. With a count likelihood
    (:class:`exprae.losses.CountNLL`) the loss is fitted to raw counts through the network's count head. Before
    the first fit the mean and PCA baselines are fitted on the training cells and (``init="pca"``) the network
    starts at PCA. Validation and test cells are scored by :class:`~exprae.training.evaluation.HeldOutEvaluation`
    (``self.evaluation``), which logs the keys :meth:`metric_names` lists.
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
        count_loss = isinstance(loss, CountNLL)
        n_batches = net.n_batches[0] if getattr(net, "n_batches", ()) else 0
        # Baselines are needed for the PCA start even when they are not reported.
        mean_and_pca = Baselines(net.n_genes, net.latent_dim, n_batches=n_batches)
        head = getattr(net, "count_head", None)
        # Validation and test scores; it checks the module.* scoring settings.
        evaluation = HeldOutEvaluation(
            net.n_genes,
            net.latent_dim,
            loss=loss,
            baselines=mean_and_pca,
            count_loss=count_loss,
            per_gene_dispersion=count_loss and head is not None and head.log_theta_g is not None,
            baseline_names=baselines,
            knn_smoothing_k=knn_smoothing_k,
            knn_k=knn_k,
            mask_fraction=mask_fraction,
            mask_seed=mask_seed,
            mask_entries=mask_entries,
            mask_fill=mask_fill,
            batch_levels=batch_levels,
            n_batches=n_batches,
            integration_k=integration_k,
            integration_max_cells=integration_max_cells,
        )
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_monitor = scheduler_monitor
        # Submodules registered in their original order and names: checkpoints and the optimizer's parameter
        # order are those of runs made before the evaluation had its own class.
        self.masker = evaluation.masker
        self.aux_loss, self.aux_weight, self.knn_k = aux_loss, float(aux_weight), knn_k
        self.count_loss = count_loss
        if self.count_loss and head is None:
            raise ValueError(
                f"{type(loss).__name__} is a count likelihood: build the network with its output head, "
                "AutoEncoder(..., count_head=loss.head) (exprae.train.build does this)"
            )
        if self.count_loss and head.spec != loss.head:
            raise ValueError(f"the network's count head {head.spec} differs from the loss's {loss.head}")
        # Maps expected counts into the input representation; buffers, so it travels with the checkpoint.
        self.input_view = InputView(net.n_genes) if self.count_loss else None
        # none | model (torch.compile) | graph (whole step in a CUDA graph, manual optimization): see fast_step.
        self.compile_mode = check_compile_mode(compile)
        self.automatic_optimization = self.compile_mode != "graph"
        self._train_step: TrainStep | None = None
        self.start_state: dict[str, torch.Tensor] | None = None
        self.data: TrainingData | None = None  # the data's hand-off (attach_data); None when only predicting
        self.baselines = mean_and_pca
        self.extra_baselines = evaluation.extra_baselines
        self.metrics = evaluation.metrics
        self.batch_metrics = evaluation.batch_metrics
        self.evaluation = evaluation  # a plain object: its torch modules are registered above
        self.scored, self.with_baselines = evaluation.scored, evaluation.with_baselines
        self.batch_levels = evaluation.batch_levels

    # ------------------------------------------------------------------ set-up

    def attach_data(self, data: TrainingData) -> None:
        """Receive what the module needs from the data (``exprae.train.build`` hands it over before fitting).

        With a molecule split (data.mcv) validation and test cells are also scored against the held-out
        molecules x''.
        """
        if data.n_genes != self.net.n_genes:
            raise ValueError(f"the data has {data.n_genes} genes but the network reads {self.net.n_genes}")
        self.data = data
        self.evaluation.attach(data)

    @property
    def mcv(self) -> MCVScorer | None:
        """The MCV scorer when the attached data has a molecule split (data.mcv); else None."""
        return self.evaluation.mcv

    @property
    def predictive(self) -> MCVScorer | None:
        """Draws a count model's expected profile E[T(x)] (at the depth of x'' under MCV); None before attach_data."""
        return self.evaluation.predictive

    def setup(self, stage: str) -> None:
        """Fit the baselines on the training cells (and start the network at PCA) before the first fit."""
        if stage == "fit" and not bool(self.baselines.fitted):
            self.prepare_start()

    def start_at_pca(self) -> None:
        """Set the network's linear path (and residual units) from the fitted PCA baseline (per-batch PCA when
        the encoder sees the batch: :meth:`~exprae.nn.AutoEncoder.init_from_baselines`), or with
        ``init="spherical_pca"`` from the principal subspace of the L2-normalised training cells."""
        if self.net.init == "spherical_pca":  # no covariates in the encoder (refused when the net is built)
            # The subspace of the L2-normalised training cells, entered at the training mean: a linear start.
            b = self.baselines
            spherical = SphericalPCA(self.net.n_genes, self.net.latent_dim).fit(self.data.train_chunks())
            self.net.init_from_pca(b.mean_g, spherical.components_kg, variance_g=b.variance_g)
            return
        self.net.init_from_baselines(self.baselines)

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
        self.evaluation.fit(data)  # the opt-in baselines and the masker
        if self.net.init in LINEAR_STARTS:
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
            check_graph_supported(self.trainer)
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
        self.evaluation.update(
            stage,
            batch,
            out=out,
            recon=self.reconstruct(out, batch),
            loss_n=loss_n,
            reconstruct=self._reconstruct_input,
        )
        return loss

    def _reconstruct_input(self, x_ng: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's reconstruction of ``x_ng`` (e.g. a masked input) with ``batch``'s covariates."""
        return self.reconstruct(self(x_ng, batch.get(BATCH_KEY)), batch)

    def eval_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What reconstructions are scored against: the target, or the input for count likelihoods."""
        return self.evaluation.eval_target(batch)

    def expected_profiles(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], recons: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each method's prediction of E[T(x)] (:meth:`HeldOutEvaluation.expected_profiles`)."""
        return self.evaluation.expected_profiles(out, batch, recons)

    def mcv_predictions(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], recons: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """MCV: each method's prediction of x'' and its per-cell Poisson NLL (:meth:`HeldOutEvaluation.mcv_predictions`)."""
        return self.evaluation.mcv_predictions(out, batch, recons)

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

        The one list of them (:meth:`HeldOutEvaluation.metric_names`): the epoch-end logging refuses a model key
        missing here, and the check of ``callbacks.*.monitor`` and ``module.scheduler_monitor`` reads it.
        """
        return self.evaluation.metric_names(stage)

    def _log_eval(self, stage: str) -> None:
        head = self.net.count_head if self.count_loss else None
        self.evaluation.log_epoch(stage, self.log, log_theta_g=None if head is None else head.log_theta_g)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
