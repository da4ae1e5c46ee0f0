"""Output locations: checked before any work starts, and names that are safe as file names.

A run that computes for minutes and then cannot write its result loses it;
``prepare_out_dir`` finds out at the start. Names that come from files (a
grid's ``name:``) become path components only through ``safe_name``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from tinyptq.errors import ConfigError, first_line

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 100


def safe_name(text: str, default: str = "unnamed") -> str:
    """``text`` as one file name: letters, digits, '.', '_' and '-' only, no leading dot or dash.

    Path separators and every other character become '-', so '../x' gives
    'x' and 'a/b' gives 'a-b': the name can never leave the directory it is
    joined to, nor hide as a dot-file.
    """
    name = _UNSAFE.sub("-", str(text)).lstrip(".-")[:MAX_NAME].rstrip(".-")
    return name or default


def _reason(exc: OSError) -> str:
    return exc.strerror or first_line(exc)


def check_out_dir(path: str | Path, what: str = "output directory") -> Path:
    """Make sure directory ``path`` exists and takes files, or can be created; ConfigError in one line.

    Leaves nothing behind: an existing directory gets a file created and
    removed in it (the only test that holds on read-only file systems and for
    root alike); for a missing one, its nearest existing ancestor must be a
    directory that takes a new subdirectory.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        if existing == path:
            raise ConfigError(f"{what} {path} is not a directory")
        raise ConfigError(f"{what} {path} cannot be created: {existing} is not a directory")
    try:
        if existing == path:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".tinyptq-write-test-"):
                pass
        else:  # what mkdir -p needs: a new directory in the nearest existing one
            Path(tempfile.mkdtemp(dir=existing, prefix=".tinyptq-write-test-")).rmdir()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be written: {_reason(exc)}") from None
    return path


def prepare_out_dir(path: str | Path, what: str = "output directory") -> Path:
    """``check_out_dir``, then create the directory: for writers about to write into it."""
    path = check_out_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be created: {_reason(exc)}") from None
    return path


def write_error(path: str | Path, exc: OSError) -> ConfigError:
    """The one-line error for a file that could not be written at the end of a run."""
    return ConfigError(f"cannot write {path}: {_reason(exc)}")

