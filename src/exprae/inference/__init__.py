"""Applying a trained run to cells: ``load`` a run directory, ``embed`` an AnnData."""

from exprae.inference.embed import ExpraeModel, embed, load

__all__ = ["ExpraeModel", "embed", "load"]
