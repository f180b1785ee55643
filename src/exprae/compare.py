"""Sweep report (``exprae-compare DIR``): which setting wins on cosine and on MSE, and is it more than noise?

exprae-compare multirun/2026-11-22/10-00-00

Groups a sweep's finished runs by the overrides that differ between them (all but the seed), and writes
into the sweep directory ``runs.csv`` (one row per run), ``summary.csv`` (mean, sd and n over seeds per
setting), ``summary.md`` (the table and the verdicts) and the plots ``metrics.png`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from scipy import stats

from exprae.report import mcv_latent
from exprae.report.paired import STATISTICS, PairedDifference, pair_runs, paired_bootstrap
from exprae.report.sweep_runs import (
    STAGES,
    Run,
    find_runs,
    metrics_table,
    read_curves,
    read_history,
    setting_labels,
)
from exprae.runs import rundir

log = logging.getLogger(__name__)

Stage = Literal["val", "test"]
TABLE_METRICS = (("cosine", "cosine"), ("mse", "MSE"), ("pearson", "Pearson"))
HIGHER_IS_BETTER = {"cosine": True, "pearson": True, "mse": False, "mcv_mse": False}
SCORED_LABELS = {"model": "exprae", "pca": "PCA", "mean": "mean profile"}
ALPHA = 0.05  # significance level of the Welch t-test behind "exceeds the seed-to-seed spread"


@dataclass(frozen=True)
class Gap:
    """How far one setting is behind the best, and whether that exceeds the seed-to-seed spread."""

    setting: str
    mean: float
    sd: float
    n: int
    difference: float  # how much better the best is (positive)
    pooled_sd: float  # of the best and this setting, over seeds
    p_value: float  # Welch's t-test; nan when it cannot be computed

    @property
    def exceeds_spread(self) -> bool | None:
        """True if the gap is larger than seed-to-seed noise (Welch p < ALPHA); None with under 2 seeds."""
        if self.n < 2 or math.isnan(self.pooled_sd):
            return None
        if self.pooled_sd == 0:
            return self.difference > 0
        return bool(self.p_value < ALPHA)


@dataclass(frozen=True)
class Verdict:
    """The best setting on one metric and its gap to every other setting, the runner-up first."""

    metric: str
    stage: str
    higher_is_better: bool
    best: str
    best_mean: float
    best_sd: float
    best_n: int
    gaps: tuple[Gap, ...] = ()
    pca_mean: float = math.nan
    panel: str = ""  # the settings compared, when a sweep splits into panels scored on different data
    paired: PairedDifference | None = None  # best − runner-up, cell by cell on the same held-out cells

    @property
    def runner_up(self) -> Gap | None:
        return self.gaps[0] if self.gaps else None

    @property
    def exceeds_spread(self) -> bool | None:
        """Whether the best beats the runner-up by more than the seed-to-seed spread (None: cannot tell)."""
        return None if self.runner_up is None else self.runner_up.exceeds_spread

    def _status(self, *, short: bool) -> str:
        """Whether the runner-up is clearly behind, in a clause (``short``: for a figure's headline)."""
        second = self.runner_up
        exceeds = None if second is None else second.exceeds_spread
        if exceeds is None:
            return "cannot tell (< 2 seeds)" if short else "cannot tell with fewer than 2 seeds per setting"
        if exceeds:
            return "exceeds the seed spread" if short else "**the difference exceeds the seed-to-seed spread**"
        if second.pooled_sd > 0 and second.difference > 2 * second.pooled_sd:
            # Several sd apart yet not significant: too few seeds to tell, which is not "within the spread".
            n = min(self.best_n, second.n)
            if short:
                return f"no clear winner yet ({n} seeds)"
            return (
                f"larger than the seed-to-seed sd but not significant with {n} seeds (p ≥ {ALPHA:g}), "
                "**no clear winner yet**; more seeds would tell"
            )
        return "no clear winner" if short else "within the seed-to-seed spread, **no clear winner**"

    def headline(self) -> str:
        """The verdict in one short line, for a figure: best, lead over the runner-up in units, and status."""
        name = dict(TABLE_METRICS).get(self.metric, self.metric)
        where = f"{self.panel}: " if self.panel else ""
        second = self.runner_up
        if second is None:
            return f"{where}{self.stage} {name}: {self.best} (the only setting)"
        return (
            f"{where}{self.stage} {name}: {self.best} best, by {second.difference:.4f} over {second.setting}: "
            f"{self._status(short=True)}"
        )

    def sentence(self) -> str:
        """The verdict in plain words."""
        direction = "higher" if self.higher_is_better else "lower"
        name = dict(TABLE_METRICS).get(self.metric, self.metric)
        where = f"within {self.panel}, " if self.panel else ""
        text = (
            f"{where}**{name}** ({self.stage}, {direction} is better): best is **{self.best}** with "
            f"{_pm(self.best_mean, self.best_sd)} over {self.best_n} seed(s)"
        )
        second = self.runner_up
        if second is None:
            return text + "; it is the only setting."
        relative = f", {abs(second.difference / second.mean):.1%} of the runner-up's value" if second.mean else ""
        text += (
            f"; next is {second.setting} with {_pm(second.mean, second.sd)}. The best is better by "
            f"{second.difference:.4f} {name}{relative}"
        )
        if not math.isnan(second.pooled_sd):
            text += f" vs pooled seed-to-seed sd {second.pooled_sd:.2g}"
        if second.pooled_sd > 0:
            text += f" ({second.difference / second.pooled_sd:.1f} sd, Welch t-test p = {second.p_value:.2g})"
        text += f": {self._status(short=False)}."
        tied = [g.setting for g in self.gaps if g.exceeds_spread is False]
        behind = [g.setting for g in self.gaps if g.exceeds_spread]
        if len(self.gaps) > 1 and (tied or behind):
            text += f" Clearly behind the best: {', '.join(behind) or 'none'}; within its spread: {', '.join(tied) or 'none'}."
        if self.paired is not None:
            p = self.paired
            parts = ", ".join(f"{stat} {p.intervals[stat].text()}" for stat in STATISTICS)
            text += (
                f" Paired cell by cell ({p.n_cells} {self.stage} cells, {p.n_pairs} run pair(s) by seed; best − next, "
                f"95 % bootstrap interval over cells{' and seeds' if p.n_pairs > 1 else ''}): {parts}."
            )
        if not math.isnan(self.pca_mean):
            gap = self.best_mean - self.pca_mean
            better = gap > 0 if self.higher_is_better else gap < 0
            text += f" PCA on the same cells: {self.pca_mean:.4f}; the best setting is {abs(gap):.2g} {'better' if better else 'worse'}."
        return text


@dataclass(frozen=True)
class Report:
    """Everything ``exprae-compare`` found and wrote."""

    sweep_dir: Path
    group_keys: list[str]
    runs: pd.DataFrame  # one row per finished run
    summary: pd.DataFrame  # one row per setting
    failed: list[Run]
    verdicts: list[Verdict]
    markdown: str
    files: list[Path]


def group_keys(table: pd.DataFrame, runs: Sequence[Run], *, seed_key: str = "seed") -> list[str]:
    """The overridden keys whose value differs between runs, in the order they were given; never the seed."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    return [k for k in keys if k != seed_key and k in table and table[k].fillna("(default)").nunique() > 1]


def summarize(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean, sample sd and count over seeds of every metric column, per setting (in first-run order)."""
    table = table.copy()
    for k in keys:
        table[k] = table[k].fillna("(default)").astype(str)
    table["setting"] = setting_labels(table, keys)
    metric_cols = [c for c in table.columns if c.count("/") == 2]
    grouped = table.groupby("setting", sort=False)
    summary = grouped[list(keys)].first() if keys else pd.DataFrame(index=grouped.size().index)
    summary["n_runs"] = grouped.size()
    summary["seeds"] = grouped["seed"].agg(lambda s: " ".join(str(v) for v in s))
    if "latent_dim" in table:
        summary["latent_dim"] = grouped["latent_dim"].agg(lambda s: "/".join(str(v) for v in s.unique()))
    stats = {}
    for col in metric_cols:
        stats[f"{col}/mean"] = grouped[col].mean()
        stats[f"{col}/sd"] = grouped[col].std(ddof=1)
    # All at once: with the MCV and truth scores there are hundreds of columns (pandas warns on one-by-one inserts).
    return pd.concat([summary, pd.DataFrame(stats, index=summary.index)], axis=1).reset_index()


def decide(summary: pd.DataFrame, *, metric: str, stage: Stage = "test", panel: str = "") -> Verdict:
    """Rank the settings on ``{stage}/model/{metric}`` and test the best against every other setting."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    col = f"{stage}/model/{metric}"
    higher = HIGHER_IS_BETTER[metric]
    ranked = summary.dropna(subset=[f"{col}/mean"]).sort_values(f"{col}/mean", ascending=not higher)
    if ranked.empty:
        raise ValueError(f"no finished run has {col}")
    best = ranked.iloc[0]
    common = {
        "metric": metric,
        "stage": stage,
        "higher_is_better": higher,
        "best": best["setting"],
        "best_mean": float(best[f"{col}/mean"]),
        "best_sd": float(best[f"{col}/sd"]),
        "best_n": int(best["n_runs"]),
        "pca_mean": float(best.get(f"{stage}/pca/{metric}/mean", math.nan)),
        "panel": panel,
    }
    gaps = tuple(_gap(best, other, col=col, higher_is_better=higher) for _, other in ranked.iloc[1:].iterrows())
    return Verdict(**common, gaps=gaps)


def panels(summary: pd.DataFrame, keys: Sequence[str], *, within: Sequence[str] = ()) -> list[tuple[str, pd.DataFrame]]:
    """Split the settings into groups whose scores can be ranked against each other.

    Settings are comparable when their mean-profile baseline is identical: the same held-out cells in the
    same representation. A cosine of 0.93 on normalised data is not "better" than 0.41 on scaled data, so a
    sweep over ``data`` gets one verdict per representation; a latent-size sweep (same cells, same mean
    profile) stays one panel. ``within`` splits further by the named keys (e.g. ``model.latent_dim``).
    """
    missing = [k for k in within if k not in keys]
    if missing:
        raise ValueError(f"--within {', '.join(missing)}: not swept in this sweep; swept keys: {list(keys)}")
    # The mean profile's scores depend only on the cells and their representation.
    signature = _baseline_key(summary, "mean")
    for k in within:
        signature = signature + "|" + summary[k].astype(str)
    groups = [members for _, members in summary.groupby(signature, sort=False)]
    if len(groups) == 1:
        return [("", summary)]
    out = []
    for members in groups:
        fixed = [k for k in keys if members[k].nunique() == 1 and summary[k].nunique() > 1]
        out.append((", ".join(f"{k}={members[k].iloc[0]}" for k in fixed) or "one group", members))
    return out


def _gap(best: pd.Series, other: pd.Series, *, col: str, higher_is_better: bool) -> Gap:
    """Difference of means, pooled sd and Welch's t-test between the best setting and another."""
    m1, s1, n1 = float(best[f"{col}/mean"]), float(best[f"{col}/sd"]), int(best["n_runs"])
    m2, s2, n2 = float(other[f"{col}/mean"]), float(other[f"{col}/sd"]), int(other["n_runs"])
    pooled = math.nan
    if min(n1, n2) >= 2:
        pooled = math.sqrt(((n1 - 1) * s1**2 + (n2 - 1) * s2**2) / (n1 + n2 - 2))
    p_value = math.nan
    if pooled > 0:
        p_value = float(stats.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False).pvalue)
    difference = m1 - m2 if higher_is_better else m2 - m1
    return Gap(other["setting"], m2, s2, n2, difference=difference, pooled_sd=pooled, p_value=p_value)


def table_rows(summary: pd.DataFrame) -> list[list[str]]:
    """The header and one row per setting, then the baselines; each cell ``mean ± sd`` over seeds."""
    cols = [(stage, m, label) for stage in STAGES for m, label in TABLE_METRICS]
    rows = [["scored", "setting", "n", *(f"{s} {label}" for s, _, label in cols)]]

    def cells(row: pd.Series, who: str) -> list[str]:
        return [_pm(row[f"{s}/{who}/{m}/mean"], row[f"{s}/{who}/{m}/sd"]) for s, m, _ in cols]

    for _, row in summary.iterrows():
        rows.append(["exprae", str(row["setting"]), str(row["n_runs"]), *cells(row, "model")])
    for who in ("pca", "mean"):
        for label, row, n in _baseline_rows(summary, who):
            rows.append([SCORED_LABELS[who], label, str(n), *cells(row, who)])
    return rows


def markdown_table(summary: pd.DataFrame) -> str:
    """:func:`table_rows` as a markdown table."""
    header, *body = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def text_table(summary: pd.DataFrame) -> str:
    """:func:`table_rows` aligned in columns for a terminal (numbers right-aligned)."""
    rows = table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def _baseline_key(summary: pd.DataFrame, who: str) -> pd.Series:
    """Per setting, a key that is equal exactly where baseline ``who`` scored the same (its cosine, MSE and Pearson;
    not its "loss", which depends on the loss): the same cells, representation and, for PCA, size."""
    cols = [c for s in STAGES for m, _ in TABLE_METRICS if (c := f"{s}/{who}/{m}/mean") in summary]
    return summary[cols].round(6).astype(str).agg("|".join, axis=1) if cols else pd.Series("", index=summary.index)


def _baseline_rows(summary: pd.DataFrame, who: str) -> list[tuple[str, pd.Series, int]]:
    """One row per distinct baseline result: settings that share the same baseline (same cells, same PCA size)
    are merged, so a loss sweep shows PCA once, a latent-size sweep once per size."""
    cols = [f"{s}/{who}/{m}/mean" for s in STAGES for m, _ in TABLE_METRICS]
    if not set(cols) <= set(summary.columns):
        return []
    rows = []
    for _, members in summary.groupby(_baseline_key(summary, who), sort=False):
        first = members.iloc[0]
        label = "all settings" if len(members) == len(summary) else "; ".join(members["setting"])
        if who == "pca" and "latent_dim" in members:
            label = f"{'/'.join(str(k) for k in members['latent_dim'].unique())} comps, {label}"
        rows.append((label, first, int(members["n_runs"].sum())))
    return rows


def compare(
    sweep_dir: str | Path,
    *,
    seed_key: str = "seed",
    stage: Stage = "test",
    plots: bool = True,
    within: Sequence[str] = (),
) -> Report:
    """Read a sweep directory, write ``runs.csv``, ``summary.csv``, ``summary.md`` and the plots into it.

    The verdicts rank settings only against settings scored on the same cells and representation (see
    :func:`panels`); ``within`` splits them further by swept keys.
    """
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    failed = [r for r in runs if not r.finished]
    table = metrics_table(runs)
    if table.empty:
        found = f"{len(runs)} run(s), none finished" if runs else "no Hydra runs (no .hydra/ folders)"
        reasons = [f"{r.name}: {r.problem}" for r in failed if r.problem]
        if reasons:  # a sweep whose every job failed says why, as the table of unscored runs would
            found += f" ({'; '.join(reasons[:5])}{'; …' if len(reasons) > 5 else ''})"
        raise ValueError(f"nothing to compare in {sweep_dir}: {found}")
    keys = group_keys(table, runs, seed_key=seed_key)
    summary = summarize(table, keys)
    # With a molecule split (data.mcv) the judge comes first: mcv_mse on the held-out molecules measures
    # denoising, which reconstruction of the noisy input (cosine, MSE) cannot (docs/mcv.md).
    judged = ("mcv_mse",) if f"{stage}/model/mcv_mse/mean" in summary else ()
    verdicts = [
        _with_paired(decide(members, metric=m, stage=stage, panel=label), runs, table, keys)
        for label, members in panels(summary, keys, within=within)
        for m in (*judged, "cosine", "mse")
    ]
    _warn_hidden_differences(runs, table, keys, seed_key=seed_key)

    files = [
        rundir.write_text_atomic(sweep_dir / "runs.csv", table.to_csv(index=False)),
        rundir.write_text_atomic(sweep_dir / "summary.csv", summary.to_csv(index=False)),
    ]
    if plots:
        from exprae.report import figures as sweep_plots

        curves = _curves(runs, table, keys)
        headlines = [v.headline() for v in verdicts]
        files.append(
            sweep_plots.metrics_figure(table, summary, keys, path=sweep_dir / "metrics.png", verdict=headlines)
        )
        if not curves.empty:
            files.append(sweep_plots.curves_figure(curves, summary, path=sweep_dir / "curves.png"))
        else:  # never leave an earlier report's curves next to this report's table
            (sweep_dir / "curves.png").unlink(missing_ok=True)
    figures = [p.name for p in files if p.suffix == ".png"]
    markdown = _markdown(sweep_dir, summary, keys, verdicts, failed, stage=stage, figures=figures)
    markdown = "\n".join([markdown, *mcv_latent.markdown_section(summary, keys, stage=stage, decide=decide)])
    files.insert(2, rundir.write_text_atomic(sweep_dir / "summary.md", markdown + "\n"))
    report = Report(sweep_dir, keys, table, summary, failed, verdicts, markdown, files)
    html_path = rundir.write_text_atomic(sweep_dir / "report.html", sweep_html(report, stage=stage, figures=figures))
    files.insert(3, html_path)
    return report


def sweep_html(report: Report, *, stage: str, figures: Sequence[str] = ()) -> str:
    """``report.html`` of a sweep: the table, the verdicts (with the paired per-cell intervals), the figures inline."""
    import html

    from exprae.report import html as page_parts

    header, *rows = table_rows(report.summary)
    n_runs = int(report.summary["n_runs"].sum())
    swept = ", ".join(report.group_keys) or "nothing but the seed"
    verdicts = "".join(f"<li>{html.escape(v.sentence()).replace('**', '')}</li>" for v in report.verdicts)
    parts = [
        f"<h1>exprae sweep</h1><p class=meta>{html.escape(str(report.sweep_dir))}<br>{n_runs} finished run(s) "
        f"grouped by {html.escape(swept)}; mean ± sd over seeds, per cell on the held-out cells.</p>",
        "<h2>Results</h2>",
        page_parts.table(header, rows, text_columns=2, classes=["model" if r[0] == "exprae" else "" for r in rows]),
        f"<h2>Verdict ({html.escape(stage)} cells)</h2><ul>{verdicts}</ul>",
    ]
    captions = {"metrics.png": "Final metrics per setting", "curves.png": "Validation curves per setting"}
    for name in figures:
        parts += [f"<h2>{captions.get(name, name)}</h2>", page_parts.img_file(report.sweep_dir / name, alt=name)]
    if report.failed:
        items = "".join(f"<li>{html.escape(r.name)}: {html.escape(str(r.problem))}</li>" for r in report.failed)
        parts.append(f"<h2>Runs that could not be scored ({len(report.failed)})</h2><ul>{items}</ul>")
    return page_parts.page(f"exprae sweep {report.sweep_dir.name}", "".join(parts))


def terminal_text(report: Report, *, stage: str = "test") -> str:
    """The report for a terminal: the aligned table, the verdicts without markdown emphasis, failed runs."""
    n_runs = int(report.summary["n_runs"].sum())
    swept = ", ".join(report.group_keys) or "nothing but the seed"
    lines = [
        f"Sweep {report.sweep_dir}: {n_runs} finished run(s) grouped by {swept}; mean ± sd over seeds, per cell "
        "on the held-out cells (the baselines on the same cells).",
        "",
        text_table(report.summary),
        "",
        f"Verdict ({stage} cells):",
        *(f"- {v.sentence().replace('**', '')}" for v in report.verdicts),
    ]
    if report.failed:
        lines += ["", f"Runs that could not be scored ({len(report.failed)}):"]
        lines += [f"- {r.name} ({_override_text(r)}): {r.problem}" for r in report.failed]
    return "\n".join(lines)


def _with_paired(verdict: Verdict, runs: Sequence[Run], table: pd.DataFrame, keys: Sequence[str]) -> Verdict:
    """The verdict with the paired per-cell bootstrap of best vs runner-up, where both runs saved ``cells.csv``."""
    if verdict.runner_up is None:
        return verdict
    paths = {r.name: r.path for r in runs if r.finished}
    labels = setting_labels(table, keys)

    def keyed(setting: str) -> dict[tuple, Path]:
        rows = table[labels == setting]
        return {(row["split_seed"], row["seed"]): paths[row["run"]] for _, row in rows.iterrows()}

    pairs = pair_runs(keyed(verdict.best), keyed(verdict.runner_up.setting), stage=verdict.stage, column=verdict.metric)
    if not pairs:
        return verdict
    return dataclasses.replace(verdict, paired=paired_bootstrap(pairs))


def _curves(runs: Sequence[Run], table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per-epoch validation curves of every finished run, labelled with its setting and seed."""
    labels = dict(zip(table["run"], setting_labels(table, keys), strict=True))
    frames = []
    for run in runs:
        if run.finished:
            curves = read_history(run.path)
            if curves.empty:  # a run trained before history.csv: TensorBoard, counted from 0 there
                curves = read_curves(run.path).assign(epoch=lambda c: c["epoch"] + 1)
            if curves.empty:
                log.warning("run %s has no validation curves (no history.csv, logger=none?)", run.name)
                continue
            best = run.metrics.get("best_epoch")
            frames.append(
                curves.assign(
                    run=run.name,
                    setting=labels[run.name],
                    seed=run.config.get("seed"),
                    best_epoch=float("nan") if best is None else best,
                )
            )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _warn_hidden_differences(runs: Sequence[Run], table: pd.DataFrame, keys: Sequence[str], *, seed_key: str) -> None:
    """Warn when runs grouped together differ in resolved config values that are not in their overrides."""
    finished = {r.name: r for r in runs if r.finished}
    for setting, names in table["run"].groupby(setting_labels(table, keys), sort=False):
        configs = [finished[name].config for name in names]
        differing = sorted(
            k
            for k in set().union(*configs)
            if k != seed_key and not k.startswith(("paths.", "hydra.")) and len({repr(c.get(k)) for c in configs}) > 1
        )
        if differing:
            log.warning("runs of %s differ in %s, which their overrides do not show", setting, ", ".join(differing))


def _markdown(
    sweep_dir: Path,
    summary: pd.DataFrame,
    keys: Sequence[str],
    verdicts: Sequence[Verdict],
    failed: Sequence[Run],
    *,
    stage: str,
    figures: Sequence[str] = (),
) -> str:
    swept = ", ".join(keys) or "nothing but the seed"
    n_runs = int(summary["n_runs"].sum())
    parts = [
        f"# Sweep {sweep_dir}",
        "",
        f"{n_runs} finished run(s) grouped by {swept}; mean ± sd over seeds, scored per cell on the held-out "
        "cells (the baselines on the same cells).",
        "",
        markdown_table(summary),
        "",
        f"## Verdict ({stage} cells)",
        "",
        *(f"- {v.sentence()}" for v in verdicts),
    ]
    captions = {"metrics.png": "Final metrics per setting", "curves.png": "Validation curves per setting"}
    if figures:
        parts += ["", "## Figures", ""]
        parts += [f"![{captions.get(name, name)}]({name})" for name in figures]
    if failed:
        parts += ["", f"## Runs that could not be scored ({len(failed)})", ""]
        parts += [f"- `{r.name}` ({_override_text(r)}): {r.problem}" for r in failed]
    return "\n".join(parts)


def _override_text(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.overrides.items()) or "no overrides"


def _pm(mean: float, sd: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.4f}" if sd is None or math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``exprae-compare``."""
    parser = argparse.ArgumentParser(prog="exprae-compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory, e.g. multirun/2026-11-22/10-00-00")
    parser.add_argument("--seed-key", default="seed", help="the override that only changes the seed (default: seed)")
    parser.add_argument("--stage", choices=STAGES, default="test", help="cells the verdict is based on")
    parser.add_argument(
        "--within",
        nargs="+",
        default=(),
        metavar="KEY",
        help="one verdict per value of these swept keys (e.g. model.latent_dim); settings scored on different "
        "data or representations are never ranked against each other anyway",
    )
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        report = compare(
            args.sweep_dir, seed_key=args.seed_key, stage=args.stage, plots=not args.no_plots, within=args.within
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"exprae-compare: {err}", file=sys.stderr)
        return 1
    print(terminal_text(report, stage=args.stage))
    print("\nwrote " + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
