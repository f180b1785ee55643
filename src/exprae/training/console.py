"""What a training run prints: exprae's own lines, not Lightning's boilerplate, and no progress-bar frames in a log.

``console`` (a top-level config key) chooses how epochs are shown:

* ``auto`` (default): Lightning's progress bar on a terminal; one line per epoch when stdout is redirected
  (``> log``, SLURM, nohup), where bar frames would fill the file with carriage-return garbage;
* ``bar`` / ``lines``: either of those, whatever stdout is;
* ``quiet``: no per-epoch output on the console (``train.log`` still gets the epoch lines), only the header,
  why training stopped and the final table.

Lightning's informational lines (GPU/TPU/HPU availability, adverts, "Restoring states" and "Loaded model
weights" for every re-evaluation, the seed) are held back while exprae trains; its warnings are not.
Under ``exprae-train`` every line goes through Python logging, so the console shows the message alone and
``train.log`` the same lines with a timestamp; called from Python (a notebook, a test), the lines are printed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Literal

from exprae.errors import ConfigError

Console = Literal["auto", "bar", "lines", "quiet"]
CONSOLE_MODES = ("auto", "bar", "lines", "quiet")
PROGRESS_LOGGER = "exprae.progress"  # the per-epoch lines; the console drops them in quiet mode
log = logging.getLogger("exprae.train")

# Lightning's loggers whose INFO lines are boilerplate for an exprae user (their warnings still show).
CHATTY_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed")
# Warnings raised inside Lightning about its own use of torch APIs: nothing a user can act on.
LIBRARY_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


def resolve_console(mode: str, *, progress_bar: bool) -> Console:
    """``bar``, ``lines`` or ``quiet`` for a ``console`` setting; ``auto`` looks at whether stdout is a terminal."""
    if mode not in CONSOLE_MODES:
        raise ConfigError(f"console={mode!r} is not one of {list(CONSOLE_MODES)}")
    if mode == "auto":
        return "bar" if progress_bar and _isatty(sys.stdout) else "lines"
    return mode  # type: ignore[return-value]


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hold back Lightning's informational lines and its internal deprecation notices; restore on exit."""
    saved = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in LIBRARY_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


_quiet = False  # console=quiet while a run trains: per-epoch lines are not printed
_via_logging = False  # set by exprae-train, where Hydra configured a console and a train.log handler


def route_to_logging() -> None:
    """Send exprae's lines through Python logging from now on (``exprae-train``'s Hydra entry point)."""
    global _via_logging
    _via_logging = True


def emit(text: str, *, progress: bool = False) -> None:
    """Show ``text``: through logging under ``exprae-train`` (console and ``train.log``), else print it."""
    if _via_logging:
        (logging.getLogger(PROGRESS_LOGGER) if progress else log).info(text)
    elif not (progress and _quiet):
        print(text, flush=True)


class DropProgress(logging.Filter):
    """A console-handler filter for ``console=quiet``: the per-epoch lines go to ``train.log`` only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(PROGRESS_LOGGER)


@contextlib.contextmanager
def console_filter(mode: Console) -> Iterator[None]:
    """In quiet mode, keep the per-epoch lines off the console while training (``train.log`` still gets them)."""
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    dropper = DropProgress()
    global _quiet
    _quiet, was_quiet = mode == "quiet", _quiet
    if mode == "quiet":
        for h in handlers:
            h.addFilter(dropper)
    try:
        yield
    finally:
        _quiet = was_quiet
        for h in handlers:
            h.removeFilter(dropper)


def short_warnings() -> None:
    """Warnings as one line, ``Category: message``, without the source path and code line (CLI entry points)."""

    def format_warning(message, category, filename, lineno, line=None) -> str:
        return f"{category.__name__}: {message}\n"

    warnings.formatwarning = format_warning
