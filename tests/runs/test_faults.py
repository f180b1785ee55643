"""Faults during a run: divergence stops cleanly and keeps the good checkpoints; one run per output directory."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from exprae.errors import RunDirError, TrainingDivergedError
from exprae.runs import lock as runguard
from exprae.runs.checkpoint import read_checkpoint
from exprae.train import train

SMALL = ["model.latent_dim=4", "model.hidden_dims=[32]", "logger=none"]


class LearningRateSpike(pl.Callback):
    """Fault injection: from epoch ``at_epoch`` on, the learning rate jumps to ``lr`` (training then diverges)."""

    def __init__(self, at_epoch: int, lr: float = 1e10) -> None:
        self.at_epoch, self.lr = at_epoch, lr

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.at_epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def test_divergence_from_the_start_names_the_step(compose_cfg):
    cfg = compose_cfg("optimizer.lr=1e8", "trainer.max_epochs=4", *SMALL)
    with pytest.raises(TrainingDivergedError, match=r"the training loss became (nan|inf) at step \d+") as info:
        train(cfg)
    assert "No checkpoint had been saved yet" in str(info.value)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_divergence_keeps_the_last_good_checkpoint(compose_cfg):
    """Two good epochs are checkpointed, then the learning rate spikes: last.ckpt must keep epoch 1's weights."""
    cfg = compose_cfg("trainer.max_epochs=6", "callbacks.model_checkpoint.monitor=val/cosine", *SMALL)
    with open_dict(cfg):
        cfg.callbacks.model_checkpoint.mode = "max"
        cfg.callbacks.lr_spike = {"_target_": f"{__name__}.LearningRateSpike", "at_epoch": 2}
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg)
    message = str(info.value)
    assert "training diverged in epoch 2" in message and str(last) in message, message
    assert "(epoch 1, step" in message, message
    ckpt = read_checkpoint(last)
    assert ckpt["epoch"] == 1
    assert not (last.parents[1] / runguard.LOCK_FILE).exists(), "a failed run left its lock file behind"
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_check_every_n_steps_must_be_positive(compose_cfg):
    with pytest.raises(Exception, match="check_every_n_steps must be >= 1"):
        train(compose_cfg("callbacks.divergence_guard.check_every_n_steps=0"))


# ---------------------------------------------------------------- one run per output directory


def _hold_lock_in_another_process(run_dir: Path) -> subprocess.Popen:
    """A real second process holding the run directory's lock, as a live run would."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run_dir / runguard.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()} (test holder)'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_live_run_into_the_same_directory_is_refused(compose_cfg):
    cfg = compose_cfg("trainer.fast_dev_run=true", *SMALL)
    run_dir = Path(cfg.paths.output_dir)
    holder = _hold_lock_in_another_process(run_dir)
    try:
        with pytest.raises(RunDirError, match=rf"is in use by another exprae run \(pid {holder.pid}"):
            train(cfg)
        assert sorted(p.name for p in run_dir.iterdir()) == [runguard.LOCK_FILE], "the refused run wrote files"
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (even killed), the directory is free again.
    metrics = train(cfg)
    assert math.isfinite(metrics["val"]["model"]["cosine"])


def test_fresh_run_into_a_finished_run_is_refused(compose_cfg):
    cfg = compose_cfg("trainer.max_epochs=1", *SMALL)
    train(cfg)
    contract = (Path(cfg.paths.output_dir) / "data_contract.json").read_bytes()
    with pytest.raises(RunDirError, match=r"already holds an exprae run .*resume it with ckpt_path=last"):
        train(cfg)
    assert (Path(cfg.paths.output_dir) / "data_contract.json").read_bytes() == contract


def _cli(root: Path, *overrides: str) -> subprocess.Popen:
    src = Path(runguard.__file__).resolve().parents[2]
    env = {
        **os.environ,
        "EXPRAE_ROOT": str(root),
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HYDRA_FULL_ERROR", None)
    args = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *SMALL, *overrides]
    return subprocess.Popen(
        [sys.executable, "-m", "exprae.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_cli_refuses_a_locked_directory_before_hydra_writes_into_it(tmp_path):
    run_dir = tmp_path / "shared-run"
    holder = _hold_lock_in_another_process(run_dir)
    try:
        proc = _cli(tmp_path, f"hydra.run.dir={run_dir}", "trainer.fast_dev_run=true")
        _, err = proc.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, err
    assert "is in use by another exprae run" in err and "Traceback" not in err, err
    # Hydra had not yet written .hydra/ (which would have overwritten the live run's recorded config).
    assert not (run_dir / ".hydra").exists()


@pytest.mark.slow
def test_runs_started_together_get_separate_directories(tmp_path):
    procs = [_cli(tmp_path, "trainer.fast_dev_run=true", f"seed={s}") for s in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = sorted(p.parent for p in (tmp_path / "outputs").rglob("data_contract.json"))
    assert len(runs) == 2 and runs[0] != runs[1], runs
    seeds = {(r / ".hydra" / "overrides.yaml").read_text().count("seed=1") for r in runs}
    assert seeds == {0, 1}, "each run directory records its own overrides"


def test_lock_is_released_when_the_holder_dies(tmp_path):
    holder = _hold_lock_in_another_process(tmp_path / "run")
    with pytest.raises(RunDirError):
        runguard.acquire(tmp_path / "run", resume=False)
    holder.kill()
    holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert runguard.acquire(tmp_path / "run", resume=False)
            break
        except RunDirError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    runguard.release(tmp_path / "run")


class LockProbe(pl.Callback):
    """At every epoch, records whether another process's attempt to lock the run directory is refused."""

    refused: ClassVar[list[bool]] = []  # class-level: Hydra instantiates the callback, the test reads what it saw

    def __init__(self, run_dir: str) -> None:
        self.path = Path(run_dir) / runguard.LOCK_FILE

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR)  # FileNotFoundError if the lock file is gone mid-run
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            LockProbe.refused.append(False)
        except BlockingIOError:
            LockProbe.refused.append(True)
        finally:
            os.close(fd)


def test_lock_guards_a_run_and_its_resume_and_is_removed_when_they_end(compose_cfg, monkeypatch):
    monkeypatch.setattr(LockProbe, "refused", [])
    first = compose_cfg("trainer.max_epochs=1", *SMALL)
    run_dir = Path(first.paths.output_dir)
    for cfg in (first, compose_cfg("trainer.max_epochs=2", "ckpt_path=last", *SMALL)):
        with open_dict(cfg):
            cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.callbacks.lock_probe = {"_target_": f"{__name__}.LockProbe", "run_dir": str(run_dir)}
        train(cfg)
        assert not (run_dir / runguard.LOCK_FILE).exists(), "a finished run left its lock file behind"
    # Epoch 0 of the first run, then epoch 1 of its resume: both held the lock against another process.
    assert LockProbe.refused == [True, True]


def test_release_removes_the_lock_file_and_acquire_skips_a_removed_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert runguard.acquire(run, resume=False)
    assert (run / runguard.LOCK_FILE).is_file()
    runguard.release(run)
    assert not (run / runguard.LOCK_FILE).exists()
    # A second process opened the file just before the holder removed it and dropped its lock: its flock then
    # succeeds on a removed file. acquire must notice and lock the file at the path instead.
    real_flock, calls = runguard.fcntl.flock, []

    def flock_after_the_holder_left(fd: int, op: int) -> None:
        if not calls:
            (run / runguard.LOCK_FILE).unlink()
        calls.append(op)
        real_flock(fd, op)

    monkeypatch.setattr(runguard.fcntl, "flock", flock_after_the_holder_left)
    assert runguard.acquire(run, resume=False)
    held = runguard._held[runguard._key(run)]
    assert len(calls) == 2, "acquire kept a lock on a removed file"
    assert os.fstat(held).st_ino == os.stat(run / runguard.LOCK_FILE).st_ino
    monkeypatch.undo()
    with pytest.raises(RunDirError, match="in use by another exprae run"):
        _locked_elsewhere(run)
    runguard.release(run)
    assert not (run / runguard.LOCK_FILE).exists()


def _locked_elsewhere(run: Path) -> None:
    """Try to take ``run``'s lock as another process would (a fresh open file description)."""
    runguard._lock_file(runguard._key(run))
