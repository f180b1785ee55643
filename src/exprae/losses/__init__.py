"""Losses: reconstruction of expression profiles, cosine embedding losses on the latent, count likelihoods."""

from exprae.losses.embedding import (
    OnlinePairCosineLoss,
    OnlineTripletCosineLoss,
    PairCosineLoss,
    TripletCosineLoss,
    cosine_similarity_matrix,
    reduce_counted,
)
from exprae.losses.expression import (
    CosineLoss,
    MixedLoss,
    MSELoss,
    ReconstructionLoss,
    cosine_similarity,
    reduce_per_cell,
)
from exprae.losses.likelihoods import (
    ZINBNLL,
    CountNLL,
    NegativeBinomialNLL,
    PoissonNLL,
    nb_log_prob,
    poisson_log_prob,
    zinb_log_prob,
)

__all__ = [
    "ZINBNLL",
    "CosineLoss",
    "CountNLL",
    "MSELoss",
    "MixedLoss",
    "NegativeBinomialNLL",
    "OnlinePairCosineLoss",
    "OnlineTripletCosineLoss",
    "PairCosineLoss",
    "PoissonNLL",
    "ReconstructionLoss",
    "TripletCosineLoss",
    "cosine_similarity",
    "cosine_similarity_matrix",
    "nb_log_prob",
    "poisson_log_prob",
    "reduce_counted",
    "reduce_per_cell",
    "zinb_log_prob",
]
