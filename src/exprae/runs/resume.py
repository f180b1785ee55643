"""Resuming a run: which checkpoint ``ckpt_path`` names, and whether it fits the model and data it resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from exprae.errors import ConfigError, DataError, DataFileNotFoundError
from exprae.runs import rundir
from exprae.runs.checkpoint import CHECKPOINT_DIR, read_checkpoint

LAST = "last"  # ckpt_path=last: <run dir>/checkpoints/last.ckpt


def resolve_ckpt_path(ckpt_path: str | Path | None, out_dir: str | Path) -> str | None:
    """The checkpoint file ``ckpt_path`` names (``last``: this run directory's ``checkpoints/last.ckpt``)."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == LAST:
        path = Path(out_dir) / CHECKPOINT_DIR / "last.ckpt"
        if not path.is_file():
            raise DataFileNotFoundError(
                f"ckpt_path=last, but {path} does not exist; to resume a run, point hydra.run.dir at its run "
                "directory (e.g. exprae-train hydra.run.dir=outputs/2026-01-31/12-00-00-000000 ckpt_path=last)"
            )
        return str(path)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise DataFileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(path)


def check_resume(ckpt_path: str | Path, *, module: nn.Module, contract: dict[str, Any], out_dir: str | Path) -> None:
    """Refuse to resume from a checkpoint of another model shape, or onto data with other genes."""
    saved = read_checkpoint(ckpt_path)["state_dict"]
    here = module.state_dict()
    missing, extra = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    shapes = [
        f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} now"
        for k, v in here.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if missing or extra or shapes:
        detail = "; ".join(
            [*shapes[:3], *(f"missing {k}" for k in missing[:3]), *(f"unexpected {k}" for k in extra[:3])]
        )
        raise ConfigError(
            f"checkpoint {ckpt_path} does not fit the configured model ({detail}); resume with the same model, "
            "loss and data overrides as the run that wrote it (see its .hydra/overrides.yaml)"
        )
    contract_file = Path(out_dir) / rundir.CONTRACT_FILE
    if contract_file.is_file():
        before = rundir.read_json(contract_file).get("var_names")
        if before is not None and before != contract["var_names"]:
            gone = [g for g in before if g not in set(contract["var_names"])]
            raise DataError(
                f"resuming {out_dir} with different genes than it was trained on ({len(before)} then, "
                f"{len(contract['var_names'])} now; missing now: {gone[:5]}); use the same data and preprocessing"
            )


def recorded_levels(ckpt_path: str | Path, out_dir: str | Path) -> dict[str, list[str]] | None:
    """The covariate levels (``data.batch_key``) the resumed run recorded in its data contract; None without.

    The checkpoint's own run directory is read first (its weights were trained with those codes), then
    ``out_dir``.
    """
    for folder in (Path(ckpt_path).parent.parent, Path(out_dir)):
        contract = folder / rundir.CONTRACT_FILE
        if contract.is_file():
            return rundir.read_json(contract).get("batch_categories") or None
    return None
