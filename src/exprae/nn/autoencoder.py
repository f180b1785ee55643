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
model does not end below the PCA baseline. ``init="random"`` is the classic MLP autoencoder (no linear path).

With a ``count_head`` (declared by a count likelihood, see :mod:`exprae.nn.count_head`) ``x_hat`` is read as per-gene
logits: the network returns log proportions ``log_rho`` (softmax over genes) and the dispersion / dropout /
log-library outputs the loss needs instead of ``recon``; the PCA path then feeds the logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from exprae.errors import ConfigError
from exprae.nn.count_head import CountHead, CountHeadSpec

Activation = Literal["relu", "gelu", "silu", "elu", "tanh", "leaky_relu"]
Norm = Literal["none", "batch", "layer"]
Init = Literal["pca", "random"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}
_NORMS = ("none", "batch", "layer")
_INITS = ("pca", "random")


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
    ) -> None:
        super().__init__()
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
        self.n_genes, self.latent_dim, self.init = int(n_genes), int(latent_dim), init
        hidden = [int(h) for h in hidden_dims]
        kw = {"activation": activation, "norm": norm, "dropout": dropout}
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        self.encoder = mlp([self.n_genes, *hidden, self.latent_dim], **kw)
        self.decoder = mlp([self.latent_dim, *reversed(hidden), self.n_genes], **kw)
        if init == "pca":
            self.linear_encoder = nn.Linear(self.n_genes, self.latent_dim)
            self.linear_decoder = nn.Linear(self.latent_dim, self.n_genes)
            self.register_buffer("center_g", torch.zeros(self.n_genes))
            self.register_buffer("scale_g", torch.ones(self.n_genes))
            # Residual branches start at zero, so the network starts as its linear (PCA) path.
            for branch in (self.encoder, self.decoder):
                nn.init.zeros_(branch[-1].weight)
                nn.init.zeros_(branch[-1].bias)
        else:
            self.linear_encoder = self.linear_decoder = None
        self.count_head = None
        if count_head is not None:
            self.count_head = CountHead(
                CountHeadSpec.coerce(count_head),
                n_genes=self.n_genes,
                n_hidden=hidden[0] if hidden else self.latent_dim,  # the decoder's last hidden width
                library_hidden=hidden[-1] if hidden else self.latent_dim,
            )

    @torch.no_grad()
    def init_from_pca(
        self,
        mean_g: torch.Tensor,
        components_kg: torch.Tensor,
        *,
        variance_g: torch.Tensor | None = None,
    ) -> None:
        """Set the linear path to the PCA projection ``W(x − μ)`` and its transpose ``Wᵀz + μ``.

        ``variance_g``, each gene's variance in the training cells, sets the units of the residual branches;
        without it they work in the data's own units.
        """
        if self.linear_encoder is None:
            raise RuntimeError("init_from_pca needs an AutoEncoder built with init='pca'")
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
        sd_g = torch.ones_like(self.scale_g) if variance_g is None else variance_g.to(mu).clamp_min(0.0).sqrt()
        # A gene constant in the training cells gets the typical sd rather than a residual fixed at 0.
        typical = sd_g[sd_g > 0].mean() if bool((sd_g > 0).any()) else torch.ones((), device=sd_g.device)
        self.scale_g.copy_(torch.where(sd_g > 0, sd_g, typical))

    def encode(self, x_ng: torch.Tensor) -> torch.Tensor:
        """Latent code ``z_nk`` of each cell."""
        x_ng = self.input_dropout(x_ng)
        if self.linear_encoder is None:
            return self.encoder(x_ng)
        standard_ng = (x_ng - self.center_g) / self.scale_g
        return self.linear_encoder(x_ng) + self.encoder(standard_ng)

    def decode(self, z_nk: torch.Tensor) -> torch.Tensor:
        """Reconstructed profile ``x_hat_ng`` from latent codes."""
        return self._decode_with_hidden(z_nk)[1]

    def _decode_with_hidden(self, z_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden layer ``h_nh`` (the count head's input) and its output ``x_hat_ng``."""
        if self.linear_decoder is None:
            h_nh = self.decoder[:-1](z_nk)
            return h_nh, self.decoder[-1](h_nh)
        h_nh = self.decoder[:-1](z_nk)
        return h_nh, self.linear_decoder(z_nk) + self.scale_g * self.decoder[-1](h_nh)

    def forward(self, x_ng: torch.Tensor) -> dict[str, torch.Tensor]:
        z_nk = self.encode(x_ng)
        if self.count_head is None:
            return {"z": z_nk, "recon": self.decode(z_nk)}
        h_nh, logits_ng = self._decode_with_hidden(z_nk)
        return {"z": z_nk, **self.count_head(logits_ng, h_nh, x_ng)}
