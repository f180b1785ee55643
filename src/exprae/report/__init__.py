"""Sweeps read back: each run's overrides, metrics and curves, and the figures ``exprae-compare`` draws."""
