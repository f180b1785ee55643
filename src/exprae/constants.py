"""Names shared across exprae: batch keys and the AnnData keys results are written under."""

# Keys of the dict every batch is (scvi-tools style): tensors named by role, never by position.
X_KEY = "x"  # encoder input, cells x genes
TARGET_KEY = "target"  # reconstruction target, cells x genes (the input itself unless a target layer is set)
LIBRARY_KEY = "library_size"  # per-cell total of the target, for count likelihoods
SIZE_FACTOR_KEY = "size_factor"  # per-cell factor normalize_total applied to the input (1 without it)
LABEL_KEY = "label"  # integer label per cell, for auxiliary latent losses
BATCH_KEY = "batch"  # integer covariate codes per cell, cells x covariates (data.batch_key; batch first)
TRUTH_KEY = "true_mean"  # noise-free profile (synthetic data only), after the same preprocessing
TRUE_LATENT_KEY = "X_true"  # synthetic data: obsm key of each cell's true position in program space
RATE_KEY = "true_rate"  # synthetic data: each entry's Poisson rate (the NB mean times its gamma noise), raw
# The expected preprocessed profile E[T(x) | truth] (synthetic data), the form a model trained in preprocessed space
# and the MCV score estimate (exprae.data.truth), given the NB mean and dispersion or given each entry's Poisson
# rate (what MCV measures: the halves share it); scored on validation/test cells only.
EXPECTED_TRUTH_KEY = "expected_truth"
RATE_TRUTH_KEY = "rate_truth"
EXPECTED_TRUTHS = {"expected_truth": EXPECTED_TRUTH_KEY, "rate_truth": RATE_TRUTH_KEY}  # EXTRA_SCORES key: batch key
INDEX_KEY = "index"  # row of the cell in the split's AnnData
# Molecular cross-validation (data.mcv): the held-out molecules x'' of validation/test cells, for scoring only.
MCV_TARGET_KEY = "mcv_target"  # x'' preprocessed like the input (normalised by its own total), cells x genes
MCV_COUNTS_KEY = "mcv_counts"  # x'' as raw counts on the model's genes, for the count score

# What every scored reconstruction is logged and saved with (exprae.scoring.metrics.ReconstructionMetrics computes them),
# and the further scores of the same names: against the noise-free truth T(E[x]) and the expected truths E[T(x)]
# given the mean or the rate (synthetic data), and on entries hidden from the encoder (module.mask_fraction).
METRIC_NAMES = ("cosine", "pearson", "mse", "loss", "cosine_median", "cosine_p10")
# With data.mcv on, also against the held-out molecules x'' (molecular cross-validation); there the per-cell
# Poisson NLL of x'' takes the place of the loss, logged as mcv_poisson.
EXTRA_SCORES = {
    "truth": "{}_to_truth",
    "expected_truth": "{}_to_expected_truth",
    "rate_truth": "{}_to_rate_truth",
    "masked": "masked_{}",
    "mcv": "mcv_{}",
}
MCV_COUNT_SCORE = "mcv_poisson"

# Where exprae.embed writes results in AnnData, following scanpy's conventions; {key} is its key_added.
DEFAULT_KEY = "exprae"
LATENT_OBSM = "X_{key}"
RECON_LAYER = "{key}_recon"
EXPECTED_COUNTS_LAYER = "{key}_expected_counts"  # count likelihoods only
