"""exprae: autoencoders for gene-expression profiles, with MSE, cosine and mixed losses and honest baselines."""

__version__ = "0.1.0"
