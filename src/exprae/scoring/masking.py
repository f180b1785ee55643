"""Held-out entries for an imputation score: which entries of each evaluation cell the encoder does not see.

Definition (the same for every representation): a cell's *eligible* entries are its non-zero entries in
the preprocessed input, and ``round(fraction · n_eligible)`` of them are chosen uniformly at random and set
to 0 in the encoder's input. The reconstruction is then scored on those hidden entries only, against their
true (unmasked) values. On log or normalised data, 0 means "not detected", so hiding an entry simulates a
dropout; on scaled data almost every entry is non-zero and 0 is the gene's training mean, so hiding an
entry replaces it by the best guess without the cell.

The choice depends only on ``(seed, stream, row of the cell in its split)``, never on the batch a cell
falls in or on the training seed, so every run of a sweep is scored on the same hidden entries.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = {"val": 0, "test": 1}


def hidden_entries(
    x_ng: torch.Tensor, index_n: torch.Tensor, *, fraction: float, seed: int, stream: str
) -> torch.Tensor:
    """Boolean ``hidden_ng``: ``round(fraction · nnz)`` of each cell's non-zero entries, seeded per cell."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval mask_fraction must lie in [0, 1), got {fraction}")
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {list(STREAMS)}, got {stream!r}")
    eligible_ng = x_ng != 0
    rows = index_n.detach().cpu().numpy()
    # One SeedSequence per cell: the cell's draw does not depend on which batch or rank it is in.
    u_ng = np.stack([np.random.default_rng([seed, STREAMS[stream], int(r)]).random(x_ng.shape[1]) for r in rows])
    u_ng = torch.from_numpy(u_ng).to(x_ng.device).masked_fill(~eligible_ng, float("inf"))
    k_n = torch.floor(eligible_ng.sum(dim=1) * fraction + 0.5).long()
    # The k smallest draws among the eligible entries are hidden (draws are distinct almost surely).
    kth_n = u_ng.sort(dim=1).values.gather(1, (k_n - 1).clamp_min(0)[:, None])
    return (u_ng <= kth_n) & (k_n[:, None] > 0) & eligible_ng
