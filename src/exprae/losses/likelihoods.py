"""Count likelihoods: Poisson, negative binomial and zero-inflated NB negative log-likelihoods of raw counts."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

from exprae.losses.expression import ReconstructionLoss, Reduction, reduce_per_cell
from exprae.nn.count_head import CountHeadSpec, Dispersion, Library

# ====================================================================== count likelihoods
# Negative log-likelihoods of raw counts (Poisson, negative binomial, zero-inflated NB), as scVI and DCA use.
# ``pred`` is not a profile but the likelihood's parameters, ``{"log_mu", "log_theta", "dropout_logit"}``
# (see exprae.nn.count_head.count_parameters); ``target`` is the raw counts. ``per_cell`` is the NLL of the whole cell
# (a sum over genes, so values are comparable across count losses as held-out NLL). Everything is computed
# from log-parameters in float32 with autocast off, so zero counts, tiny and huge means stay finite.


_STIRLING_THETA = 100.0  # above this inverse dispersion, lgamma differences are taken from Stirling's series


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def poisson_log_prob(x_ng: torch.Tensor, log_mu_ng: torch.Tensor) -> torch.Tensor:
    """log Poisson(x; mu) per entry, from ``log mu``."""
    return x_ng * log_mu_ng - log_mu_ng.exp() - torch.lgamma(x_ng + 1.0)


def nb_log_prob(x_ng: torch.Tensor, log_mu_ng: torch.Tensor, log_theta_ng: torch.Tensor) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta) per entry, from ``log mu`` and ``log theta``.

    ``theta·log(theta/(theta+mu)) = -theta·softplus(log mu - log theta)`` avoids the cancellation of two
    nearly equal logs when theta >> mu. For large theta (the Poisson limit) ``lgamma(x+theta) - lgamma(theta)``
    is a difference of two huge float32 numbers; there Stirling's series gives it in terms of moderate
    quantities (accurate to ~1e-9 for theta > 100), which keeps the NLL exact to float32 precision.
    """
    theta = log_theta_ng.exp()
    large = theta > _STIRLING_THETA
    # Each branch is evaluated at a safe theta so the unused one never puts inf/NaN into the gradient.
    theta_small = torch.where(large, torch.ones_like(theta), theta)
    theta_large = torch.where(large, theta, torch.full_like(theta, 2 * _STIRLING_THETA))
    exact = (
        torch.lgamma(x_ng + theta_small)
        - torch.lgamma(theta_small)
        - theta_small * F.softplus(log_mu_ng - log_theta_ng)
        - x_ng * F.softplus(log_theta_ng - log_mu_ng)
    )
    # lgamma(x+θ) - lgamma(θ) = (θ+x-½)·log1p(x/θ) + x·log θ - x - x/(12θ(θ+x)) + O(θ⁻³); the x·log θ term
    # cancels against x·softplus(log θ - log μ) = x·(log θ - log μ) + x·softplus(log μ - log θ).
    log_mu_minus_log_theta = log_mu_ng - theta_large.log()
    stirling = (
        (theta_large + x_ng - 0.5) * torch.log1p(x_ng / theta_large)
        - x_ng
        - x_ng / (12.0 * theta_large * (theta_large + x_ng))
        + x_ng * log_mu_ng
        - (theta_large + x_ng) * F.softplus(log_mu_minus_log_theta)
    )
    return torch.where(large, stirling, exact) - torch.lgamma(x_ng + 1.0)


def zinb_log_prob(
    x_ng: torch.Tensor, log_mu_ng: torch.Tensor, log_theta_ng: torch.Tensor, dropout_logit_ng: torch.Tensor
) -> torch.Tensor:
    """log ZINB per entry: ``pi·[x=0] + (1 - pi)·NB(x)`` with ``pi = sigmoid(dropout_logit)``.

    At zero, ``log(pi + (1 - pi)·NB(0))`` is a ``logaddexp`` of two log-terms, never a log of a small sum.
    """
    log_pi = F.logsigmoid(dropout_logit_ng)
    log_one_minus_pi = F.logsigmoid(-dropout_logit_ng)
    nb = nb_log_prob(x_ng, log_mu_ng, log_theta_ng)
    log_nb_zero = -log_theta_ng.exp() * F.softplus(log_mu_ng - log_theta_ng)
    at_zero = torch.logaddexp(log_pi, log_one_minus_pi + log_nb_zero)
    return torch.where(x_ng < 0.5, at_zero, log_one_minus_pi + nb)


class CountNLL(ReconstructionLoss):
    """Base class of the count likelihoods: declares its output head, computes the NLL from parameters."""

    needs_dispersion = False
    needs_dropout = False

    def __init__(
        self,
        *,
        dispersion: Dispersion = "none",
        library: Library = "observed",
        reduction: Reduction = "mean",
        dim: int = -1,
    ) -> None:
        super().__init__(reduction=reduction, dim=dim)
        if self.needs_dispersion and dispersion == "none":
            raise ValueError(f"{type(self).__name__} needs a dispersion: 'gene' or 'gene-cell', got 'none'")
        if not self.needs_dispersion and dispersion != "none":
            raise ValueError(f"{type(self).__name__} has no dispersion; got dispersion={dispersion!r}")
        self.head = CountHeadSpec(dispersion=dispersion, dropout=self.needs_dropout, library=library)

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each entry of ``target_ng`` (float32)."""
        raise NotImplementedError

    def per_cell(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if not isinstance(pred, Mapping):
            raise TypeError(
                f"{type(self).__name__} takes the likelihood's parameters {{'log_mu', ...}} as pred, not a "
                "profile; build the network with the loss's count head (AutoEncoder(count_head=loss.head))"
            )
        missing = [k for k in self._keys() if k not in pred]
        if missing:
            raise KeyError(f"{type(self).__name__} needs parameters {missing}; got {sorted(pred)}")
        if pred["log_mu"].shape != target.shape:
            raise ValueError(f"log_mu {tuple(pred['log_mu'].shape)} and target {tuple(target.shape)} differ in shape")
        with torch.autocast(device_type=target.device.type, enabled=False):
            params = {k: _float32(pred[k]) for k in self._keys()}
            return -self.log_prob(params, _float32(target)).sum(dim=self.dim)

    def forward(
        self, pred: Mapping[str, torch.Tensor], target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return reduce_per_cell(self.per_cell(pred, target), weight, self.reduction)

    def _keys(self) -> tuple[str, ...]:
        return (
            ("log_mu",)
            + (("log_theta",) if self.needs_dispersion else ())
            + (("dropout_logit",) if self.needs_dropout else ())
        )

    def extra_repr(self) -> str:
        return f"head={self.head}, " + super().extra_repr()


class PoissonNLL(CountNLL):
    """Poisson NLL of raw counts per cell (sum over genes): no overdispersion, the simplest count model."""

    def __init__(self, *, library: Library = "observed", reduction: Reduction = "mean", dim: int = -1) -> None:
        super().__init__(dispersion="none", library=library, reduction=reduction, dim=dim)

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        return poisson_log_prob(target_ng, params["log_mu"])


class NegativeBinomialNLL(CountNLL):
    """Negative-binomial NLL (mean mu, inverse dispersion theta; var = mu + mu²/theta), as scVI's default."""

    needs_dispersion = True

    def __init__(
        self,
        *,
        dispersion: Dispersion = "gene",
        library: Library = "observed",
        reduction: Reduction = "mean",
        dim: int = -1,
    ) -> None:
        super().__init__(dispersion=dispersion, library=library, reduction=reduction, dim=dim)

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        return nb_log_prob(target_ng, params["log_mu"], params["log_theta"])


class ZINBNLL(NegativeBinomialNLL):
    """Zero-inflated NB NLL: an extra per-cell-and-gene dropout probability, as DCA and scVI's ``zinb``."""

    needs_dropout = True

    def log_prob(self, params: Mapping[str, torch.Tensor], target_ng: torch.Tensor) -> torch.Tensor:
        return zinb_log_prob(target_ng, params["log_mu"], params["log_theta"], params["dropout_logit"])
