"""exprae: autoencoders for gene-expression profiles, with MSE, cosine and mixed losses and honest baselines.

The packages, in the order data flows through them: ``data`` (AnnData in, batches out), ``nn`` (pure torch:
network, count head, baselines), ``losses``, ``scoring`` (metrics, masking, figures), ``training`` (the
LightningModule, its step, callbacks), ``runs`` (run directory, lock, resume), ``inference`` (load a run, embed
cells), ``report`` (sweeps read back, figures); the entry points ``train``, ``predict`` and ``compare`` on top.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["compose", "embed", "load", "pl"]
# Where each public name lives, imported on first use (train itself is exprae.train.train: the module's name).
_PUBLIC = {"compose": "exprae.train", "embed": "exprae.inference", "load": "exprae.inference"}

if TYPE_CHECKING:
    from exprae import pl
    from exprae.inference import embed, load
    from exprae.train import compose

# Module paths of exprae 0.1's flat layout that a run directory's saved config.yaml may name as ``_target_``;
# they resolve to the module that now holds the class, so runs trained before the move still load and resume.
MOVED_MODULES = {
    "exprae.callbacks": "exprae.training.callbacks",
    "exprae.module": "exprae.training.module",
    "exprae.preprocessing": "exprae.data.preprocessing",
    "exprae.runguard": "exprae.runs.lock",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module it moved to (the same module object, not a copy)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: Any) -> None:
        pass  # the module it moved to is already executed


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str) -> Any:
    # Lazy, so `import exprae` stays cheap and does not pull in torch/anndata until they are used.
    if name == "pl":
        return importlib.import_module("exprae.pl")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'exprae' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names too, so dir(exprae) and tab completion show load, embed and pl.
    return sorted(set(globals()) | set(__all__))
