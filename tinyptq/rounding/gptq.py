"""GPTQ's maths (Frantar et al. 2022): im2col rows, Hessians, the column-by-column solve on a fixed grid.

See :mod:`tinyptq.components.gptq` for the stage that runs it layer by layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dsyrk as syrk

from tinyptq.errors import ConfigError, ModelError
from tinyptq.graph.spec import LayerSpec, same_pads
from tinyptq.pipeline import PTQState
from tinyptq.quant import Encoding

_CHUNK_VALUES = 2**22  # im2col values turned into Hessian terms at a time (memory bound)
_MAX_DAMPING_RETRIES = 8


# ------------------------------------------------------------------ im2col
def conv_geometry(
    spec: LayerSpec, spatial: tuple[int, ...]
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """(pads, output sizes) of a conv layer on an input of spatial size ``spatial``."""
    taps = spec.kernel.shape[2:]
    pads = spec.pads
    if spec.same_padding or len(pads) != len(
        taps
    ):  # 'same' on a free size: as TF's "SAME" computes it
        pads = tuple(
            same_pads(*a) for a in zip(spatial, taps, spec.strides, spec.dilations, strict=True)
        )
    out = tuple(
        (size + before + after - (k - 1) * d - 1) // s + 1
        for size, (before, after), k, s, d in zip(
            spatial, pads, taps, spec.strides, spec.dilations, strict=True
        )
    )
    return pads, out


def conv_groups(spec: LayerSpec, in_channels: int) -> int:
    """The number of groups, from the input the layer really reads (kernel (out, in // groups, *taps))."""
    per_group = int(spec.kernel.shape[1])
    groups = in_channels // per_group
    if in_channels % per_group or spec.out_channels % groups:
        raise ModelError(
            f"layer '{spec.name}': kernel {tuple(spec.kernel.shape)} does not fit {in_channels} input channels"
        )
    return groups


def im2col(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """The rows a conv layer multiplies by its kernel: shape (N * out positions, groups, in // groups * taps).

    ``x`` is the tensor the layer reads (NHWC when ``spec.channels_last``, else
    NCHW; 1-D convolutions without the height). Row order is (sample, output
    position); column order is that of the canonical kernel flattened per
    output channel, so ``rows[:, g] @ kernel[group g].reshape(out_g, -1).T``
    is the layer's output (bias excluded).
    """
    x = np.asarray(x)
    if not spec.channels_last:
        x = np.moveaxis(x, 1, -1)
    pads, out = conv_geometry(spec, tuple(x.shape[1:-1]))
    taps, strides, dilations = spec.kernel.shape[2:], spec.strides, spec.dilations
    if len(taps) == 1:  # as 2-D with a height of one
        x, pads, out = x[:, None], ((0, 0), *pads), (1, *out)
        taps, strides, dilations = (1, *taps), (1, *strides), (1, *dilations)
    channels = x.shape[-1]
    groups = conv_groups(spec, channels)
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    n, (oh, ow), (kh, kw) = x.shape[0], out, taps
    cols = np.empty((n, oh, ow, channels, kh, kw), x.dtype)
    for i in range(kh):
        top = i * dilations[0]
        for j in range(kw):
            left = j * dilations[1]
            cols[..., i, j] = x[
                :,
                top : top + (oh - 1) * strides[0] + 1 : strides[0],
                left : left + (ow - 1) * strides[1] + 1 : strides[1],
            ]
    return cols.reshape(n * oh * ow, groups, -1)


def layer_rows(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """The layer's input as matrix rows (positions, groups, columns): im2col, or dense vectors."""
    if spec.kind == "dense":
        x = np.asarray(x)
        return x.reshape(-1, 1, x.shape[-1])
    return im2col(x, spec)


# ------------------------------------------------------------------ Hessian
class Hessian:
    """Streaming sum of X^T X per group (float64) and the row count: H = 2 X^T X / n."""

    def __init__(self) -> None:
        self.xtx: np.ndarray | None = None  # upper triangles (BLAS syrk)
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        """Accumulate a batch of rows (positions, groups, columns)."""
        n, groups, cols = rows.shape
        if self.xtx is None:
            self.xtx = np.zeros((groups, cols, cols))
        step = max(1, _CHUNK_VALUES // max(1, groups * cols))
        for start in range(0, n, step):
            part = rows[start : start + step]
            for g in range(groups):
                # syrk (one triangle of A^T A) in float64: several times faster than a general product
                a = np.asarray(part[:, g, :].T, np.float64, order="F")
                self.xtx[g] = syrk(1.0, a, beta=1.0, c=self.xtx[g], trans=0, lower=0)
        self.rows += n

    @property
    def matrix(self) -> np.ndarray:
        """H = 2 X^T X / n, one (columns, columns) matrix per group."""
        if self.xtx is None or self.rows == 0:
            raise ConfigError("gptq saw no calibration rows")
        upper = np.triu(self.xtx)
        return 2.0 * (upper + np.triu(upper, 1).transpose(0, 2, 1)) / self.rows


def row_losses(delta: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Squared layer output error per output channel, averaged over rows, of a kernel change (groups, rows, cols).

    With H = 2 X^T X / n it is delta_r (H / 2) delta_r^T: the mean over the
    calibration rows of (x . delta_r)^2, exactly (padding rows included).
    """
    return np.einsum("grc,gcd,grd->gr", delta, hessian / 2.0, delta)


# ------------------------------------------------------------------ solver
@dataclass
class Grid:
    """The fixed grid of every weight of a (groups, rows, cols) problem: scale, zero point, limits."""

    scale: np.ndarray  # float64, same shape as the weights
    zero_point: np.ndarray
    qmin: int
    qmax: int

    def quantize(self, w: np.ndarray, index: Any = ...) -> np.ndarray:
        """Nearest grid integers of ``w`` (at ``index`` of the grid arrays)."""
        q = np.rint(w / self.scale[index]) + self.zero_point[index]
        return np.clip(q, self.qmin, self.qmax)

    def dequantize(self, q: np.ndarray, index: Any = ...) -> np.ndarray:
        """Grid values of the integers ``q``."""
        return (q - self.zero_point[index]) * self.scale[index]

    def permuted(self, perm: np.ndarray) -> Grid:
        """The grid with columns in the order ``perm`` (groups, cols)."""
        take = perm[:, None, :]
        return Grid(
            np.take_along_axis(self.scale, take, 2),
            np.take_along_axis(self.zero_point, take, 2),
            self.qmin,
            self.qmax,
        )


def inverse_cholesky(hessian: np.ndarray, percdamp: float) -> tuple[np.ndarray, float]:
    """(U, relative damping used): U upper with U^T U = (H + damping I)^-1, per group.

    Dead columns (H_jj = 0: inputs that are zero on all calibration data) get
    H_jj = 1 so that they are rounded to nearest and change nothing else. When
    a Cholesky factorisation fails, the damping grows tenfold and it retries.
    """
    h = np.array(hessian, np.float64, copy=True)
    diag = np.einsum("gii->gi", h)  # a writable view of the diagonals
    diag[diag <= 0] = 1.0
    mean_diag = diag.mean(axis=1)
    eye = np.eye(h.shape[1])
    u = np.empty_like(h)
    damping = percdamp
    for _ in range(_MAX_DAMPING_RETRIES):
        try:
            damped = h + (damping * mean_diag)[:, None, None] * eye
            for g in range(h.shape[0]):
                lower = scipy.linalg.cholesky(damped[g], lower=True)
                inverse = scipy.linalg.cho_solve((lower, True), eye)
                u[g] = scipy.linalg.cholesky(inverse, lower=False)
            return u, damping
        except np.linalg.LinAlgError:
            damping *= 10.0
    raise ConfigError(
        f"gptq: the Hessian stays singular with damping up to {damping:g} of its mean diagonal"
    )


def gptq_integers(
    weights: np.ndarray,
    hessian: np.ndarray,
    grid: Grid,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """GPTQ's grid integers of ``weights`` (groups, rows, cols) under H (groups, cols, cols).

    Returns the integers (float64 array of whole numbers, same shape) and
    facts for the log. Batched over groups: every group is its own problem.
    """
    groups, _, cols = weights.shape
    perm = np.argsort(-np.einsum("gii->gi", hessian), axis=1, kind="stable") if act_order else None
    w, h = weights.astype(np.float64), hessian
    if perm is not None:
        w = np.take_along_axis(w, perm[:, None, :], 2)
        h = hessian[np.arange(groups)[:, None, None], perm[:, :, None], perm[:, None, :]]
        grid = grid.permuted(perm)
    u, damping = inverse_cholesky(h, percdamp)
    q = np.empty_like(w)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = w[:, :, start:stop].copy()
        errors = np.empty_like(block)
        ub = u[:, start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            q[:, :, col] = grid.quantize(block[:, :, i], (slice(None), slice(None), col))
            rounded = grid.dequantize(q[:, :, col], (slice(None), slice(None), col))
            err = (block[:, :, i] - rounded) / ub[:, i, i][:, None]
            block[:, :, i:] -= err[:, :, None] * ub[:, None, i, i:]
            errors[:, :, i] = err
        w[:, :, stop:] -= np.matmul(errors, u[:, start:stop, stop:])
    if perm is not None:
        q = np.take_along_axis(q, np.argsort(perm, axis=1)[:, None, :], 2)
    return q, {"damping": damping}


# ------------------------------------------------------------------ layers
def grid_of(enc: Encoding, layout: Any, kernel_shape: tuple[int, ...], groups: int) -> Grid:
    """The encoding's grid per weight, in the (groups, rows, cols) view of the canonical kernel."""
    ndim = len(kernel_shape)
    scale, zp = enc.tf_params(ndim)
    canon = [
        layout.to_canonical(np.broadcast_to(a, kernel_shape)).astype(np.float64)
        for a in (scale, zp)
    ]
    out = canon[0].shape[0]
    shape = (groups, out // groups, -1)
    return Grid(canon[0].reshape(shape), canon[1].reshape(shape), enc.qmin, enc.qmax)


@dataclass
class LayerResult:
    """What GPTQ did to one layer."""

    integers: np.ndarray  # int32, graph layout
    mse_nearest: float
    mse_gptq: float
    rows_kept_nearest: int
    damping: float
    seconds: float = 0.0


def solve_layer(
    state: PTQState,
    name: str,
    hessian: np.ndarray,
    groups: int,
    block_size: int,
    percdamp: float,
    act_order: bool,
) -> LayerResult:
    """GPTQ integers of one layer from its Hessian (per group), with the output MSE before and after."""
    graph, enc = state.graph, state.weight_encodings[name]
    layout = graph.kernel_layout(name)
    kernel = graph.kernel(name)
    canonical = layout.to_canonical(kernel).astype(np.float64)
    w = canonical.reshape(groups, canonical.shape[0] // groups, -1)
    grid = grid_of(enc, layout, kernel.shape, groups)
    nearest = layout.to_canonical(enc.quantize(kernel)).astype(np.float64).reshape(w.shape)
    with (
        _single_threaded_blas()
    ):  # small factorisations: BLAS threads only contend (20x slower on a busy host)
        q, facts = gptq_integers(w, hessian, grid, block_size, percdamp, act_order)
    # the objective is a sum over output channels: keep nearest rounding on any row where GPTQ did worse
    loss_q = row_losses(grid.dequantize(q) - w, hessian)
    loss_n = row_losses(grid.dequantize(nearest) - w, hessian)
    worse = loss_q > loss_n
    q = np.where(worse[:, :, None], nearest, q)
    integers = layout.from_canonical(q.reshape(canonical.shape), kernel.shape)
    return LayerResult(
        integers=np.rint(integers).astype(np.int32),
        mse_nearest=float(loss_n.mean()),
        mse_gptq=float(np.minimum(loss_q, loss_n).mean()),
        rows_kept_nearest=int(worse.sum()),
        damping=facts["damping"],
    )


def _single_threaded_blas() -> Any:
    """A context limiting BLAS to one thread (threadpoolctl comes with scikit-learn); a no-op without it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
