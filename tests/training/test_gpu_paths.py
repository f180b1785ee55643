"""The CUDA-only paths, for `make test-gpu` on a GPU machine: resident data under on_device=auto, the fused
optimizer, and module.compile=model. Each skips here with the reason; `make test-gpu` refuses to run without CUDA."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from exprae.constants import X_KEY
from exprae.data import ExpressionDataModule
from exprae.data.device import DeviceBatches
from exprae.train import build, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device: run `make test-gpu` on a GPU machine"
    ),
]
GPU_RUN = ["trainer=gpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none"]


def test_on_device_auto_chooses_the_resident_path_on_cuda():
    dm = ExpressionDataModule(dataset="pbmc68k", batch_size=64)  # data.on_device=auto, the default
    dm.setup("fit")
    dm.trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False)
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches)  # 700 x 765 floats fit in half of any GPU's free memory
    batch = next(iter(loader))
    assert batch[X_KEY].is_cuda and batch[X_KEY].shape == (64, 765)
    host = ExpressionDataModule(dataset="pbmc68k", batch_size=64, on_device=False)
    host.setup("fit")
    first = next(iter(host.train_dataloader()))  # the same sampler, so the same first batch
    torch.testing.assert_close(batch[X_KEY].cpu(), first[X_KEY])


def test_fused_optimizer_is_chosen_on_cuda(compose_cfg):
    _, module = build(compose_cfg(*GPU_RUN, fast=False))
    optimizer = module.to("cuda").configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert optimizer.param_groups[0]["fused"] is True  # optimizer.fused=null means fused on CUDA


def test_compile_model_trains_like_eager_on_cuda(compose_cfg):
    common = [*GPU_RUN, "trainer.max_epochs=2", "model.dropout=0"]
    eager = train(compose_cfg(*common, "module.compile=none", fast=False))
    compiled = train(compose_cfg(*common, "module.compile=model", fast=False))
    for stage in ("val", "test"):
        # bf16-mixed: both runs round activations to 8 mantissa bits, in different kernel orders.
        assert compiled[stage]["model"]["cosine"] == pytest.approx(eager[stage]["model"]["cosine"], abs=5e-3), stage
