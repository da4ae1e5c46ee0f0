"""A content-addressed disk cache shared by the worker processes of a grid.

Every entry is a pickle under ``root/kind/<hash>.pkl``; the hash covers the
cache's scope (model and data fingerprints) and the caller's key. A per-entry
file lock makes concurrent workers compute each entry once: the second waits
for the first and then reads its result.
"""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinyptq.cache import content_hash
from tinyptq.pipeline import StageCache


class DiskCache(StageCache):
    """StageCache on disk; ``scope`` is hashed into every key (e.g. model and calibration data)."""

    def __init__(self, root: str | Path, scope: Any = None) -> None:
        self.root = Path(root)
        self.scope = scope

    def path(self, kind: str, key: Any) -> Path:
        """Where the entry (kind, key) lives."""
        return self.root / kind / f"{content_hash(self.scope, key)}.pkl"

    def exists(self, kind: str, key: Any) -> bool:
        """Whether (kind, key) is stored."""
        return self.path(kind, key).is_file()

    def get_or_compute(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_suffix(".lock")):
            value = _read(path)
            if value is not None:
                return value
            value = compute()
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
            return value


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        return None  # a damaged or outdated entry is recomputed


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
