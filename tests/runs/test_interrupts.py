"""Fault injection: SIGTERM, SIGINT and SIGKILL at several points of training and prediction.

(SIGKILL of a training run, then ``ckpt_path=last``, is ``tests/runs/test_resume.py``.)

Afterwards the exit status is non-zero, nothing partial is left (no metrics.json, no output .h5ad, no
temporary file that outlives its writer), and ``ckpt_path=last`` finishes with the metrics of an
uninterrupted run. Each test starts real ``exprae-train`` / ``exprae-predict`` processes, so all are slow.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from run_process import finish, signal_mid_training, start, start_train, wait_until

from exprae.runs import rundir

pytestmark = pytest.mark.slow


def _stop_mid_training(proc: subprocess.Popen, last: Path, signum: int) -> str:
    """Send ``signum`` once ``last.ckpt`` has been written twice; return stderr after the process ends."""
    signal_mid_training(proc, last, signum, after_saves=2)
    _, err = proc.communicate(timeout=120)
    return err


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The metrics of the uninterrupted run every interrupted one must end with."""
    run = tmp_path_factory.mktemp("straight") / "run"
    finish(start_train(run))
    return json.loads((run / rundir.METRICS_FILE).read_text())


def _same_metrics(a: dict, b: dict) -> None:
    assert a["epochs_trained"] == b["epochs_trained"]
    for stage in ("val", "test"):
        for name, value in a[stage]["model"].items():
            assert b[stage]["model"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (stage, name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_says_so_exits_non_zero_and_resumes_to_the_same_metrics(tmp_path, straight, signum):
    run = tmp_path / "run"
    err = _stop_mid_training(start_train(run), run / "checkpoints" / "last.ckpt", signum)
    name = signal.Signals(signum).name
    assert f"was stopped by {name} before it finished; metrics.json was not written" in err, err[-2000:]
    assert f"hydra.run.dir={run} ckpt_path=last" in err and "Traceback" not in err, err[-2000:]
    assert not (run / rundir.METRICS_FILE).exists()
    proc = start_train(run, "ckpt_path=last")
    finish(proc)
    assert proc.returncode == 0
    _same_metrics(straight, json.loads((run / rundir.METRICS_FILE).read_text()))


def test_a_run_stopped_before_its_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = start_train(run)
    # The data is loaded; no epoch has ended yet.
    wait_until(proc, (run / rundir.CONTRACT_FILE).exists, waiting_for=rundir.CONTRACT_FILE)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    if not (run / "checkpoints" / "last.ckpt").exists():
        assert "No checkpoint had been written yet, so there is nothing to resume" in err, err[-2000:]
    assert not (run / rundir.METRICS_FILE).exists()


# ---------------------------------------------------------------- exprae-predict


@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory, pbmc_run) -> tuple[Path, Path]:
    """A run and an input large enough (pbmc68k x 20) that predict can be stopped while it works."""
    from exprae.data.datasets import pbmc68k

    folder = tmp_path_factory.mktemp("predict_in")
    adata = pbmc68k()
    big = ad.concat([adata] * 20, index_unique="-")
    path = folder / "big.h5ad"
    big.write_h5ad(path)
    return pbmc_run, path


def _predict(run: Path, data: Path, out: Path) -> subprocess.Popen:
    return start("exprae.predict", f"ckpt={run}", f"data.path={data}", f"out={out}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_predict_leaves_no_output(tmp_path, predict_inputs, signum):
    run, data = predict_inputs
    n_cells = ad.read_h5ad(data, backed="r").n_obs
    for delay in (1.0, 5.0):  # during start-up, loading, embedding or writing: whichever it reaches
        out = tmp_path / f"out-{delay}.h5ad"
        proc = _predict(run, data, out)
        time.sleep(delay)
        if proc.poll() is not None:
            pytest.fail(f"predict finished within {delay} s; the input is too small to interrupt it")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, err[-2000:]
        if out.exists():  # the signal came after the one rename that writes it: complete, never partial
            assert delay > 1.0, "an output within 1 s: the start-up alone takes longer"
            written = ad.read_h5ad(out, backed="r")
            assert written.n_obs == n_cells and np.isfinite(written.obs["exprae_cosine"]).all()
            if proc.returncode == 128 + signum:
                assert "the output is complete" in err, err[-2000:]
            continue
        if proc.returncode == 128 + signum:
            assert "nothing was written" in err, err[-2000:]
        else:  # stopped before the handler was installed (imports), or by SIGKILL: killed by the signal itself
            assert proc.returncode == -signum, (proc.returncode, err[-2000:])
    # A temporary file a SIGKILL left behind is removed by the next predict to the same output.
    out = tmp_path / "out-1.0.h5ad"
    done = _predict(run, data, out)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-2000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp.h5ad")] == []
    assert np.isfinite(ad.read_h5ad(out, backed="r").obs["exprae_cosine"]).all()
