"""A streaming histogram with a growing range, and the entropy (KL) threshold search on it.

The histogram keeps a fixed number of equal-width bins whose edges are integer
multiples of the bin width, so zero is always an edge. When a batch falls
outside the current window the width is multiplied by a power of two: each new
bin is the exact union of 2**k old ones, so re-binning moves counts without
interpolation and the total count is preserved. The window then slides to
start at the running minimum. Memory is ``num_bins`` counts however many
batches come, and the histogram of ``|x|`` is an exact fold of the signed one.
"""

from __future__ import annotations

import math

import numpy as np


class StreamingHistogram:
    """``num_bins`` equal-width bins over a range that grows with the data."""

    def __init__(self, num_bins: int = 2048) -> None:
        if num_bins < 4:
            raise ValueError("a streaming histogram needs at least 4 bins")
        self.num_bins = int(num_bins)
        self.counts = np.zeros(self.num_bins, dtype=np.int64)
        self.width: float | None = None  # bin width
        self.offset = 0  # global index (edge / width) of the first bin's left edge
        self.min = math.inf
        self.max = -math.inf

    @property
    def total(self) -> int:
        """Number of values added so far."""
        return int(self.counts.sum())

    def update(self, x: np.ndarray) -> None:
        """Add a batch of values (any shape), widening the range when needed."""
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size == 0:
            return
        lo, hi = min(self.min, float(x.min())), max(self.max, float(x.max()))
        if self.width is None or self.min == self.max:
            self._restart(lo, hi)
        self._fit(lo, hi)
        self.min, self.max = lo, hi
        self.counts += np.bincount(self._index(x), minlength=self.num_bins)

    def _index(self, x: np.ndarray) -> np.ndarray:
        idx = np.floor(x / self.width).astype(np.int64) - self.offset
        return np.clip(idx, 0, self.num_bins - 1)  # float edge cases land in the end bins

    def _restart(self, lo: float, hi: float) -> None:
        """Choose the width afresh; what was seen so far is a single value (or nothing)."""
        seen, value = self.total, self.min
        span = hi - lo
        if span > 0:
            self.width = span / (self.num_bins - 2)  # +2: both ends may straddle an edge
        else:
            self.width = abs(hi) / (self.num_bins // 2) if hi != 0 else 1.0
        self.offset = math.floor(lo / self.width)
        self.counts[:] = 0
        if seen:
            self.counts[self._index(np.array([value]))] = seen

    def _fit(self, lo: float, hi: float) -> None:
        """Merge bins (width x 2**k) until [lo, hi] fits, then start the window at ``lo``."""
        width, factor = self.width, 1
        while math.floor(hi / width) - math.floor(lo / width) + 1 > self.num_bins:
            width, factor = width * 2, factor * 2
        new_offset = math.floor(lo / width)
        if factor == 1 and new_offset == self.offset:
            return
        occupied = np.flatnonzero(self.counts)
        target = (self.offset + occupied) // factor - new_offset
        target = np.clip(target, 0, self.num_bins - 1)
        counts = np.zeros_like(self.counts)
        np.add.at(counts, target, self.counts[occupied])
        self.counts, self.width, self.offset = counts, width, new_offset

    # ------------------------------------------------------------- read-outs
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges."""
        return (self.offset + np.arange(self.num_bins + 1)) * self.width

    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres and counts of the non-empty bins."""
        idx = np.flatnonzero(self.counts)
        centres = (self.offset + idx + 0.5) * self.width
        return np.clip(centres, self.min, self.max), self.counts[idx]

    def abs_counts(self) -> tuple[np.ndarray, float]:
        """The histogram of ``|x|``: counts of bins [k w, (k+1) w) for k = 0.. and the width w."""
        idx = np.flatnonzero(self.counts)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64), float(self.width or 1.0)
        g = self.offset + idx
        k = np.where(g >= 0, g, -g - 1)  # bin [g w, (g+1) w) with g < 0 mirrors to [(-g-1) w, -g w)
        counts = np.zeros(int(k.max()) + 1, dtype=np.int64)
        np.add.at(counts, k, self.counts[idx])
        return counts, float(self.width)

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the values, interpolated linearly inside a bin."""
        value = _quantile(self.counts, self.offset * self.width, self.width, q)
        return float(np.clip(value, self.min, self.max))

    def abs_quantile(self, q: float) -> float:
        """The q-quantile (0..1) of ``|x|``."""
        counts, width = self.abs_counts()
        amax = max(abs(self.min), abs(self.max))
        return float(np.clip(_quantile(counts, 0.0, width, q), 0.0, amax))


def _quantile(counts: np.ndarray, start: float, width: float, q: float) -> float:
    """Quantile of a histogram with bins [start + i w, start + (i+1) w)."""
    cum = np.cumsum(counts, dtype=np.float64)
    if cum.size == 0 or cum[-1] == 0:
        return start
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / counts[i] if counts[i] else 0.0
    return start + (i + frac) * width


# ------------------------------------------------------------- entropy (KL)
def kl_threshold_bins(counts: np.ndarray, num_quant_bins: int, budget: int = 2**19) -> int:
    """How many leading bins of a ``|x|`` histogram to keep so that KL(P||Q) is smallest.

    TensorRT-style entropy calibration: for each candidate ``i`` the reference P
    is the first ``i`` bins with all the mass beyond added to the last one; Q
    merges those ``i`` bins (without the clipped mass) into ``num_quant_bins``
    levels and spreads each level's count evenly over the bins where P is
    non-zero. Every ``i`` from ``num_quant_bins`` to the last non-empty bin is
    tried (the divergence is jagged in ``i``; striding misses minima), in blocks
    of about ``budget`` (candidate, non-empty bin) pairs: only the non-empty bins
    enter, which keeps sparse histograms (weights) cheap.
    """
    counts = np.asarray(counts, dtype=np.float64)
    occupied = np.flatnonzero(counts)
    if occupied.size == 0:
        return 0
    n = int(occupied[-1]) + 1
    if n <= num_quant_bins:
        return n
    candidates = np.arange(num_quant_bins, n + 1)
    block = max(1, budget // occupied.size)
    kl = np.concatenate([
        _clipped_kl(occupied, counts[occupied], candidates[s : s + block], num_quant_bins)
        for s in range(0, len(candidates), block)
    ])
    return int(candidates[int(np.argmin(kl))])


def _clipped_kl(bins: np.ndarray, counts: np.ndarray, keep: np.ndarray, levels: int) -> np.ndarray:
    """KL(P||Q) for thresholds ``keep`` (bins kept), from the occupied ``bins`` and their counts."""
    total, rows = counts.sum(), np.arange(keep.size)
    i = keep[:, None]
    inside = bins[None, :] < i
    kept_mass = np.where(inside, counts, 0.0).sum(axis=1)
    clipped = total - kept_mass  # goes to bin i-1, which may itself be empty
    last_occupied = np.isin(keep - 1, bins)
    extra = (clipped > 0) & ~last_occupied  # bin i-1: P > 0 from the clipped mass alone
    # bin j of i kept bins is on level ceil((j+1) levels / i) - 1 (levels split at floor(k i / levels))
    level = ((bins[None, :] + 1) * levels + i - 1) // i - 1 + rows[:, None] * levels
    level = np.where(inside, level, 0)
    size = keep.size * levels
    level_sum = np.bincount(level[inside], weights=np.broadcast_to(counts, inside.shape)[inside], minlength=size)
    level_nnz = np.bincount(level[inside], minlength=size).astype(np.float64)
    last = rows * levels + levels - 1
    level_nnz[last] += extra
    q = level_sum[level] / np.maximum(level_nnz[level], 1.0) / np.maximum(kept_mass[:, None], 1e-300)
    p = (counts + np.where(bins[None, :] == i - 1, clipped[:, None], 0.0)) / total
    q_extra = level_sum[last] / np.maximum(level_nnz[last], 1.0) / np.maximum(kept_mass, 1e-300)
    # P mass where Q has none (the clipped tail in an empty last level) costs as if
    # Q held a tiny share there, rather than an infinite divergence
    terms = np.where(inside, p * np.log(p / np.maximum(q, 1e-9)), 0.0).sum(axis=1)
    p_extra = clipped / total
    return terms + np.where(extra, p_extra * np.log(np.maximum(p_extra, 1e-300) / np.maximum(q_extra, 1e-9)), 0.0)
