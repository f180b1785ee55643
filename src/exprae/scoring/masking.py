"""Held-out entries for an imputation score that measures imputation: which entries the encoder does not see.

Definition (the same for every representation): ``round(fraction · n_genes)`` of each evaluation cell's
entries, drawn uniformly over **all** its entries, zeros included (``entries="all"``, the default), are
hidden, and the reconstruction is scored on those entries only, against their true values. Drawing only
among the non-zero entries (``entries="nonzero"``, the old definition, kept to reproduce old numbers) makes
the target "the value given that it was detected": a predictor of that conditional value then beats the
perfect denoiser, so the score rewards bias, not imputation.

The encoder's input is then rebuilt as if the hidden entries had not been measured (:class:`InputMasker`):
on data the datamodule normalised (``preprocess.normalize_total``) the hidden values are removed in the
normalised space and the cell is re-normalised to its target sum over what is left, so the hidden total does
not leak through the other entries' size factor; ``log1p`` and the per-gene scaling are then replayed. The
hidden entries carry a fill value the encoder reads as "no information": the gene's training mean in the
input representation (``fill="mean"``, the default, 0 on scaled data) or a zero count (``fill="zero"``).
Scaling clipped with ``preprocess.max_value`` cannot be undone exactly; clipped entries stay clipped.
Data normalised before exprae saw it (pbmc68k's ``X`` and ``raw``) cannot be re-normalised: there only the
hidden entries change.

The choice depends only on ``(seed, stream, row of the cell in its split)``, never on the batch a cell
falls in or on the training seed, so every run of a sweep is scored on the same hidden entries.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

STREAMS = {"val": 0, "test": 1}
MaskEntries = Literal["all", "nonzero"]
MaskFill = Literal["mean", "zero"]


def hidden_entries(
    x_ng: torch.Tensor,
    index_n: torch.Tensor,
    *,
    fraction: float,
    seed: int,
    stream: str,
    entries: MaskEntries = "all",
) -> torch.Tensor:
    """Boolean ``hidden_ng``: ``round(fraction · n)`` of each cell's eligible entries, seeded per cell.

    Eligible are all entries (``entries="all"``) or the non-zero ones (``"nonzero"``).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval mask_fraction must lie in [0, 1), got {fraction}")
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {list(STREAMS)}, got {stream!r}")
    if entries not in ("all", "nonzero"):
        raise ValueError(f"mask entries must be 'all' or 'nonzero', got {entries!r}")
    eligible_ng = torch.ones_like(x_ng, dtype=torch.bool) if entries == "all" else x_ng != 0
    rows = index_n.detach().cpu().numpy()
    # One SeedSequence per cell: the cell's draw does not depend on which batch or rank it is in.
    u_ng = np.stack([np.random.default_rng([seed, STREAMS[stream], int(r)]).random(x_ng.shape[1]) for r in rows])
    u_ng = torch.from_numpy(u_ng).to(x_ng.device).masked_fill(~eligible_ng, math.inf)
    k_n = torch.floor(eligible_ng.sum(dim=1) * fraction + 0.5).long()
    # The k smallest draws among the eligible entries are hidden (draws are distinct almost surely).
    kth_n = u_ng.sort(dim=1).values.gather(1, (k_n - 1).clamp_min(0)[:, None])
    return (u_ng <= kth_n) & (k_n[:, None] > 0) & eligible_ng


class InputMasker(nn.Module):
    """Rebuilds an encoder input with some entries unmeasured: re-normalised without them, then filled.

    Settings are copied from the datamodule's fitted :class:`exprae.data.preprocessing.Preprocessing`;
    the buffers are not persistent (the masker judges a run, it is not part of the model).
    """

    def __init__(self, n_genes: int, *, fill: MaskFill = "mean") -> None:
        super().__init__()
        if fill not in ("mean", "zero"):
            raise ValueError(f"mask fill must be 'mean' or 'zero', got {fill!r}")
        self.fill = fill
        # Placeholders until fit() sets them from the preprocessing (the masker is never used unfitted).
        self.target_sum = 0.0  # pragma: no mutate (normalize_total's target; 0: not normalised by exprae)
        self.log1p = self.scaled = False  # pragma: no mutate
        # Buffers, so they follow the module to the batches' device; not persistent: nothing goes into checkpoints.
        for name, placeholder in (
            ("scale_mean_g", torch.zeros(n_genes)),
            ("scale_std_g", torch.ones(n_genes)),
            ("fill_g", torch.zeros(n_genes)),
        ):
            self.register_buffer(name, placeholder, persistent=False)  # pragma: no mutate (None is as falsy)
        self.max_value = math.inf  # pragma: no mutate (placeholder, read only once fit() found scaling and set it)

    def fit(self, preprocess: Any, *, mean_g: torch.Tensor) -> InputMasker:
        """Copy the preprocessing's settings; ``mean_g`` is each gene's training mean in the input representation."""
        self.target_sum = float(preprocess.normalize_total or 0.0)
        self.log1p, self.scaled = bool(preprocess.log1p), bool(preprocess.scale)
        if self.scaled:
            # Preprocessing stores lists of Python floats, which torch reads as float32 with or without the dtype.
            self.scale_mean_g = torch.as_tensor(preprocess.scale_mean, dtype=torch.float32)  # pragma: no mutate
            self.scale_std_g = torch.as_tensor(preprocess.scale_std, dtype=torch.float32)  # pragma: no mutate
            self.max_value = math.inf if preprocess.max_value is None else float(preprocess.max_value)
        self.fill_g = (
            mean_g.detach().float().clone()
            if self.fill == "mean"
            else self._forward_chain(torch.zeros(len(self.scale_mean_g)))
        )
        return self

    def _forward_chain(self, v_ng: torch.Tensor) -> torch.Tensor:
        """Normalised (or raw) values to the input representation: log1p, then scaling and clipping."""
        if self.log1p:
            v_ng = torch.log1p(v_ng)
        if self.scaled:
            v_ng = ((v_ng - self.scale_mean_g) / self.scale_std_g).clamp(-self.max_value, self.max_value)
        return v_ng

    def _inverse_chain(self, x_ng: torch.Tensor) -> torch.Tensor:
        if self.scaled:
            x_ng = x_ng * self.scale_std_g + self.scale_mean_g
        if self.log1p:
            x_ng = torch.expm1(x_ng)
        return x_ng

    def forward(self, x_ng: torch.Tensor, hidden_ng: torch.Tensor) -> torch.Tensor:
        x = x_ng.float()
        if self.target_sum > 0:
            v_ng = self._inverse_chain(x).clamp_min(0.0)
            hidden_total_n = (v_ng * hidden_ng).sum(1, keepdim=True)
            # The cell's total over every gene was target_sum; without the hidden values it is target − hidden.
            # A cell whose every count is hidden keeps only zeros, which any positive floor leaves at zero.
            floor = 1e-6 * self.target_sum  # pragma: no mutate
            factor_n = self.target_sum / (self.target_sum - hidden_total_n).clamp_min(floor)
            x = self._forward_chain(v_ng * factor_n)
        return torch.where(hidden_ng, self.fill_g, x).to(x_ng.dtype)
