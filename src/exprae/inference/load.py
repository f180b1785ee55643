"""``exprae.load``: a run directory back as the trained LightningModule, with its preprocessing and genes.

The module is rebuilt exactly as ``exprae-train`` built it (:func:`exprae.training.build.build_module` on the
run's saved config), then the checkpoint is loaded into it whole, so every loss loads, count likelihoods
included, and inference runs the module's own ``predict_step``.

Loading never executes code from the run: the config and the data contract are plain YAML/JSON, only
targets under :data:`ALLOWED_TARGETS` are instantiated from the config, and the weights are read with
``torch.load(weights_only=True)`` (:func:`exprae.runs.checkpoint.read_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from exprae.data.preprocessing import Preprocessing
from exprae.errors import ConfigError, DataError, DataFileNotFoundError
from exprae.nn import AutoEncoder
from exprae.nn.baselines import Baselines
from exprae.runs import rundir
from exprae.runs.checkpoint import UnsafeCheckpointError, read_checkpoint, resolve_checkpoint
from exprae.training.module import AutoencoderModule

ALLOWED_TARGETS = ("exprae.", "torch.")  # module prefixes a saved config may instantiate
# The config groups build_module reads; nothing else of the saved config is instantiated.
MODULE_GROUPS = ("model", "loss", "aux", "module", "optimizer", "scheduler")


class ExpraeModel:
    """A trained run ready to apply: its LightningModule (network, count head, baselines), preprocessing, genes."""

    def __init__(
        self,
        *,
        module: AutoencoderModule,
        preprocess: Preprocessing,
        contract: dict[str, Any],
        run_dir: Path,
        checkpoint: Path,
        loss: str,
    ) -> None:
        if preprocess.genes is None or len(preprocess.genes) != module.net.n_genes:
            raise DataError(
                f"the data contract lists {0 if preprocess.genes is None else len(preprocess.genes)} genes but the "
                f"network expects {module.net.n_genes}"
            )
        self.module = module.eval()
        self.preprocess = preprocess
        self.layer: str | None = contract.get("layer")
        # Count likelihoods: the matrix whose per-cell totals are the library size (None: the input's own).
        self.target_layer: str | None = contract.get("target_layer")
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        self.loss = loss
        # Covariate levels in code order (data.batch_key at training); empty without covariates.
        self.batch_categories: dict[str, list[str]] = dict(contract.get("batch_categories") or {})

    @property
    def net(self) -> AutoEncoder:
        """The plain ``nn.Module`` network inside the module."""
        return self.module.net

    @property
    def baselines(self) -> Baselines:
        """The mean-profile and PCA baselines, fitted on the run's training cells."""
        return self.module.baselines

    @property
    def count_model(self) -> bool:
        """Whether the model was trained with a count likelihood (Poisson, NB, ZINB)."""
        return self.module.count_loss

    @property
    def needs_library(self) -> bool:
        """Whether prediction needs each cell's observed total counts (a count model without a learned library)."""
        return self.count_model and self.net.count_head.spec.library == "observed"

    @property
    def var_names(self) -> list[str]:
        """The genes the network reads and reconstructs, in its order."""
        return list(self.preprocess.genes)

    @property
    def latent_dim(self) -> int:
        return self.net.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def history(self) -> pd.DataFrame:
        """The run's per-epoch metrics (``history.csv``; epoch 0 is the model before training), as scvi-tools'
        ``model.history``; empty for a run trained before exprae wrote it."""
        path = self.run_dir / rundir.HISTORY_FILE
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def to(self, device: str | torch.device) -> ExpraeModel:
        """Move the module to ``device`` (in place; returns self)."""
        self.module.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"ExpraeModel(loss={self.loss}, genes={self.net.n_genes}, latent_dim={self.latent_dim}, "
            f"checkpoint={str(self.checkpoint)!r}, device={self.device})"
        )

    def transform(
        self, adata: ad.AnnData, *, layer: str | None = None, allow_missing_genes: bool = False
    ) -> ad.AnnData:
        """The network's input for ``adata``: the saved preprocessing applied, genes in the model's order.

        Whole matrix in memory; :func:`exprae.embed` does the same per batch.
        """
        from exprae.inference.align import InputMatrix

        source = InputMatrix.from_adata(self, adata, layer=layer, allow_missing_genes=allow_missing_genes)
        out = source.preprocessed(np.arange(adata.n_obs))
        out.obs = adata.obs.copy()
        return out


def load(path: str | Path, *, device: str | torch.device = "auto") -> ExpraeModel:
    """Load a trained model from a run directory (best checkpoint, else last) or a ``.ckpt`` inside one."""
    run_dir, checkpoint = resolve_checkpoint(path)
    contract = rundir.read_json(run_dir / rundir.CONTRACT_FILE)
    preprocess = Preprocessing.from_dict(contract["preprocess"])
    if preprocess.genes is None:
        preprocess.genes = list(contract["var_names"])
    if list(preprocess.genes) != list(contract["var_names"]):
        raise DataError(f"{run_dir / rundir.CONTRACT_FILE}: var_names and preprocess.genes disagree")
    config = read_module_config(run_dir)
    batch_categories = contract.get("batch_categories") or {}
    module = _build(
        config,
        n_genes=len(preprocess.genes),
        n_batches=[len(levels) for levels in batch_categories.values()],
        batch_levels=[str(v) for v in next(iter(batch_categories.values()))] if batch_categories else None,
        where=run_dir / rundir.CONFIG_FILE,
    )
    _load_weights(module, read_checkpoint(checkpoint)["state_dict"], checkpoint, run_dir)
    loss = str(config.loss.get("_target_", "unknown")).rsplit(".", 1)[-1]
    model = ExpraeModel(
        module=module, preprocess=preprocess, contract=contract, run_dir=run_dir, checkpoint=checkpoint, loss=loss
    )
    return model.to(_resolve_device(device))


def read_module_config(run_dir: Path) -> Any:
    """The groups of the run's saved config that build the module, resolved, with every target allow-listed."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = run_dir / rundir.CONFIG_FILE
    if not path.is_file():
        raise DataFileNotFoundError(f"{path} not found: {run_dir} is not an exprae run directory (no saved config)")
    cfg = OmegaConf.load(path)
    if "model" not in cfg or "loss" not in cfg:
        raise DataError(f"{path} has no 'model' or 'loss' section; it was not written by exprae-train")
    try:
        groups = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in MODULE_GROUPS if k in cfg}
    except OmegaConfBaseException as e:
        raise DataError(f"{path} could not be resolved: {str(e).splitlines()[0]}") from e
    for name, node in groups.items():
        _check_targets(node, name)
    groups.setdefault("module", {"_target_": "exprae.training.module.AutoencoderModule"})
    groups.setdefault("optimizer", {"_target_": "torch.optim.AdamW", "_partial_": True})
    return OmegaConf.create(groups)


def _check_targets(node: Any, where: str) -> None:
    """Refuse any ``_target_`` outside exprae and torch, so a saved config cannot run arbitrary code."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGETS):
            raise UnsafeCheckpointError(
                f"{where}._target_={target!r} is not an exprae or torch class; exprae.load only instantiates "
                f"targets starting with {ALLOWED_TARGETS}"
            )
        for key, value in node.items():
            _check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_targets(value, f"{where}[{i}]")


def _build(
    config: Any, *, n_genes: int, n_batches: list[int], batch_levels: list[str] | None, where: Path
) -> AutoencoderModule:
    from hydra.errors import InstantiationException

    from exprae.training.build import build_module

    try:
        return build_module(config, n_genes=n_genes, n_batches=n_batches, batch_levels=batch_levels)
    except InstantiationException as e:
        raise DataError(f"the module described by {where} could not be rebuilt: {e}") from e


def _load_weights(module: AutoencoderModule, state: dict[str, torch.Tensor], checkpoint: Path, run_dir: Path) -> None:
    """Load the whole module's weights (strict), naming the keys or shapes that do not fit."""
    mismatch = (
        f"{checkpoint} does not match the model described by {run_dir / rundir.CONFIG_FILE} (trained by "
        "another exprae version, or the config edited after training?)"
    )
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape, e.g. model.latent_dim changed in the config
        sizes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:3]
        raise DataError(f"{mismatch}: {'; '.join(sizes) or e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise DataError(f"{mismatch}: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device torch knows (auto, cpu, cuda, cuda:1, ...): {e}") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device} was asked for, but torch sees no CUDA GPU here; use device=cpu or device=auto"
        )
    return resolved
