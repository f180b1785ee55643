"""One run per output directory: a lock held for the whole run, and no leftovers from a run that never started.

* A run takes an exclusive ``flock`` on ``<run dir>/.exprae.lock`` and holds it until it ends. The kernel
  drops the lock when the process dies (even by SIGKILL), so a killed run never blocks its own resume, and a
  second live run into the same directory is refused with the holder's pid instead of interleaving writes.
* A run that ends (finished or failed) removes the lock file while it still holds the lock, so a finished
  run directory holds only results. Only a killed process leaves one, unlocked and harmless; its resume
  takes it over. Because the file can vanish under a process that has opened it, :func:`acquire` checks
  that the file it locked is still the one at the path (else it locked a deleted file and tries again).
* A fresh run (no ``ckpt_path``) into a directory that already holds a run's artefacts is refused: the way
  into an existing run directory is to resume it.
* A run that fails before it has written anything (bad data, bad config) leaves no run directory behind:
  :func:`discard_if_unused` removes Hydra's own files from a directory this process created.

For ``exprae-train``, :class:`RunDirGuard` (a Hydra callback) claims the directory in ``on_run_start``,
before Hydra writes ``.hydra/`` into it, so a refused run cannot overwrite another run's recorded config.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from exprae.errors import RunDirError
from exprae.runs.output_gate import check_writable_dir

LOCK_FILE = ".exprae.lock"
# Files whose presence means a run has started writing here (train() writes these first).
RUN_MARKERS = ("data_contract.json", "checkpoints", "metrics.json")
# What Hydra writes into a run directory before the task starts.
HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log")

_held: dict[Path, int] = {}  # run dir -> fd of its lock, for the locks this process holds
_created: set[Path] = set()  # run dirs this process created (so it may remove them again)


def _key(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def existing_run(out_dir: str | Path) -> list[str]:
    """The run artefacts already in ``out_dir`` (empty if none)."""
    out = Path(out_dir)
    return [m for m in RUN_MARKERS if (out / m).exists()]


def acquire(out_dir: str | Path, *, resume: bool) -> bool:
    """Lock ``out_dir`` for this process (creating it); return False if this process already held it.

    Raises :class:`RunDirError` if another live process holds the lock, or if the directory already holds
    a run and ``resume`` is false.
    """
    key = _key(out_dir)
    if key in _held or _secondary_rank():
        return False
    check_writable_dir(key, what="output directory")  # before anything is created or trained
    if not key.exists():
        new_dirs = [key, *(p for p in key.parents if not p.exists())]
        key.mkdir(parents=True)
        _created.update(new_dirs)
    found = existing_run(key)
    if found and not resume:
        raise RunDirError(
            f"output directory {key} already holds an exprae run ({', '.join(found)}); resume it with "
            "ckpt_path=last, or write this run elsewhere (the default hydra.run.dir is new for every run)"
        )
    fd = _lock_file(key)
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
    )
    _held[key] = fd
    return True


def _lock_file(key: Path) -> int:
    """Open and lock ``key``'s lock file; return its descriptor, or raise if a live run holds it."""
    path = key / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"output directory {key} is in use by another exprae run ({holder}); two runs writing into one "
                "directory would overwrite each other's checkpoints, so this one stops here"
            ) from None
        if _same_file(fd, path):
            return fd
        # The previous holder removed the file between our open and our lock: this lock guards nothing.
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not one removed since it was opened)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


def release(out_dir: str | Path) -> None:
    """Remove ``out_dir``'s lock file and drop this process's lock on it (a no-op if this process holds none).

    The file is removed before the lock is dropped, so no other process can lock it in between and then
    lose it; one that opened it earlier notices in :func:`acquire` that it locked a removed file.
    """
    key = _key(out_dir)
    fd = _held.pop(key, None)
    if fd is not None:
        if _same_file(fd, key / LOCK_FILE):
            with contextlib.suppress(OSError):  # a read-only or vanished directory: the unheld file is harmless
                (key / LOCK_FILE).unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _secondary_rank() -> bool:
    """A DDP worker of rank > 0 (launched by Lightning or srun): rank 0 owns and guards the run directory."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def claim(out_dir: str | Path, *, resume: bool) -> Iterator[None]:
    """Hold the run-directory lock for the block (a no-op if this process already holds it)."""
    acquired = acquire(out_dir, resume=resume)
    try:
        yield
    finally:
        if acquired:
            release(out_dir)


def created_here(out_dir: str | Path) -> bool:
    """Whether this process created ``out_dir`` (Hydra's run directory, made by :func:`acquire`)."""
    return _key(out_dir) in _created


def discard_if_unused(out_dir: str | Path) -> bool:
    """Remove ``out_dir`` if this process created it and it holds only Hydra's files and the lock.

    Only known file names are deleted and directories are removed only when empty, so nothing a user put
    there can be lost. Returns True if the directory is gone.
    """
    key = _key(out_dir)
    if key not in _created or not key.is_dir():
        return False
    known = {key / f for f in (*HYDRA_FILES, LOCK_FILE)}
    present = {p for p in key.rglob("*") if p.is_file() or p.is_symlink()}
    if not present <= known:
        return False
    release(key)
    for p in present:
        p.unlink(missing_ok=True)
    # Then the directory itself and the parents this process created for it (outputs/<date>/), if empty.
    for d in (key / ".hydra", key, *(p for p in key.parents if p in _created)):
        with contextlib.suppress(OSError):
            d.rmdir()
            _created.discard(d)
    return not key.exists()


class RunDirGuard(HydraCallback):
    """Hydra callback: claim the run directory before Hydra writes its config there, drop it at the end."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from exprae.errors import ExpraeError
        from exprae.runs.resume import resolve_ckpt_path

        out_dir = OmegaConf.select(config, "hydra.run.dir")
        try:
            acquire(out_dir, resume=resolve_ckpt_path(config.get("ckpt_path"), out_dir) is not None)
        except ExpraeError as e:
            # Hydra turns an exception from a callback into a warning and carries on (writing .hydra/ into
            # the directory another run owns), so exit here, the way Hydra reports a user error.
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for tracebacks
                traceback.print_exc()
            sys.stderr.write(f"exprae-train: {e}\n")
            raise SystemExit(1) from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release(OmegaConf.select(config, "hydra.run.dir"))
