"""Per-batch reconstruction scores: weighted by cells, they give back the global means."""

from __future__ import annotations

import torch

from exprae.scoring.metrics import PerBatchMetrics, ReconstructionMetrics


def test_per_batch_means_weighted_by_cells_sum_back_to_the_global_ones():
    gen = torch.Generator().manual_seed(0)
    overall, per_batch = ReconstructionMetrics(), PerBatchMetrics(4)
    for size in (37, 50, 13):
        target = torch.randn(size, 20, generator=gen)
        pred = target + torch.randn(size, 20, generator=gen) * torch.rand(size, 1, generator=gen)
        batch_n = torch.randint(0, 3, (size,), generator=gen)  # level 3 has no cells
        overall.update(pred, target)
        per_batch.update(pred, target, batch_n)
    glob, by = overall.compute(), per_batch.compute()
    n_b = by["n_cells"]
    assert n_b.sum() == 100 and n_b[3] == 0 and torch.isnan(by["cosine"][3])
    for name in PerBatchMetrics.NAMES:
        weighted = (by[name][:3].double() * n_b[:3].double()).sum() / n_b.sum()
        torch.testing.assert_close(weighted.float(), glob[name])
    # Each level's value is its own cells' mean, not a shared one.
    assert by["cosine"][:3].std() > 0


def test_a_level_gets_only_its_own_cells():
    per_batch = PerBatchMetrics(2)
    target = torch.ones(4, 3)
    pred = torch.tensor([[1.0, 1, 1], [1, 1, 1], [-1, -1, -1], [-1, -1, -1]])
    per_batch.update(pred, target, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(per_batch.compute()["cosine"], torch.tensor([1.0, -1.0]))
