"""Count likelihoods: values against torch.distributions and by hand, stability, the count head, the data
contract for raw-count targets, and short real runs through the Hydra entry point on synthetic counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import NegativeBinomial, Poisson

from exprae.constants import LIBRARY_KEY, SIZE_FACTOR_KEY, TARGET_KEY, X_KEY
from exprae.data import ExpressionDataModule
from exprae.data.datasets import synthetic_counts
from exprae.losses import ZINBNLL, NegativeBinomialNLL, PoissonNLL, nb_log_prob, poisson_log_prob
from exprae.nn import AutoEncoder
from exprae.nn.count_head import CountHeadSpec, InputView, count_parameters, expected_counts
from exprae.scoring.metrics import dispersion_agreement
from exprae.train import train


def _counts_and_params(seed: int = 0, n: int = 16, g: int = 30):
    gen = torch.Generator().manual_seed(seed)
    log_mu = torch.randn(n, g, generator=gen) * 2.0  # means from ~0.02 to ~50
    log_theta = torch.randn(1, g, generator=gen)
    x = torch.poisson(log_mu.exp(), generator=gen)
    x[:, :3] = 0.0  # guaranteed zeros
    return x, log_mu, log_theta


# ---------------------------------------------------------------- values


def test_poisson_matches_torch_distributions():
    x, log_mu, _ = _counts_and_params()
    expected = -Poisson(rate=log_mu.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(PoissonNLL(reduction="none")({"log_mu": log_mu}, x), expected, rtol=1e-5, atol=1e-4)


def test_negative_binomial_matches_torch_distributions():
    x, log_mu, log_theta = _counts_and_params(seed=1)
    # torch's NB(total_count=r, p) has mean r·p/(1-p): with r = theta, p/(1-p) = mu/theta, i.e. logits = log(mu/theta).
    theta = log_theta.exp().expand_as(log_mu)
    reference = NegativeBinomial(total_count=theta, logits=log_mu - log_theta).log_prob(x).sum(-1)
    got = NegativeBinomialNLL(reduction="none")({"log_mu": log_mu, "log_theta": log_theta}, x)
    torch.testing.assert_close(got, -reference, rtol=1e-5, atol=1e-3)
    # The same through the mean/probs parameterisation of the brief: probs = mu / (mu + theta).
    mu = log_mu.exp()
    reference_probs = NegativeBinomial(total_count=theta, probs=mu / (mu + theta)).log_prob(x).sum(-1)
    torch.testing.assert_close(got, -reference_probs, rtol=1e-4, atol=1e-2)


def _zinb_by_hand(x: float, mu: float, theta: float, pi: float) -> float:
    """log ZINB written out from its definition, in float64 Python math."""
    nb = (
        math.lgamma(x + theta)
        - math.lgamma(theta)
        - math.lgamma(x + 1)
        + theta * math.log(theta / (theta + mu))
        + x * math.log(mu / (theta + mu))
    )
    if x == 0:
        return math.log(pi + (1 - pi) * math.exp(nb))
    return math.log(1 - pi) + nb


def test_zinb_matches_hand_computation_including_zeros():
    cases = [(0, 2.0, 1.5, 0.3), (0, 0.01, 10.0, 0.9), (0, 50.0, 0.5, 0.05), (3, 2.0, 1.5, 0.3), (40, 25.0, 4.0, 0.6)]
    x = torch.tensor([[c[0] for c in cases]], dtype=torch.float32)
    log_mu = torch.tensor([[math.log(c[1]) for c in cases]])
    log_theta = torch.tensor([[math.log(c[2]) for c in cases]])
    logit = torch.tensor([[math.log(c[3] / (1 - c[3])) for c in cases]])
    loss = ZINBNLL(reduction="none")
    params = {"log_mu": log_mu, "log_theta": log_theta, "dropout_logit": logit}
    per_entry = loss.log_prob(params, x)[0]
    for got, case in zip(per_entry.tolist(), cases, strict=True):
        assert got == pytest.approx(_zinb_by_hand(*case), rel=1e-5, abs=1e-5), case
    assert loss.per_cell(params, x).item() == pytest.approx(-sum(_zinb_by_hand(*c) for c in cases), rel=1e-5)


def test_zinb_without_dropout_is_nb():
    x, log_mu, log_theta = _counts_and_params(seed=2)
    nb = NegativeBinomialNLL(reduction="none")({"log_mu": log_mu, "log_theta": log_theta}, x)
    zinb = ZINBNLL(reduction="none")(
        {"log_mu": log_mu, "log_theta": log_theta, "dropout_logit": torch.full_like(x, -40.0)}, x
    )
    torch.testing.assert_close(zinb, nb, rtol=1e-5, atol=1e-4)


def test_nb_approaches_poisson_for_huge_theta():
    """theta >> mu is where a naive log(theta) - log(theta + mu) cancels; the softplus form does not."""
    x, log_mu, _ = _counts_and_params(seed=3)
    nb = -nb_log_prob(x, log_mu, torch.full_like(log_mu, math.log(1e7))).sum(-1)
    poisson = -poisson_log_prob(x, log_mu).sum(-1)
    torch.testing.assert_close(nb, poisson, rtol=1e-3, atol=0.5)


# ---------------------------------------------------------------- stability


@pytest.mark.parametrize("loss_cls", [PoissonNLL, NegativeBinomialNLL, ZINBNLL])
def test_finite_values_and_gradients_at_zero_counts_and_extreme_means(loss_cls):
    log_mu = torch.tensor([[-30.0, -5.0, 0.0, 12.0, 25.0, 40.0]] * 2, requires_grad=True)
    log_theta = torch.tensor([[-8.0, -2.0, 0.0, 3.0, 10.0, 16.0]], requires_grad=True)
    logit = torch.tensor([[-20.0, -3.0, 0.0, 3.0, 20.0, 0.0]] * 2, requires_grad=True)
    x = torch.tensor([[0.0] * 6, [1e6, 0.0, 1.0, 1e5, 7e10, 3.0]])
    params = {"log_mu": log_mu, "log_theta": log_theta, "dropout_logit": logit}
    loss = loss_cls(reduction="sum")(params, x)
    loss.backward()
    assert torch.isfinite(loss)
    for t in (log_mu, log_theta, logit):
        if t.grad is not None:
            assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("loss_cls", [PoissonNLL, NegativeBinomialNLL, ZINBNLL])
def test_float32_under_bf16_autocast(loss_cls):
    x, log_mu, log_theta = _counts_and_params(seed=4)
    params = {"log_mu": log_mu, "log_theta": log_theta, "dropout_logit": torch.zeros_like(x) - 2.0}
    bf16 = {k: v.bfloat16() for k, v in params.items()}
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = loss_cls(reduction="none")(bf16, x)
    assert got.dtype == torch.float32
    # Same value as float32 arithmetic on the bf16-rounded parameters: only the inputs were rounded.
    reference = loss_cls(reduction="none")({k: v.float() for k, v in bf16.items()}, x)
    torch.testing.assert_close(got, reference)


def test_count_loss_refuses_a_profile_and_a_wrong_head():
    with pytest.raises(TypeError, match="count head"):
        PoissonNLL()(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(KeyError, match="log_theta"):
        NegativeBinomialNLL()({"log_mu": torch.zeros(2, 3)}, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs a dispersion"):
        NegativeBinomialNLL(dispersion="none")
    with pytest.raises(ValueError, match="dispersion must be one of"):
        NegativeBinomialNLL(dispersion="cell")


# ---------------------------------------------------------------- the head


@pytest.mark.parametrize(
    ("loss", "keys", "theta_shape"),
    [
        (PoissonNLL(), {"z", "log_rho"}, None),
        (NegativeBinomialNLL(), {"z", "log_rho", "log_theta"}, (1, 40)),
        (NegativeBinomialNLL(dispersion="gene-cell"), {"z", "log_rho", "log_theta"}, (5, 40)),
        (ZINBNLL(library="learned"), {"z", "log_rho", "log_theta", "dropout_logit", "log_library"}, (1, 40)),
    ],
)
def test_network_builds_the_head_the_loss_declares(loss, keys, theta_shape):
    net = AutoEncoder(40, latent_dim=4, hidden_dims=(16,), count_head=loss.head.to_dict())
    out = net(torch.rand(5, 40))
    assert set(out) == keys
    torch.testing.assert_close(out["log_rho"].logsumexp(-1), torch.zeros(5))  # proportions sum to one
    if theta_shape:
        assert tuple(out["log_theta"].shape) == theta_shape
    library = torch.tensor([1000.0, 10.0, 0.0, 5.0, 3e4])
    params = count_parameters(out, {LIBRARY_KEY: library})
    if "log_library" not in out:  # the expected counts of a cell add up to its observed library
        torch.testing.assert_close(params["log_mu"].exp().sum(-1), library.clamp_min(1.0), rtol=1e-4, atol=0)
    loss(params, torch.poisson(params["log_mu"].exp().detach())).backward()


def test_pca_path_feeds_the_logits():
    """With init=pca the count head starts at softmax of the PCA reconstruction of the input."""
    torch.manual_seed(0)
    net = AutoEncoder(12, latent_dim=3, hidden_dims=(8,), count_head={"dispersion": "gene"})
    plain = AutoEncoder(12, latent_dim=3, hidden_dims=(8,))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("count_head")})
    mean_g, components = torch.rand(12), torch.linalg.qr(torch.randn(12, 3))[0].T
    net.init_from_pca(mean_g, components)
    plain.init_from_pca(mean_g, components)
    x = torch.rand(4, 12)
    torch.testing.assert_close(net(x)["log_rho"], torch.log_softmax(plain(x)["recon"], -1))


def test_input_view_maps_counts_to_the_input_exactly(tmp_path):
    """Mapping the observed counts through the view reproduces the encoder's input (normalize_total + log1p)."""
    dm = ExpressionDataModule(
        dataset="synthetic",
        synthetic={"n_cells": 120, "n_genes": 60},
        target_layer="counts",
        count_target=True,
        preprocess={"normalize_total": 1e4, "log1p": True},
        batch_size=32,
    )
    dm.setup("fit")
    batch = dm.split_dataset("val")[np.arange(len(dm.splits["val"]))]
    view = InputView(dm.n_genes).fit(dm.preprocess)
    torch.testing.assert_close(view(batch[TARGET_KEY], batch[SIZE_FACTOR_KEY]), batch[X_KEY], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[LIBRARY_KEY], batch[TARGET_KEY].sum(-1))
    assert float(batch[TARGET_KEY].max()) > 20  # raw counts, not the log profile


def test_expected_counts_of_zinb_include_dropout():
    params = {"log_mu": torch.log(torch.tensor([[4.0]])), "dropout_logit": torch.tensor([[0.0]])}
    assert expected_counts(params).item() == pytest.approx(2.0)


def test_dispersion_agreement_is_pearson_and_spearman():
    true = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    got = dispersion_agreement(torch.tensor([1.0, 4.0, 9.0, 16.0, 0.0]), true)
    assert got["dispersion_spearman"].item() == pytest.approx(1.0)
    # Pearson r of (1, 4, 9, 16) with (1, 2, 3, 4) is 0.98437; the uncentred cosine would be 0.97037, outside
    # the tolerance (scipy comparison on 200 genes: tests/scoring/test_metrics.py).
    assert got["dispersion_pearson"].item() == pytest.approx(0.98437, abs=1e-4)


# ---------------------------------------------------------------- data contract


def test_target_layer_is_subset_to_the_kept_genes_and_carries_library():
    dm = ExpressionDataModule(
        dataset="synthetic",
        synthetic={"n_cells": 150, "n_genes": 80},
        target_layer="counts",
        count_target=True,
        preprocess={"normalize_total": 1e4, "log1p": True, "n_top_genes": 30},
        batch_size=32,
    )
    dm.setup("fit")
    counts = synthetic_counts(150, 80)[:, dm.var_names].X.toarray()
    batch = next(iter(dm.train_dataloader()))
    rows = dm.splits["train"][batch["index"].numpy()]
    np.testing.assert_array_equal(batch[TARGET_KEY].numpy(), counts[rows])
    np.testing.assert_allclose(batch[LIBRARY_KEY].numpy(), counts[rows].sum(1), rtol=1e-6)
    assert dm.adata.var["true_dispersion"].notna().all()  # gene annotations follow the kept genes


def test_expression_loss_with_a_target_layer_fits_it_preprocessed_like_the_input():
    dm = ExpressionDataModule(
        dataset="synthetic",
        synthetic={"n_cells": 100, "n_genes": 40},
        target_layer="counts",
        preprocess={"normalize_total": 1e4, "log1p": True},
        batch_size=16,
    )
    dm.setup("fit")
    batch = dm.split_dataset("train")[np.arange(10)]
    torch.testing.assert_close(batch[TARGET_KEY], batch[X_KEY])  # X is the counts, so the target is the input
    assert LIBRARY_KEY not in batch


def test_count_loss_on_a_non_integer_layer_fails_naming_the_layer(compose_cfg):
    cfg = compose_cfg("loss=poisson", "data.target_layer=raw", "trainer.fast_dev_run=true", "logger=none")
    with pytest.raises(ValueError, match=r"data\.target_layer='raw' .* non-integer values .* raw integer counts"):
        train(cfg)


def test_count_loss_on_pbmc68k_scaled_x_fails_naming_the_matrix(compose_cfg):
    """pbmc68k_reduced ships no raw counts: its X is scaled, so a count likelihood must refuse it."""
    cfg = compose_cfg("loss=nb", "trainer.fast_dev_run=true", "logger=none")
    with pytest.raises(ValueError, match=r"count target 'X' of builtin:pbmc68k .* negative values"):
        train(cfg)


def test_missing_target_layer_is_a_clear_error(compose_cfg):
    cfg = compose_cfg("data=synthetic", "loss=nb", "data.target_layer=spliced", "logger=none")
    with pytest.raises(KeyError, match="layer 'spliced' not found"):
        train(cfg)


# ---------------------------------------------------------------- real runs


SMALL = [
    "data=synthetic",
    "data.synthetic.n_cells=300",
    "data.synthetic.n_genes=80",
    "data.target_layer=counts",
    "data.batch_size=64",
    "model.latent_dim=4",
    "model.hidden_dims=[32]",
    "callbacks=none",
    "logger=none",
]


@pytest.mark.parametrize(
    ("loss", "extra"),
    [("poisson", []), ("nb", []), ("zinb", []), ("nb", ["loss.dispersion=gene-cell", "loss.library=learned"])],
)
def test_short_training_run_per_count_loss(compose_cfg, loss, extra):
    metrics = train(compose_cfg(f"loss={loss}", *SMALL, *extra, "trainer.max_epochs=2"))
    for stage in ("val", "test"):
        model = metrics[stage]["model"]
        for name in ("cosine", "pearson", "mse", "nll"):
            assert math.isfinite(model[name]), (stage, name)
        assert model["nll"] == pytest.approx(model["loss"])
        # Scored in the input space like the baselines: the model's cosine is in the same range as theirs.
        assert 0.5 < model["cosine"] <= 1.0 and 0.5 < metrics[stage]["pca"]["cosine"] <= 1.0
        assert ("dispersion_pearson" in model) == (loss != "poisson" and not extra)
        # Synthetic data knows the noise-free profile: model and baselines are also scored against it.
        assert math.isfinite(model["cosine_to_truth"]) and math.isfinite(metrics[stage]["pca"]["mse_to_truth"])


@pytest.mark.slow
def test_count_loss_training_lowers_heldout_nll(compose_cfg):
    """A few epochs of NB training lower the held-out NLL from its start (the PCA-fed head)."""
    start = train(compose_cfg("loss=nb", *SMALL, "trainer.max_epochs=1", "trainer.limit_train_batches=1"))
    more = train(compose_cfg("loss=nb", *SMALL, "trainer.max_epochs=8"))
    assert more["val"]["model"]["nll"] < start["val"]["model"]["nll"]


def test_count_losses_experiment_composes_six_losses(compose_cfg):
    cfg = compose_cfg("experiment=count_losses")
    assert cfg.data.target_layer == "counts" and cfg.data.dataset == "synthetic"
    assert cfg.hydra.sweeper.params.loss.split(",") == ["mse", "cosine", "mixed", "poisson", "nb", "zinb"]


@pytest.mark.gpu
def test_gpu_bf16_count_loss_is_float32():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: checks the count NLL stays float32 under bf16 autocast on the GPU")
    x, log_mu, log_theta = (t.cuda() for t in _counts_and_params())
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        got = ZINBNLL()({"log_mu": log_mu, "log_theta": log_theta, "dropout_logit": torch.zeros_like(x)}, x)
    assert got.dtype == torch.float32 and torch.isfinite(got)


def test_head_spec_is_checked():
    with pytest.raises(ValueError, match="library must be one of"):
        CountHeadSpec(library="fixed")


@pytest.mark.parametrize("theta", [99.0, 100.5, 150.0, 1e3, 1e5])
def test_nb_log_prob_is_scipys_on_both_sides_of_the_stirling_switch(theta):
    """In float64 the Stirling branch (theta > 100) and the exact one (theta <= 100) both give scipy's log-pmf.

    The series' next term is O(x/theta^3); its first correction x/(12 theta (theta + x)) is up to 6e-4 here, so a
    wrong sign or constant in it is far outside the tolerance.
    """
    from scipy.stats import nbinom

    x = torch.tensor([0.0, 1.0, 5.0, 30.0, 200.0], dtype=torch.float64).repeat(3)
    mu = torch.tensor([0.5, 10.0, 300.0], dtype=torch.float64).repeat_interleave(5)
    ours = nb_log_prob(x, mu.log(), torch.full_like(mu, theta).log())
    expected = nbinom.logpmf(x.numpy(), theta, theta / (theta + mu.numpy()))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-9 if theta <= 100 else 2e-7)


def test_count_losses_weight_cells_keep_float64_and_sum_over_their_axis():
    """Per-cell weights reach the mean; float64 inputs stay float64 (only lower precisions are raised to float32);
    ``dim`` picks the genes' axis; the library choice reaches the count head."""
    g = torch.Generator().manual_seed(3)
    log_mu = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = torch.poisson(log_mu.exp(), generator=g)
    per_cell = PoissonNLL(reduction="none")({"log_mu": log_mu}, x)
    assert per_cell.dtype == torch.float64
    w = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(PoissonNLL()({"log_mu": log_mu}, x, w), (per_cell * w).sum() / w.sum())
    by_column = PoissonNLL(reduction="none", dim=0)({"log_mu": log_mu.T.contiguous()}, x.T.contiguous())
    torch.testing.assert_close(by_column, per_cell)
    log_theta = torch.full_like(log_mu, 2.0)
    nb = NegativeBinomialNLL(reduction="none")({"log_mu": log_mu, "log_theta": log_theta}, x)
    nb_by_column = NegativeBinomialNLL(reduction="none", dim=0)(
        {"log_mu": log_mu.T.contiguous(), "log_theta": log_theta.T.contiguous()}, x.T.contiguous()
    )
    torch.testing.assert_close(nb_by_column, nb)
    for loss in (PoissonNLL, NegativeBinomialNLL):
        assert loss(library="observed").head.library == "observed"
        assert loss(library="learned").head.library == "learned"
