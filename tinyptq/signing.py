"""Pickles that only this user's tinyptq wrote: signed with HMAC-SHA256, checked before loading.

Loading a pickle runs code, so tinyptq unpickles nothing it cannot
authenticate. ``dump_signed`` writes a keyed hash (HMAC-SHA256) of the pickle
in front of it; the key is 32 random bytes in ``signing.key`` of the user's
cache directory (``tinyptq.cache.cache_dir()``), mode 0600, created on first
use. ``load_signed`` recomputes the hash before unpickling: a file written by
anyone else, by another user's tinyptq, or damaged since, raises
``SignatureMismatch`` and is never unpickled. ``context`` binds a file to its
purpose (e.g. one cache key), so a valid file copied to another place does
not verify either.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import secrets
import stat
from pathlib import Path
from typing import Any

from tinyptq.errors import TinyPTQError, first_line

KEY_FILE = "signing.key"
MAGIC = b"tinyptq-signed-pickle/1\n"
_DIGEST = hashlib.sha256().digest_size
_KEYS: dict[Path, bytes] = {}  # per process: key file -> key


class SignedFileError(TinyPTQError):
    """A signed file that cannot be used (unreadable after its signature verified)."""


class SignatureMismatch(SignedFileError):
    """The file was not written by this user's tinyptq (or was changed since)."""


class SigningKeyError(TinyPTQError):
    """The signing key file is unsafe (readable by others, owned by another user) or unreadable."""


def key_path() -> Path:
    """Where the signing key lives: ``signing.key`` in the cache directory."""
    from tinyptq.cache import cache_dir

    return cache_dir() / KEY_FILE


def signing_key() -> bytes:
    """The user's signing key, created (mode 0600) when there is none."""
    path = key_path()
    if path not in _KEYS:
        if not path.exists():
            _create_key(path)
        _KEYS[path] = _read_key(path)
    return _KEYS[path]


def _create_key(path: Path) -> None:
    # written in full under a private name, then linked: no process ever reads half a key
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror or first_line(exc)}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise SigningKeyError(f"signing key {path} belongs to another user; delete it (tinyptq makes a new one)")
        if st.st_mode & 0o077:
            raise SigningKeyError(
                f"signing key {path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run 'chmod 600 {path}' or delete it (tinyptq makes a new one)"
            )
        key = fh.read()
    if len(key) < 16:
        raise SigningKeyError(f"signing key {path} is too short; delete it (tinyptq makes a new one)")
    return key


def _mac(key: bytes, context: str, payload: bytes) -> bytes:
    mac = hmac.new(key, MAGIC, hashlib.sha256)
    mac.update(context.encode() + b"\0")
    mac.update(payload)
    return mac.digest()


def dump_signed(obj: Any, path: str | Path, context: str = "") -> Path:
    """Pickle ``obj`` to ``path`` with its signature (atomically, mode 0600); return the path."""
    path = Path(path)
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    blob = MAGIC + _mac(signing_key(), context, payload) + payload
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_signed(path: str | Path, context: str = "") -> Any:
    """The object ``dump_signed`` wrote to ``path`` with the same ``context``.

    Raises SignatureMismatch (nothing unpickled) when the signature does not
    verify, SignedFileError when a verified file cannot be unpickled (e.g.
    written by another tinyptq version), OSError when it cannot be read.
    """
    path = Path(path)
    blob = path.read_bytes()
    head, digest, payload = blob[: len(MAGIC)], blob[len(MAGIC) : len(MAGIC) + _DIGEST], blob[len(MAGIC) + _DIGEST :]
    if head != MAGIC or not hmac.compare_digest(digest, _mac(signing_key(), context, payload)):
        raise SignatureMismatch(f"{path} was not written by this user's tinyptq (signature mismatch)")
    try:
        return pickle.loads(payload)
    except Exception as exc:  # classes moved or changed since it was written
        raise SignedFileError(f"cannot read {path}: {type(exc).__name__}: {first_line(exc, 80)}") from None
