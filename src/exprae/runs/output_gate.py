"""The output gate: every place exprae will write is checked before any work starts.

Training and prediction can run for hours; a folder that cannot be written, an output path that is a
directory, or a name that an ``.h5ad`` file cannot store must fail in the first second, with a message
that names it, not after the work is done. The training run directory, ``exprae-predict``'s output
file and the AnnData keys ``key_added`` produces all pass through here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from exprae.errors import OutputError


def check_writable_dir(folder: str | Path, *, what: str) -> Path:
    """Refuse ``folder`` unless it is (or can be created as) a directory this process can write into.

    Tries a real temporary file in the nearest existing folder, because permission bits do not tell the
    whole story (root ignores them; ``/proc``, read-only mounts and full quotas refuse writes anyway).
    Nothing is created or left behind. Returns the folder, expanded.
    """
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {folder} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".exprae-write-check-"):
            pass
    except OSError as e:
        detail = e.strerror or type(e).__name__
        where = "" if existing == folder else f" (its nearest existing parent {existing})"
        raise OutputError(f"{what} {folder} is not writable{where}: {detail}; choose a folder you can write to") from e
    return folder


def check_output_file(path: str | Path, *, overwrite: bool, suffix: str, what: str = "out") -> Path:
    """Refuse an output file path that cannot be written as asked; return it expanded.

    A directory is never a valid output file (``overwrite=true`` does not replace folders), an existing
    file needs ``overwrite``, and the folder it goes into must exist and be writable.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(
            f"{what}={path} is a directory; name a {suffix} file to write, e.g. {what}={path / f'cells{suffix}'}"
        )
    if path.suffix != suffix:
        raise OutputError(f"{what}={path} should end in {suffix}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite=true to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist (for {what}={path}); create it first")
    check_writable_dir(path.parent, what="output folder")
    return path


def check_key_name(name: object, *, what: str) -> str:
    """Refuse a name that cannot be an AnnData key in an ``.h5ad`` file (it becomes an HDF5 object name)."""
    if not isinstance(name, str) or not name.strip():
        raise OutputError(f"{what} must be a non-empty string, got {name!r}")
    bad = [c for c in ("/", "\x00") if c in name]
    if bad or name in (".", ".."):
        raise OutputError(
            f"{what}={name!r} cannot be stored in an .h5ad file: keys become HDF5 names, which may not contain "
            "'/' or NUL characters or be '.' or '..'; choose a name such as 'exprae_v2'"
        )
    return name
