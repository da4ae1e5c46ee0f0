"""The cache directory for what tinyptq produces itself (trained models, features, results).

``$TINYPTQ_CACHE_DIR`` if set, else the per-user cache directory. Nothing in
it is precious: deleting it only costs recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

ENV_VAR = "TINYPTQ_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """A (created) sub-directory of the cache."""
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("tinyptq"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_hash(*items: Any) -> str:
    """A short stable hash of JSON-able items (dict keys sorted)."""
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
