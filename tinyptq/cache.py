"""The cache directory for what tinyptq produces itself (trained models, features, results).

``$TINYPTQ_CACHE_DIR`` if set, else the per-user cache directory. Nothing in
it is precious: deleting it only costs recomputation (its ``signing.key``,
see tinyptq.signing, also voids the run states signed with it). Directories
tinyptq creates there are private to the user (mode 0700).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENV_VAR = "TINYPTQ_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """A (created) sub-directory of the cache."""
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("tinyptq"))
    return private_dir(root.joinpath(*parts))


def private_dir(path: str | Path) -> Path:
    """Directory ``path``, its missing components created with mode 0700 (existing ones left as they are)."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir():
                raise
    return path


def content_hash(*items: Any) -> str:
    """A short stable hash of JSON-able items (dict keys sorted)."""
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_key(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file: a cache key that changes when any file does."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append((str(p), int(st.st_size), int(st.st_mtime_ns)))
    return out


def cached_arrays(
    kind: str, key: str, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays stored in the feature cache as ``{kind}_{key}.npz``; computed and saved on a miss."""
    path = cache_dir("features") / f"{kind}_{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache entry is recomputed
    arrays = compute()
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays
