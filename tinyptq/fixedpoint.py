"""Fixed-point arithmetic of integer inference runtimes, vectorized in numpy (int64).

TFLite, TFLite Micro and CMSIS-NN requantize an int32 accumulator by a real
multiplier M = s_in * s_w / s_out stored as a Q31 mantissa and a power-of-two
shift (``quantize_multiplier``), and apply it with gemmlowp's rounding
doubling high multiply followed by a rounding right shift
(``multiply_by_quantized_multiplier``). Float values enter and leave through
``tflite_round`` (C's ``round``: half away from zero), not numpy's half to even.

Every function takes arrays (or scalars) of any integer dtype and returns
int64 arrays holding the int32 results; shifts may be per channel arrays that
broadcast against the values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def wrap_int32(x: Any) -> np.ndarray:
    """Two's complement wrap of integers to int32 (held as int64), like C int32 arithmetic in practice."""
    x = np.asarray(x, np.int64)
    return ((x + 2**31) & 0xFFFFFFFF) - 2**31


def tflite_round(x: Any) -> np.ndarray:
    """C's ``round``: nearest integer, halves away from zero (exact for float32 and float64 inputs)."""
    x = np.asarray(x, np.float64)
    a = np.abs(x)
    lo = np.floor(a)
    return np.copysign(np.where(a - lo >= 0.5, lo + 1.0, lo), x)


def quantize_multiplier(m: Any, cap_shift: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The Q31 mantissa and shift of real multipliers ``m`` (TFLite's QuantizeMultiplier).

    m = q * 2**(shift - 31) with q in [2**30, 2**31); m == 0 gives (0, 0); a
    shift below -31 underflows to (0, 0). A shift above 30 stays as it is
    (TFLite Micro's default build); ``cap_shift`` saturates it at 30 with the
    largest mantissa, as builds with TFLITE_SINGLE_ROUNDING do.
    """
    m = np.asarray(m, np.float64)
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("a requantization multiplier must be finite and non-negative")
    frac, shift = np.frexp(m)
    q = tflite_round(frac * 2.0**31).astype(np.int64)
    carry = q == 2**31
    q = np.where(carry, q // 2, q)
    shift = np.where(carry, shift + 1, shift).astype(np.int64)
    under = shift < -31
    q, shift = np.where(under, 0, q), np.where(under, 0, shift)
    if cap_shift:
        over = shift > 30
        q, shift = np.where(over, INT32_MAX, q), np.where(over, 30, shift)
    zero = m == 0
    return np.where(zero, 0, q).astype(np.int64), np.where(zero, 0, shift).astype(np.int64)


def _trunc_div(a: np.ndarray, d: int) -> np.ndarray:
    """Integer division rounding toward zero (C semantics)."""
    q = np.abs(a) // d
    return np.where(a < 0, -q, q)


def saturating_rounding_doubling_high_mul(a: Any, b: Any) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul of int32 values: round(a * b / 2**31)."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = _trunc_div(ab + nudge, 1 << 31)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, high).astype(np.int64)


def rounding_divide_by_pot(x: Any, exponent: Any) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: x / 2**exponent, halves away from zero."""
    x = np.asarray(x, np.int64)
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: Any, multiplier: Any, shift: Any) -> np.ndarray:
    """x * M for M = (multiplier, shift) from ``quantize_multiplier``, as TFLite's reference kernels do.

    Double rounding: the doubling high multiply rounds, then the right shift
    rounds again (the default build of TFLite and TFLite Micro). A positive
    shift is applied first as an int32 multiplication, which wraps on
    overflow as it does there.
    """
    x = np.asarray(x, np.int64)
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(wrap_int32(x << left), multiplier), right)


def multiply_by_quantized_multiplier_single_round(x: Any, multiplier: Any, shift: Any) -> np.ndarray:
    """x * M with one rounding (TFLite built with TFLITE_SINGLE_ROUNDING, and CMSIS-NN's arm_nn_requantize)."""
    x = np.asarray(x, np.int64)
    total = 31 - np.asarray(shift, np.int64)
    rounded = (x * np.asarray(multiplier, np.int64) + (np.int64(1) << (total - 1))) >> total
    return np.clip(rounded, INT32_MIN, INT32_MAX)


# ------------------------------------------------- gemmlowp fixed-point helpers
# Raw int32 values of gemmlowp's FixedPoint<int32_t, IntegerBits> (Q<IntegerBits>.<31 - IntegerBits>),
# held in int64 arrays. Plain additions wrap modulo 2**32 like the C code on every target.


def saturating_rounding_multiply_by_pot(x: Any, exponent: int) -> np.ndarray:
    """gemmlowp's SaturatingRoundingMultiplyByPOT<exponent>: saturating left shift or rounding right shift."""
    x = np.asarray(x, np.int64)
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    if exponent == 0:
        return x
    threshold = (1 << (31 - exponent)) - 1
    return np.where(x > threshold, INT32_MAX, np.where(x < -threshold, INT32_MIN, x << exponent))


def rounding_half_sum(a: Any, b: Any) -> np.ndarray:
    """gemmlowp's RoundingHalfSum of int32 values: (a + b) / 2, halves away from zero."""
    s = np.asarray(a, np.int64) + np.asarray(b, np.int64)
    return _trunc_div(s + np.where(s >= 0, 1, -1), 2)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a: np.ndarray) -> np.ndarray:
    """exp(a) for Q0.31 raw values a in [-1/4, 0): Taylor series around -1/8 (gemmlowp)."""
    constant_term = 1895147668  # exp(-1/8)
    constant_1_over_3 = 715827883
    x = wrap_int32(a + (1 << 28))
    x2 = saturating_rounding_doubling_high_mul(x, x)
    x3 = saturating_rounding_doubling_high_mul(x2, x)
    x4 = saturating_rounding_doubling_high_mul(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    poly = saturating_rounding_doubling_high_mul(wrap_int32(x4_over_4 + x3), constant_1_over_3)
    poly = rounding_divide_by_pot(wrap_int32(poly + x2), 1)
    return wrap_int32(constant_term + saturating_rounding_doubling_high_mul(constant_term, wrap_int32(x + poly)))


# exp(-2**k) in Q0.31 for k = -2 .. 4 (gemmlowp's barrel shifter constants)
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401), (4, 242))


def exp_on_negative_values(a: Any, integer_bits: int) -> np.ndarray:
    """gemmlowp's exp_on_negative_values: exp of raw Q<integer_bits> values a <= 0, as Q0.31 raw values."""
    a = np.asarray(a, np.int64)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = wrap_int32((a & (one_quarter - 1)) - one_quarter)
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        saturating_rounding_multiply_by_pot(a_mod_quarter_minus_one_quarter, integer_bits)
    )
    remainder = wrap_int32(a_mod_quarter_minus_one_quarter - a)
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            bit = (remainder & (1 << (fractional_bits + exponent))) != 0
            result = np.where(bit, saturating_rounding_doubling_high_mul(result, multiplier), result)
    if integer_bits > 5:
        result = np.where(a < -(1 << (36 - integer_bits)), 0, result)
    return np.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x_for_x_in_0_1(a: Any) -> np.ndarray:
    """gemmlowp's 1 / (1 + a) for Q0.31 raw values a in [0, 1): Newton-Raphson, Q0.31 raw result."""
    half_denominator = rounding_half_sum(a, INT32_MAX)
    x = wrap_int32(1515870810 + saturating_rounding_doubling_high_mul(half_denominator, -1010580540))  # 48/17 - 32/17 d
    one_q2 = 1 << 29
    for _ in range(3):
        half_denominator_times_x = saturating_rounding_doubling_high_mul(half_denominator, x)
        one_minus = wrap_int32(one_q2 - half_denominator_times_x)
        x = wrap_int32(x + saturating_rounding_multiply_by_pot(saturating_rounding_doubling_high_mul(x, one_minus), 2))
    return saturating_rounding_multiply_by_pot(x, 1)


def count_leading_zeros_u32(x: Any) -> np.ndarray:
    """Leading zero bits of values taken as uint32 (32 for 0)."""
    x = np.asarray(x, np.int64) & 0xFFFFFFFF
    n = np.zeros(x.shape, np.int64)
    for bits in (16, 8, 4, 2, 1):
        small = x < (np.int64(1) << (32 - bits))
        n = np.where(small, n + bits, n)
        x = np.where(small, x << bits, x)
    return np.where(x == 0, 32, n)


def get_reciprocal(x: Any, x_integer_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's GetReciprocal of positive raw Q<x_integer_digits> values: (Q0.31 raw 1/x scaled, num_bits_over_unit).

    1 / x = result * 2**-num_bits_over_unit with result in (1/2, 1].
    """
    x = np.asarray(x, np.int64)
    headroom_plus_one = count_leading_zeros_u32(x)
    num_bits_over_unit = x_integer_digits - headroom_plus_one
    shifted_sum_minus_one = wrap_int32(((x << headroom_plus_one) & 0xFFFFFFFF) - (1 << 31))
    return one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one), num_bits_over_unit


def bias_int32(bias: Any, in_scale: Any, w_scales: Any) -> np.ndarray:
    """A float bias as the int32 a deployed model stores: round(b / (s_in * s_w)) on the scale float32(s_in * s_w).

    The one formula of every exporter and of the integer simulation (halves to even, saturated).
    """
    b_scale = (np.float64(np.float32(in_scale)) * np.asarray(w_scales, np.float32).astype(np.float64)).astype(np.float32)
    q = np.rint(np.asarray(bias, np.float64) / b_scale.astype(np.float64))
    return np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int64)
