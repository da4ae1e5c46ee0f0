"""Soft rounding: AdaRound's relaxed up-or-down choice per weight, as an executor weight transform."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from tinyptq._tf import tf
from tinyptq.executor import Executor, Quantizer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
SOFT, HARD, NEAREST, FLOAT = 0, 1, 2, 3  # how a SoftRounding rounds (FLOAT: not at all)


def rectified_sigmoid(v: Any) -> Any:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(h: Any, beta: Any) -> Any:
    """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1."""
    return tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))


def annealed_beta(
    step: int, iterations: int, warmup: float, start: float, end: float
) -> tuple[float, bool]:
    """(beta, regularizer on) at ``step``: off for the first ``warmup`` fraction, then start -> end linearly."""
    warm = int(warmup * iterations)
    if step < warm:
        return start, False
    progress = (step - warm) / max(iterations - warm, 1)
    return end + (start - end) * max(0.0, 1.0 - progress), True


class SoftRounding:
    """The rounding variables V of one kernel (canonical layout), on its weight quantizer's grid.

    ``transform`` is the executor's weight-transform hook: the kernel rounded
    softly (mode SOFT), by h(V) >= 0.5 (HARD), to nearest (NEAREST, as the
    weight quantizer rounds) or not at all (FLOAT), switched by a variable
    without retracing.
    """

    def __init__(self, kernel: Any, quantizer: Quantizer) -> None:
        w = np.asarray(kernel.numpy(), np.float32)
        ratio = w / quantizer.scale.numpy().reshape(_channel_shape(w.ndim))
        frac = ratio - np.floor(ratio)
        p = np.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)  # h(V) = frac
        self.v = tf.Variable((np.log(p) - np.log1p(-p)).astype(np.float32), name="rounding")
        self.mode = tf.Variable(SOFT, trainable=False, name="rounding_mode")
        self.size = int(w.size)
        self._kernel, self._quantizer = kernel, quantizer

    def h(self) -> Any:
        """The soft rounding h(V) in [0, 1]."""
        return rectified_sigmoid(self.v)

    def levels(self, kernel: Any, quantizer: Quantizer) -> Any:
        """The kernel's grid integers (as floats) in the current mode; soft ones differentiable in V."""
        shape = _channel_shape(len(kernel.shape))
        scale = tf.reshape(quantizer.scale, shape)
        zp = tf.reshape(quantizer._zero_point, shape)
        ratio = tf.convert_to_tensor(kernel) / scale
        down = tf.floor(ratio)
        soft = self.h()
        up = tf.where(
            self.mode == SOFT,
            soft,
            tf.where(self.mode == HARD, tf.cast(soft >= 0.5, tf.float32), tf.round(ratio) - down),
        )
        return tf.clip_by_value(down + up + zp, quantizer._qmin, quantizer._qmax)

    def transform(self, kernel: Any, quantizer: Quantizer) -> Any:
        """Executor hook: the kernel on its grid, rounded as the mode says (FLOAT: the kernel itself)."""
        shape = _channel_shape(len(kernel.shape))
        zp = tf.reshape(quantizer._zero_point, shape)
        rounded = (self.levels(kernel, quantizer) - zp) * tf.reshape(quantizer.scale, shape)
        return tf.where(self.mode == FLOAT, tf.convert_to_tensor(kernel), rounded)

    def integers(self, mode: int) -> np.ndarray:
        """The kernel's grid integers (int32, canonical layout) in ``mode`` (which stays set)."""
        self.mode.assign(mode)
        return np.rint(self.levels(self._kernel, self._quantizer).numpy()).astype(np.int32)


def _channel_shape(ndim: int) -> list[int]:
    """Broadcast shape of per-output-channel values over a canonical kernel."""
    return [-1] + [1] * (ndim - 1)


@contextlib.contextmanager
def float_mode(ex: Executor, roundings: dict[str, SoftRounding]) -> Iterator[None]:
    """``ex`` as the float model for a while: every quantizer off, no kernel rounded (no retracing)."""
    quantizers = [*ex.act_quantizers.values(), *ex.weight_quantizers.values()]
    flags = [q.enabled for q in quantizers]
    modes = {name: int(r.mode.numpy()) for name, r in roundings.items()}
    for q in quantizers:
        q.enable(False)
    for r in roundings.values():
        r.mode.assign(FLOAT)
    try:
        yield
    finally:
        for q, on in zip(quantizers, flags, strict=True):
            q.enable(on)
        for name, mode in modes.items():
            roundings[name].mode.assign(mode)
