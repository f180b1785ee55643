"""The network's PCA start and the baselines against scikit-learn's PCA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from exprae.nn import AutoEncoder
from exprae.nn.baselines import Baselines, fit_pca


@pytest.fixture
def x_ng(pbmc) -> torch.Tensor:
    return torch.as_tensor(pbmc.X[:300], dtype=torch.float32)


def test_fit_pca_matches_sklearn(x_ng):
    mean_g, comps_kg, variance_g = fit_pca(torch.split(x_ng, 64), n_components=10)  # streamed in chunks
    ref = PCA(n_components=10, svd_solver="full").fit(x_ng.double().numpy())
    np.testing.assert_allclose(mean_g.numpy(), ref.mean_, atol=1e-5)
    np.testing.assert_allclose(variance_g.numpy(), x_ng.double().numpy().var(0, ddof=1), rtol=1e-4, atol=1e-6)
    # components agree up to sign
    overlap = np.abs((comps_kg.double().numpy() * ref.components_).sum(1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4)
    base = Baselines(x_ng.shape[1], 10).fit([x_ng])
    recon = ref.inverse_transform(ref.transform(x_ng.numpy()))
    np.testing.assert_allclose(base.pca(x_ng).numpy(), recon, atol=1e-4)


def test_pca_initialised_network_starts_at_the_pca_reconstruction(x_ng):
    base = Baselines(x_ng.shape[1], 16).fit([x_ng])
    net = AutoEncoder(x_ng.shape[1], latent_dim=16, hidden_dims=[64, 32], init="pca").eval()
    net.init_from_pca(base.mean_g, base.components_kg)
    with torch.no_grad():
        out = net(x_ng)
    torch.testing.assert_close(out["recon"], base.pca(x_ng), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["z"], (x_ng - base.mean_g) @ base.components_kg.T, atol=1e-4, rtol=1e-4)


def _with_residuals(net: AutoEncoder, seed: int = 0) -> AutoEncoder:
    """Give the residual branches' last layers non-zero weights, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in (net.encoder, net.decoder):
            branch[-1].weight.copy_(0.05 * torch.randn(branch[-1].weight.shape, generator=gen))
    return net


@pytest.mark.parametrize("factor", [1e-2, 1e3])
def test_residual_branches_work_in_each_genes_standard_units(x_ng, factor):
    """On data ``c·x`` the encoder branch sees the same input and the decoder branch's output is ``c`` times larger.

    So the residual MLPs need the same weights, and the same learning rate, for raw counts in the thousands
    as for scaled data; without the gene units they would see inputs, and have to produce outputs, ``c``
    times larger (on counts they then hardly trained).
    """
    x_ng = x_ng - x_ng.min() + 0.1  # positive, like counts
    template = _with_residuals(AutoEncoder(x_ng.shape[1], latent_dim=8, hidden_dims=[64, 32], init="pca")).eval()
    seen, residual = [], []
    z_nk = torch.randn(x_ng.shape[0], 8, generator=torch.Generator().manual_seed(1))
    for data in (x_ng, factor * x_ng):
        base = Baselines(x_ng.shape[1], 8).fit([data])
        net = copy.deepcopy(template)
        net.init_from_pca(base.mean_g, base.components_kg, variance_g=base.variance_g)
        net.encoder.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        with torch.no_grad():
            net.encode(data)
            residual.append(net.decode(z_nk) - net.linear_decoder(z_nk))
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-3, atol=1e-3)
    assert seen[0].std(0).mean() == pytest.approx(1.0, abs=0.05)  # standardised genes
    assert residual[0].abs().mean() > 1e-3  # the decoder branch is active
    scale = factor * residual[0].abs().mean()
    torch.testing.assert_close(residual[1], factor * residual[0], rtol=1e-3, atol=1e-4 * scale)


def test_constant_genes_get_the_typical_scale(x_ng):
    x_ng = x_ng.clone()
    x_ng[:, 0] = 3.0  # a gene with the same value in every training cell
    base = Baselines(x_ng.shape[1], 8).fit([x_ng])
    net = AutoEncoder(x_ng.shape[1], latent_dim=8, init="pca")
    net.init_from_pca(base.mean_g, base.components_kg, variance_g=base.variance_g)
    sd_g = base.variance_g.sqrt()
    assert sd_g[0] == 0 and torch.isfinite(net(x_ng)["recon"]).all()
    torch.testing.assert_close(net.scale_g[0], sd_g[sd_g > 0].mean())
    torch.testing.assert_close(net.scale_g[1:][sd_g[1:] > 0], sd_g[1:][sd_g[1:] > 0])


def test_random_init_has_no_linear_path_and_refuses_pca():
    net = AutoEncoder(20, latent_dim=4, init="random")
    assert net.linear_encoder is None
    with pytest.raises(RuntimeError, match="init='pca'"):
        net.init_from_pca(torch.zeros(20), torch.zeros(4, 20))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latent_dim": -3}, "latent_dim must be a positive integer"),
        ({"norm": "group"}, "norm must be one of"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"init": "xavier"}, "init must be one of"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
    ],
)
def test_bad_network_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoEncoder(20, **kwargs)


def test_pca_needs_enough_cells():
    with pytest.raises(ValueError, match="n_components"):
        fit_pca([torch.randn(5, 30)], n_components=8)
