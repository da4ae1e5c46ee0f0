"""Adam over a fixed list of variables, compiled with the step that uses it."""

from __future__ import annotations

from typing import Any

from tinyptq._tf import tf


class Adam:
    """Adam over a fixed list of variables, each with its own learning rate (compiled with the step)."""

    def __init__(
        self, variables: list[Any], rates: list[float], b1: float = 0.9, b2: float = 0.999
    ) -> None:
        self.variables, self.rates, self.b1, self.b2 = variables, rates, b1, b2
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        self.s = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        self.t = tf.Variable(0.0, trainable=False)

    def apply(self, grads: list[Any], train: Any) -> None:
        """One update when ``train`` is 1.0; none (state untouched) when it is 0.0 (no branch: no retrace)."""
        t = self.t.assign_add(train)
        c1, c2 = (
            1.0 - tf.pow(self.b1, tf.maximum(t, 1.0)),
            1.0 - tf.pow(self.b2, tf.maximum(t, 1.0)),
        )
        for var, g, m, s, rate in zip(
            self.variables, grads, self.m, self.s, self.rates, strict=True
        ):
            if g is None:
                continue
            m.assign(m + train * (1.0 - self.b1) * (g - m))
            s.assign(s + train * (1.0 - self.b2) * (tf.square(g) - s))
            var.assign_sub(train * rate * (m / c1) / (tf.sqrt(s / c2) + 1e-8))
