"""Property-based tests (hypothesis) of the losses and metrics: finiteness, invariances, symmetry, bounds.

Inputs are float32 cells x genes matrices with entries up to 1e4 in magnitude (expression values, counts
or z-scores; far larger values overflow float32 squares in any MSE), and any row may be all zeros.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from exprae.losses import CosineLoss, MixedLoss, MSELoss, cosine_similarity, reduce_per_cell
from exprae.scoring.metrics import ReconstructionMetrics, per_cell_metrics

# Derandomized so CI is reproducible; EXPRAE_HYPOTHESIS_EXAMPLES=2000 searches harder locally.
PROPERTY = settings(
    max_examples=int(os.environ.get("EXPRAE_HYPOTHESIS_EXAMPLES", 60)),
    deadline=None,
    derandomize="EXPRAE_HYPOTHESIS_EXAMPLES" not in os.environ,
)

VALUES = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
LOSSES = {
    "mse": MSELoss(reduction="none"),
    "cosine": CosineLoss(reduction="none"),
    "pearson": CosineLoss(centered=True, reduction="none"),
    "mixed": MixedLoss(0.3, reduction="none"),
}


@st.composite
def pairs(draw, *, min_genes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two same-shape float32 matrices, with some rows forced to zero."""
    n, g = draw(st.integers(1, 8)), draw(st.integers(min_genes, 16))
    a = draw(arrays(np.float32, (n, g), elements=VALUES))
    b = draw(arrays(np.float32, (n, g), elements=VALUES))
    a[draw(arrays(np.bool_, n))] = 0
    b[draw(arrays(np.bool_, n))] = 0
    return torch.from_numpy(a), torch.from_numpy(b)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.double().norm(dim=-1)


@pytest.mark.parametrize("name", list(LOSSES))
@PROPERTY
@given(ab=pairs())
def test_losses_and_their_gradients_are_finite_for_any_finite_input(name, ab):
    pred, target = ab[0].clone().requires_grad_(True), ab[1]
    loss_n = LOSSES[name](pred, target)
    assert loss_n.shape == (pred.shape[0],)
    assert torch.isfinite(loss_n).all()
    loss_n.sum().backward()
    assert torch.isfinite(pred.grad).all(), "a zero row must not give NaN gradients"


@PROPERTY
@given(ab=pairs())
def test_metrics_are_finite_and_bounded(ab):
    m = per_cell_metrics(*ab)
    for name, v in m.items():
        assert torch.isfinite(v).all(), name
    for name in ("cosine", "pearson"):
        assert (m[name].abs() <= 1 + 1e-5).all(), name
    assert (m["mse"] >= 0).all()


@PROPERTY
@given(ab=pairs())
def test_cosine_and_pearson_losses_lie_in_0_2_and_mse_is_nonnegative(ab):
    for name in ("cosine", "pearson"):
        v = LOSSES[name](*ab)
        assert ((v >= -1e-5) & (v <= 2 + 1e-5)).all(), name
    assert (LOSSES["mse"](*ab) >= 0).all()
    assert (LOSSES["mixed"](*ab) >= -1e-5).all()


@PROPERTY
@given(ab=pairs())
def test_zero_rows_have_cosine_zero(ab):
    a, b = ab
    zero = (a == 0).all(dim=1) | (b == 0).all(dim=1)
    cos = cosine_similarity(a, b)
    assert (cos[zero] == 0).all()
    assert torch.allclose(LOSSES["cosine"](a, b)[zero], torch.ones(int(zero.sum())))


@PROPERTY
@given(ab=pairs())
def test_losses_and_metrics_are_symmetric(ab):
    a, b = ab
    for name, loss in LOSSES.items():
        torch.testing.assert_close(loss(a, b), loss(b, a), rtol=1e-5, atol=1e-5, msg=name)
    ma, mb = per_cell_metrics(a, b), per_cell_metrics(b, a)
    for name in ma:
        torch.testing.assert_close(ma[name], mb[name], rtol=1e-5, atol=1e-5, msg=name)


@PROPERTY
@given(ab=pairs(), data=st.data())
def test_cosine_is_scale_invariant_per_cell_and_mse_is_not(ab, data):
    a, b = ab
    n = a.shape[0]
    scale_n1 = torch.tensor(data.draw(st.lists(st.floats(0.01, 100.0), min_size=n, max_size=n)), dtype=torch.float32)[
        :, None
    ]
    usable = (_norm(a) > 1e-2) & (_norm(b) > 1e-2)  # far from the eps that defines the cosine of a zero row
    cos, cos_scaled = LOSSES["cosine"](a, b), LOSSES["cosine"](a * scale_n1, b)
    torch.testing.assert_close(cos_scaled[usable], cos[usable], rtol=1e-4, atol=1e-4)
    # MSE is homogeneous of degree 2 instead: scaling both profiles by c scales it by c².
    mse, mse_scaled = LOSSES["mse"](a, b).double(), LOSSES["mse"](a * scale_n1, b * scale_n1).double()
    torch.testing.assert_close(mse_scaled, mse * scale_n1[:, 0].double() ** 2, rtol=1e-4, atol=1e-3)


def test_mse_changes_when_one_profile_is_rescaled():
    """The counter-example to scale invariance, concretely: doubling a reconstruction changes its MSE."""
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert LOSSES["cosine"](2 * a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert LOSSES["mse"](2 * a, a).item() == pytest.approx(14 / 3)


@PROPERTY
@given(ab=pairs(min_genes=2), data=st.data())
def test_pearson_ignores_a_per_cell_offset(ab, data):
    a, b = ab
    n = a.shape[0]
    shift_n1 = torch.tensor(data.draw(st.lists(st.floats(-100.0, 100.0), min_size=n, max_size=n)), dtype=torch.float32)[
        :, None
    ]
    centred = a.double() - a.double().mean(1, keepdim=True)
    usable = (centred.norm(dim=1) > 1.0) & ((b.double() - b.double().mean(1, keepdim=True)).norm(dim=1) > 1.0)
    r, r_shifted = LOSSES["pearson"](a, b), LOSSES["pearson"](a + shift_n1, b)
    torch.testing.assert_close(r_shifted[usable], r[usable], rtol=1e-3, atol=1e-3)


@PROPERTY
@given(ab=pairs())
def test_a_profile_reconstructed_exactly_has_zero_loss(ab):
    a, _ = ab
    # Norms below the loss's eps (1e-8) count as a zero profile by design (cosine 0); hypothesis found 1e-38.
    nonzero = _norm(a) > 1e-6
    assert (LOSSES["mse"](a, a) == 0).all()
    torch.testing.assert_close(LOSSES["cosine"](a, a)[nonzero], torch.zeros(int(nonzero.sum())), atol=1e-5, rtol=0)


@PROPERTY
@given(ab=pairs(), data=st.data())
def test_metric_means_do_not_depend_on_how_cells_are_batched(ab, data):
    """The running metric is an exact per-cell mean: any split into batches gives the whole-set value."""
    a, b = ab
    n = a.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=3, unique=True))) if n > 1 else []
    whole, batched = ReconstructionMetrics(), ReconstructionMetrics()
    whole.update(a, b, LOSSES["mse"](a, b))
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        batched.update(a[lo:hi], b[lo:hi], LOSSES["mse"](a[lo:hi], b[lo:hi]))
    w, v = whole.compute(), batched.compute()
    assert w.keys() == v.keys()
    for name in w:
        torch.testing.assert_close(v[name], w[name], rtol=1e-5, atol=1e-5, msg=name)
        assert torch.isfinite(v[name]), name


@PROPERTY
@given(
    loss_n=arrays(np.float32, st.integers(1, 10), elements=st.floats(0, 10, width=32)),
    data=st.data(),
)
def test_weighted_mean_ignores_the_scale_of_the_weights(loss_n, data):
    n = len(loss_n)
    w = np.asarray(data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n)), dtype=np.float32)
    c = data.draw(st.floats(0.1, 100.0))
    loss, w_t = torch.from_numpy(loss_n), torch.from_numpy(w)
    torch.testing.assert_close(
        reduce_per_cell(loss, w_t * c, "mean"), reduce_per_cell(loss, w_t, "mean"), rtol=1e-4, atol=1e-5
    )
