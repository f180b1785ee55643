"""A real sweep through the Hydra multirun entry point, then the comparison report on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import exprae
from exprae import compare
from exprae.compare import decide, panels, summarize
from exprae.report import sweep_runs as sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOSSES = ("mse", "cosine")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """experiment=loss_sweep cut to 2 losses x 2 seeds x 2 epochs on pbmc68k, run as a user would (-m)."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    src = Path(exprae.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "exprae.train",
        "-m",
        "experiment=loss_sweep",
        f"loss={','.join(LOSSES)}",
        f"seed={','.join(map(str, SEEDS))}",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false",
        f"hydra.sweep.dir={out}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The sweep ends with the command to run next and an index of its job folders.
    assert f"exprae-compare {out}" in proc.stdout
    jobs = pd.read_csv(out / "jobs.csv")
    assert len(jobs) == len(LOSSES) * len(SEEDS) and jobs["finished"].all()
    first = jobs.loc[jobs["job"] == 0, "overrides"].item().split()
    assert f"loss={LOSSES[0]}" in first and f"seed={SEEDS[0]}" in first and "experiment=loss_sweep" in first
    return out


def _run_metrics(sweep_dir: Path) -> dict[str, dict]:
    """Each run's metrics.json and overrides, read directly (not through exprae.report.sweep_runs)."""
    runs = {}
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json")):
        overrides = (metrics_path.parent / ".hydra" / "overrides.yaml").read_text()
        runs[metrics_path.parent.name] = {"metrics": json.loads(metrics_path.read_text()), "overrides": overrides}
    return runs


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert image[..., :3].std() > 0.01, f"{path} is blank"


@pytest.mark.slow
def test_report_on_a_real_sweep(sweep_dir, capsys):
    runs = _run_metrics(sweep_dir)
    assert len(runs) == len(LOSSES) * len(SEEDS)

    assert compare.main([str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    report = compare.compare(sweep_dir)

    assert report.group_keys == ["loss"] and not report.failed
    assert list(report.summary["setting"]) == [f"loss={loss}" for loss in LOSSES]
    assert list(report.summary["n_runs"]) == [len(SEEDS)] * len(LOSSES)
    for loss in LOSSES:
        mine = [r["metrics"] for r in runs.values() if f"- loss={loss}\n" in r["overrides"]]
        assert len(mine) == len(SEEDS)
        row = report.summary.set_index("setting").loc[f"loss={loss}"]
        for stage in ("val", "test"):
            for who in ("model", "pca", "mean"):
                for metric in ("cosine", "mse", "pearson"):
                    values = [m[stage][who][metric] for m in mine]
                    col = f"{stage}/{who}/{metric}"
                    assert row[f"{col}/mean"] == pytest.approx(np.mean(values), rel=1e-12), col
                    assert row[f"{col}/sd"] == pytest.approx(np.std(values, ddof=1), rel=1e-9, abs=1e-12), col

    # The files agree with the in-memory report, and the markdown is what was printed.
    written = pd.read_csv(sweep_dir / "summary.csv")
    assert np.allclose(written["test/model/cosine/mean"], report.summary["test/model/cosine/mean"], rtol=1e-12)
    assert len(pd.read_csv(sweep_dir / "runs.csv")) == len(runs)
    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown.strip() == report.markdown
    # The terminal gets an aligned table (no markdown pipes) and the verdicts without emphasis marks.
    assert compare.text_table(report.summary) in printed and "| exprae |" not in printed and "**" not in printed
    assert "![Final metrics per setting](metrics.png)" in markdown and "![Validation curves" in markdown
    # cells.csv in every run: the verdicts carry the paired per-cell bootstrap of best vs runner-up.
    assert all(v.paired is not None and v.paired.n_pairs == len(SEEDS) for v in report.verdicts)
    assert "Paired cell by cell (70 test cells, 2 run pair(s) by seed" in markdown
    page = (sweep_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "Paired cell by cell" in page
    assert "<td class=text>loss=mse</td>" in page
    for loss in LOSSES:
        assert f"| exprae | loss={loss} | {len(SEEDS)} |" in markdown
    assert "| PCA | 32 comps, all settings |" in markdown and "| mean profile | all settings |" in markdown

    # The verdicts name the best setting by the numbers in the table.
    by_setting = report.summary.set_index("setting")
    cosine, mse = report.verdicts
    assert cosine.best == by_setting["test/model/cosine/mean"].idxmax()
    assert mse.best == by_setting["test/model/mse/mean"].idxmin()
    assert cosine.exceeds_spread is not None and f"best is **{cosine.best}**" in markdown

    for name in ("metrics.png", "curves.png"):
        _assert_png(sweep_dir / name)


@pytest.mark.slow
def test_curves_come_from_the_fit_and_match_the_best_checkpoint(sweep_dir):
    """Per-epoch val curves have one point per trained epoch; the MSE run's best val MSE is its reported one."""
    for name, run in _run_metrics(sweep_dir).items():
        curves = sweep.read_curves(sweep_dir / name)
        assert set(curves["tag"]) == {"val/cosine", "val/mse"}
        epochs = curves.loc[curves["tag"] == "val/mse", "epoch"].tolist()
        assert epochs == list(range(run["metrics"]["epochs_trained"]))  # trainer.current_epoch after fit: a count
        if "- loss=mse\n" in run["overrides"]:
            # The checkpoint monitors val/loss, which for the MSE loss is val/mse: its best epoch is the reported one.
            best = curves.loc[curves["tag"] == "val/mse", "value"].min()
            start = run["metrics"]["start"]  # the PCA start competes with the epochs for best.ckpt
            if start["kept"]:
                assert start["score"] <= best
                best = start["score"]
            assert run["metrics"]["val"]["model"]["mse"] == pytest.approx(best, rel=1e-5)


@pytest.mark.slow
def test_hparams_reach_tensorboard_for_every_run(sweep_dir):
    """Each run writes its hyperparameters (session start/end, no per-run experiment) and the final metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    for name, run in _run_metrics(sweep_dir).items():
        acc = EventAccumulator(str(sweep_dir / name / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        assert metadata.EXPERIMENT_TAG not in content  # else TensorBoard keeps one run's columns for the sweep
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert end.status == api_pb2.STATUS_SUCCESS
        assert start.hparams["seed"].number_value == run["metrics"]["seed"]
        assert start.hparams["model.latent_dim"].number_value == 32
        # The class name, not "_target_"/"_partial_" keys; booleans as words; the trainer and early stopping too.
        loss_class = start.hparams["loss"].string_value
        assert loss_class == run["metrics"]["loss"]
        assert not [k for k in start.hparams if "_target_" in k or "_partial_" in k]
        assert start.hparams["trainer.deterministic"].string_value in ("true", "false", "warn")
        # experiment=loss_sweep sets early stopping's patience to 10 (the default config has 20)
        assert start.hparams["callbacks.early_stopping.patience"].number_value == 10
        assert start.hparams["trainer.max_epochs"].number_value == 2
        hp_cosine = acc.Scalars("hp/test_cosine")[-1].value
        assert hp_cosine == pytest.approx(run["metrics"]["test"]["model"]["cosine"], rel=1e-6)
        hparams_yaml = (sweep_dir / name / "tensorboard" / "hparams.yaml").read_text()
        assert "loss: " + loss_class in hparams_yaml


@pytest.mark.slow
def test_crashed_and_broken_runs_are_listed_and_the_rest_reported(sweep_dir, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "*.png", "*.csv", "*.md"))
    # A job that died after Hydra wrote its config (no metrics.json), and one whose metrics.json is cut short.
    crashed = copy / "7"
    shutil.copytree(copy / "0" / ".hydra", crashed / ".hydra")
    (copy / "1" / "metrics.json").write_text('{"val": {"model": {')

    report = compare.compare(copy)

    assert sorted(r.name for r in report.failed) == ["1", "7"]
    problems = {r.name: r.problem for r in report.failed}
    assert "no metrics.json" in problems["7"] and "malformed metrics.json" in problems["1"]
    assert int(report.summary["n_runs"].sum()) == len(LOSSES) * len(SEEDS) - 1
    assert set(report.summary["setting"]) == {f"loss={loss}" for loss in LOSSES}
    markdown = (copy / "summary.md").read_text()
    assert "Runs that could not be scored (2)" in markdown and "`7` (" in markdown
    _assert_png(copy / "metrics.png")


# ---------------------------------------------------------------- fast: the verdict and the CLI


def _table(values: dict[str, list[float]]) -> pd.DataFrame:
    """A runs table as sweep.metrics_table builds it, with only the test cosine/MSE columns filled in."""
    rows = []
    for loss, scores in values.items():
        for seed, score in enumerate(scores):
            rows.append(
                {
                    "run": f"{loss}{seed}",
                    "seed": seed,
                    "loss": loss,
                    "test/model/cosine": score,
                    "test/model/mse": 1 - score,
                }
            )
    return pd.DataFrame(rows)


def test_verdict_separates_a_real_gap_from_seed_noise():
    scores = {"mse": [0.40, 0.401, 0.399], "mixed_a50": [0.449, 0.452, 0.446], "cosine": [0.45, 0.451, 0.449]}
    clear = decide(summarize(_table(scores), ["loss"]), metric="cosine")
    assert clear.best == "loss=cosine" and [g.setting for g in clear.gaps] == ["loss=mixed_a50", "loss=mse"]
    tie, far = clear.gaps
    assert tie.exceeds_spread is False and clear.exceeds_spread is False  # the runner-up is within the noise
    assert far.difference == pytest.approx(0.05) and far.pooled_sd == pytest.approx(0.001)
    assert far.exceeds_spread is True and far.p_value < 1e-4
    assert "no clear winner" in clear.sentence()
    assert "Clearly behind the best: loss=mse; within its spread: loss=mixed_a50." in clear.sentence()

    mse = decide(summarize(_table(scores), ["loss"]), metric="mse")
    assert mse.best == "loss=cosine" and not mse.higher_is_better  # lowest MSE (1 - 0.45) wins
    assert mse.runner_up.difference == pytest.approx(0.001)  # MSE 0.551 vs 0.550

    two = decide(
        summarize(_table({"mse": [0.40, 0.401, 0.399], "cosine": [0.45, 0.451, 0.449]}), ["loss"]), metric="cosine"
    )
    assert two.exceeds_spread is True and "the difference exceeds the seed-to-seed spread" in two.sentence()

    # 6 sd apart with two seeds each is not significant (p ~ 0.1): too few seeds, not "within the spread".
    few = decide(summarize(_table({"mse": [0.4065, 0.4071], "cosine": [0.4058, 0.4058]}), ["loss"]), metric="cosine")
    assert few.exceeds_spread is False and few.runner_up.difference > 2 * few.runner_up.pooled_sd
    assert "not significant with 2 seeds (p ≥ 0.05), **no clear winner yet**" in few.sentence()
    assert "within the seed-to-seed spread" not in few.sentence()
    assert few.headline() == (
        f"test cosine: loss=mse best, by {few.runner_up.difference:.4f} over loss=cosine: no clear winner yet (2 seeds)"
    )
    assert two.headline().endswith(": exceeds the seed spread") and clear.headline().endswith(": no clear winner")

    single = decide(summarize(_table({"mse": [0.40], "cosine": [0.45]}), ["loss"]), metric="cosine")
    assert single.exceeds_spread is None and "cannot tell" in single.sentence()


def test_gap_p_value_is_welchs_t_test_from_scipy():
    """Unequal seed counts and spreads, where Welch's and Student's t-tests give clearly different p-values."""
    from scipy import stats

    best, other = [0.452, 0.450, 0.449, 0.451, 0.447, 0.453], [0.440, 0.452, 0.431]
    verdict = decide(summarize(_table({"cosine": best, "mse": other}), ["loss"]), metric="cosine")
    gap = verdict.runner_up
    welch = stats.ttest_ind(best, other, equal_var=False).pvalue
    student = stats.ttest_ind(best, other, equal_var=True).pvalue
    assert abs(welch - student) > 0.05  # the case can tell the two tests apart
    assert gap.p_value == pytest.approx(welch, rel=1e-9)
    assert gap.difference == pytest.approx(np.mean(best) - np.mean(other))
    assert gap.exceeds_spread is bool(welch < compare.ALPHA)


def _study_table() -> pd.DataFrame:
    """Two representations x two losses x two latent sizes x 2 seeds; each representation has its own mean profile."""
    rows = []
    for data, floor in (("pbmc68k", -0.02), ("pbmc68k_log", 0.73)):
        for loss in ("mse", "cosine"):
            for latent in (8, 32):
                for seed in (0, 1):
                    score = floor + 0.4 + 0.01 * (loss == "cosine") + 0.05 * (latent == 32) + 0.001 * seed
                    rows.append(
                        {
                            "run": f"{data}{loss}{latent}{seed}",
                            "seed": seed,
                            "data": data,
                            "loss": loss,
                            "model.latent_dim": latent,
                            "test/model/cosine": score,
                            "test/model/mse": 1 - score,
                            "test/mean/cosine": floor,
                            "test/mean/mse": 1 - floor,
                            # the baseline's "loss" value depends on the loss: it must not split the panels
                            "test/mean/loss": 1 - floor if loss == "mse" else 1 + floor,
                        }
                    )
    return pd.DataFrame(rows)


def test_verdicts_never_rank_settings_scored_on_different_representations():
    keys = ["data", "loss", "model.latent_dim"]
    summary = summarize(_study_table(), keys)
    found = panels(summary, keys)
    assert [label for label, _ in found] == ["data=pbmc68k", "data=pbmc68k_log"]
    for label, members in found:
        assert set(members["data"]) == {label.split("=")[1]} and len(members) == 4
        best = decide(members, metric="cosine", panel=label)
        # Within each representation the cosine loss at latent 32 wins; the log data's higher floor never does.
        assert best.best == f"{label}, loss=cosine, model.latent_dim=32"
        assert best.sentence().startswith(f"within {label}, **cosine**")

    by_latent = panels(summary, keys, within=["model.latent_dim"])
    assert [label for label, _ in by_latent] == [
        "data=pbmc68k, model.latent_dim=8",
        "data=pbmc68k, model.latent_dim=32",
        "data=pbmc68k_log, model.latent_dim=8",
        "data=pbmc68k_log, model.latent_dim=32",
    ]
    assert all(len(members) == 2 for _, members in by_latent)

    one_representation = _study_table().query("data == 'pbmc68k'")
    keys = ["loss", "model.latent_dim"]
    assert [label for label, _ in panels(summarize(one_representation, keys), keys)] == [""]
    with pytest.raises(ValueError, match=r"--within optimizer.lr: not swept.*\['loss', 'model.latent_dim'\]"):
        panels(summarize(one_representation, keys), keys, within=["optimizer.lr"])


def test_cli_within_splits_the_verdicts_of_a_real_sweep(sweep_dir, capsys):
    assert compare.main([str(sweep_dir), "--no-plots", "--within", "loss"]) == 0
    out = capsys.readouterr().out
    for loss in LOSSES:
        assert f"- within loss={loss}, cosine (test, higher is better): best is loss={loss}" in out
    assert compare.main([str(sweep_dir), "--no-plots", "--within", "model.latent_dim"]) == 1
    assert "--within model.latent_dim: not swept" in capsys.readouterr().err


def test_cli_fails_clearly_without_runs(tmp_path, capsys):
    assert compare.main([str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert compare.main([str(tmp_path)]) == 1
    assert "no Hydra runs" in capsys.readouterr().err


# ---------------------------------------------------------------- launchers


def test_joblib_launcher_composes(compose_cfg):
    import hydra_plugins.hydra_joblib_launcher  # noqa: F401  (in the dev extra: missing is a failure, not a skip)

    cfg = compose_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=loss_sweep")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    assert cfg.hydra.sweeper.params.loss == "mse,mixed_a75,mixed_a50,mixed_a25,cosine"


def test_slurm_launcher_composes_to_one_gpu_per_run(compose_cfg):
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = compose_cfg(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=gpu", "experiment=loss_sweep", fast=False
    )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith("SlurmLauncher")
    assert (launcher_cfg.gpus_per_node, launcher_cfg.tasks_per_node, launcher_cfg.nodes) == (1, 1, 1)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    instantiate(launcher_cfg)  # the plugin accepts every key

    # Every key is one submitit's SLURM executor knows (a typo would only fail on the cluster, at submission).
    from submitit.slurm.slurm import SlurmExecutor

    known = set(OmegaConf.structured(BaseQueueConf).keys()) | SlurmExecutor._valid_parameters() | {"_target_"}
    known |= {"max_num_timeout", "array_parallelism", "setup", "additional_parameters"}  # the plugin's own
    assert set(launcher_cfg.keys()) <= known, set(launcher_cfg.keys()) - known
    assert SlurmExecutor._equivalence_dict()["gpus_per_node"] == "gpus_per_node"  # sbatch --gpus-per-node


def test_study_tables_script_reads_a_real_sweep(sweep_dir, tmp_path):
    """scripts/study_tables.py (the docs' tables) reads runs through exprae.report.sweep_runs and lists unfinished ones."""
    unfinished = tmp_path / "other" / "0" / ".hydra"
    unfinished.mkdir(parents=True)
    (unfinished / "overrides.yaml").write_text("- loss=mse\n")
    script = Path(exprae.__file__).resolve().parents[2] / "scripts" / "study_tables.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(sweep_dir), str(tmp_path / "other")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    runs = _run_metrics(sweep_dir)
    out = proc.stdout
    assert f"{len(runs)} finished runs; unfinished: {tmp_path / 'other' / '0'}" in out
    for loss in LOSSES:
        cosines = [r["metrics"]["test"]["model"]["cosine"] for r in runs.values() if f"loss={loss}" in r["overrides"]]
        assert f"| {loss} | {len(cosines)} | {np.mean(cosines):.4f} ± {np.std(cosines, ddof=1):.4f} |" in out
