"""Range observers: percentile, mse and kl clip as they should; the streaming histogram is exact."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.errors import ConfigError
from tinyptq.histogram import StreamingHistogram, kl_threshold_bins
from tinyptq.quant import Encoding, QuantSpec, quantization_mse
from tinyptq.ranges import RANGE_METHODS, make_observer


def heavy_tailed(shape=(3, 3, 16, 32), seed=0) -> np.ndarray:
    """A Laplacian kernel with a few large outliers (as a conv kernel, channels last)."""
    rng = np.random.default_rng(seed)
    w = rng.laplace(scale=0.05, size=shape)
    idx = rng.choice(w.size, size=max(4, w.size // 1000), replace=False)
    w.flat[idx] = rng.choice([-1, 1], idx.size) * rng.uniform(0.6, 1.0, idx.size)
    return w.astype(np.float32)


def encoding_of(method: str, x: np.ndarray, spec: QuantSpec, axis=None, **options) -> Encoding:
    obs = make_observer(method, axis=axis, **options)
    obs.update(x)
    lo, hi = obs.range(spec)
    return Encoding.from_range(lo, hi, spec, axis=axis)


def streamed(method: str, x: np.ndarray, batches: int = 20, **options):
    obs = make_observer(method, **options)
    for part in np.array_split(x, batches):
        obs.update(part)
    return obs


# ----------------------------------------------------------------------- mse
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("axis", [None, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_never_worse_than_minmax(bits, axis, symmetric):
    w = heavy_tailed()
    spec = QuantSpec(bits, symmetric=symmetric, signed=True if symmetric else None, per_channel=axis is not None)
    err_minmax = quantization_mse(w, encoding_of("minmax", w, spec, axis))
    err_mse = quantization_mse(w, encoding_of("mse", w, spec, axis))
    assert err_mse <= err_minmax * (1 + 1e-6)
    if bits <= 4:  # outliers waste most of a coarse grid: clipping must pay off clearly
        # (per channel less so: only the few channels holding an outlier gain much)
        assert err_mse < (0.5 if axis is None else 0.95) * err_minmax


def test_mse_depends_on_bits_and_norm():
    w = heavy_tailed(seed=1)
    hi = {b: float(encoding_of("mse", w, QuantSpec(b)).max) for b in (3, 4, 8)}
    assert hi[3] < hi[4] < hi[8] <= np.abs(w).max() + 1e-6
    # a larger norm weighs big errors (clipped outliers) more: a wider range
    spec = QuantSpec(4)
    assert float(encoding_of("mse", w, spec, p=4.0).max) > float(encoding_of("mse", w, spec, p=1.0).max)


def test_mse_streaming_estimate_beats_minmax_at_4_bits():
    x = heavy_tailed((200_000,), seed=2)
    spec = QuantSpec(4, symmetric=False)
    obs = streamed("mse", x)
    assert obs.rows is None and obs.hist is not None  # histogram path
    lo, hi = obs.range(spec)
    err = quantization_mse(x, Encoding.from_range(lo, hi, spec))
    assert err < 0.5 * quantization_mse(x, encoding_of("minmax", x, spec))
    exact = encoding_of("mse", x, spec)  # the same search on the values themselves
    assert err <= 1.05 * quantization_mse(x, exact)


# ---------------------------------------------------------------- percentile
@pytest.mark.parametrize("streaming", [False, True])
def test_percentile_clips_the_expected_fraction(streaming):
    x = np.random.default_rng(3).laplace(size=100_000).astype(np.float32)
    obs = streamed("percentile", x, percentile=99.0) if streaming else make_observer("percentile", percentile=99.0)
    if not streaming:
        obs.update(x)
    lo, hi = obs.range(QuantSpec(8, symmetric=True))
    assert lo == -hi
    assert abs(np.mean(np.abs(x) > hi) - 0.01) < 0.001  # symmetric: 1 % of |x| outside in total
    lo, hi = obs.range(QuantSpec(8, symmetric=False))
    assert abs(np.mean(x < lo) - 0.01) < 0.001  # asymmetric: 1 % on each side
    assert abs(np.mean(x > hi) - 0.01) < 0.001


def test_streaming_percentile_matches_exact_percentile():
    rng = np.random.default_rng(4)
    # batches of very different spread force several re-binnings
    parts = [rng.normal(scale=s, size=5000) for s in (0.01, 0.1, 1.0, 3.0, 0.5) * 4]
    x = np.concatenate(parts).astype(np.float32)
    for p in (99.0, 99.9):
        obs = make_observer("percentile", percentile=p)
        for part in parts:
            obs.update(part)
        lo, hi = obs.range(QuantSpec(8, symmetric=False))
        _, t = obs.range(QuantSpec(8, symmetric=True))
        tail = (100 - p) / 100
        # in ranks: the same share of values lies outside as for the exact percentile
        assert abs(np.mean(x < lo) - tail) < 0.1 * tail and abs(np.mean(x > hi) - tail) < 0.1 * tail
        assert abs(np.mean(np.abs(x) > t) - tail) < 0.1 * tail
        if p == 99.0:  # where values are dense, also in value: within two bins
            width = obs.hist.width
            assert lo == pytest.approx(np.percentile(x, 100 - p), abs=2 * width)
            assert hi == pytest.approx(np.percentile(x, p), abs=2 * width)
            assert t == pytest.approx(np.percentile(np.abs(x), p), abs=2 * width)


def test_percentile_per_channel_is_exact():
    w = heavy_tailed()
    lo, hi = make_percentile_range(w, QuantSpec(4, symmetric=False), axis=-1)
    rows = np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)
    np.testing.assert_allclose(lo, np.percentile(rows, 2.0, axis=1), rtol=1e-6)
    np.testing.assert_allclose(hi, np.percentile(rows, 98.0, axis=1), rtol=1e-6)


def make_percentile_range(w, spec, axis):
    obs = make_observer("percentile", axis=axis, percentile=98.0)
    obs.update(w)
    return obs.range(spec)


def test_percentile_falls_back_to_minmax_on_mostly_zero_relu_output():
    x = np.zeros(100_000, np.float32)
    x[:5] = [1.0, 2.0, 3.0, 4.0, 5.0]
    lo, hi = streamed("percentile", x, percentile=99.0).range(QuantSpec(8, symmetric=False))
    assert (lo, hi) == (0.0, 5.0)


# ------------------------------------------------------------------------ kl
def ramp_with_outliers(seed: int, symmetric: bool, outlier: float) -> np.ndarray:
    """Density 2|x| on [-1, 1] (or [0, 1]) ending in a sharp edge, plus 20 far outliers.

    Clipping below 1 piles a lot of mass into the last bin; any threshold above 1
    spends levels on empty bins and leaves the outliers' mass where Q has none.
    So the entropy threshold is the bulk's edge, 1.
    """
    rng = np.random.default_rng(seed)
    bulk = np.sqrt(rng.random(100_000))
    if symmetric:
        bulk *= rng.choice([-1.0, 1.0], bulk.size)
    out = np.full(20, outlier) * (np.resize([-1.0, 1.0], 20) if symmetric else 1.0)
    return rng.permutation(np.concatenate([bulk, out])).astype(np.float32)


@pytest.mark.parametrize(
    "symmetric, bits, outlier", [(True, 8, 4.0), (False, 8, 4.0), (True, 4, 20.0), (False, 4, 20.0)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_finds_the_edge_of_the_bulk(symmetric, bits, outlier, seed):
    x = ramp_with_outliers(seed, symmetric, outlier)
    spec = QuantSpec(bits, symmetric=symmetric)
    lo, hi = streamed("kl", x).range(spec)
    assert 0.95 < hi < 1.05 and hi < 0.3 * x.max()
    assert lo == (-hi if symmetric else x.min())  # one-sided data: only the top is clipped
    hi_exact = float(encoding_of("kl", x, spec).max)  # one update: exact values, own bins
    assert 0.9 < hi_exact < 1.1


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_kl_ignores_the_zeros_of_a_relu_output(bits):
    """Exact zeros (a ReLU output) say nothing about where to clip: same threshold with or without.

    Left in, the spike in the first bin drags the threshold to 0.1-0.5 here.
    """
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=100_000)).astype(np.float32)
    relu = rng.permutation(np.concatenate([x, np.zeros(300_000, np.float32)]))
    spec = QuantSpec(bits, symmetric=False)
    _, hi = streamed("kl", x).range(spec)
    lo_relu, hi_relu = streamed("kl", relu).range(spec)
    assert lo_relu == 0.0 and hi_relu == pytest.approx(hi, rel=0.05) and hi > 3.0


def test_kl_on_small_kernels_does_not_collapse():
    """27 weights per channel cannot fill 2048 bins: fewer bins, so no absurd clipping."""
    w = np.random.default_rng(8).normal(size=(3, 3, 3, 16)).astype(np.float32)
    enc = encoding_of("kl", w, QuantSpec(4, signed=True, per_channel=True), axis=-1)
    minmax = encoding_of("minmax", w, QuantSpec(4, signed=True, per_channel=True), axis=-1)
    np.testing.assert_array_equal(enc.scale, minmax.scale)  # fewer bins than levels: no clipping
    w = np.random.default_rng(9).normal(size=(3, 3, 64, 64)).astype(np.float32)
    enc = encoding_of("kl", w, QuantSpec(4, signed=True, per_channel=True), axis=-1)
    ratio = enc.scale * enc.qmax / np.abs(w).reshape(-1, 64).max(axis=0)
    assert ratio.min() > 0.4 and ratio.mean() < 0.99  # larger kernels are clipped, moderately


def test_kl_threshold_bins_matches_a_plain_loop():
    """The vectorized search equals a direct, bin-by-bin evaluation of KL(P||Q)."""
    rng = np.random.default_rng(5)
    counts = np.histogram(np.abs(rng.standard_t(3, size=3000)), 300)[0].astype(float)

    def plain_kl(i: int, levels: int) -> float:
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        mask = p > 0
        starts = (np.arange(levels) * i) // levels
        sizes = np.diff(np.append(starts, i))
        per_level = np.add.reduceat(counts[:i], starts) / np.maximum(np.add.reduceat(mask * 1.0, starts), 1)
        q = np.repeat(per_level, sizes) * mask
        p, q = p[mask] / p.sum(), q[mask] / q.sum()
        return float(np.sum(p * np.log(p / np.maximum(q, 1e-9))))

    n = int(np.flatnonzero(counts)[-1]) + 1
    for levels in (8, 16, 64):
        expected = levels + int(np.argmin([plain_kl(i, levels) for i in range(levels, n + 1)]))
        assert kl_threshold_bins(counts, levels) == expected


# ----------------------------------------------------------------- streaming
def test_histogram_memory_is_bounded_and_rebinning_preserves_counts():
    rng = np.random.default_rng(6)
    hist, seen = StreamingHistogram(256), []
    for i in range(200):
        batch = rng.normal(loc=(i % 7) - 3, scale=10.0 ** rng.uniform(-3, 2), size=500)
        hist.update(batch)
        seen.append(batch)
        assert hist.counts.shape == (256,) and hist.total == 500 * (i + 1)
    x = np.concatenate(seen)
    assert (hist.min, hist.max) == (x.min(), x.max())
    # merging bins is exact: the counts are the histogram of everything on the final edges
    direct = np.histogram(x, bins=hist.edges())[0]
    assert np.abs(direct - hist.counts).sum() <= 2  # values on an edge may fall either way
    abs_counts, width = hist.abs_counts()
    direct_abs = np.histogram(np.abs(x), bins=np.arange(abs_counts.size + 1) * width)[0]
    assert np.abs(direct_abs - abs_counts).sum() <= 2 and abs_counts.sum() == x.size


def test_observer_memory_is_bounded_over_many_batches():
    rng = np.random.default_rng(7)
    for method in ("percentile", "mse", "kl"):
        obs = make_observer(method, num_bins=512)
        for _ in range(50):
            obs.update(rng.normal(size=(8, 4, 4, 3)))
        assert obs.rows is None and obs.hist.counts.size == 512 and obs.hist.total == 50 * 384


def test_histogram_starting_with_constant_values():
    hist = StreamingHistogram(64)
    hist.update(np.zeros(100))
    hist.update(np.zeros(10))
    hist.update(np.linspace(-1e-3, 2e-3, 50))
    assert hist.total == 160 and hist.width < 1e-4  # resolution set by the first spread batch
    assert hist.quantile(0.5) == pytest.approx(0.0, abs=2 * hist.width)


# ------------------------------------------------------------------- factory
def test_factory_and_option_errors_name_the_culprit():
    assert set(RANGE_METHODS) == {"minmax", "percentile", "mse", "kl"}
    with pytest.raises(ConfigError, match="'entropy'.*kl, minmax, mse, percentile"):
        make_observer("entropy")
    with pytest.raises(ConfigError, match="unknown option 'p' for range method 'kl'"):
        make_observer("kl", p=2.0)
    for method, options, name in [
        ("percentile", {"percentile": 40.0}, "percentile"),
        ("percentile", {"percentile": 100.5}, "percentile"),
        ("mse", {"p": 0.0}, "p"),
        ("mse", {"num_candidates": 0}, "num_candidates"),
        ("kl", {"num_bins": 8}, "num_bins"),
        ("kl", {"num_quant_bins": 1}, "num_quant_bins"),
        ("kl", {"num_bins": 2.5}, "num_bins"),
    ]:
        with pytest.raises(ConfigError, match=name):
            make_observer(method, **options)


def test_per_channel_clipping_needs_one_update():
    obs = make_observer("mse", axis=-1)
    obs.update(heavy_tailed())
    with pytest.raises(ConfigError, match="one update"):
        obs.update(heavy_tailed())
