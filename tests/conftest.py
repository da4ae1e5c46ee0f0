"""Shared fixtures: the data directory (../shared/data beside the checkout, or $TINYPTQ_DATA_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TINYPTQ_OFFLINE", "1")  # tests never reach for the network

_REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    env = os.environ.get("TINYPTQ_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(_REPO.parent / "shared" / "data")
    for c in candidates:
        if (c / "mlperf-tiny").is_dir():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory; tests that need it fail loudly when it is missing in CI."""
    d = _shared_data_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("../shared/data (or $TINYPTQ_DATA_DIR) is required in CI")
        pytest.skip("no data directory with mlperf-tiny/ found")
    return d


@pytest.fixture(scope="session")
def mlperf_dir(data_dir: Path) -> Path:
    """The MLPerf Tiny reference models folder."""
    return data_dir / "mlperf-tiny"
