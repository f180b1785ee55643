"""Errors that mean "the input or the config is wrong", as opposed to a bug in exprae.

``exprae-train`` prints these as one paragraph and exits with status 1 (``HYDRA_FULL_ERROR=1`` shows the
traceback); any other exception is a bug and keeps its traceback. Each class also derives from the builtin
an older caller may catch (``ValueError``, ``KeyError``, ``FileNotFoundError``), so callers that caught
those keep working.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class ExpraeError(Exception):
    """A problem the user can fix: bad data, a bad config value, a run directory in use."""


class DataError(ExpraeError, ValueError):
    """The data cannot be trained on as configured (NaN, negatives, too few cells, a corrupt file...)."""


class DataFileNotFoundError(ExpraeError, FileNotFoundError):
    """The data (or checkpoint) path does not exist."""


class MissingKeyError(ExpraeError, KeyError):
    """A layer or obs column that is not there; the message lists the ones that are."""

    # KeyError's str() is the repr of its argument (quotes, escaped newlines); show the message as written.
    __str__ = Exception.__str__


class ConfigError(ExpraeError, ValueError):
    """A config value of the wrong type or outside its valid range."""


class RunDirError(ExpraeError, RuntimeError):
    """The output directory is in use by another run, or already holds a finished one."""


class TrainingDivergedError(ExpraeError, RuntimeError):
    """The loss or the weights became NaN/inf, or the loss exploded; nothing was saved from that point on."""


class OutputError(ExpraeError, OSError):
    """A folder exprae must write to cannot be written, or a name cannot be stored in an AnnData file."""


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT stopped the run; the message says what was kept and how to resume.

    Not a mistake in the input, but reported the same way: one paragraph, a non-zero exit status
    (128 + the signal number, as a shell reports a process stopped by that signal). A ``BaseException``,
    as ``KeyboardInterrupt`` is: the signal may arrive inside any library call, and a library's
    ``except Exception`` (h5py and anndata reading a file, for one) must not turn it into another error.
    """

    def __init__(self, message: str, *, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class CLIError(CompactHydraException):
    """A user error as ``exprae-train`` reports it: Hydra prints the message alone, no traceback, exit status 1."""
