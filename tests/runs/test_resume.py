"""A run killed with SIGKILL mid-training resumes with ``ckpt_path=last`` and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from run_process import finish, signal_mid_training, start_train

from exprae.errors import ConfigError, DataFileNotFoundError
from exprae.runs import rundir
from exprae.runs.checkpoint import UnsafeCheckpointError, read_checkpoint
from exprae.train import train


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = start_train(straight)
    victim = start_train(killed)
    last = killed / "checkpoints" / "last.ckpt"
    signal_mid_training(victim, last, signal.SIGKILL, after_saves=3)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / rundir.METRICS_FILE).exists(), "the run finished before the kill"
    epoch_at_kill = read_checkpoint(last)["epoch"]
    assert epoch_at_kill < 7

    finish(start_train(killed, "ckpt_path=last"))
    finish(reference)

    a = json.loads((straight / rundir.METRICS_FILE).read_text())
    b = json.loads((killed / rundir.METRICS_FILE).read_text())
    assert a["epochs_trained"] == b["epochs_trained"] == 8
    for stage in ("val", "test"):
        for name, value in a[stage]["model"].items():
            assert b[stage]["model"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (stage, name)
    wa, wb = (read_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (straight, killed))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-7, msg=key)


def test_ckpt_path_last_without_a_checkpoint_says_how_to_resume(compose_cfg):
    cfg = compose_cfg("ckpt_path=last", "trainer.fast_dev_run=true")
    with pytest.raises(DataFileNotFoundError, match=r"ckpt_path=last, but .*last.ckpt does not exist.*hydra.run.dir"):
        train(cfg)


def test_resume_with_another_model_shape_is_refused(compose_cfg):
    cfg = compose_cfg("trainer.max_epochs=1", "model.latent_dim=4", "model.hidden_dims=[32]", "logger=none")
    train(cfg)
    cfg.model.latent_dim = 6
    cfg.ckpt_path = "last"
    with pytest.raises(
        ConfigError, match=r"does not fit the configured model .*\(4, 32\) in the checkpoint, \(6, 32\) now"
    ):
        train(cfg)


class _OpensAFile:
    """Unpickling this calls ``open(path, "w")``: the visible side effect of a checkpoint that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


def test_resume_refuses_a_checkpoint_that_would_run_code(compose_cfg, pbmc_run, tmp_path):
    """A real checkpoint plus one pickled object: resuming from it fails before unpickling anything."""
    marker = tmp_path / "code-ran"
    ckpt = torch.load(pbmc_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["payload"] = _OpensAFile(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    cfg = compose_cfg("trainer.max_epochs=4", "model.latent_dim=8", f"ckpt_path={evil}", "logger=none")
    with pytest.raises(UnsafeCheckpointError, match=r"contains Python objects other than tensors and plain data"):
        train(cfg)
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert not (Path(cfg.paths.output_dir) / rundir.METRICS_FILE).exists()
