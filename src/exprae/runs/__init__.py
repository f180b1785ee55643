"""The run directory: what a run writes, the lock that gives it one owner, and resuming from its checkpoints."""

from exprae.runs.lock import RunDirGuard

__all__ = ["RunDirGuard"]
