"""exprae: autoencoders for gene-expression profiles, with MSE, cosine and mixed losses and honest baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["embed", "load"]

if TYPE_CHECKING:
    from exprae.api import embed, load


def __getattr__(name: str) -> Any:
    # Lazy, so `import exprae` stays cheap and does not pull in torch/anndata until they are used.
    if name in __all__:
        from exprae import api

        return getattr(api, name)
    raise AttributeError(f"module 'exprae' has no attribute {name!r}")
