"""The low-overhead step: optimizer choice, the manual/graph step on CPU, and the CUDA graph against eager on GPU."""

from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import pytest
import torch

from exprae.constants import TARGET_KEY, X_KEY
from exprae.data.datasets import synthetic_counts
from exprae.data.device import DeviceMatrix
from exprae.losses import CosineLoss
from exprae.nn import AutoEncoder
from exprae.train import train
from exprae.training.fast_step import TrainStep, build_optimizer, check_compile_mode

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs and the fused optimizer need a CUDA device; none here")


def test_compile_mode_is_checked():
    assert check_compile_mode("graph") == "graph"
    with pytest.raises(ValueError, match=r"module\.compile must be one of"):
        check_compile_mode("fast")


def test_build_optimizer_fused_only_on_cuda_and_capturable_lr_tensor():
    params = [torch.nn.Parameter(torch.zeros(3))]
    cpu = torch.device("cpu")
    opt = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3, fused=None), params, device=cpu)
    assert opt.param_groups[0]["fused"] is False
    forced = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3, fused=True), params, device=cpu)
    assert forced.param_groups[0]["fused"] is True  # an explicit setting is kept
    graphed = build_optimizer(functools.partial(torch.optim.AdamW, lr=2e-3), params, device=cpu, capturable=True)
    lr = graphed.param_groups[0]["lr"]
    assert graphed.param_groups[0]["capturable"] and isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(2e-3)
    # Schedulers update a tensor learning rate in place, so a captured step sees the new value.
    with warnings.catch_warnings():  # "scheduler stepped before the optimizer": intended here
        warnings.simplefilter("ignore", UserWarning)
        torch.optim.lr_scheduler.StepLR(graphed, step_size=1, gamma=0.5).step()
    assert graphed.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="capturable"):
        build_optimizer(functools.partial(torch.optim.SGD, lr=0.1), params, device=cpu, capturable=True)


def _net_and_batches(device: str, *, n_batches: int = 8, batch: int = 64, genes: int = 100, last: int = 0):
    adata = synthetic_counts(n_batches * batch + last, genes, store_truth=False, seed=1)
    x = DeviceMatrix(adata.X, device=device)
    order = torch.randperm(adata.n_obs, generator=torch.Generator().manual_seed(0)).to(device)
    batches = []
    for idx in torch.split(order, batch):
        x_bg = torch.log1p(x.rows(idx))
        batches.append({X_KEY: x_bg, TARGET_KEY: x_bg})
    torch.manual_seed(0)
    net = AutoEncoder(genes, latent_dim=8, hidden_dims=(32, 16), dropout=0.0, init="random").to(device)
    return net, batches


def _losses(net, batches, *, graph: bool, device: torch.device, autocast: torch.dtype | None = None) -> np.ndarray:
    loss = CosineLoss()
    opt = build_optimizer(
        functools.partial(torch.optim.AdamW, lr=1e-2),
        net.parameters(),
        device=device,
        capturable=graph and device.type == "cuda",
    )

    def loss_fn(b):
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture (Lightning does the same).
        with torch.autocast(
            device.type, dtype=autocast or torch.float32, enabled=autocast is not None, cache_enabled=False
        ):
            return loss(net(b[X_KEY])["recon"], b[TARGET_KEY])

    step = TrainStep(loss_fn, opt, graph=graph)
    out = torch.stack([step(b) for _ in range(3) for b in batches])
    return out.float().cpu().numpy()


def test_eager_train_step_matches_a_plain_loop():
    net, batches = _net_and_batches("cpu")
    stepped = _losses(copy.deepcopy(net), batches, graph=True, device=torch.device("cpu"))  # eager off CUDA
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    plain = []
    for _ in range(3):
        for b in batches:
            opt.zero_grad()
            loss = CosineLoss()(net(b[X_KEY])["recon"], b[TARGET_KEY])
            loss.backward()
            opt.step()
            plain.append(loss.item())
    np.testing.assert_allclose(stepped, plain, rtol=1e-5, atol=1e-6)
    assert stepped[-1] < stepped[0]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_cuda_graph_step_matches_eager(autocast):
    """The captured step gives the eager loss curve (fp32: tight; bf16: within bf16 rounding)."""
    device = torch.device("cuda")
    net, batches = _net_and_batches("cuda", last=17)  # a smaller last batch runs eagerly between replays
    eager = _losses(copy.deepcopy(net), batches, graph=False, device=device, autocast=autocast)
    graphed = _losses(copy.deepcopy(net), batches, graph=True, device=device, autocast=autocast)
    tol = {"rtol": 1e-4, "atol": 1e-5} if autocast is None else {"rtol": 2e-2, "atol": 2e-3}
    np.testing.assert_allclose(graphed, eager, **tol)
    assert graphed[-1] < graphed[0]


@pytest.mark.gpu
@needs_cuda
def test_device_matrix_on_cuda_matches_host():
    adata = synthetic_counts(300, 50, store_truth=False, seed=2)
    idx = torch.arange(0, 300, 7)
    on_gpu = DeviceMatrix(adata.X, device="cuda").rows(idx.cuda()).cpu()
    assert torch.equal(on_gpu, DeviceMatrix(adata.X, device="cpu").rows(idx))


def _run(compose_cfg, *overrides, fast: bool = True):
    cfg = compose_cfg(
        "data=synthetic",
        "data.synthetic.n_cells=300",
        "data.synthetic.n_genes=60",
        "data.batch_size=32",
        "model.dropout=0",
        "callbacks=none",
        "logger=none",
        *overrides,
        fast=fast,
    )
    return train(cfg)


def test_graph_mode_fast_dev_run_on_cpu(compose_cfg):
    metrics = _run(compose_cfg, "module.compile=graph", "trainer.fast_dev_run=true")
    assert np.isfinite(metrics["val"]["model"]["cosine"])


@pytest.mark.slow
def test_graph_mode_trains_like_automatic_optimization(compose_cfg):
    """Manual optimization (the graph path, eager on CPU) gives Lightning's automatic run, schedulers included."""
    auto = _run(compose_cfg, "trainer.max_epochs=3", "scheduler=cosine")
    graph = _run(compose_cfg, "trainer.max_epochs=3", "scheduler=cosine", "module.compile=graph")
    assert graph["epochs_trained"] == auto["epochs_trained"]
    for stage in ("val", "test"):
        assert graph[stage]["model"]["cosine"] == pytest.approx(auto[stage]["model"]["cosine"], abs=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.slow
def test_graph_mode_on_gpu_through_the_entry_point(compose_cfg):
    """trainer=gpu (bf16-mixed, data resident): the CUDA-graph step ends where the eager step does."""
    common = ("trainer=gpu", "trainer.max_epochs=4", "scheduler=cosine", "data.on_device=true")
    common += ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    eager = _run(compose_cfg, *common, fast=False)
    graph = _run(compose_cfg, *common, "module.compile=graph", fast=False)
    assert graph["val"]["model"]["cosine"] == pytest.approx(eager["val"]["model"]["cosine"], abs=5e-3)


def test_graph_mode_counts_optimizer_steps(compose_cfg):
    """Steps taken outside LightningOptimizer.step still advance global_step (max_steps, checkpoint names)."""
    import hydra

    from exprae.train import build

    cfg = compose_cfg(
        "data=synthetic", "data.synthetic.n_cells=300", "data.synthetic.n_genes=40", "module.compile=graph"
    )
    datamodule, module = build(cfg)
    trainer = hydra.utils.instantiate(
        cfg.trainer, max_epochs=5, max_steps=7, limit_val_batches=1, logger=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 7 and not module.automatic_optimization
