"""Applying a trained run to cells: ``load`` a run (load.py), align new data to it (align.py), ``embed`` (embed.py)."""

from exprae.inference.align import GeneMismatchError
from exprae.inference.embed import embed
from exprae.inference.load import ExpraeModel, load
from exprae.runs.checkpoint import UnsafeCheckpointError

__all__ = ["ExpraeModel", "GeneMismatchError", "UnsafeCheckpointError", "embed", "load"]
