"""The count output head (scVI-style) and the map from expected counts back to the input representation.

A count likelihood (``exprae.losses.PoissonNLL``, ``NegativeBinomialNLL``, ``ZINBNLL``) declares the head it
needs as a :class:`CountHeadSpec`; the network builds a :class:`CountHead` from it. The decoder's output
becomes per-gene logits, so the expected count of gene g in cell n is

    mu_ng = softmax_g(logits_n) · l_n

with ``l_n`` the cell's observed total count of the target (default) or a learned log-library. With
``model.init=pca`` the decoder's linear path is the PCA reconstruction of the log-normalised input, so the
softmax starts at ``exp(x_hat) / sum exp(x_hat)``: the PCA profile with a pseudocount of one normalised
count, a sensible start in proportion space.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from exprae.constants import LIBRARY_KEY

Dispersion = Literal["none", "gene", "gene-cell"]
Library = Literal["observed", "learned"]
_DISPERSIONS = ("none", "gene", "gene-cell")
# Per-gene log-dispersions are stored in units of 1/30: Adam moves each parameter by about lr per step, and
# log theta has to travel O(1) (theta from its start at 1 to 5-50) while the network's weights move little.
# In these units, at the default lr 3e-4, it gets there in a few hundred steps instead of thousands, without a
# separate optimizer group.
_LOG_THETA_UNIT = 30.0
_LIBRARIES = ("observed", "learned")


@dataclass(frozen=True)
class CountHeadSpec:
    """What a count likelihood needs from the network: dispersion, a dropout logit, and the library size."""

    dispersion: Dispersion = "none"  # none (Poisson), one per gene, or one per cell and gene from the decoder
    dropout: bool = False  # a per-cell-and-gene zero-inflation logit (ZINB)
    library: Library = "observed"  # the target's observed total counts, or a log-library learned from the input

    def __post_init__(self) -> None:
        if self.dispersion not in _DISPERSIONS:
            raise ValueError(f"dispersion must be one of {list(_DISPERSIONS)}, got {self.dispersion!r}")
        if self.library not in _LIBRARIES:
            raise ValueError(f"library must be one of {list(_LIBRARIES)}, got {self.library!r}")

    @classmethod
    def coerce(cls, spec: CountHeadSpec | Mapping[str, Any]) -> CountHeadSpec:
        """A spec from itself or from a mapping (Hydra passes configs as mappings)."""
        return spec if isinstance(spec, cls) else cls(**dict(spec))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CountHead(nn.Module):
    """Turns decoder logits (and its last hidden layer) into log proportions, dispersions and dropout logits.

    ``forward`` returns ``log_rho`` (cells x genes, log-softmax over genes, float32) and, as the spec asks,
    ``log_theta`` (1 x genes or cells x genes), ``dropout_logit`` (cells x genes) and ``log_library``
    (cells). Nothing here depends on the library size, so the network stays a pure function of its input.
    """

    def __init__(self, spec: CountHeadSpec, *, n_genes: int, n_hidden: int, library_hidden: int) -> None:
        super().__init__()
        self.spec = spec
        self.log_theta_g_units = nn.Parameter(torch.zeros(n_genes)) if spec.dispersion == "gene" else None
        self.theta_head = nn.Linear(n_hidden, n_genes) if spec.dispersion == "gene-cell" else None
        self.dropout_head = nn.Linear(n_hidden, n_genes) if spec.dropout else None
        if self.dropout_head is not None:
            # Start with little zero inflation (pi ~ 0.05): the NB already explains most zeros of UMI data.
            nn.init.constant_(self.dropout_head.bias, -3.0)
        self.library_encoder = None
        if spec.library == "learned":
            self.library_encoder = nn.Sequential(
                nn.Linear(n_genes, library_hidden), nn.GELU(), nn.Linear(library_hidden, 1)
            )

    @property
    def log_theta_g(self) -> torch.Tensor | None:
        """The learned per-gene log inverse dispersion (None unless ``dispersion="gene"``)."""
        return None if self.log_theta_g_units is None else self.log_theta_g_units * _LOG_THETA_UNIT

    @torch.no_grad()
    def init_library(self, mean_log_library: float) -> None:
        """Start a learned log-library at the training cells' mean, so the first steps are not spent on scale."""
        if self.library_encoder is not None:
            self.library_encoder[-1].bias.fill_(float(mean_log_library))

    def forward(self, logits_ng: torch.Tensor, h_nh: torch.Tensor, x_ng: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"log_rho": F.log_softmax(logits_ng.float(), dim=-1)}
        if self.log_theta_g is not None:
            out["log_theta"] = self.log_theta_g.float().unsqueeze(0)
        if self.theta_head is not None:
            out["log_theta"] = self.theta_head(h_nh).float()
        if self.dropout_head is not None:
            out["dropout_logit"] = self.dropout_head(h_nh).float()
        if self.library_encoder is not None:
            out["log_library"] = self.library_encoder(x_ng).float().squeeze(-1)
        return out


def count_parameters(out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Likelihood parameters of a batch: ``log_mu`` (log expected counts) plus dispersion and dropout logits.

    The library is the network's learned ``log_library`` when it has one, else the batch's observed total.
    """
    if "log_library" in out:
        log_library_n = out["log_library"]
    else:
        if LIBRARY_KEY not in batch:
            raise KeyError(
                f"a count likelihood needs batch[{LIBRARY_KEY!r}] (the target's total counts per cell); "
                "the datamodule adds it when the loss is a count likelihood"
            )
        # A cell with no counts has every target 0; a library of 1 keeps log finite and its NLL ~ 0.
        log_library_n = batch[LIBRARY_KEY].float().clamp_min(1.0).log()
    params = {"log_mu": out["log_rho"] + log_library_n.unsqueeze(-1)}
    for key in ("log_theta", "dropout_logit"):
        if key in out:
            params[key] = out[key]
    return params


def expected_counts(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the count distribution, ``(1 - pi) · mu`` under zero inflation, else ``mu``."""
    mu_ng = params["log_mu"].exp()
    if "dropout_logit" in params:
        mu_ng = mu_ng * torch.sigmoid(-params["dropout_logit"])
    return mu_ng


class InputView(nn.Module):
    """Expected counts in the representation of the encoder's input, so every loss is scored alike.

    The datamodule's per-cell ``size_factor`` (``normalize_total``'s ``target_sum / total``, or 1) is applied
    first, then ``log1p`` and the training cells' per-gene scaling, as in :class:`exprae.data.preprocessing.
    Preprocessing`. Settings are buffers, so they travel with the checkpoint.
    """

    def __init__(self, n_genes: int) -> None:
        super().__init__()
        self.register_buffer("log1p", torch.zeros((), dtype=torch.bool))
        self.register_buffer("scaled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("scale_mean_g", torch.zeros(n_genes))
        self.register_buffer("scale_std_g", torch.ones(n_genes))
        self.register_buffer("max_value", torch.full((), float("inf")))

    @torch.no_grad()
    def fit(self, preprocess: Any) -> InputView:
        """Copy the fitted settings of an :class:`exprae.data.preprocessing.Preprocessing`."""
        self.log1p.fill_(bool(preprocess.log1p))
        self.scaled.fill_(bool(preprocess.scale))
        if preprocess.scale:
            self.scale_mean_g.copy_(torch.as_tensor(preprocess.scale_mean, dtype=torch.float32))
            self.scale_std_g.copy_(torch.as_tensor(preprocess.scale_std, dtype=torch.float32))
            if preprocess.max_value is not None:
                self.max_value.fill_(float(preprocess.max_value))
        return self

    def forward(self, counts_ng: torch.Tensor, size_factor_n: torch.Tensor | None) -> torch.Tensor:
        x_ng = counts_ng.float()
        if size_factor_n is not None:
            x_ng = x_ng * size_factor_n.float().unsqueeze(-1)
        if bool(self.log1p):
            x_ng = torch.log1p(x_ng)
        if bool(self.scaled):
            x_ng = ((x_ng - self.scale_mean_g) / self.scale_std_g).clamp(-self.max_value, self.max_value)
        return x_ng
