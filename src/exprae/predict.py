"""Prediction entry point (``exprae-predict``): embed an ``.h5ad`` with a trained run, write a new ``.h5ad``.

exprae-predict ckpt=outputs/2026-01-01/12-00-00 data.path=new.h5ad out=new_with_ae.h5ad
exprae-predict ckpt=run/checkpoints/last.ckpt data.path=new.h5ad out=new.h5ad overwrite=true allow_missing_genes=true

Arguments use Hydra's ``key=value`` syntax and are checked against :class:`PredictConfig` (a misspelt key or
a wrong type is an error naming the valid keys). The model's saved preprocessing is always applied; an
existing output is never replaced without ``overwrite=true``, and the output appears whole or not at all.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad

from exprae.errors import ConfigError, ExpraeError, OutputError, RunInterrupted
from exprae.runs.output_gate import check_key_name, check_output_file
from exprae.runs.rundir import new_file_mode
from exprae.runs.signals import stop_on_signals

TMP_SUFFIX = ".tmp.h5ad"

VALID_KEYS = (
    "ckpt, data.path, data.layer, data.preprocess.*, out, overwrite, key_added, batch_size, allow_missing_genes, "
    "baselines, transform_batch, recon, check_representation, device"
)
USAGE = "usage: exprae-predict ckpt=RUN_DIR_OR_CKPT data.path=IN.h5ad out=OUT.h5ad [overwrite=true] [key=value ...]"


@dataclass
class DataConfig:
    """The cells to embed."""

    path: str = "???"
    layer: str | None = None  # None: the matrix the model was trained on
    # Only to state expectations: every value given must equal the model's saved preprocessing.
    preprocess: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictConfig:
    """Everything ``exprae-predict`` accepts."""

    ckpt: str = "???"  # run directory or checkpoint file
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "???"
    overwrite: bool = False
    key_added: str = "exprae"
    batch_size: int = 1024
    allow_missing_genes: bool = False
    baselines: bool = False  # also write the mean-profile and PCA baselines' per-cell cosine
    transform_batch: str | None = None  # a batch level: the reconstruction of every cell as if from that batch
    recon: str = "auto"  # auto | layer | obsm | none: where the reconstruction goes (exprae.inference.outputs)
    check_representation: bool = True  # refuse data that does not look like the training representation
    device: str = "auto"  # auto (GPU when present), cpu, cuda, cuda:1, ...


class PredictError(ConfigError):
    """A problem with the user's arguments, reported as one line without a traceback."""


def parse_args(argv: Sequence[str]) -> PredictConfig:
    """``key=value`` arguments merged onto :class:`PredictConfig`, with OmegaConf's type and key checks."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise PredictError(f"arguments must be key=value, got {bad}\n{USAGE}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PredictConfig), OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise PredictError(f"{f'{key}: ' if key else ''}{str(e).splitlines()[0]} (valid keys: {VALID_KEYS})") from e
    except yaml.YAMLError as e:  # a value YAML cannot hold, e.g. a NUL character
        raise PredictError(f"arguments {list(argv)} could not be parsed: {str(e).splitlines()[0]}") from e
    missing = [k for k in ("ckpt", "data.path", "out") if _is_missing(cfg, k)]
    if missing:
        raise PredictError(f"missing required argument(s): {', '.join(f'{k}=...' for k in missing)}\n{USAGE}")
    return OmegaConf.to_object(cfg)


def _is_missing(cfg: Any, dotted: str) -> bool:
    from omegaconf import OmegaConf

    parent, _, key = dotted.rpartition(".")
    return OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, key)


def check_preprocess(requested: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse a preprocessing that differs from the one the model was trained with (it would not be applied)."""
    unknown = sorted(set(requested) - set(saved))
    if unknown:
        raise PredictError(f"unknown data.preprocess key(s) {unknown}; valid: {sorted(saved)}")
    differ = {k: (v, saved[k]) for k, v in requested.items() if v != saved[k]}
    if differ:
        details = "; ".join(
            f"data.preprocess.{k}={v!r} but the model was trained with {s!r}" for k, (v, s) in differ.items()
        )
        raise PredictError(
            f"different preprocessing requested: {details}. exprae-predict always applies the model's saved "
            "preprocessing (a model only understands data prepared as it was trained); drop these arguments, or "
            "train a model with that preprocessing"
        )


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path, *, overwrite: bool) -> Path:
    """Write ``adata`` to a temporary file next to ``path`` and move it into place in one step.

    A failure (disk full, interrupt) leaves no partial ``path``; without ``overwrite`` an existing file is
    never replaced, even one created while writing (the final step is a hard link, which refuses to clobber).
    The temporary file's name holds the writer's pid, so one left by a killed writer (SIGKILL cannot be
    cleaned up after) is recognised and removed by the next write to the same path.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite=true to replace it")
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_tmp_prefix(path)}{os.getpid()}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        try:
            adata.write_h5ad(tmp)
        except OSError as e:  # disk full, quota, a mount gone read-only
            raise OutputError(f"writing {path} failed, so nothing was written: {e}") from e
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; the output follows the umask like any new file
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputError(f"{path} appeared while writing; pass overwrite=true to replace it") from None
            except OSError:  # a filesystem without hard links: re-check, then rename
                if path.exists():
                    raise OutputError(f"{path} exists; pass overwrite=true to replace it") from None
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def refuse_other_representation(found: dict[str, Any], *, model_dir: Path) -> None:
    """Refuse (before writing) data that is clearly in another representation than the model's training data."""
    from exprae.inference.representation import RAW_FINDING, REFUSE

    far = [v for v in (found.get("shift"), found.get("spread")) if v is not None and v > REFUSE]
    raw = [f for f in found.get("findings", []) if f.startswith(RAW_FINDING)]
    if far or raw:
        raise PredictError(
            f"the data does not look like the representation the model in {model_dir} was trained on: "
            f"{'; '.join(found['findings'])}. Its scores would not be meaningful. Use the matrix the model was "
            "trained on (data.layer=..., see data_contract.json), or pass check_representation=false to write "
            "the output anyway"
        )


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporary files of earlier writes to ``path`` whose writer process is gone; return them."""
    removed = []
    for tmp in path.parent.glob(f"{_tmp_prefix(path)}*{TMP_SUFFIX}"):
        pid = tmp.name[len(_tmp_prefix(path)) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def predict(cfg: PredictConfig) -> ad.AnnData:
    """Load the model, embed the data, write the output; returns the embedded AnnData."""
    from exprae.data import read_h5ad
    from exprae.data.covariates import level_code
    from exprae.inference import embed, load

    # Fail before any work: an output that cannot be written as asked, a key an .h5ad cannot store, a bad layout.
    out = check_output_file(cfg.out, overwrite=cfg.overwrite, suffix=".h5ad")
    check_key_name(cfg.key_added, what="key_added")
    from exprae.inference.outputs import RECON_LAYOUTS

    if cfg.recon not in RECON_LAYOUTS:
        raise PredictError(f"recon={cfg.recon!r} is not one of {list(RECON_LAYOUTS)}")
    model = load(cfg.ckpt, device=cfg.device)
    check_preprocess(dict(cfg.data.preprocess), model.preprocess.settings())
    if cfg.transform_batch is not None:  # an unknown level fails before the data is read
        level_code(model.batch_categories, cfg.transform_batch)
    adata = read_h5ad(cfg.data.path)
    with warnings.catch_warnings(record=True) as seen:  # held back: a refusal below says the same in full
        warnings.simplefilter("always")
        embed(
            model,
            adata,
            layer=cfg.data.layer,
            key_added=cfg.key_added,
            batch_size=cfg.batch_size,
            allow_missing_genes=cfg.allow_missing_genes,
            baselines=cfg.baselines,
            transform_batch=cfg.transform_batch,
            recon=cfg.recon,
        )
    if cfg.check_representation:
        refuse_other_representation(adata.uns[cfg.key_added]["representation"], model_dir=model.run_dir)
    for w in seen:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    write_h5ad_atomic(adata, out, overwrite=cfg.overwrite)
    return adata


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 done, 1 failed, 2 bad arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        return 0 if argv else 2
    from exprae.training.console import short_warnings

    short_warnings()  # one line per warning, without exprae's source path and code line
    try:
        cfg = parse_args(argv)
    except PredictError as e:
        print(f"exprae-predict: error: {e}", file=sys.stderr)
        return 2

    started = time.time()

    def stopped(signal_name: str) -> str:
        out = Path(cfg.out).expanduser()
        # The output appears in one rename, complete: a signal after it stops nothing but the summary.
        if out.is_file() and out.stat().st_mtime >= started:
            return f"stopped by {signal_name} after {cfg.out} was written (the output is complete)"
        return f"stopped by {signal_name} before {cfg.out} was written; nothing was written, run the command again"

    # Any other exception is a bug in exprae and keeps its traceback.
    try:
        with stop_on_signals(stopped):
            adata = predict(cfg)
    except RunInterrupted as e:
        print(f"exprae-predict: {e}", file=sys.stderr)
        return e.exit_code
    except ExpraeError as e:
        print(f"exprae-predict: error: {e}", file=sys.stderr)
        return 1
    from exprae.inference.splits import summary

    counts_at = adata.uns[cfg.key_added]["keys"].get("expected_counts")  # "layers/<name>" or "obsm/<name>"
    also = f"; expected counts in {counts_at}" if counts_at else ""
    print(
        f"exprae-predict: {adata.n_obs} cells embedded{also}; wrote {cfg.out}\n"
        f"{summary(adata, key_added=cfg.key_added)}\n"
        f"(obs['{cfg.key_added}_split'] marks each cell's split in the run, matched by cell name)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
