"""Every config in each swappable group composes and instantiates; the CLI runs a real multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from exprae.data import ExpressionDataModule
from exprae.losses import CountNLL, ReconstructionLoss
from exprae.train import CONFIG_DIR


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("name", _options("loss"))
def test_every_loss_config_instantiates(compose_cfg, name):
    loss = hydra.utils.instantiate(compose_cfg(f"loss={name}").loss)
    assert isinstance(loss, ReconstructionLoss)
    x = torch.randn(4, 10)
    if isinstance(loss, CountNLL):  # count likelihoods take their parameters and raw counts
        params = {"log_mu": x, "log_theta": x[:1], "dropout_logit": x}
        assert torch.isfinite(loss(params, torch.poisson(x.exp())))
    else:
        assert torch.isfinite(loss(x, x + 0.1))


@pytest.mark.parametrize("name", _options("model"))
def test_every_model_config_instantiates(compose_cfg, name):
    net = hydra.utils.instantiate(compose_cfg(f"model={name}").model, n_genes=30)
    out = net(torch.randn(5, 30))
    assert out["recon"].shape == (5, 30) and out["z"].shape == (5, net.latent_dim)


def _instantiate_option(cfg, group: str, name: str) -> None:
    """Build what one option of ``group`` describes, as exprae.train does, and check it is the documented kind."""
    node = cfg[group]
    if group == "data":
        dm = hydra.utils.instantiate(node)
        assert isinstance(dm, ExpressionDataModule) and dm.batch_seed == cfg.seed
    elif group == "optimizer":
        params = [torch.nn.Parameter(torch.zeros(3))]
        assert isinstance(hydra.utils.instantiate(node)(params), torch.optim.Optimizer)
    elif group == "scheduler":
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
        scheduler = hydra.utils.instantiate(node)(optimizer)
        optimizer.step()
        scheduler.step(1.0) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()
    elif group == "trainer":
        if node.get("accelerator") == "gpu" and not torch.cuda.is_available():
            return  # Lightning refuses a GPU trainer without CUDA; make test-gpu builds it on a GPU machine
        assert isinstance(hydra.utils.instantiate(node, logger=False), pl.Trainer)
    else:  # callbacks and logger: a mapping of named parts, each a real class
        built = [hydra.utils.instantiate(part) for part in (node or {}).values() if part]
        kind = pl.Callback if group == "callbacks" else Logger
        assert all(isinstance(b, kind) for b in built) and (bool(built) == (name != "none"))


@pytest.mark.parametrize("group", ["data", "optimizer", "scheduler", "trainer", "callbacks", "logger"])
def test_every_option_of_the_other_groups_instantiates(compose_cfg, group):
    for name in _options(group):
        overrides = [f"{group}={name}"] + (["data.path=x.h5ad"] if (group, name) == ("data", "h5ad") else [])
        cfg = compose_cfg(*overrides)
        assert cfg[group] is not None or name == "none"
        if cfg[group] is not None:
            _instantiate_option(cfg, group, name)


def test_typos_fail_with_hydra_message_and_choices(compose_cfg):
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)cosin.*Available options.*cosine.*mixed.*mse"):
        compose_cfg("loss=cosin")
    with pytest.raises(ConfigCompositionException, match="alpah"):
        compose_cfg("loss=mixed", "loss.alpah=0.5")


@pytest.mark.slow
def test_cli_multirun_runs_one_job_per_loss(tmp_path):
    env = {**os.environ, "EXPRAE_ROOT": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "exprae.train",
        "-m",
        "loss=mse,cosine,mixed",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 3
    losses = {json.loads(p.read_text())["loss"] for p in runs}
    assert losses == {"MSELoss", "CosineLoss", "MixedLoss"}
