"""Range estimators (observers): streaming statistics -> the clipping range of a tensor.

One small class per method behind one factory, so adding a method touches one
place. Observers only collect and choose ranges; turning a range into an
Encoding is the quantization core's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from tinyptq.errors import ConfigError, DataError
from tinyptq.quant import QuantSpec


class RangeObserver(ABC):
    """Collects statistics of a tensor batch by batch; ``range`` picks [lo, hi]."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis

    def _reduce_axes(self, x: np.ndarray) -> tuple[int, ...] | None:
        if self.axis is None:
            return None
        axis = self.axis % x.ndim
        return tuple(i for i in range(x.ndim) if i != axis)

    def update(self, x: np.ndarray) -> None:
        """Add one batch (or the whole weight tensor)."""
        x = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError("NaN/Inf values reached a range observer (check the calibration data)")
        self._update(x)

    @abstractmethod
    def _update(self, x: np.ndarray) -> None: ...

    @abstractmethod
    def range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        """The chosen (lo, hi), scalars or per-channel arrays."""


class MinMaxObserver(RangeObserver):
    """The running minimum and maximum: nothing is clipped."""

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def _update(self, x: np.ndarray) -> None:
        axes = self._reduce_axes(x)
        lo, hi = np.min(x, axis=axes), np.max(x, axis=axes)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None:
            raise DataError("range observer saw no data")
        return self.lo, self.hi


RANGE_METHODS: dict[str, type[RangeObserver]] = {
    "minmax": MinMaxObserver,
}


def make_observer(method: str, axis: int | None = None, **options: Any) -> RangeObserver:
    """An observer for ``method`` (one of RANGE_METHODS) with its options."""
    try:
        cls = RANGE_METHODS[method]
    except KeyError:
        raise ConfigError(
            f"unknown range method '{method}'; valid: {', '.join(sorted(RANGE_METHODS))}"
        ) from None
    return cls(axis=axis, **options)
