"""Molecular cross-validation scores: every model and baseline, trained on x', scored against the held-out x''.

Each method is scored on its own prediction of the held-out quantity (formulas and why the truth minimises
each expected score: docs/mcv.md):

* ``mcv_mse`` (the main score), ``mcv_cosine``, ``mcv_pearson``: per cell, against x'' put through the run's
  preprocessing (normalised by its own total, log1p, the kept genes, scaling if on). An expression model
  (mse, cosine, pearson, PCA, mean profile) predicts it with its reconstruction of x'; a count model predicts
  ``E[view(c)]`` for counts ``c`` drawn from its predictive distribution (Monte Carlo, fixed seed), not
  ``view(E[c])``: log1p is concave, and its mean's log1p overstates every lowly expressed gene.
* ``mcv_poisson``: the Poisson negative log-likelihood of the x'' counts, per gene then averaged, under the
  method's expected counts scaled by ``(1 - p) / p``. An expression model's reconstruction is mapped back to
  counts through the inverse preprocessing (unscale, expm1, divide by the cell's size factor): approximate,
  since the inverse of a mean in log space is not the mean count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from exprae.constants import MCV_COUNTS_KEY, SIZE_FACTOR_KEY
from exprae.data.mcv import MoleculeSplit
from exprae.nn.count_head import InputView, expected_counts

# Predicted counts are floored here before the log of the count score: an expression model may reconstruct a
# gene below zero, which maps back to a negative count; one hundredth of a molecule keeps its NLL finite.
MIN_EXPECTED_COUNT = 1e-2
N_SAMPLES = 32  # Monte Carlo draws per cell for a count model's expected log expression


class MCVScorer:
    """The pieces every MCV score needs: the split's depth ratio, the input view and its inverse, a seed.

    A plain object (not an ``nn.Module``), so it adds nothing to checkpoints: it is rebuilt from the data at
    every ``setup``.
    """

    def __init__(self, split: MoleculeSplit | None, preprocess: object, *, n_samples: int = N_SAMPLES) -> None:
        # No split: the draws are of the cell's own counts (depth ratio 1), e.g. a count model's prediction of
        # the expected truth E[T(x)] without MCV (exprae.data.truth).
        self.depth_ratio = 1.0 if split is None else split.depth_ratio
        self.seed, self.n_samples = 0 if split is None else int(split.seed), int(n_samples)
        self.view = InputView(len(preprocess.genes)).fit(preprocess)

    def _view_on(self, device: torch.device) -> InputView:
        if self.view.scale_mean_g.device != device:
            self.view = self.view.to(device)
        return self.view

    @torch.no_grad()
    def expected_view(
        self, params: Mapping[str, torch.Tensor], size_factor_n: torch.Tensor | None, *, stream: int
    ) -> torch.Tensor:
        """``E[view(c)]``, c drawn from the count model ``params`` (Poisson, NB or ZINB), averaged over draws.

        ``stream`` (e.g. the batch's first cell index) seeds the draws with the split's seed, so a score is
        reproducible run to run and independent of which batches came before.
        """
        view = self._view_on(params["log_mu"].device)
        mu_ng = params["log_mu"].float().exp() * self.depth_ratio
        theta_ng = params["log_theta"].float().exp().expand_as(mu_ng) if "log_theta" in params else None
        keep_ng = torch.sigmoid(-params["dropout_logit"].float()) if "dropout_logit" in params else None
        devices = [mu_ng.device] if mu_ng.device.type == "cuda" else []
        total_ng = torch.zeros_like(mu_ng)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + int(stream))
            for _ in range(self.n_samples):
                rate_ng = mu_ng
                if theta_ng is not None:  # NB as a gamma-Poisson mixture: rate ~ Gamma(theta, theta / mu)
                    rate_ng = torch.distributions.Gamma(theta_ng, theta_ng / mu_ng.clamp_min(1e-12)).sample()
                c_ng = torch.poisson(rate_ng)
                if keep_ng is not None:
                    c_ng = c_ng * torch.bernoulli(keep_ng)
                total_ng += view(c_ng, size_factor_n)
        return total_ng / self.n_samples

    @torch.no_grad()
    def count_mean(
        self,
        *,
        recon_ng: torch.Tensor | None = None,
        params: Mapping[str, torch.Tensor] | None = None,
        size_factor_n: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expected held-out counts: a count model's mean, or an expression reconstruction mapped back to counts."""
        if params is not None:
            return expected_counts(params).float() * self.depth_ratio
        view = self._view_on(recon_ng.device)
        x_ng = recon_ng.float()
        if bool(view.scaled):
            x_ng = x_ng * view.scale_std_g + view.scale_mean_g
        if bool(view.log1p):
            x_ng = torch.expm1(x_ng)
        if size_factor_n is not None:
            sf_n = size_factor_n.float().unsqueeze(-1)
            x_ng = torch.where(sf_n > 0, x_ng / sf_n.clamp_min(1e-12), torch.zeros_like(x_ng))
        return x_ng * self.depth_ratio

    def predictions(
        self,
        recons: Mapping[str, torch.Tensor],
        profiles: Mapping[str, torch.Tensor],
        batch: Mapping[str, torch.Tensor],
        *,
        count_params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each method's prediction of x'' and the per-cell Poisson NLL of x'' under its expected counts.

        ``profiles`` are the methods' expected preprocessed profiles (their predictions of x''); the expected
        counts are a count model's mean (``count_params``, the model's) or a reconstruction in ``recons`` mapped
        back to counts.
        """
        size_factor_n = batch.get(SIZE_FACTOR_KEY)
        predictions = {}
        for who, pred in profiles.items():
            if who == "model" and count_params is not None:
                mean_ng = self.count_mean(params=count_params)
            else:
                mean_ng = self.count_mean(recon_ng=recons[who], size_factor_n=size_factor_n)
            predictions[who] = (pred, poisson_nll(batch[MCV_COUNTS_KEY], mean_ng))
        return predictions


def poisson_nll(counts_ng: torch.Tensor, mean_ng: torch.Tensor) -> torch.Tensor:
    """Per cell, the mean over genes of the Poisson NLL ``mu - x log mu + log x!`` (expected counts floored)."""
    mu = mean_ng.float().clamp_min(MIN_EXPECTED_COUNT)
    x = counts_ng.float()
    return (mu - x * mu.log() + torch.lgamma(x + 1.0)).mean(dim=-1)
