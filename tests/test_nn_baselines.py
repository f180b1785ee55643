"""The network's PCA start and the baselines against scikit-learn's PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from exprae.baselines import Baselines, fit_pca
from exprae.nn import AutoEncoder


@pytest.fixture
def x_ng(pbmc) -> torch.Tensor:
    return torch.as_tensor(pbmc.X[:300], dtype=torch.float32)


def test_fit_pca_matches_sklearn(x_ng):
    mean_g, comps_kg = fit_pca(torch.split(x_ng, 64), n_components=10)  # streamed in chunks
    ref = PCA(n_components=10, svd_solver="full").fit(x_ng.double().numpy())
    np.testing.assert_allclose(mean_g.numpy(), ref.mean_, atol=1e-5)
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
