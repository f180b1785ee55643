"""Pure PyTorch networks (no Lightning, no AnnData): the MLP autoencoder and its PCA-started variant.

With ``init="pca"`` (the default) the autoencoder is a PCA model plus nonlinear residual branches:

    z     = W (x − μ)          + f_enc((x − μ) / σ)
    x_hat = Wᵀ z + μ           + σ ⊙ f_dec(z)

``W`` (latent x genes) and ``μ`` are set from a PCA of the training cells by :meth:`AutoEncoder.init_from_pca`
and stay trainable; the last layer of each residual MLP starts at zero. The residual MLPs work in each gene's
standard units (``σ``: the gene's sd in the training cells, a fixed buffer): the encoder branch sees
standardised genes and the decoder branch's output is scaled back per gene, so one learning rate suits scaled
data, log data and raw counts in the thousands (on counts, without it, the residuals hardly trained). Training therefore starts exactly at
the PCA reconstruction and can only move away from it where the loss improves, which is why the default
model does not end below the PCA baseline. ``init="spherical_pca"`` builds the same network and starts its
linear path from the principal subspace of the L2-normalised training cells (the cosine score's natural linear
baseline) entered at the training mean, so that no initialisation is favoured by construction (the start is
scored and competes for the checkpoint alike). ``init="random"`` is the classic MLP autoencoder (no linear path).

With covariates (``n_batches``: the number of levels of each categorical covariate, e.g. sample or condition,
served as integer codes ``batch_nk``) the decoder always receives them, one-hot, next to ``z`` (scVI's
``batch_key``), and with ``encode_covariates`` the encoder too. The first covariate (the batch) also has a
per-level centre ``Δ_b`` in the linear path:

    z     = W (x − μ − Δ_b)    + f_enc((x − μ) / σ, c)
    x_hat = Wᵀ z + μ + Δ_b     + σ ⊙ f_dec(z, c)

The one-hot inputs feed the residual MLPs, whose last layers start at zero, so they change nothing at step 0;
``Δ`` starts at zero (the start is then exactly PCA) unless :meth:`AutoEncoder.init_from_pca` is given the
per-batch centres of a PCA fitted on per-batch-centred cells, when the start is exactly that per-batch PCA.
Without ``encode_covariates`` the encoder cannot centre per batch, so ``Δ`` is only added by the decoder.
Decoding with other codes than the cell's own (:meth:`AutoEncoder.forward`'s ``decode_batch_nk``) is the
counterfactual "this cell as if measured in batch b" (scVI's ``transform_batch``).

With a ``count_head`` (declared by a count likelihood, see :mod:`exprae.nn.count_head`) ``x_hat`` is read as per-gene
logits: the network returns log proportions ``log_rho`` (softmax over genes) and the dispersion / dropout /
log-library outputs the loss needs instead of ``recon``; the PCA path then feeds the logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from exprae.errors import ConfigError
from exprae.nn.count_head import CountHead, CountHeadSpec

if TYPE_CHECKING:
    from exprae.nn.baselines import Baselines

Activation = Literal["relu", "gelu", "silu", "elu", "tanh", "leaky_relu"]
Norm = Literal["none", "batch", "layer"]
Init = Literal["pca", "spherical_pca", "random"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}
_NORMS = ("none", "batch", "layer")
_INITS = ("pca", "spherical_pca", "random")
LINEAR_STARTS = ("pca", "spherical_pca")  # inits with the linear path, started from a PCA before training


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def mlp(
    sizes: Sequence[int], *, activation: Activation = "gelu", norm: Norm = "layer", dropout: float = 0.0
) -> nn.Sequential:
    """Linear layers through ``sizes``; every hidden layer gets norm, activation and dropout, the last none."""
    _check_choice("activation", activation, list(_ACTIVATIONS))
    _check_choice("norm", norm, _NORMS)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            if norm == "batch":
                layers.append(nn.BatchNorm1d(n_out))
            elif norm == "layer":
                layers.append(nn.LayerNorm(n_out))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class AutoEncoder(nn.Module):
    """MLP autoencoder for expression profiles; ``forward`` returns ``{"z": z_nk, "recon": x_hat_ng}``.

    With ``count_head`` it returns ``{"z", "log_rho", ...}`` (see :class:`exprae.nn.count_head.CountHead`).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        latent_dim: int = 32,
        hidden_dims: Sequence[int] = (256, 128),
        activation: Activation = "gelu",
        norm: Norm = "layer",
        dropout: float = 0.1,
        input_dropout: float = 0.0,
        init: Init = "pca",
        count_head: CountHeadSpec | Mapping[str, Any] | None = None,
        n_batches: Sequence[int] | None = None,
        encode_covariates: bool = True,
    ) -> None:
        super().__init__()
        self.n_batches = tuple(int(n) for n in (n_batches or ()))
        if any(n < 1 for n in self.n_batches):
            raise ConfigError(f"n_batches must list a positive number of levels per covariate, got {list(n_batches)}")
        self.encode_covariates = bool(encode_covariates) and bool(self.n_batches)
        n_cov = sum(self.n_batches)
        if int(n_genes) < 1:
            raise ConfigError(f"n_genes must be positive, got {n_genes}")
        if int(latent_dim) < 1:
            raise ConfigError(f"model.latent_dim must be a positive integer, got {latent_dim}")
        if any(int(h) < 1 for h in hidden_dims):
            raise ConfigError(f"model.hidden_dims must be positive integers, got {list(hidden_dims)}")
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{name} must lie in [0, 1), got {p}")
        _check_choice("model.init", init, _INITS)
        if init == "spherical_pca" and self.encode_covariates:
            raise ConfigError(
                "model.init=spherical_pca has no per-batch start: with data.batch_key the encoder sees the batch and "
                "the start is a PCA of per-batch-centred cells; use model.init=pca or random, or "
                "model.encode_covariates=false"
            )
        self.n_genes, self.latent_dim, self.init = int(n_genes), int(latent_dim), init
        hidden = [int(h) for h in hidden_dims]
        kw = {"activation": activation, "norm": norm, "dropout": dropout}
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        n_cov_in = n_cov if self.encode_covariates else 0
        self.encoder = mlp([self.n_genes + n_cov_in, *hidden, self.latent_dim], **kw)
        self.decoder = mlp([self.latent_dim + n_cov, *reversed(hidden), self.n_genes], **kw)
        if init in LINEAR_STARTS:
            self.linear_encoder = nn.Linear(self.n_genes, self.latent_dim)
            self.linear_decoder = nn.Linear(self.latent_dim, self.n_genes)
            self.register_buffer("center_g", torch.zeros(self.n_genes))
            self.register_buffer("scale_g", torch.ones(self.n_genes))
            # Per-level centre of the first covariate in the linear path (see the module docstring).
            self.batch_center_bg = nn.Parameter(torch.zeros(self.n_batches[0], self.n_genes)) if n_cov else None
            # Residual branches start at zero, so the network starts as its linear (PCA) path.
            for branch in (self.encoder, self.decoder):
                nn.init.zeros_(branch[-1].weight)
                nn.init.zeros_(branch[-1].bias)
        else:
            self.linear_encoder = self.linear_decoder = self.batch_center_bg = None
        self.count_head = None
        if count_head is not None:
            self.count_head = CountHead(
                CountHeadSpec.coerce(count_head),
                n_genes=self.n_genes,
                n_hidden=hidden[0] if hidden else self.latent_dim,  # the decoder's last hidden width
                library_hidden=hidden[-1] if hidden else self.latent_dim,
            )

    def init_from_baselines(self, baselines: Baselines) -> None:
        """Start at the fitted PCA baseline: per-batch PCA (per-batch centres, components of the per-batch-centred
        cells) when the encoder sees the batch, the baseline a model told the batch has to beat; else plain PCA."""
        b = baselines
        if b.n_batches and self.encode_covariates:
            center_bg = b.batch_mean_bg - b.mean_g
            self.init_from_pca(b.mean_g, b.batch_components_kg, variance_g=b.variance_g, batch_center_bg=center_bg)
            return
        self.init_from_pca(b.mean_g, b.components_kg, variance_g=b.variance_g)

    @torch.no_grad()
    def init_from_pca(
        self,
        mean_g: torch.Tensor,
        components_kg: torch.Tensor,
        *,
        variance_g: torch.Tensor | None = None,
        batch_center_bg: torch.Tensor | None = None,
    ) -> None:
        """Set the linear path to the PCA projection ``W(x − μ)`` and its transpose ``Wᵀz + μ``.

        ``variance_g``, each gene's variance in the training cells, sets the units of the residual branches;
        without it they work in the data's own units. ``batch_center_bg`` (levels x genes, each batch's centre
        minus ``μ``; needs ``encode_covariates``) starts the network at a PCA of per-batch-centred cells;
        without it the per-batch centres start at zero.
        """
        if self.linear_encoder is None:
            raise RuntimeError("init_from_pca needs an AutoEncoder built with init='pca' or init='spherical_pca'")
        if tuple(components_kg.shape) != (self.latent_dim, self.n_genes):
            raise ValueError(
                f"PCA components {tuple(components_kg.shape)} do not match (latent_dim, n_genes) = "
                f"{(self.latent_dim, self.n_genes)}"
            )
        w = components_kg.to(self.linear_encoder.weight)
        mu = mean_g.to(self.linear_encoder.weight)
        self.linear_encoder.weight.copy_(w)
        self.linear_encoder.bias.copy_(-(w @ mu))
        self.linear_decoder.weight.copy_(w.T)
        self.linear_decoder.bias.copy_(mu)
        self.center_g.copy_(mu)
        if self.batch_center_bg is not None:
            self.batch_center_bg.zero_()
        if batch_center_bg is not None:
            if not self.encode_covariates:
                raise ValueError("per-batch centres need the encoder to see the batch: encode_covariates=True")
            self.batch_center_bg.copy_(batch_center_bg.to(mu))
        sd_g = torch.ones_like(self.scale_g) if variance_g is None else variance_g.to(mu).clamp_min(0.0).sqrt()
        # A gene constant in the training cells gets the typical sd rather than a residual fixed at 0.
        typical = sd_g[sd_g > 0].mean() if bool((sd_g > 0).any()) else torch.ones((), device=sd_g.device)
        self.scale_g.copy_(torch.where(sd_g > 0, sd_g, typical))

    def covariates(self, batch_nk: torch.Tensor | None) -> torch.Tensor | None:
        """The covariate codes of each cell (cells x covariates) as concatenated one-hot columns."""
        if not self.n_batches:
            return None
        if batch_nk is None:
            raise ValueError(
                f"this network was trained with {len(self.n_batches)} covariate(s) (levels {list(self.n_batches)}); "
                "pass each cell's integer codes as batch_nk"
            )
        batch_nk = batch_nk.reshape(batch_nk.shape[0], -1).long()
        if batch_nk.shape[1] != len(self.n_batches):
            raise ValueError(f"batch_nk has {batch_nk.shape[1]} covariate columns, the network {len(self.n_batches)}")
        parts = [nn.functional.one_hot(batch_nk[:, i], n) for i, n in enumerate(self.n_batches)]
        return torch.cat(parts, dim=1).float()

    def _center(self, c_nb: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | int:
        """Each cell's batch centre ``Δ_b`` (genes), from the one-hot columns of the first covariate."""
        if self.batch_center_bg is None or c_nb is None:
            return 0
        return c_nb[:, : self.n_batches[0]].to(like) @ self.batch_center_bg.to(like)

    def encode(self, x_ng: torch.Tensor, batch_nk: torch.Tensor | None = None) -> torch.Tensor:
        """Latent code ``z_nk`` of each cell (``batch_nk``: its covariate codes, when the network has them)."""
        x_ng = self.input_dropout(x_ng)
        c_nb = self.covariates(batch_nk) if self.encode_covariates else None
        if self.linear_encoder is None:
            return self.encoder(_with(x_ng, c_nb))
        standard_ng = (x_ng - self.center_g) / self.scale_g
        return self.linear_encoder(x_ng - self._center(c_nb, x_ng)) + self.encoder(_with(standard_ng, c_nb))

    def decode(self, z_nk: torch.Tensor, batch_nk: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstructed profile ``x_hat_ng`` from latent codes (as if from batch ``batch_nk``)."""
        return self._decode_with_hidden(z_nk, self.covariates(batch_nk))[1]

    def _decode_with_hidden(self, z_nk: torch.Tensor, c_nb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden layer ``h_nh`` (the count head's input) and its output ``x_hat_ng``."""
        h_nh = self.decoder[:-1](_with(z_nk, c_nb))
        if self.linear_decoder is None:
            return h_nh, self.decoder[-1](h_nh)
        linear_ng = self.linear_decoder(z_nk) + self._center(c_nb, z_nk)
        return h_nh, linear_ng + self.scale_g * self.decoder[-1](h_nh)

    def forward(
        self, x_ng: torch.Tensor, batch_nk: torch.Tensor | None = None, *, decode_batch_nk: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode with each cell's own covariates ``batch_nk``; decode with ``decode_batch_nk`` when given
        (the counterfactual: every cell as if from those batches), else with its own."""
        z_nk = self.encode(x_ng, batch_nk)
        c_nb = self.covariates(batch_nk if decode_batch_nk is None else decode_batch_nk)
        if self.count_head is None:
            return {"z": z_nk, "recon": self._decode_with_hidden(z_nk, c_nb)[1]}
        h_nh, logits_ng = self._decode_with_hidden(z_nk, c_nb)
        return {"z": z_nk, **self.count_head(logits_ng, h_nh, x_ng)}


def _with(x_nd: torch.Tensor, c_nb: torch.Tensor | None) -> torch.Tensor:
    """``x_nd`` with the covariate columns appended (unchanged without covariates)."""
    return x_nd if c_nb is None else torch.cat([x_nd, c_nb.to(x_nd)], dim=1)
