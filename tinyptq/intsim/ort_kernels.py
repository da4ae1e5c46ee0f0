"""Bit-exact numpy versions of the onnxruntime CPU kernels that tinyptq's QDQ exports run on.

onnxruntime (default graph optimizations, x86-64 CPU) turns groups
DequantizeLinear -> op -> QuantizeLinear of one 8-bit type into integer
kernels and runs everything else as float32 MLAS kernels between
DequantizeLinear and QuantizeLinear (tinyptq.intsim.ort_sim decides which).
For the same inputs every function here returns exactly what onnxruntime
1.32 computes on an AVX512 (VNNI) machine; tests/intsim/test_ort_kernels.py
compares each with onnxruntime on one-operator models. Tensors are NCHW.

Integer kernels:

* QuantizeLinear (MlasQuantizeLinear): float32 division ``x / scale``,
  rounded half to even, plus the zero point, saturated.
  DequantizeLinear: ``float32(q - zp) * scale`` in float32.
* WeightBiasQuantization (a graph rewrite): a float bias becomes
  ``int32(rint(float32(b / float32(s_x * s_w))))``; float weights become
  asymmetric int8 from their min / max (dynamic_int8_params).
* QLinearConv: exact int32 accumulation of ``(x - zp_x) * (w - zp_w)`` plus
  the int32 bias (VNNI / AMX kernels do not saturate; AVX2 without VNNI would),
  then MlasRequantizeOutput: ``float32(acc) * m`` with
  ``m = float32(float32(s_x * s_w[c]) / s_y)``, rounded half to even, plus
  ``zp_y``, saturated. QGemm requantizes the same way.
* QLinearAdd (AVX2 kernel): ``r_a = s_a / s_c``, ``r_b = s_b / s_c`` and
  ``fixed = zp_c - (r_a * zp_a + r_b * zp_b)`` in float32; per element
  ``fma(a, r_a, fma(b, r_b, fixed))`` on the stored integers, rounded half
  to even, saturated.
* QLinearGlobalAveragePool, and QLinearAveragePool whose window is the whole
  image without padding: the int32 sum of ``x - zp_x`` times
  ``float32(s_x / float32(s_y * count))``, then as MlasRequantizeOutput.
  Other QLinearAveragePool windows: float32 row-major sums of dequantized
  values divided by the count, ``nearbyint(y / s_y + zp_y)``.
* QLinearSoftmax: a float32 table ``exp((i - 255 + shift) * s_x)`` computed
  in double (``shift = max(0, log(FLT_MAX / D) - 5) / s_x``), a float32 row
  sum in order, ``nearbyint(t * floor(1 / s_y) / sum) + zp_y`` saturated:
  the output scale enters only through ``floor(1 / s_y)``.

Float kernels (MLAS single precision):

* Conv / FusedConv (im2col + SGEMM): every output is a chain of fused
  multiply-adds over ``(channel, kh, kw)`` in order, cut into K blocks by
  MLAS's stride rules (MlasConvOperation, MlasSgemmOperation; for one image
  the thread split of the output matters) whose sums are added to the output;
  then ``+ bias`` and the activation. A group with one filter (depthwise) takes
  the M=1 AVX kernel: rounded products summed four taps at a time,
  ``((p0 + p1) + p2) + p3``, each partial sum added to the output.
* Gemm: the output starts as the bias, K blocks are added to it as in Conv;
  a single row takes the M=1 kernel.
* Softmax: MLAS's AVX512 exp (FMA polynomial, VSCALEFPS), 16-lane sums with
  its reduction tree, times ``float32(1 / sum)``.
* AveragePool / GlobalAveragePool: NCHWc pooling (channels a multiple of 16)
  sums windows row by row; MlasPool sums whole images four lanes at a time
  and other windows column by column (avg_pool_float); then ``/ count``.

Fused multiply-adds are emulated exactly: a product of two float32 is exact
in float64, the float64 sum is rounded to float32, and the rare double
rounding at a float32 tie is corrected with the sum's exact error (TwoSum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinyptq.fixedpoint import wrap_int32

F32 = np.float32
F64 = np.float64
FLT_MAX = float(np.finfo(np.float32).max)
SGEMM_STRIDE_N = 128  # MLAS_SGEMM_STRIDEN on x86-64
SGEMM_STRIDE_K = 128  # MLAS_SGEMM_STRIDEK
SGEMM_THREAD_COMPLEXITY = 64 * 1024  # MLAS_SGEMM_THREAD_COMPLEXITY
SGEMM_THREAD_ALIGN = 16  # MLAS_SGEMM_STRIDEN_THREAD_ALIGN
MAX_THREADS = 16  # MLAS_MAXIMUM_THREAD_COUNT
WORKING_SET = 1 << 14  # outputs computed per pass of the FMA emulation
_LOW29 = np.int64((1 << 29) - 1)  # float64 mantissa bits below float32 precision
_HALF29 = np.int64(1 << 28)  # ... exactly half a float32 ulp

Pads = Sequence[int]


# ------------------------------------------------------------ float32 arithmetic
def _fix_ties(r: np.ndarray, s: np.ndarray, a: np.ndarray, b: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Correct float32 roundings ``r`` of float64 sums ``s = a + b`` that landed exactly on a float32 tie.

    The float64 sum may itself be rounded; its exact error (TwoSum) says on
    which side of the tie the true sum lies.
    """
    idx = np.nonzero(tie)
    si, ai, bi, ri = s[idx], np.broadcast_to(a, s.shape)[idx], np.broadcast_to(b, s.shape)[idx], r[idx]
    bb = si - ai
    err = (ai - (si - bb)) + (bi - bb)
    other = np.nextafter(ri, np.where(ri < si, F32(np.inf), F32(-np.inf))).astype(F32)
    r = r.copy()
    r[idx] = np.where(err > 0, np.maximum(ri, other), np.where(err < 0, np.minimum(ri, other), ri))
    return r


def round_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32(a + b) rounded once, for float64 ``a`` and ``b`` each exact (products of float32)."""
    s = a + b
    r = s.astype(F32)
    tie = (s.view(np.int64) & _LOW29) == _HALF29
    if tie.any():
        a, b = np.broadcast_to(a, s.shape), np.broadcast_to(b, s.shape)
        r = _fix_ties(r, s, a, b, tie)
    return r


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` on float32 values rounded once, as the x86 FMA instructions compute it."""
    p = np.multiply(a, b, dtype=F64)
    return round_sum(p, np.asarray(c, F64))


# -------------------------------------------------------- quantize / dequantize
def int_limits(dtype: np.dtype | type) -> tuple[int, int]:
    """The saturation limits of an integer type."""
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def quantize_linear(x: np.ndarray, scale: float, zero_point: int, dtype: type,
                    limits: tuple[int, int] | None = None) -> np.ndarray:
    """QuantizeLinear (MlasQuantizeLinear): float32 ``x / scale`` half to even, + zp, saturated.

    ``limits`` narrows the saturation range of ``dtype`` (INT4 / UINT4 stored in 8 bits).
    """
    lo, hi = limits or int_limits(dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint(np.asarray(x, F32) / F32(scale))
    q = np.clip(q.astype(F64) + int(zero_point), lo, hi)
    return q.astype(dtype)


def dequantize_linear(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, axis: int = 1) -> np.ndarray:
    """DequantizeLinear: ``float32(q - zp) * scale`` in float32 (per tensor, or per channel along ``axis``)."""
    q = np.asarray(q)
    scale, zp = np.asarray(scale, F32), np.asarray(zero_point, np.int64)
    if scale.ndim:  # per channel: broadcast along axis
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q.astype(np.int64) - zp).astype(F32) * scale


def requantize_output(acc: np.ndarray, scale: np.ndarray | float, zero_point: int, dtype: type,
                      channel_axis: int = 1) -> np.ndarray:
    """MlasRequantizeOutput: ``float32(acc) * scale`` rounded half to even, + zp, saturated.

    ``scale`` is one value or one per channel along ``channel_axis``.
    """
    lo, hi = int_limits(dtype)
    scale = np.asarray(scale, F32)
    if scale.ndim and scale.size > 1:
        shape = [1] * acc.ndim
        shape[channel_axis] = -1
        scale = scale.reshape(shape)
    y = np.rint(np.asarray(acc).astype(F32) * scale)
    return np.clip(y.astype(F64) + int(zero_point), lo, hi).astype(dtype)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's WeightBiasQuantization: (int32 bias, its float32 scale ``s_x * s_w``)."""
    scale = F32(input_scale) * np.asarray(weight_scale, F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(np.asarray(bias, F32) / scale)
    return q.astype(np.int64).astype(np.int32), np.asarray(scale, F32)


def dynamic_int8_params(data: np.ndarray) -> tuple[float, int]:
    """GetQuantizationParameter<int8_t>: asymmetric int8 (scale, zero point) of float data.

    onnxruntime quantizes a float Conv / Gemm weight this way when the input is quantized.
    """
    data = np.asarray(data, F32)
    lo, hi = min(data.min(), F32(0.0)), max(data.max(), F32(0.0))
    scale = F32(1.0) if lo == hi else (F32(hi) - F32(lo)) / F32(255.0)
    zp = np.rint(np.clip(F32(-128.0) - F32(lo) / scale, F32(-128.0), F32(127.0)))
    return float(scale), int(zp)


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Window:
    """A 2-D window (convolution or pooling) in ONNX terms."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an input of ``h`` x ``w`` (floor mode)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        t, left, b, r = self.pads
        oh = (h + t + b - ((kh - 1) * dh + 1)) // sh + 1
        ow = (w + left + r - ((kw - 1) * dw + 1)) // sw + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(f"window {self.kernel} does not fit an input of {h}x{w}")
        return oh, ow

    @property
    def taps(self) -> int:
        """Number of kernel positions."""
        return self.kernel[0] * self.kernel[1]


def window(kernel: Sequence[int], strides: Sequence[int] | None = None, pads: Pads | None = None,
           dilations: Sequence[int] | None = None) -> Window:
    """A Window from ONNX attributes (missing ones at their defaults)."""
    return Window(
        (int(kernel[0]), int(kernel[1])),
        tuple(int(s) for s in strides) if strides else (1, 1),  # type: ignore[arg-type]
        tuple(int(p) for p in pads) if pads else (0, 0, 0, 0),  # type: ignore[arg-type]
        tuple(int(d) for d in dilations) if dilations else (1, 1),  # type: ignore[arg-type]
    )


def _padded(x: np.ndarray, win: Window, fill: float | int) -> np.ndarray:
    t, left, b, r = win.pads
    return np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)), constant_values=fill)


def _tap(xp: np.ndarray, win: Window, i: int, j: int, oh: int, ow: int) -> np.ndarray:
    """The input values seen by kernel position (i, j) for every output: (N, C, oh, ow)."""
    (sh, sw), (dh, dw) = win.strides, win.dilations
    return xp[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]


def _im2col(x: np.ndarray, win: Window, fill: float | int) -> tuple[np.ndarray, tuple[int, int]]:
    """Patches (N, C, taps, oh * ow) with taps in (kh, kw) order, padding filled with ``fill``."""
    n, c, h, w = x.shape
    oh, ow = win.out_size(h, w)
    xp = _padded(x, win, fill)
    cols = np.empty((n, c, win.taps, oh * ow), x.dtype)
    for i in range(win.kernel[0]):
        for j in range(win.kernel[1]):
            cols[:, :, i * win.kernel[1] + j] = _tap(xp, win, i, j, oh, ow).reshape(n, c, oh * ow)
    return cols, (oh, ow)


# ------------------------------------------------------------ integer kernels
def qlinear_conv(x: np.ndarray, x_scale: float, x_zp: int, w: np.ndarray, w_scale: np.ndarray | float,
                 w_zp: int, y_scale: float, y_zp: int, bias: np.ndarray | None, win: Window,
                 group: int = 1) -> np.ndarray:
    """QLinearConv (NCHW): exact int32 accumulation, per-channel float32 requantization."""
    x, w = np.asarray(x), np.asarray(w)
    n, c = x.shape[:2]
    m = w.shape[0]
    cols, (oh, ow) = _im2col(x.astype(F64) - int(x_zp), win, 0.0)  # padding holds the zero point
    cg, mg = c // group, m // group
    cols = cols.reshape(n, group, cg * win.taps, oh * ow)
    wk = (w.astype(F64) - int(w_zp)).reshape(group, mg, cg * win.taps)
    acc = np.einsum("gmk,ngkp->ngmp", wk, cols, optimize=True).reshape(n, m, oh, ow)
    acc = np.rint(acc).astype(np.int64)  # integer sums far below 2**53: exact in float64
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64).reshape(1, m, 1, 1)
    acc = wrap_int32(acc)
    out_scale = (F32(x_scale) * np.broadcast_to(np.asarray(w_scale, F32), (m,))) / F32(y_scale)
    return requantize_output(acc, out_scale, y_zp, x.dtype.type)


def qlinear_add(a: np.ndarray, a_scale: float, a_zp: int, b: np.ndarray, b_scale: float, b_zp: int,
                c_scale: float, c_zp: int) -> np.ndarray:
    """com.microsoft QLinearAdd (MLAS AVX2 kernel, same-shaped inputs)."""
    a, b = np.asarray(a), np.asarray(b)
    ra, rb = F32(a_scale) / F32(c_scale), F32(b_scale) / F32(c_scale)
    fixed = F32(c_zp) - (ra * F32(a_zp) + rb * F32(b_zp))
    acc = fma(b.astype(F32), rb, fixed)
    acc = fma(a.astype(F32), ra, acc)
    lo, hi = int_limits(a.dtype)
    r = np.clip(np.rint(acc).astype(F64), -(2**15), 2**15 - 1)  # packs to int16, then to 8 bits
    return np.clip(r, lo, hi).astype(a.dtype)


def qlinear_global_avg_pool(x: np.ndarray, x_scale: float, x_zp: int, y_scale: float, y_zp: int) -> np.ndarray:
    """QLinearGlobalAveragePool (NCHW, keepdims): int32 sums, one float32 multiplier."""
    x = np.asarray(x)
    n, c = x.shape[:2]
    count = int(np.prod(x.shape[2:]))
    acc = (x.reshape(n, c, count).astype(np.int64) - int(x_zp)).sum(axis=2)
    scale = F32(x_scale) / (F32(y_scale) * F32(count))
    y = requantize_output(acc, scale, y_zp, x.dtype.type)
    return y.reshape(n, c, *([1] * (x.ndim - 2)))


def qlinear_avg_pool(x: np.ndarray, x_scale: float, x_zp: int, y_scale: float, y_zp: int, win: Window,
                     count_include_pad: bool = False) -> np.ndarray:
    """com.microsoft QLinearAveragePool (NCHW); whole-image windows take the global pooling kernel."""
    x = np.asarray(x)
    if tuple(x.shape[2:]) == win.kernel and not any(win.pads):
        return qlinear_global_avg_pool(x, x_scale, x_zp, y_scale, y_zp)
    xf = dequantize_linear(x, x_scale, x_zp)
    n, c, h, w = xf.shape
    oh, ow = win.out_size(h, w)
    xp = _padded(xf, win, 0.0)
    total = np.zeros((n, c, oh, ow), F32)
    for i in range(win.kernel[0]):  # row-major order over the window, padding adds 0.0
        for j in range(win.kernel[1]):
            total = total + _tap(xp, win, i, j, oh, ow)
    count = _window_counts(h, w, win, count_include_pad)
    y = total / count
    lo, hi = int_limits(x.dtype)
    q = np.rint(y / F32(y_scale) + F32(y_zp))
    return np.clip(q.astype(F64), lo, hi).astype(x.dtype)


def _window_counts(h: int, w: int, win: Window, include_pad: bool) -> np.ndarray:
    """Elements per pooling window as float32 (1, 1, oh, ow)."""
    oh, ow = win.out_size(h, w)
    if include_pad:
        return np.full((1, 1, oh, ow), F32(win.taps))
    t, left, _, _ = win.pads
    (kh, kw), (sh, sw) = win.kernel, win.strides
    hs = np.arange(oh) * sh - t
    ws = np.arange(ow) * sw - left
    hc = np.minimum(hs + kh, h) - np.maximum(hs, 0)
    wc = np.minimum(ws + kw, w) - np.maximum(ws, 0)
    return (hc[:, None] * wc[None, :]).astype(F32)[None, None]


def softmax_table(x_scale: float, reduce_len: int) -> np.ndarray:
    """QLinearSoftmax's float32 lookup table, indexed by 255 + x - max(x)."""
    shift = math.log(FLT_MAX / reduce_len)
    shift = max(0.0, shift - 5.0) / float(F32(x_scale))
    i = np.arange(256, dtype=F64)
    return np.exp((i - 255.0 + shift) * float(F32(x_scale))).astype(F32)


def qlinear_softmax(x: np.ndarray, x_scale: float, x_zp: int, y_scale: float, y_zp: int, axis: int = -1) -> np.ndarray:
    """com.microsoft QLinearSoftmax (opset 13 semantics) along ``axis``."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    table = softmax_table(x_scale, x.shape[-1])
    xi = x.astype(np.int64)
    idx = 255 + xi - xi.max(axis=-1, keepdims=True)
    vals = table[idx]
    total = np.zeros(vals.shape[:-1], F32)
    for k in range(vals.shape[-1]):  # float32 sum in order
        total = total + vals[..., k]
    scale = F32(np.floor(F32(1.0) / F32(y_scale)))
    q = np.rint((vals * scale) / total[..., None]).astype(np.int64) + int(y_zp)
    lo, hi = int_limits(x.dtype)
    return np.moveaxis(np.clip(q, lo, hi).astype(x.dtype), -1, axis)


# ------------------------------------------------------------- float SGEMM
# MLAS computes every output of a float GEMM as a sequence of K blocks: an
# FMA chain from zero over each block, added to the output (the first block
# writes it unless the output starts from a bias). A "schedule" lists the
# blocks of a set of output columns; columns sharing one are computed together.
Blocks = tuple[tuple[int, int], ...]
Schedule = list[tuple[tuple[int, int], Blocks]]  # (column range, K blocks)


def sgemm_strides(n: int, k: int) -> tuple[int, int]:
    """MlasSgemmOperation's (StrideN, StrideK) for N columns and depth K (A not transposed)."""
    stride_n, stride_k = SGEMM_STRIDE_N, SGEMM_STRIDE_K
    if n >= k:
        while stride_k // 2 >= k:
            stride_n, stride_k = stride_n * 2, stride_k // 2
    else:
        while stride_n > 16 and stride_n // 2 >= n:
            stride_k, stride_n = stride_k * 2, stride_n // 2
    return stride_n, stride_k


def _split(total: int, stride: int, offset: int = 0) -> list[tuple[int, int]]:
    return [(offset + s, offset + min(s + stride, total)) for s in range(0, total, stride)]


def _sgemm_blocks(n: int, k0: int, k1: int) -> Blocks:
    """The K blocks MlasSgemmOperation uses for N columns over depth k0..k1 (the same for all its columns)."""
    return tuple(_split(k1 - k0, sgemm_strides(n, k1 - k0)[1], k0))


def _fma_block(a: np.ndarray, b: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """An FMA chain from zero over depth k0..k1: a (..., M, K) x b (..., K, N) -> (..., M, N) float32.

    Runs in float64 (products of float32 are exact there) and rounds to
    float32 after every step, correcting the rare ties of a double rounding.
    """
    a64, b64 = a[..., k0:k1].astype(F64), b[..., k0:k1, :].astype(F64)
    shape = np.broadcast_shapes(a.shape[:-1] + (1,), b.shape[:-2] + (1, b.shape[-1]))
    acc, s = np.zeros(shape, F64), np.empty(shape, F64)
    low, tie = np.empty(shape, np.int64), np.empty(shape, bool)
    for j in range(k1 - k0):
        aj, bj = a64[..., :, j: j + 1], b64[..., j: j + 1, :]
        np.multiply(aj, bj, out=s)
        s += acc
        r = s.astype(F32)
        np.bitwise_and(s.view(np.int64), _LOW29, out=low)
        np.equal(low, _HALF29, out=tie)
        if tie.any():
            r = _fix_ties(r, s, aj * bj, acc, tie)
        acc[...] = r
    return acc.astype(F32)


def _m1_block(a: np.ndarray, b: np.ndarray, k0: int, k1: int, c: np.ndarray | None) -> np.ndarray:
    """MlasSgemmKernelM1Avx over k0..k1 into ``c`` (None: zero mode); a (..., 1, K), b (..., K, N).

    Rounded products summed four rows at a time, ((p0 + p1) + p2) + p3, then
    two, then one, each partial sum added to the output.
    """
    count = k1 - k0
    steps = [4] * (count // 4) + ([2] if count & 2 else []) + ([1] if count & 1 else [])
    k = k0
    for step in steps:
        t = a[..., :, k: k + 1] * b[..., k: k + 1, :]
        for j in range(1, step):
            t = t + a[..., :, k + j: k + j + 1] * b[..., k + j: k + j + 1, :]
        c = t + F32(0.0) if c is None else t + c
        k += step
    assert c is not None
    return c


def _run_blocks(a: np.ndarray, b: np.ndarray, blocks: Blocks, c: np.ndarray | None, m1: bool) -> np.ndarray:
    for k0, k1 in blocks:
        if m1:
            c = _m1_block(a, b, k0, k1, c)
        else:
            acc = _fma_block(a, b, k0, k1)
            c = acc if c is None else acc + c
    assert c is not None
    return c


def _run_schedule(a: np.ndarray, b: np.ndarray, schedule: Schedule, c: np.ndarray | None, m1: bool) -> np.ndarray:
    """Compute the columns of ``a @ b`` (plus ``c``) block by block, columns sharing blocks together."""
    shape = np.broadcast_shapes(a.shape[:-1] + (1,), b.shape[:-2] + (1, b.shape[-1]))
    out = np.empty(shape, F32)
    groups: dict[Blocks, list[int]] = {}
    for (c0, c1), blocks in schedule:
        groups.setdefault(blocks, []).extend(range(c0, c1))
    step = max(1, WORKING_SET // max(1, int(np.prod(shape[:-1]))))  # columns per pass: stay in cache
    for blocks, cols in groups.items():
        for i in range(0, len(cols), step):
            part = cols[i: i + step]
            sel = slice(part[0], part[-1] + 1) if part[-1] - part[0] + 1 == len(part) else np.asarray(part)
            start = None if c is None else np.broadcast_to(c, shape)[..., sel]
            out[..., sel] = _run_blocks(a, b[..., sel], blocks, start, m1)
    return out


def sgemm_schedule(n: int, k: int, offset: int = 0) -> Schedule:
    """MlasSgemmOperation's column slices of N columns with their K blocks (depth k from ``offset``)."""
    stride_n, _ = sgemm_strides(n, k)
    blocks = _sgemm_blocks(n, offset, offset + k)
    return [(cols, blocks) for cols in _split(n, stride_n)]


def _thread_count(complexity: float, threads: int) -> int:
    if complexity < SGEMM_THREAD_COMPLEXITY * MAX_THREADS:
        target = int(complexity / SGEMM_THREAD_COMPLEXITY) + 1
    else:
        target = MAX_THREADS
    return min(target, threads)


def mlas_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """MlasGemm of ``a`` (..., M, K) and ``b`` (..., K, N), alpha 1, adding to ``c`` (beta 1) if given.

    The work is split over threads as MLAS splits it (columns when N > M,
    else rows); each part is one MlasSgemmOperation, whose M=1 case takes
    the M=1 kernel.
    """
    a, b = np.asarray(a, F32), np.asarray(b, F32)
    m, k = a.shape[-2:]
    n = b.shape[-1]
    target = _thread_count(float(m) * n * k, threads)
    if target > 1 and m >= n:  # rows per thread: each part computed on its own
        stride = -(-m // target)
        parts = [mlas_gemm(a[..., r0:r1, :], b, None if c is None else np.broadcast_to(c, (*c.shape[:-2], m, n))[..., r0:r1, :])
                 for r0, r1 in _split(m, stride)]
        return np.concatenate(parts, axis=-2)
    if m == 1:
        return _run_blocks(a, b, ((0, k),), c, m1=True)
    if target <= 1:
        return _run_schedule(a, b, sgemm_schedule(n, k), c, m1=False)
    per_thread = -(-n // target)
    stride = -(-per_thread // SGEMM_THREAD_ALIGN) * SGEMM_THREAD_ALIGN
    schedule = [((c0 + s0, c0 + s1), blocks) for c0, c1 in _split(n, stride)
                for (s0, s1), blocks in sgemm_schedule(c1 - c0, k)]
    return _run_schedule(a, b, schedule, c, m1=False)


# ------------------------------------------------------------- float kernels
@dataclass(frozen=True)
class Activation:
    """A fused activation of FusedConv: None, "relu" or "clip" with its limits."""

    kind: str | None = None
    lo: float = -FLT_MAX
    hi: float = FLT_MAX

    def apply(self, y: np.ndarray) -> np.ndarray:
        """MlasActivation after the bias."""
        if self.kind == "relu":
            return np.maximum(y, F32(0.0))
        if self.kind == "clip":
            return np.minimum(np.maximum(y, F32(self.lo)), F32(self.hi))
        return y


def conv_float(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, win: Window, group: int = 1,
               activation: Activation | None = None, threads: int = 1) -> np.ndarray:
    """Conv / FusedConv float32 (MlasConv, NCHW) with MLAS's order of operations.

    ``threads`` (the session's intra-op threads) matters only for a batch of one image.
    """
    x, w = np.asarray(x, F32), np.asarray(w, F32)
    n, c, h, wd = x.shape
    m = w.shape[0]
    cg, mg = c // group, m // group
    oh, ow = win.out_size(h, wd)
    out_size, k = oh * ow, cg * win.taps
    cols, _ = _im2col(x, win, 0.0)
    cols = cols.reshape(n, group, k, out_size)
    filt = w.reshape(group, mg, k)[None]
    y = _conv_gemm(filt, cols, n * group, out_size, k, win, threads).reshape(n, m, oh, ow)
    if bias is not None:
        y = y + np.asarray(bias, F32).reshape(1, m, 1, 1)
    return (activation or Activation()).apply(y)


def _conv_gemm(filt: np.ndarray, cols: np.ndarray, batch_groups: int, out_size: int, k: int, win: Window,
               threads: int) -> np.ndarray:
    """The GEMM part of MlasConv with MlasConvPrepare's choice of algorithm."""
    mg = filt.shape[-2]
    pointwise = win.taps == 1 and win.strides == (1, 1) and not any(win.pads)
    if pointwise or mg > out_size:  # GemmDirect, ExpandThenGemm: one GEMM per image and group
        if batch_groups > 1 and pointwise:
            return _run_gemm_operation(filt, cols, out_size, k)
        return mlas_gemm(filt, cols, threads=threads)
    segment = out_size  # ExpandThenGemmSegmented
    if batch_groups == 1:
        segment = _conv_thread_stride(mg, out_size, k, threads)
    schedule = [sched for s0, s1 in _split(out_size, segment) for sched in _conv_schedule(s0, s1 - s0, k)]
    return _run_schedule(filt, cols, schedule, None, m1=mg == 1)


def _run_gemm_operation(filt: np.ndarray, cols: np.ndarray, n: int, k: int) -> np.ndarray:
    """One MlasSgemmOperation per image and group (GemmDirect of batches or groups)."""
    if filt.shape[-2] == 1:
        return _run_blocks(filt, cols, ((0, k),), None, m1=True)
    return _run_schedule(filt, cols, sgemm_schedule(n, k), None, m1=False)


def _conv_thread_stride(filters: int, out_size: int, k: int, threads: int) -> int:
    """MlasConvPrepare's ThreadStrideN for one image and one group."""
    target = _thread_count(float(filters) * out_size * k, threads)
    stride = -(-out_size // target)
    if target > 1:
        stride = -(-stride // SGEMM_THREAD_ALIGN) * SGEMM_THREAD_ALIGN
    return stride


def _conv_schedule(start: int, seg_n: int, k: int) -> Schedule:
    """MlasConvOperation over columns start..start+seg_n: N slices, K blocks, one SGEMM per block."""
    stride_n, stride_k = sgemm_strides(seg_n, k)
    schedule = []
    for c0, c1 in _split(seg_n, stride_n, start):
        blocks = tuple(b for k0, k1 in _split(k, stride_k) for b in _sgemm_blocks(c1 - c0, k0, k1))
        schedule.append(((c0, c1), blocks))
    return schedule


def gemm_float(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """Gemm float32 (transA = transB = 0, alpha = beta = 1): the output starts as the broadcast bias."""
    a, b = np.asarray(a, F32), np.asarray(b, F32)
    c = None if bias is None else np.broadcast_to(np.asarray(bias, F32), (a.shape[0], b.shape[1])).copy()
    return mlas_gemm(a, b, c, threads=threads)


# MlasExpConstants
_EXP_LOWER = F32(-103.9720840454)
_EXP_BIAS = F32(12582912.0)  # MLAS_ROUNDING_BIAS_MAGIC: 1.5 * 2**23
_EXP_LOG2_RECIPROCAL = F32(1.44269504088896341)
_EXP_LOG2_HIGH = F32(-6.93145752e-1)
_EXP_LOG2_LOW = F32(-1.42860677e-6)
_EXP_POLY = tuple(F32(float.fromhex(h)) for h in ("0x1.694000p-10", "0x1.125edcp-7", "0x1.555b5ap-5",
                                                   "0x1.555450p-3", "0x1.fffff6p-2", "0x1.000000p+0"))


def sum_exp_terms(x: np.ndarray, negative_max: np.ndarray) -> np.ndarray:
    """MlasComputeSumExpF32KernelAvx512F's exp(x - max) per element (FMA polynomial, VSCALEFPS)."""
    v = np.maximum(_EXP_LOWER, np.asarray(x, F32) + negative_max)
    m = fma(v, _EXP_LOG2_RECIPROCAL, _EXP_BIAS) - _EXP_BIAS
    v = fma(m, _EXP_LOG2_HIGH, v)
    v = fma(m, _EXP_LOG2_LOW, v)
    p = np.full(v.shape, _EXP_POLY[0], F32)
    for coef in (*_EXP_POLY[1:], _EXP_POLY[5]):
        p = fma(p, v, coef)
    return np.ldexp(p, m.astype(np.int32)).astype(F32)


def _avx512_lane_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis as the AVX512 kernel accumulates (16 lanes, then its reduction tree)."""
    d = terms.shape[-1]
    lanes = np.zeros(terms.shape[:-1] + (16,), F32)
    start = 0
    while d - start >= 48:  # the 48-element loop adds three vectors in order
        for j in range(3):
            lanes = lanes + terms[..., start + 16 * j: start + 16 * (j + 1)]
        start += 48
    while start < d:
        chunk = terms[..., start: start + 16]
        lanes[..., : chunk.shape[-1]] = lanes[..., : chunk.shape[-1]] + chunk
        start += 16
    a = lanes[..., 8:] + lanes[..., :8]
    h1 = np.stack([a[..., 0] + a[..., 1], a[..., 2] + a[..., 3], a[..., 4] + a[..., 5], a[..., 6] + a[..., 7]], -1)
    low, high = h1[..., 0] + h1[..., 1], h1[..., 2] + h1[..., 3]
    return low + high


def softmax_float(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax float32 (MlasComputeSoftmax, AVX512F kernels): exp terms times float32(1 / sum)."""
    x = np.moveaxis(np.asarray(x, F32), axis, -1)
    negative_max = -x.max(axis=-1, keepdims=True)
    terms = sum_exp_terms(x, negative_max)
    total = _avx512_lane_sum(terms)
    y = terms * (F32(1.0) / total)[..., None]
    return np.moveaxis(y, -1, axis)


NCHWC_BLOCK = 16  # MlasNchwcGetBlockSize() with AVX512F: pooling over C % 16 == 0 channels runs NCHWc


def avg_pool_float(x: np.ndarray, win: Window, count_include_pad: bool = False, mlas_pool: bool = False) -> np.ndarray:
    """AveragePool float32: window sums in MLAS's order, divided by the element count.

    NCHWc pooling (channels a multiple of 16) and AveragePool-19 sum each
    window row by row. ``mlas_pool`` selects MlasPool (AveragePool before
    opset 19 on other channel counts): a whole-image window with unit strides
    sums four lanes (see global_avg_pool_float); windows of at most 32 taps a
    side with a width stride of 1 or 2 sum each column over the window's rows,
    then those column sums; other windows sum row by row.
    """
    x = np.asarray(x, F32)
    n, c, h, w = x.shape
    if mlas_pool and win.kernel == (h, w) and win.strides == (1, 1) and not any(win.pads):
        return _lane_mean(x)
    if mlas_pool and win.strides[1] <= 2 and max(win.kernel) <= 32:
        total = _column_window_sums(x, win)
    else:
        oh, ow = win.out_size(h, w)
        xp = _padded(x, win, 0.0)
        total = np.zeros((n, c, oh, ow), F32)
        for i in range(win.kernel[0]):
            for j in range(win.kernel[1]):
                total = total + _tap(xp, win, i, j, oh, ow)
    return total / _window_counts(h, w, win, count_include_pad)


def _column_window_sums(x: np.ndarray, win: Window) -> np.ndarray:
    """MlasPool2DVectorKernel's sums: per output row, in-image rows summed per column, then across the window."""
    n, c, h, w = x.shape
    oh, ow = win.out_size(h, w)
    (kh, kw), (sh, sw) = win.kernel, win.strides
    top, left, _, right = win.pads
    out = np.empty((n, c, oh, ow), F32)
    for ph in range(oh):
        r0, r1 = max(ph * sh - top, 0), min(ph * sh - top + kh, h)
        cols = x[:, :, r0]
        for r in range(r0 + 1, r1):
            cols = cols + x[:, :, r]
        buf = np.pad(cols, ((0, 0), (0, 0), (left, right + kw)))
        total = buf[:, :, 0: (ow - 1) * sw + 1: sw]
        for t in range(1, kw):
            total = total + buf[:, :, t: t + (ow - 1) * sw + 1: sw]
        out[:, :, ph] = total
    return out


def _lane_mean(x: np.ndarray) -> np.ndarray:
    """MlasPoolGlobalKernel: four lane sums, (l0 + l2) + (l1 + l3), the tail in order, / count."""
    n, c = x.shape[:2]
    v = x.reshape(n, c, -1)
    size = v.shape[-1]
    lanes = np.zeros((n, c, 4), F32)
    full = size - size % 4
    for i in range(0, full, 4):
        lanes = lanes + v[..., i: i + 4]
    total = (lanes[..., 0] + lanes[..., 2]) + (lanes[..., 1] + lanes[..., 3])
    for i in range(full, size):
        total = total + v[..., i]
    return (total / F32(size)).reshape(n, c, *([1] * (x.ndim - 2)))


def global_avg_pool_float(x: np.ndarray) -> np.ndarray:
    """GlobalAveragePool float32 (keepdims): NCHWc sums in order; other channel counts 4 lanes at a time."""
    x = np.asarray(x, F32)
    n, c = x.shape[:2]
    if c % NCHWC_BLOCK:
        return _lane_mean(x)
    v = x.reshape(n, c, -1)
    total = np.zeros((n, c), F32)
    for i in range(v.shape[-1]):
        total = total + v[..., i]
    return (total / F32(v.shape[-1])).reshape(n, c, *([1] * (x.ndim - 2)))


def max_pool(x: np.ndarray, win: Window) -> np.ndarray:
    """MaxPool (any type): the largest in-image value of each window."""
    x = np.asarray(x)
    n, c, h, w = x.shape
    oh, ow = win.out_size(h, w)
    low = np.finfo(x.dtype).min if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    xp = _padded(x, win, low)
    out = np.full((n, c, oh, ow), low, x.dtype)
    for i in range(win.kernel[0]):
        for j in range(win.kernel[1]):
            out = np.maximum(out, _tap(xp, win, i, j, oh, ow))
    return out


def qgemm(a: np.ndarray, a_scale: float, a_zp: int, b: np.ndarray, b_scale: np.ndarray | float,
          b_zp: np.ndarray | int, y_scale: float, y_zp: int, bias: np.ndarray | None) -> np.ndarray:
    """com.microsoft QGemm with a quantized output: exact int32 ``(a - zp_a) (b - zp_b) + bias``, requantized.

    ``b`` is (K, N); scales and zero points of ``b`` per tensor or per column.
    """
    a, b = np.asarray(a), np.asarray(b)
    n = b.shape[1]
    acc = (a.astype(F64) - int(a_zp)) @ (b.astype(F64) - np.broadcast_to(np.asarray(b_zp, F64), (n,)))
    acc = np.rint(acc).astype(np.int64)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64).reshape(1, n)
    out_scale = (F32(a_scale) * np.broadcast_to(np.asarray(b_scale, F32), (n,))) / F32(y_scale)
    return requantize_output(wrap_int32(acc), out_scale, y_zp, a.dtype.type, channel_axis=1)
