"""Real ``exprae-train`` / ``exprae-predict`` processes for the fault-injection tests, and waiting on them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from exprae.runs import rundir

SRC = Path(rundir.__file__).resolve().parents[2]
# trainer=cpu is deterministic mode; dropout stays on so the per-epoch reseeding is exercised.
RUN = [
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_epochs=8",
    "model.latent_dim=8",
    "model.hidden_dims=[64]",
    "model.dropout=0.2",
    "logger=none",
    "seed=3",
]
TIMEOUT_S = 300  # a loaded 2-core machine: a run that shows nothing for this long has failed


def start(module: str, *args: str) -> subprocess.Popen:
    """``python -m <module> <args>`` with this checkout's ``src`` first on the path, stdout/stderr captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def start_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """A short, seeded ``exprae-train`` run (:data:`RUN`) into ``run_dir``."""
    return start("exprae.train", *RUN, f"hydra.run.dir={run_dir}", *overrides)


def finish(proc: subprocess.Popen) -> None:
    """Wait for ``proc`` and require it to succeed, showing the end of its stderr if not."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def wait_until(proc: subprocess.Popen, done: Callable[[], bool], *, waiting_for: str) -> None:
    """Poll ``done`` while ``proc`` runs; fail if the process ends first or nothing happens in :data:`TIMEOUT_S`."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        assert proc.poll() is None, f"the process ended while waiting for {waiting_for}"
        assert time.monotonic() < deadline, f"{waiting_for} did not happen within {TIMEOUT_S} s"
        time.sleep(0.01)


def signal_mid_training(proc: subprocess.Popen, last: Path, signum: int, *, after_saves: int) -> None:
    """Send ``signum`` shortly after ``proc`` has written ``last.ckpt`` ``after_saves`` times (so mid-epoch)."""
    stamps: set[int] = set()

    def saved_enough() -> bool:
        if last.exists():
            stamps.add(last.stat().st_mtime_ns)
        return len(stamps) >= after_saves

    wait_until(proc, saved_enough, waiting_for=f"{after_saves} writes of {last.name}")
    time.sleep(0.15)  # into the next training epoch
    proc.send_signal(signum)
