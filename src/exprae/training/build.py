"""Build the LightningModule from a composed config: the one recipe training and inference share.

``exprae-train`` builds the module this way before fitting; ``exprae.load`` builds it the same way from a run's
saved config before loading the checkpoint into it, so a loaded model is the trained module (count head,
input view and baselines included) and inference runs the module's own ``predict_step``.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from exprae.training.module import AutoencoderModule


def build_module(
    cfg: DictConfig,
    *,
    n_genes: int,
    n_batches: list[int] | None = None,
    batch_levels: list[str] | None = None,
    loss: Any = None,
) -> AutoencoderModule:
    """The network (with the count head a count likelihood declares) inside the LightningModule.

    Reads the ``model``, ``loss``, ``aux``, ``module``, ``optimizer`` and ``scheduler`` groups of ``cfg``;
    ``n_batches`` (levels per covariate, ``data.batch_key``) sizes the network's covariate inputs and
    ``batch_levels`` names the first covariate's levels; ``loss`` is the already instantiated ``cfg.loss`` where
    the caller needed it earlier.
    """
    loss = hydra.utils.instantiate(cfg.loss) if loss is None else loss
    head = getattr(loss, "head", None)  # a count likelihood declares the output head it needs
    head_kwargs = {} if head is None else {"count_head": head.to_dict()}
    batch_kwargs = {"n_batches": list(n_batches)} if n_batches else {}
    net = hydra.utils.instantiate(cfg.model, n_genes=n_genes, **head_kwargs, **batch_kwargs)
    aux = cfg.get("aux") or {}
    aux_loss = hydra.utils.instantiate(aux["loss"]) if aux.get("loss") else None
    return hydra.utils.instantiate(
        cfg.module,
        net=net,
        loss=loss,
        aux_loss=aux_loss,
        aux_weight=aux.get("weight", 0.0) if aux_loss is not None else 0.0,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        batch_levels=batch_levels,
    )
