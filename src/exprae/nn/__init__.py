"""Pure PyTorch (no Lightning, no AnnData): the autoencoder, its count output head, and the baselines."""

from exprae.nn.autoencoder import AutoEncoder
from exprae.nn.baselines import Baselines, fit_pca, fit_pcas
from exprae.nn.count_head import CountHead, CountHeadSpec

__all__ = ["AutoEncoder", "Baselines", "CountHead", "CountHeadSpec", "fit_pca", "fit_pcas"]
