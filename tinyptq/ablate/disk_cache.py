"""A content-addressed disk cache shared by the worker processes of a grid.

Every entry is a signed pickle (tinyptq.signing) under
``root/kind/<hash>.pkl``; the hash covers the cache's scope (model and data
fingerprints) and the caller's key. The cache is an optimization only: an
entry that is missing, damaged, foreign (its signature does not verify, so it
is never unpickled), stale (another cache format or tinyptq version) or not
what the caller expects is recomputed and replaced, never fatal. A per-entry
file lock makes concurrent workers compute each entry once: the second waits
for the first and then reads its result. Directories are created private to
the user (mode 0700).
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tinyptq import __version__
from tinyptq.cache import content_hash, private_dir
from tinyptq.pipeline import StageCache
from tinyptq.signing import SignedFileError, dump_signed, load_signed

CACHE_FORMAT = 1  # bump when what the entries hold changes meaning
MISSING: Any = object()  # ``DiskCache.load`` found nothing usable


class DiskCache(StageCache):
    """StageCache on disk; ``scope`` is hashed into every key (e.g. model and calibration data)."""

    def __init__(self, root: str | Path, scope: Any = None) -> None:
        self.root = Path(root)
        self.scope = scope

    def path(self, kind: str, key: Any) -> Path:
        """Where the entry (kind, key) lives."""
        return self.root / kind / f"{content_hash(self.scope, key)}.pkl"

    def load(self, kind: str, key: Any, valid: Callable[[Any], bool] | None = None) -> Any:
        """The value stored under (kind, key), or MISSING when there is none fit to use.

        ``valid`` checks what came back (e.g. its type); a value it rejects
        counts as missing.
        """
        path = self.path(kind, key)
        try:
            stored = load_signed(path, _context(kind, path))
        except (OSError, SignedFileError):
            return MISSING  # absent, unreadable, foreign or damaged: recomputed by the caller
        if not isinstance(stored, dict) or stored.get("format") != CACHE_FORMAT or stored.get("tinyptq") != __version__:
            return MISSING
        value = stored.get("value")
        if valid is not None and not valid(value):
            return MISSING
        return value

    def get_or_compute(
        self, kind: str, key: Any, compute: Callable[[], Any], valid: Callable[[Any], bool] | None = None
    ) -> Any:
        """The usable value under (kind, key); else ``compute()``, stored in its place and returned."""
        path = self.path(kind, key)
        with ExitStack() as stack:
            try:
                stack.enter_context(locked(path.with_suffix(".lock")))
            except OSError:
                pass  # no lock (directory removed meanwhile): at worst two workers compute the entry
            value = self.load(kind, key, valid)
            if value is not MISSING:
                return value
            value = compute()
            self._store(kind, path, value)
            return value

    def _store(self, kind: str, path: Path, value: Any) -> None:
        try:
            private_dir(path.parent)
            dump_signed({"format": CACHE_FORMAT, "tinyptq": __version__, "value": value}, path, _context(kind, path))
        except OSError:
            pass  # a cache that cannot be written costs recomputation, not the run


def _context(kind: str, path: Path) -> str:
    # binds an entry to its key: a valid entry copied over another one does not verify
    return f"tinyptq-cache/{kind}/{path.stem}"


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the block."""
    private_dir(lock_path.parent)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
