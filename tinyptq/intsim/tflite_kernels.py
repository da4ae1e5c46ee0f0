"""Bit-exact numpy versions of TensorFlow Lite Micro's int8 reference kernels.

For the same int8 inputs and quantization parameters every function returns
exactly the int8 values the TFLM interpreter (the ``tflite_micro`` Python
package, which runs the portable reference kernels) computes; the tests in
tests/intsim compare every kernel with it. Requantization parameters are
derived as the kernels' Prepare functions derive them: in double from the
float32 scales stored in the .tflite file, through QuantizeMultiplier; fused
activations become clamps through CalculateActivationRangeQuantized
(float32 division, C ``round``).

Rounding: the TFLM Python build uses DOUBLE rounding (TFLITE_SINGLE_ROUNDING
is defined nowhere in TFLM's build files). MultiplyByQuantizedMultiplier is
gemmlowp's rounding doubling high multiply followed by a rounding right
shift, and so is MultiplyByQuantizedMultiplierSmallerThanOneExp (ADD).
Checked against the interpreter: a requantization and ADD inputs chosen
where the two builds disagree give the double-rounding values, and with
single rounding the conv, depthwise, dense, mean and requantize comparisons
fail. A positive shift is applied first as the int32 product
x * (1 << shift), which wraps on overflow like the interpreter does.

Kernel behaviour reproduced here:

* CONV_2D / DEPTHWISE_CONV_2D: per-channel multipliers
  double(s_in) * double(s_w[c]) / double(s_out), also for one weight scale;
  int32 accumulator (wraps), points outside the image skipped (the same as
  padding with the input zero point). The converter folds ZeroPadding2D
  into the convolution's SAME padding when it can.
* FULLY_CONNECTED: per-channel weights (the converter's default) as conv; a
  single weight scale takes the float32 product s_in * s_w before the
  double division.
* ADD: both inputs shifted left by 20 bits, rescaled by
  s_i / (2 max(s_a, s_b)), summed, rescaled by 2 max(s_a, s_b) / (2**20 s_out).
* AVERAGE_POOL_2D: integer sum over the in-image points only, divided by
  their count with halves away from zero; no requantization (the converter
  keeps scale and zero point). MAX_POOL_2D starts from -128.
* MEAN over H, W (GlobalAveragePooling2D, keep_dims false): the int32 sum
  minus count * zp_in times QuantizeMultiplier(s_in / s_out) with 1 / count
  folded into the mantissa: m' = (m << k) // count, shift' = shift - k,
  k = min(floor(log2 count), 32, 31 + shift); no activation.
* SOFTMAX: gemmlowp fixed point. Differences to the row maximum are scaled
  into Q5.26 by min(beta s_in 2**26, 2**31 - 1) (the multiplier's shift may
  reach 31: no saturation at 30 in this build); differences below
  -floor(31 * 2**26 / 2**shift) give -128; exp_on_negative_values, a Q12.19
  sum, GetReciprocal; output scale exactly 1/256, zero point -128.
* QUANTIZE float -> int8: round(float32(x) / float32(s)) halves away from
  zero; quotients outside int32 (and NaN, inf) become INT32_MIN (x86-64
  cvttss2si) before the zero point is added with int32 wrap-around, so they
  end at 127 for a negative zero point and at -128 otherwise.
  DEQUANTIZE is float32(double(s) * (q - zp)). QUANTIZE int8 -> int8
  (requantize) is MultiplyByQuantizedMultiplier(q - zp_in, s_in / s_out).
* PAD (ZeroPadding2D not followed by a convolution) fills with the output
  zero point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tinyptq.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    exp_on_negative_values,
    get_reciprocal,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_round,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    tflite_round,
    wrap_int32,
)

SINGLE_ROUNDING = False  # the TFLM Python package is built without TFLITE_SINGLE_ROUNDING
INT8_MIN, INT8_MAX = -128, 127
ACTIVATIONS = (None, "relu", "relu6", "relu_n1_to_1")
SOFTMAX_SCALED_DIFF_INTEGER_BITS = 5
SOFTMAX_ACCUMULATION_INTEGER_BITS = 12
ADD_LEFT_SHIFT = 20
# int8 products (|x - zp| <= 255, |w| <= 128) a float32 sum holds exactly in any order: n * 255 * 128 <= 2**24
F32_EXACT_TERMS = 2**24 // (255 * 128)
GEMM_BLOCK_ELEMENTS = 1 << 23  # im2col block size (float32 elements)

Pair = int | Sequence[int]


# ------------------------------------------------------------ shared pieces
def _mbqm(x: Any, multiplier: Any, shift: Any) -> np.ndarray:
    """MultiplyByQuantizedMultiplier of the build (int32 overload)."""
    if SINGLE_ROUNDING:
        return multiply_by_quantized_multiplier_single_round(x, multiplier, shift)
    return multiply_by_quantized_multiplier(x, multiplier, shift)


def _quantize_multiplier(m: Any) -> tuple[np.ndarray, np.ndarray]:
    """QuantizeMultiplier of the build: shifts above 30 saturate only with single rounding."""
    return quantize_multiplier(m, cap_shift=SINGLE_ROUNDING)


def _scalar_multiplier(m: float) -> tuple[int, int]:
    """QuantizeMultiplier of one real multiplier as Python ints."""
    q, shift = _quantize_multiplier(m)
    return int(q), int(shift)


def _f32(x: Any) -> np.float32:
    """A scale as the float32 the .tflite file stores."""
    return np.float32(x)


def _to_int8(x: np.ndarray, lo: int = INT8_MIN, hi: int = INT8_MAX) -> np.ndarray:
    """Clamp int64 values to [lo, hi] and store them as int8."""
    return np.clip(x, lo, hi).astype(np.int8)


def _c_div(a: np.ndarray, d: Any) -> np.ndarray:
    """C integer division (rounds toward zero)."""
    q = np.abs(a) // d
    return np.where(a < 0, -q, q)


def _pair(v: Pair) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    h, w = v
    return int(h), int(w)


def _quantize_float(f: float, scale: float, zero_point: int) -> int:
    """kernel_util's Quantize: zp + round(float32(f) / float32(scale))."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        tmp = tflite_round(np.float32(f) / _f32(scale))
    if not INT32_MIN <= tmp <= INT32_MAX:
        raise ValueError(f"activation bound {f} overflows int32 at scale {scale}")
    return int(zero_point) + int(tmp)


def activation_range(activation: str | None, scale: float, zero_point: int) -> tuple[int, int]:
    """(qmin, qmax) of a fused activation on an int8 output (CalculateActivationRangeQuantized)."""
    if activation is not None:
        activation = activation.lower()
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown fused activation {activation!r}; expected one of {ACTIVATIONS}")
    bounds = {"relu": (0.0, None), "relu6": (0.0, 6.0), "relu_n1_to_1": (-1.0, 1.0)}.get(activation, (None, None))
    lo = INT8_MIN if bounds[0] is None else max(INT8_MIN, _quantize_float(bounds[0], scale, zero_point))
    hi = INT8_MAX if bounds[1] is None else min(INT8_MAX, _quantize_float(bounds[1], scale, zero_point))
    return lo, hi


def _window(in_size: int, filt: int, stride: int, dilation: int, padding: str) -> tuple[int, int]:
    """(output size, padding before) of one spatial axis (TF's SAME / VALID, TFLite's ComputePadding)."""
    eff = (filt - 1) * dilation + 1
    padding = padding.upper()
    if padding == "SAME":
        out = (in_size + stride - 1) // stride
    elif padding == "VALID":
        out = (in_size - eff + stride) // stride
    else:
        raise ValueError(f"padding must be 'SAME' or 'VALID', not {padding!r}")
    if out <= 0:
        raise ValueError(f"window {filt} (dilation {dilation}) does not fit an input of {in_size}")
    total = max((out - 1) * stride + eff - in_size, 0)
    return out, total // 2


class _Taps:
    """The strided input views seen by each tap of a 2-D window over an NHWC tensor."""

    def __init__(self, x: np.ndarray, kernel_hw: tuple[int, int], strides: Pair, padding: str,
                 dilations: Pair, fill: int) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected an NHWC tensor, got shape {x.shape}")
        self.kh, self.kw = kernel_hw
        self.sh, self.sw = _pair(strides)
        self.dh, self.dw = _pair(dilations)
        _, h, w, _ = x.shape
        self.oh, ph = _window(h, self.kh, self.sh, self.dh, padding)
        self.ow, pw = _window(w, self.kw, self.sw, self.dw, padding)
        need_h = (self.oh - 1) * self.sh + (self.kh - 1) * self.dh + 1
        need_w = (self.ow - 1) * self.sw + (self.kw - 1) * self.dw + 1
        pads = ((0, 0), (ph, max(need_h - h - ph, 0)), (pw, max(need_w - w - pw, 0)), (0, 0))
        self.x = np.pad(x, pads, constant_values=fill)
        self.pad_h, self.pad_w, self.h, self.w = ph, pw, h, w

    def view(self, ky: int, kx: int, batch: slice = slice(None)) -> np.ndarray:
        """Input values under tap (ky, kx) for every output position: (N, OH, OW, C)."""
        y0, x0 = ky * self.dh, kx * self.dw
        rows = slice(y0, y0 + (self.oh - 1) * self.sh + 1, self.sh)
        cols = slice(x0, x0 + (self.ow - 1) * self.sw + 1, self.sw)
        return self.x[batch, rows, cols, :]

    def counts(self) -> np.ndarray:
        """Number of in-image points of each output window: (OH, OW)."""
        def axis(out: int, stride: int, pad: int, filt: int, size: int) -> np.ndarray:
            start = np.arange(out) * stride - pad
            return np.minimum(start + filt, size) - np.maximum(start, 0)
        return np.outer(axis(self.oh, self.sh, self.pad_h, self.kh, self.h),
                        axis(self.ow, self.sw, self.pad_w, self.kw, self.w))


def requantize_accumulator(acc: np.ndarray, bias: Any, in_scale: float, kernel_scales: Any, out_scale: float,
                    out_zp: int, activation: str | None, float32_product: bool = False) -> np.ndarray:
    """Bias, int32 wrap, per-channel MultiplyByQuantizedMultiplier, output offset and clamp."""
    n_out = acc.shape[-1]
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64).reshape(n_out)
    acc = wrap_int32(acc)
    ks = np.asarray(kernel_scales, np.float32).reshape(-1)
    if ks.size not in (1, n_out):
        raise ValueError(f"{ks.size} kernel scales for {n_out} output channels")
    if float32_product:
        eff = (_f32(in_scale) * ks).astype(np.float64) / np.float64(_f32(out_scale))
    else:
        eff = np.float64(_f32(in_scale)) * ks.astype(np.float64) / np.float64(_f32(out_scale))
    mult, shift = _quantize_multiplier(np.broadcast_to(eff, (n_out,)))
    lo, hi = activation_range(activation, out_scale, out_zp)
    return _to_int8(_mbqm(acc, mult, shift) + int(out_zp), lo, hi)


def _offset_input(x: Any, zero_point: int) -> np.ndarray:
    """int8 values minus their zero point, as float64 (exact products and sums for BLAS)."""
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise TypeError(f"expected int8 values, got {x.dtype}")
    return x.astype(np.float64) - float(zero_point)


# ----------------------------------------------------------------- kernels
def quantize(x_float: Any, scale: float, zero_point: int) -> np.ndarray:
    """QUANTIZE float32 -> int8 (AffineQuantize): round(x / scale) in float32, halves away from zero."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r = tflite_round(np.asarray(x_float, np.float32) / _f32(scale))
    fits = (r >= INT32_MIN) & (r < 2.0**31)  # false for NaN too: x86 cvttss2si gives INT32_MIN
    q = np.where(fits, np.nan_to_num(r), INT32_MIN).astype(np.int64)
    return _to_int8(wrap_int32(q + int(zero_point)))


def dequantize(q: Any, scale: float, zero_point: int) -> np.ndarray:
    """DEQUANTIZE int8 -> float32: float32(double(scale) * (q - zero_point))."""
    q = np.asarray(q, np.int64)
    return (np.float64(_f32(scale)) * (q - int(zero_point))).astype(np.float32)


def requantize(q: Any, in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> np.ndarray:
    """QUANTIZE int8 -> int8 (Requantize): (q - zp_in) * s_in / s_out + zp_out."""
    mult, shift = _scalar_multiplier(np.float64(_f32(in_scale)) / np.float64(_f32(out_scale)))
    return _to_int8(_mbqm(np.asarray(q, np.int64) - int(in_zp), mult, shift) + int(out_zp))


def _segments(kh: int, kw: int, k_in: int) -> list[list[tuple[int, int, int, int]]]:
    """Taps x channel ranges (ky, kx, c0, c1) packed into chunks of at most F32_EXACT_TERMS products."""
    chunks: list[list[tuple[int, int, int, int]]] = [[]]
    used = 0
    for ky in range(kh):
        for kx in range(kw):
            for c0 in range(0, k_in, F32_EXACT_TERMS):
                c1 = min(c0 + F32_EXACT_TERMS, k_in)
                if used + c1 - c0 > F32_EXACT_TERMS:
                    chunks.append([])
                    used = 0
                chunks[-1].append((ky, kx, c0, c1))
                used += c1 - c0
    return chunks


def _conv_acc(taps: _Taps, kernel: np.ndarray, groups: int) -> np.ndarray:
    """Exact int64 convolution sums (N, OH, OW, out): float32 im2col GEMMs over exact-size chunks."""
    kh, kw, k_in, n_out = kernel.shape
    per_group = n_out // groups
    n = taps.x.shape[0]
    acc = np.zeros((n, taps.oh * taps.ow, n_out), np.int64)
    chunks = _segments(kh, kw, k_in)
    chunk_k = max(sum(c1 - c0 for _, _, c0, c1 in chunk) for chunk in chunks)
    step = max(1, GEMM_BLOCK_ELEMENTS // (taps.oh * taps.ow * chunk_k))  # images per im2col block
    for b0 in range(0, n, step):
        views = {(ky, kx): taps.view(ky, kx, slice(b0, b0 + step)) for ky in range(kh) for kx in range(kw)}
        rows = views[0, 0].shape[0] * taps.oh * taps.ow
        for g in range(groups):
            out = slice(g * per_group, (g + 1) * per_group)
            base = g * k_in
            for chunk in chunks:
                cols = np.concatenate([views[ky, kx][..., base + c0:base + c1] for ky, kx, c0, c1 in chunk], axis=-1)
                w = np.concatenate([kernel[ky, kx, c0:c1, out] for ky, kx, c0, c1 in chunk], axis=0)
                part = cols.reshape(rows, -1) @ w
                acc[b0:b0 + step, :, out] += part.astype(np.int64).reshape(-1, taps.oh * taps.ow, per_group)
    return acc.reshape(n, taps.oh, taps.ow, n_out)


def conv2d(x: Any, in_zp: int, in_scale: float, kernel: Any, kernel_scales: Any, bias: Any, out_scale: float,
           out_zp: int, strides: Pair, padding: str, dilations: Pair = (1, 1),
           activation: str | None = None) -> np.ndarray:
    """CONV_2D (ConvPerChannel) on NHWC int8; kernel (kh, kw, in / groups, out) int8, bias int32 or None."""
    xf = _offset_input(x, in_zp).astype(np.float32)
    k = np.asarray(kernel)
    kh, kw, k_in, n_out = k.shape
    n_in = xf.shape[-1]
    if n_in % k_in or n_out % (n_in // k_in):
        raise ValueError(f"kernel {k.shape} does not fit {n_in} input channels")
    taps = _Taps(xf, (kh, kw), strides, padding, dilations, 0)
    acc = _conv_acc(taps, k.astype(np.float32), n_in // k_in)
    return requantize_accumulator(acc, bias, in_scale, kernel_scales, out_scale, out_zp, activation)


def depthwise_conv2d(x: Any, in_zp: int, in_scale: float, kernel: Any, kernel_scales: Any, bias: Any,
                     out_scale: float, out_zp: int, strides: Pair, padding: str, dilations: Pair = (1, 1),
                     activation: str | None = None) -> np.ndarray:
    """DEPTHWISE_CONV_2D (DepthwiseConvPerChannel); kernel (kh, kw, in, multiplier), channel c * m + j."""
    k = np.asarray(kernel)
    kh, kw, n_in, mult = k.shape
    dtype = np.float32 if kh * kw <= F32_EXACT_TERMS else np.float64  # exact sums either way
    xf = _offset_input(x, in_zp).astype(dtype)
    if xf.shape[-1] != n_in:
        raise ValueError(f"kernel {k.shape} does not fit {xf.shape[-1]} input channels")
    taps = _Taps(xf, (kh, kw), strides, padding, dilations, 0)
    kf = k.astype(dtype)
    acc = np.zeros((xf.shape[0], taps.oh, taps.ow, n_in, mult), dtype)
    for ky in range(kh):
        for kx in range(kw):
            acc += taps.view(ky, kx)[..., None] * kf[ky, kx]
    acc = acc.astype(np.int64).reshape(*acc.shape[:3], n_in * mult)
    return requantize_accumulator(acc, bias, in_scale, kernel_scales, out_scale, out_zp, activation)


def fully_connected(x: Any, in_zp: int, in_scale: float, kernel: Any, kernel_scales: Any, bias: Any,
                    out_scale: float, out_zp: int, activation: str | None = None) -> np.ndarray:
    """FULLY_CONNECTED on (..., in) int8 with kernel (in, out) int8 (per-tensor or per-channel scales)."""
    xf = _offset_input(x, in_zp)
    k = np.asarray(kernel)
    if xf.shape[-1] != k.shape[0]:
        raise ValueError(f"kernel {k.shape} does not fit inputs of shape {xf.shape}")
    acc = (xf.reshape(-1, k.shape[0]) @ k.astype(np.float64)).astype(np.int64)
    per_tensor = np.asarray(kernel_scales).size == 1
    out = requantize_accumulator(acc, bias, in_scale, kernel_scales, out_scale, out_zp, activation,
                          float32_product=per_tensor)
    return out.reshape(*xf.shape[:-1], k.shape[1])


def add(a: Any, a_zp: int, a_scale: float, b: Any, b_zp: int, b_scale: float, out_scale: float, out_zp: int,
        activation: str | None = None) -> np.ndarray:
    """ADD of two int8 tensors (numpy broadcasting) with TFLite's 20-bit left shift rescaling."""
    twice_max = 2.0 * float(max(_f32(a_scale), _f32(b_scale)))
    m_a = _scalar_multiplier(float(_f32(a_scale)) / twice_max)
    m_b = _scalar_multiplier(float(_f32(b_scale)) / twice_max)
    m_out = _scalar_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * float(_f32(out_scale))))
    if max(m_a[1], m_b[1], m_out[1]) > 0:
        raise ValueError("ADD needs input and output multipliers below one")
    sa = _mbqm((np.asarray(a, np.int64) - int(a_zp)) << ADD_LEFT_SHIFT, *m_a)
    sb = _mbqm((np.asarray(b, np.int64) - int(b_zp)) << ADD_LEFT_SHIFT, *m_b)
    lo, hi = activation_range(activation, out_scale, out_zp)
    return _to_int8(_mbqm(wrap_int32(sa + sb), *m_out) + int(out_zp), lo, hi)


def _pool_range(activation: str | None, scale: float | None, zero_point: int | None) -> tuple[int, int]:
    """Activation clamp of a pooling op (same scale and zero point in and out)."""
    if activation is None:
        return INT8_MIN, INT8_MAX
    if scale is None or zero_point is None:
        raise ValueError("a fused activation on a pooling op needs the tensor's scale and zero_point")
    return activation_range(activation, scale, zero_point)


def avg_pool2d(x: Any, pool: Pair, strides: Pair, padding: str, activation: str | None = None,
               scale: float | None = None, zero_point: int | None = None) -> np.ndarray:
    """AVERAGE_POOL_2D on int8: sum of the in-image points / their count, halves away from zero."""
    taps = _Taps(np.asarray(x, np.int64), _pair(pool), strides, padding, (1, 1), 0)
    acc = sum(taps.view(ky, kx) for ky in range(taps.kh) for kx in range(taps.kw))
    n = taps.counts()[None, :, :, None]
    half = n // 2
    avg = np.where(acc > 0, _c_div(acc + half, n), _c_div(acc - half, n))
    return _to_int8(avg, *_pool_range(activation, scale, zero_point))


def max_pool2d(x: Any, pool: Pair, strides: Pair, padding: str, activation: str | None = None,
               scale: float | None = None, zero_point: int | None = None) -> np.ndarray:
    """MAX_POOL_2D on int8 (padding never wins: it starts from -128)."""
    taps = _Taps(np.asarray(x, np.int8), _pair(pool), strides, padding, (1, 1), INT8_MIN)
    out = taps.view(0, 0)
    for ky in range(taps.kh):
        for kx in range(taps.kw):
            out = np.maximum(out, taps.view(ky, kx))
    return _to_int8(out.astype(np.int64), *_pool_range(activation, scale, zero_point))


def _mean_multiplier(in_scale: float, out_scale: float, count: int) -> tuple[int, int]:
    """QuantizedMeanOrSum's multiplier: QuantizeMultiplier(s_in / s_out) with 1 / count folded in."""
    mult, shift = _scalar_multiplier(float(_f32(in_scale)) / float(_f32(out_scale)))
    k = min(count.bit_length() - 1, 32, 31 + shift)
    return (mult << k) // count, shift - k


def mean_hw(x: Any, in_zp: int, in_scale: float, out_zp: int, out_scale: float,
            keep_dims: bool = False) -> np.ndarray:
    """MEAN over axes 1 and 2 of NHWC int8 (GlobalAveragePooling2D): (N, C), or (N, 1, 1, C) with keep_dims."""
    x = np.asarray(x, np.int64)
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC tensor, got shape {x.shape}")
    count = x.shape[1] * x.shape[2]
    total = wrap_int32(x.sum(axis=(1, 2), keepdims=keep_dims) - int(in_zp) * count)
    mult, shift = _mean_multiplier(in_scale, out_scale, count)
    return _to_int8(_mbqm(total, mult, shift) + int(out_zp))


def _softmax_params(in_scale: float, beta: float) -> tuple[int, int, int]:
    """(input multiplier, left shift, diff_min) of the int8 softmax (PreprocessSoftmaxScaling)."""
    max_real = float((1 << 30) - 1) if SINGLE_ROUNDING else float((1 << 31) - 1)
    real = min(float(_f32(beta)) * float(_f32(in_scale)) * (1 << (31 - SOFTMAX_SCALED_DIFF_INTEGER_BITS)), max_real)
    if not real > 1.0:
        raise ValueError(f"softmax input scale {in_scale} (beta {beta}) is too small for TFLite")
    mult, shift = _scalar_multiplier(real)
    radius = math.floor(((1 << SOFTMAX_SCALED_DIFF_INTEGER_BITS) - 1)
                        * float(1 << (31 - SOFTMAX_SCALED_DIFF_INTEGER_BITS)) / float(1 << shift))
    return mult, shift, -radius


def _rescale_diff(diff: np.ndarray, mult: int, shift: int) -> np.ndarray:
    """MultiplyByQuantizedMultiplierGreaterThanOne of the build."""
    if SINGLE_ROUNDING:
        return multiply_by_quantized_multiplier_single_round(diff, mult, shift)
    return saturating_rounding_doubling_high_mul(wrap_int32(diff << shift), mult)


def softmax(x: Any, in_scale: float, in_zp: int, out_scale: float = 1 / 256, out_zp: int = -128,
            beta: float = 1.0) -> np.ndarray:
    """SOFTMAX over the last axis of int8 values, gemmlowp fixed point as TFLM computes it."""
    del in_zp  # softmax only sees differences
    if _f32(out_scale) != _f32(1 / 256) or int(out_zp) != -128:
        raise ValueError("TFLM's int8 softmax needs output scale 1/256 and zero point -128")
    x = np.asarray(x, np.int64)
    mult, shift, diff_min = _softmax_params(in_scale, beta)
    diff = x - x.max(axis=-1, keepdims=True)
    keep = diff >= diff_min
    exps = exp_on_negative_values(_rescale_diff(np.where(keep, diff, 0), mult, shift),
                                  SOFTMAX_SCALED_DIFF_INTEGER_BITS)
    terms = rounding_divide_by_pot(exps, SOFTMAX_ACCUMULATION_INTEGER_BITS)  # Rescale<12>: Q0.31 -> Q12.19
    total = wrap_int32(np.where(keep, terms, 0).sum(axis=-1, keepdims=True))
    scale, bits_over_unit = get_reciprocal(total, SOFTMAX_ACCUMULATION_INTEGER_BITS)
    exponent = bits_over_unit + 31 - 8
    out = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(scale, exps), exponent) + INT8_MIN
    return np.where(keep, _to_int8(out), np.int8(INT8_MIN)).astype(np.int8)


def pad(x: Any, pads: Sequence[Sequence[int]], zp: int) -> np.ndarray:
    """PAD of int8 values with the zero point; ``pads`` per axis ((before, after), ...) or for H, W only."""
    x = np.asarray(x, np.int8)
    pads = [tuple(int(v) for v in p) for p in pads]
    if len(pads) == 2 and x.ndim == 4:
        pads = [(0, 0), *pads, (0, 0)]
    if len(pads) != x.ndim:
        raise ValueError(f"{len(pads)} padding pairs for a tensor of rank {x.ndim}")
    return np.pad(x, pads, constant_values=np.int8(zp))
