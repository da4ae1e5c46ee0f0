"""The quantization core: encodings, rounding and clamping shared by every backend.

One formula serves the numpy simulation, the TF (Keras) simulation and every
exporter, so that what is simulated is what onnxruntime computes::

    q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

All arithmetic is float32, as onnxruntime's QuantizeLinear / DequantizeLinear:
``x / scale`` is a true IEEE division (never a multiplication by a reciprocal),
rounding is half to even (``np.rint`` / ``tf.round``), and integers stay below
2**24 so that adding the zero point in float32 is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyptq.errors import ConfigError
from tinyptq.params import Integer, validate

MIN_BITS = 2
MAX_BITS = 16
# every bit-width a user sets (QuantConfig, overrides, grids, --weight-bits / --act-bits)
BITS = Integer(MIN_BITS, MAX_BITS)


def check_bits(bits: Any, what: str = "bits", owner: str = "quantization") -> int:
    """Validate a bit-width (an integer in 2..16) and return it as int."""
    return validate(owner, what, bits, BITS)


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is to be quantized, before its range is known.

    ``signed=None`` picks the grid: a symmetric grid is signed when the range
    has negative values and unsigned otherwise (a ReLU output then gets all
    levels); an asymmetric grid is unsigned (the zero point places it).
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool | None = None
    per_channel: bool = False
    narrow_range: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        fields = {**self.__dict__, **changes}
        return QuantSpec(**fields)


def grid_limits(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """The integer range [qmin, qmax] of a grid."""
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    return (qmin + 1 if narrow_range else qmin), qmax


@dataclass(frozen=True, eq=False)
class Encoding:
    """Scale and zero point of one tensor, per tensor or per channel along ``axis``."""

    bits: int
    scale: np.ndarray
    zero_point: np.ndarray
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    axis: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point).astype(np.int32)
        if scale.ndim > 1 or zp.shape not in (scale.shape, ()):
            raise ConfigError(f"encoding scale {scale.shape} / zero point {zp.shape} do not match")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ConfigError("encoding scale must be finite and positive")
        if self.axis is None and scale.ndim != 0:
            raise ConfigError("a per-channel encoding needs an axis")
        zp = np.broadcast_to(zp, scale.shape).copy()
        if np.any(zp < self.qmin) or np.any(zp > self.qmax):
            raise ConfigError(f"zero point outside the {self.bits}-bit grid")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp)

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_range(
        cls,
        min_val: Any,
        max_val: Any,
        spec: QuantSpec,
        axis: int | None = None,
    ) -> Encoding:
        """The encoding whose grid covers [min_val, max_val] (widened to include 0)."""
        lo = np.minimum(np.asarray(min_val, dtype=np.float64), 0.0)
        hi = np.maximum(np.asarray(max_val, dtype=np.float64), 0.0)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ConfigError("cannot build an encoding from a NaN/Inf range")
        if spec.signed is not None:
            signed = spec.signed
        else:  # asymmetric grids shift with the zero point: unsigned, as ORT's uint8 activations
            signed = spec.symmetric and bool(np.any(lo < 0))
        qmin, qmax = grid_limits(spec.bits, signed, spec.narrow_range)
        if spec.symmetric:
            if signed:
                scale = np.maximum(-lo, hi) / qmax
            else:
                scale = hi / qmax
            scale = _safe_scale(scale)
            zp = np.zeros_like(scale, dtype=np.int32)
        else:
            scale = _safe_scale((hi - lo) / (qmax - qmin))
            zp = np.clip(qmin - np.rint(lo / scale.astype(np.float64)), qmin, qmax).astype(np.int32)
        if scale.ndim == 0:
            axis = None
        return cls(spec.bits, scale, zp, signed, spec.symmetric, spec.narrow_range, axis)

    @classmethod
    def from_dict(cls, d: dict) -> Encoding:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            int(d["bits"]),
            np.asarray(d["scale"], dtype=np.float32),
            np.asarray(d["zero_point"], dtype=np.int32),
            bool(d["signed"]),
            bool(d["symmetric"]),
            bool(d.get("narrow_range", False)),
            d.get("axis"),
        )

    def to_dict(self) -> dict:
        """A JSON-ready description (scale and offset as lists or scalars)."""
        return {
            "bits": self.bits,
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "signed": self.signed,
            "symmetric": self.symmetric,
            "narrow_range": self.narrow_range,
            "axis": self.axis,
            "qmin": self.qmin,
            "qmax": self.qmax,
        }

    # ------------------------------------------------------------- properties
    @property
    def qmin(self) -> int:
        """Smallest integer of the grid."""
        return grid_limits(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        """Largest integer of the grid."""
        return grid_limits(self.bits, self.signed, self.narrow_range)[1]

    @property
    def per_channel(self) -> bool:
        """Whether scale and zero point vary along ``axis``."""
        return self.scale.ndim == 1

    @property
    def min(self) -> np.ndarray:
        """The smallest representable value (per channel)."""
        return ((self.qmin - self.zero_point) * self.scale).astype(np.float32)

    @property
    def max(self) -> np.ndarray:
        """The largest representable value (per channel)."""
        return ((self.qmax - self.zero_point) * self.scale).astype(np.float32)

    def _broadcast(self, arr: np.ndarray, ndim: int) -> np.ndarray:
        if not self.per_channel:
            return arr
        axis = self.axis % ndim
        shape = [1] * ndim
        shape[axis] = arr.shape[0]
        return arr.reshape(shape)

    # ------------------------------------------------------------------ numpy
    def quantize(self, x: Any) -> np.ndarray:
        """Float -> integers on the grid (int32), rounding half to even."""
        x = np.asarray(x, dtype=np.float32)
        scale = self._broadcast(self.scale, x.ndim)
        zp = self._broadcast(self.zero_point.astype(np.float32), x.ndim)
        q = np.rint(x / scale) + zp
        return np.clip(q, self.qmin, self.qmax).astype(np.int32)

    def dequantize(self, q: Any) -> np.ndarray:
        """Integers on the grid -> float32."""
        q = np.asarray(q)
        scale = self._broadcast(self.scale, q.ndim)
        zp = self._broadcast(self.zero_point, q.ndim)
        return (q.astype(np.int32) - zp).astype(np.float32) * scale

    def fake_quant(self, x: Any) -> np.ndarray:
        """Quantize then dequantize (float32 values on the grid)."""
        return self.dequantize(self.quantize(x))

    # --------------------------------------------------------------------- TF
    def fake_quant_tf(self, x: Any) -> Any:
        """TF fake quantization, bit-identical to :meth:`fake_quant`.

        The gradient is the straight-through estimator: identity where the
        value falls inside the grid, zero where it is clamped.
        """
        scale, zp = self.tf_params(_ndim(x))
        return fake_quant_tf(x, scale, zp, self.qmin, self.qmax)

    def tf_params(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point as float32 arrays broadcastable to rank ``ndim``.

        numpy (not TF) values, so that each TF graph embeds its own constants.
        """
        scale = self._broadcast(self.scale, ndim)
        zp = self._broadcast(self.zero_point.astype(np.float32), ndim)
        return scale, zp

    def __repr__(self) -> str:
        kind = f"per-channel(axis={self.axis}, n={self.scale.shape[0]})" if self.per_channel else "per-tensor"
        sign = "int" if self.signed else "uint"
        return f"Encoding({sign}{self.bits}, {'sym' if self.symmetric else 'asym'}, {kind})"


def fake_quant_tf(x: Any, scale: Any, zero_point: Any, qmin: Any, qmax: Any) -> Any:
    """TF fake-quant, differentiable in ``x`` and ``scale``; scale / zero point broadcast to x.

    The value is bit-identical to :meth:`Encoding.fake_quant`. The gradient in
    ``x`` is the straight-through estimator (1 inside the grid, 0 where it is
    clamped); the gradient in ``scale`` is the LSQ one, ``q - zp - x / s``
    inside the grid and ``qmin - zp`` / ``qmax - zp`` where clamped, summed
    over the axes ``scale`` is broadcast along. ``qmin`` / ``qmax`` may be
    tensors (the simulation keeps them in variables).
    """
    from tinyptq._tf import tf

    x = tf.convert_to_tensor(x, tf.float32)
    zp = tf.convert_to_tensor(zero_point, tf.float32)
    lo = tf.cast(qmin, tf.float32)
    hi = tf.cast(qmax, tf.float32)

    s = tf.convert_to_tensor(scale, tf.float32)
    ratio = x / s
    q = tf.round(ratio) + zp
    clipped = tf.clip_by_value(q, lo, hi)
    out = tf.stop_gradient((clipped - zp) * s)
    # the gradients ride on a term that is exactly zero in value (g - g): no custom-gradient
    # registration, which TF keeps forever per traced graph (with everything it captured)
    inside = tf.stop_gradient(tf.logical_and(q >= lo, q <= hi))
    ds = tf.stop_gradient(tf.where(inside, clipped - zp - ratio, clipped - zp))
    g = tf.where(inside, x, tf.zeros_like(x)) + s * ds
    return out + (g - tf.stop_gradient(g))


def _ndim(x: Any) -> int:
    shape = getattr(x, "shape", None)
    return len(shape) if shape is not None else np.ndim(x)


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    """float32 scale; an empty range (all zeros) gets scale 1 so that 0 stays exact."""
    scale = np.asarray(scale, dtype=np.float64)
    scale = np.where(scale > np.finfo(np.float32).tiny * 2**24, scale, 1.0)
    return scale.astype(np.float32)


def quantization_mse(x: np.ndarray, encoding: Encoding) -> float:
    """Mean squared error of fake-quantizing ``x`` with ``encoding``."""
    x = np.asarray(x, dtype=np.float32)
    return float(np.mean((encoding.fake_quant(x) - x) ** 2))
