"""Range estimators (observers): streaming statistics -> the clipping range of a tensor.

One small class per method behind one factory, so adding a method touches one
place. Observers only collect and choose ranges; turning a range into an
Encoding is the quantization core's job.

Methods: ``minmax`` (no clipping), ``percentile``, ``mse`` (the range whose
Lp quantization error on the actual grid is smallest) and ``kl`` (TensorRT's
entropy calibration). The clipping methods see data in one of two ways:

- one update (a weight tensor, optionally per channel along ``axis``, or a
  calibration set that fits in one batch; per tensor at most ``EXACT_LIMIT``
  values): the values themselves, exactly;
- several updates (activation batches): from the second batch on, a
  :class:`~tinyptq.histogram.StreamingHistogram` of ``num_bins`` bins, so
  memory stays at one batch plus the bins however long calibration runs.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from tinyptq.errors import ConfigError, DataError
from tinyptq.histogram import StreamingHistogram, kl_threshold_bins
from tinyptq.params import Integer, Real, validate
from tinyptq.quant import Encoding, QuantSpec, grid_limits

# a single per-tensor update larger than this goes straight into the histogram
EXACT_LIMIT = 2**20
# kl on exact values (weights): at most len(values) / VALUES_PER_BIN bins
VALUES_PER_BIN = 8


def check_number(
    value: Any, name: str, lo: float, hi: float, integer: bool = False, lo_open: bool = False
) -> Any:
    """Validate an observer option in [lo, hi] (or (lo, hi] with ``lo_open``), as tinyptq.params does."""
    constraint = Integer(lo, hi) if integer else Real(lo, hi, lo_open=lo_open)
    return validate("range observer", name, value, constraint)


class RangeObserver(ABC):
    """Collects statistics of a tensor batch by batch; ``range`` picks [lo, hi].

    Every observer tracks the running min / max (per channel along ``axis``),
    the range that nothing is clipped from.
    """

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.min_val: np.ndarray | None = None
        self.max_val: np.ndarray | None = None

    @classmethod
    def option_names(cls) -> list[str]:
        """The method's options (constructor arguments besides ``axis``)."""
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p not in ("self", "axis")]

    def _reduce_axes(self, x: np.ndarray) -> tuple[int, ...] | None:
        if self.axis is None:
            return None
        axis = self.axis % x.ndim
        return tuple(i for i in range(x.ndim) if i != axis)

    def update(self, x: np.ndarray) -> None:
        """Add one batch (or the whole weight tensor)."""
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            raise DataError("a range observer got an empty tensor")
        if not np.all(np.isfinite(x)):
            raise DataError("NaN/Inf values reached a range observer (check the calibration data)")
        axes = self._reduce_axes(x)
        lo, hi = np.min(x, axis=axes), np.max(x, axis=axes)
        self.min_val = lo if self.min_val is None else np.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else np.maximum(self.max_val, hi)
        self._update(x)

    def _update(self, x: np.ndarray) -> None:  # noqa: B027  (an optional hook: min-max needs none)
        """Method-specific statistics (the running min / max are already kept)."""

    def minmax(self) -> tuple[np.ndarray, np.ndarray]:
        """The observed (min, max), scalars or per-channel arrays."""
        if self.min_val is None:
            raise DataError("range observer saw no data")
        return self.min_val, self.max_val

    @abstractmethod
    def range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        """The chosen (lo, hi), scalars or per-channel arrays."""


class MinMaxObserver(RangeObserver):
    """The running minimum and maximum: nothing is clipped."""

    def range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        return self.minmax()


class ClippingObserver(RangeObserver):
    """Base of the clipping methods: exact values for one update, a histogram for many."""

    def __init__(self, axis: int | None = None, num_bins: int = 2048) -> None:
        super().__init__(axis)
        self.num_bins = check_number(num_bins, "num_bins", 16, 2**20, integer=True)
        self.rows: np.ndarray | None = None  # (channels, values) of a single update
        self.hist: StreamingHistogram | None = None

    def _update(self, x: np.ndarray) -> None:
        if self.axis is not None:
            if self.rows is not None:
                raise ConfigError(
                    f"per-channel '{self.method_name()}' ranges need the whole tensor in one update"
                )
            axis = self.axis % x.ndim
            self.rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).copy()
            return
        if self.hist is None and self.rows is None and x.size <= EXACT_LIMIT:
            self.rows = x.reshape(1, -1).copy()
            return
        if self.hist is None:
            self.hist = StreamingHistogram(self.num_bins)
            if self.rows is not None:
                self.hist.update(self.rows)
                self.rows = None  # from now on memory is the bins only
        self.hist.update(x)

    @classmethod
    def method_name(cls) -> str:
        """The name this class is registered under."""
        return next((k for k, v in RANGE_METHODS.items() if v is cls), cls.__name__)

    def range(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        self.minmax()  # raises when nothing was observed
        if self.rows is not None:
            lo, hi = self._range_rows(self.rows, spec)
            return (lo, hi) if self.axis is not None else (lo[0], hi[0])
        lo, hi = self._range_hist(self.hist, spec)
        return np.asarray(lo, np.float64), np.asarray(hi, np.float64)

    @abstractmethod
    def _range_rows(self, rows: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        """Per-row (lo, hi) from exact values, rows = channels."""

    @abstractmethod
    def _range_hist(self, hist: StreamingHistogram, spec: QuantSpec) -> tuple[float, float]:
        """(lo, hi) from the streaming histogram."""


def clip_range(threshold: Any, mn: Any, mx: Any) -> tuple[np.ndarray, np.ndarray]:
    """[-t, t] intersected with [min, max]; a zero threshold falls back to no clipping."""
    mn, mx = np.asarray(mn, np.float64), np.asarray(mx, np.float64)
    t = np.asarray(threshold, np.float64)
    t = np.where(t > 0, t, np.maximum(-mn, mx))
    return np.maximum(mn, -t), np.minimum(mx, t)


def magnitude_levels(spec: QuantSpec, two_sided: bool) -> int:
    """Grid levels available to |x|: all of them for one-sided data, half for two-sided."""
    signed = spec.signed if spec.signed is not None else (spec.symmetric and two_sided)
    qmin, qmax = grid_limits(spec.bits, signed, spec.narrow_range)
    levels = qmax - qmin + 1
    return max(2, levels // 2) if two_sided else levels


class PercentileObserver(ClippingObserver):
    """Clip at the p-th percentile of |x| (symmetric specs) or at the (100-p)-th / p-th of x.

    A symmetric spec leaves (100 - p) % of the values outside in total; an
    asymmetric one (100 - p) % on each side, so twice that for two-sided data.
    """

    def __init__(self, axis: int | None = None, percentile: float = 99.99, num_bins: int = 2048) -> None:
        super().__init__(axis, num_bins)
        self.percentile = check_number(percentile, "percentile", 50.0, 100.0, lo_open=True)

    def _range_rows(self, rows: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        p, mn, mx = self.percentile, rows.min(axis=1), rows.max(axis=1)
        if spec.symmetric:
            return clip_range(np.percentile(np.abs(rows), p, axis=1), mn, mx)
        return self._ordered(np.percentile(rows, 100 - p, axis=1), np.percentile(rows, p, axis=1), mn, mx)

    def _range_hist(self, hist: StreamingHistogram, spec: QuantSpec) -> tuple[float, float]:
        # a range within one bin is below what the histogram resolves (a point mass at 0
        # inside the first bin, say): such ranges fall back to min / max like empty ones
        q, width = self.percentile / 100, hist.width
        if spec.symmetric:
            t = hist.abs_quantile(q)
            return clip_range(t if t > width else 0.0, hist.min, hist.max)
        return self._ordered(hist.quantile(1 - q), hist.quantile(q), hist.min, hist.max, width)

    @staticmethod
    def _ordered(lo: Any, hi: Any, mn: Any, mx: Any, resolution: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """An empty clipped range (e.g. a mostly-zero ReLU output) falls back to min / max."""
        keep = np.asarray(hi) - np.asarray(lo) > resolution
        return np.where(keep, lo, mn), np.where(keep, hi, mx)


class MSEObserver(ClippingObserver):
    """The range minimizing the Lp quantization error on the actual grid (bits matter).

    Candidates shrink the min-max range by factors k / num_candidates,
    k = 1..num_candidates (both ends together); each is turned into an Encoding
    and scored by sum |fake_quant(x) - x|^p over the tensor (per channel), or
    over the histogram's bin centres weighted by their counts. The factor 1
    (min-max) is a candidate, so the result is never worse than min-max on the
    data it saw.
    """

    def __init__(
        self, axis: int | None = None, p: float = 2.0, num_candidates: int = 100, num_bins: int = 2048
    ) -> None:
        super().__init__(axis, num_bins)
        self.p = check_number(p, "p", 0.0, 100.0, lo_open=True)
        self.num_candidates = check_number(num_candidates, "num_candidates", 1, 100_000, integer=True)

    def _range_rows(self, rows: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        return self._search(rows, None, rows.min(axis=1), rows.max(axis=1), spec)

    def _range_hist(self, hist: StreamingHistogram, spec: QuantSpec) -> tuple[float, float]:
        centres, counts = hist.occupied()
        lo, hi = self._search(
            centres[None].astype(np.float32), counts[None], np.array([hist.min]), np.array([hist.max]), spec
        )
        return lo[0], hi[0]

    def _search(
        self, values: np.ndarray, weights: np.ndarray | None, mn: np.ndarray, mx: np.ndarray, spec: QuantSpec
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the shrink factor with the smallest error (ties keep the wider range)."""
        mn, mx = np.asarray(mn, np.float64), np.asarray(mx, np.float64)
        best_err = np.full(mn.shape, np.inf)
        best = np.ones(mn.shape)
        for k in range(self.num_candidates, 0, -1):
            alpha = k / self.num_candidates
            enc = Encoding.from_range(alpha * mn, alpha * mx, spec, axis=0)
            err = lp_error(values, enc, self.p, weights)
            better = err < best_err
            best_err[better], best[better] = err[better], alpha
        return best * mn, best * mx


def lp_error(values: np.ndarray, enc: Encoding, p: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``values`` (channels first), sum of weights * |fake_quant(x) - x|^p."""
    diff = np.abs(enc.fake_quant(values) - values).astype(np.float64)
    err = diff * diff if p == 2 else diff**p
    if weights is not None:
        err = err * weights
    return err.sum(axis=1)


class KLObserver(ClippingObserver):
    """Entropy calibration (TensorRT): the |x| threshold minimizing KL(P || quantized P).

    It works on the histogram of |x| with ``num_quant_bins`` levels, by default
    the levels the grid gives |x|: 2**(bits-1) for two-sided data, 2**bits for
    one-sided data such as ReLU outputs (the common asymmetric case). The range
    is [-t, t] intersected with [min, max], so for one-sided data only the top
    is clipped; for two-sided data under an asymmetric spec both sides are cut
    at the same magnitude. Exact values (weights) are binned per channel over
    [0, max |x|] with ``num_bins`` bins, or fewer so that each holds about
    ``VALUES_PER_BIN`` values on average. The first bin's count is replaced by the
    second's, so that the zeros of ReLU outputs do not decide the threshold.
    """

    def __init__(
        self, axis: int | None = None, num_bins: int = 2048, num_quant_bins: int | None = None
    ) -> None:
        super().__init__(axis, num_bins)
        if num_quant_bins is not None:
            num_quant_bins = check_number(num_quant_bins, "num_quant_bins", 2, self.num_bins, integer=True)
        self.num_quant_bins = num_quant_bins

    def _threshold(self, counts: np.ndarray, width: float, spec: QuantSpec, two_sided: bool) -> float:
        levels = self.num_quant_bins or magnitude_levels(spec, two_sided)
        counts = np.array(counts, dtype=np.float64)
        if counts.size > 1:
            # the exact zeros of a ReLU output are a spike in the first bin that no
            # merging can represent; left in, it dominates KL and drives the threshold
            # down (NVIDIA's entropy calibrator flattens it the same way)
            counts[0] = counts[1]
        return kl_threshold_bins(counts, levels) * width

    def _range_rows(self, rows: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        mn, mx = rows.min(axis=1), rows.max(axis=1)
        two_sided = bool(np.any(mn < 0))
        # a few values spread over many bins make a spiky P that any Q matches
        # poorly; with ~VALUES_PER_BIN values per bin, a small kernel (27 weights per
        # channel) gets fewer bins than levels, and so is not clipped at all
        bins = int(min(self.num_bins, max(1, rows.shape[1] // VALUES_PER_BIN)))
        thresholds = []
        for row in np.abs(rows):
            amax = float(row.max())
            if amax == 0:
                thresholds.append(0.0)
                continue
            counts, _ = np.histogram(row, bins=bins, range=(0.0, amax))
            thresholds.append(self._threshold(counts, amax / bins, spec, two_sided))
        return clip_range(np.array(thresholds), mn, mx)

    def _range_hist(self, hist: StreamingHistogram, spec: QuantSpec) -> tuple[float, float]:
        counts, width = hist.abs_counts()
        t = self._threshold(counts, width, spec, hist.min < 0)
        return clip_range(t, hist.min, hist.max)


RANGE_METHODS: dict[str, type[RangeObserver]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


def make_observer(method: str, axis: int | None = None, **options: Any) -> RangeObserver:
    """An observer for ``method`` (one of RANGE_METHODS) with its options."""
    try:
        cls = RANGE_METHODS[method]
    except KeyError:
        raise ConfigError(
            f"unknown range method '{method}'; valid: {', '.join(sorted(RANGE_METHODS))}"
        ) from None
    valid = cls.option_names()
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"unknown option '{key}' for range method '{method}'; valid: {', '.join(valid) or 'none'}"
            )
    return cls(axis=axis, **options)
