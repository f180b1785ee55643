"""A ModelCheckpoint whose saved state holds no absolute path, so a run directory can be moved or copied.

Lightning's ``ModelCheckpoint`` stores ``dirpath``, ``best_model_path``, ``last_model_path`` and the top-k
paths as absolute paths in every checkpoint. Resumed from a run directory that was moved or copied, it
finds a different ``dirpath``, drops its record of the best score and keeps the *old* run's
``best_model_path``: the next save finds ``best.ckpt`` present but unknown to it and writes
``best-v1.ckpt`` beside it, ``metrics.json`` names the new file while ``exprae.load`` still reads the old
``best.ckpt``, and testing the old run's absolute best path can fail outright. :class:`RunCheckpoint`
stores those paths relative to ``dirpath`` and, when loading, places them in the current ``dirpath``;
paths written by plain ``ModelCheckpoint`` (older runs) are rebased the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint

_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with a relocatable state: file paths saved relative to the checkpoint folder."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key, so runs checkpointed before this class existed resume with their record.
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        base = state.get("dirpath")
        state["dirpath"] = None  # the folder is wherever the run directory is now
        for key in _PATH_KEYS:
            state[key] = _relative(state.get(key), base)
        state["best_k_models"] = {_relative(p, base): v for p, v in (state.get("best_k_models") or {}).items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        state = dict(state_dict)
        for key in _PATH_KEYS:
            state[key] = self._here(state.get(key), old)
        state["best_k_models"] = {self._here(p, old): v for p, v in (state.get("best_k_models") or {}).items()}
        state["dirpath"] = self.dirpath  # now the same folder, so Lightning restores the whole record
        super().load_state_dict(state)

    def _here(self, path: str | None, old_dirpath: str | None) -> str:
        """``path`` (relative, or absolute inside ``old_dirpath``) as a path inside this callback's folder."""
        if not path or self.dirpath is None:
            return path or ""
        name = _relative(path, old_dirpath)
        return name if os.path.isabs(name) else os.path.join(self.dirpath, name)


def _relative(path: str | None, base: str | None) -> str:
    """``path`` relative to ``base`` when it lies inside it; otherwise unchanged (``""`` for none)."""
    if not path:
        return ""
    if base and os.path.isabs(path):
        try:
            return str(Path(path).relative_to(base))
        except ValueError:
            return path
    return path
