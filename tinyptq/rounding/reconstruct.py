"""One unit's optimization: soft rounding (and activation steps) learned against the float output."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyptq._tf import tf
from tinyptq.executor import Executor
from tinyptq.rounding.adam import Adam
from tinyptq.rounding.fisher import EVAL_BATCH
from tinyptq.rounding.soft import (
    HARD,
    NEAREST,
    SOFT,
    SoftRounding,
    annealed_beta,
    rounding_regularizer,
)
from tinyptq.rounding.units import Unit

# fewer iterations run eagerly: compiling a step (tracing the sub-graph with its
# gradient, ~1 s) costs more than a few dozen eager steps
COMPILE_FROM = 100


@dataclass(frozen=True)
class Settings:
    """Options of a reconstruction (the stages' hyperparameters)."""

    iterations: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-2
    reg_weight: float = 10.0
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    input_from: str = "quantized"  # or "float"
    qdrop: float = 0.0
    seed: int = 0
    loss: str = "mse"  # or "fisher"
    act_learning_rate: float | None = (
        None  # relative step of learned activation scales; None: fixed
    )


@dataclass
class UnitResult:
    """What reconstructing one unit gave."""

    unit: Unit
    mse_nearest: float
    mse: float
    seconds: float
    integers: dict[str, np.ndarray]  # layer -> grid integers, canonical layout
    scales: dict[str, float] = field(default_factory=dict)  # learned activation steps
    flipped: float = 0.0  # fraction of weights rounded away from nearest
    kept_nearest: bool = False
    mse_learned: float = 0.0  # of the learned rounding, kept or not


@dataclass
class _Data:
    """One unit's fed inputs, float target and Fisher weights (or None), as TF constants."""

    xs: list[Any]
    y: Any
    weights: Any = None


def _collect(
    fn: Any, names: Sequence[str], wanted: Sequence[str], calib: np.ndarray
) -> dict[str, np.ndarray]:
    """The ``wanted`` ones of ``fn``'s outputs ``names`` over ``calib``, in batches (the rest dropped)."""
    parts: dict[str, list[np.ndarray]] = {w: [] for w in wanted}
    for start in range(0, len(calib), EVAL_BATCH):
        values = dict(zip(names, fn(tf.constant(calib[start : start + EVAL_BATCH])), strict=True))
        for w in wanted:
            parts[w].append(values[w].numpy())
    return {w: np.concatenate(p) for w, p in parts.items()}


class _Reconstruction:
    """One unit's optimization: one function runs a table of steps, training or (``train`` 0) evaluating.

    Compiled (from ``COMPILE_FROM`` iterations on) it is traced once per unit
    and loops over its table in the graph: tracing the sub-graph with its
    gradient costs far more than a few hundred steps of a small layer, and a
    Python call per step would add its own overhead. Fewer iterations run
    eagerly, step by step.
    """

    CHUNK = 50  # steps per call while training (the progress bar moves between calls)

    def __init__(
        self,
        ex: Executor,
        unit: Unit,
        roundings: dict[str, SoftRounding],
        scales: list[Any],
        data: _Data,
        settings: Settings,
    ) -> None:
        self.ex, self.unit, self.roundings, self.data, self.settings = (
            ex,
            unit,
            roundings,
            data,
            settings,
        )
        self.scales = scales
        self.s0 = [float(v.numpy()) for v in scales]
        self.n = int(data.y.shape[0])
        self.batch = min(settings.batch_size, self.n)
        self.norm = tf.Variable(1.0, trainable=False)  # the loss of nearest rounding, once measured
        variables = [r.v for r in roundings.values()] + list(scales)
        rates = [settings.learning_rate] * len(roundings) + [
            (settings.act_learning_rate or 0.0) * v for v in self.s0
        ]
        self.adam = Adam(variables, rates)
        self.variables = variables
        # the sub-graph's ops inlined into the step: one trace, no nested function to differentiate
        self.forward = ex.function([unit.output], unit.inputs, raw=[unit.output]).python_function
        self.compiled = settings.iterations >= COMPILE_FROM
        if self.compiled:
            rows, steps = (
                tf.TensorSpec([None, self.batch], tf.int32),
                tf.TensorSpec([None], tf.float32),
            )
            signature = [
                rows,
                tf.TensorSpec([None, self.batch], tf.float32),
                steps,
                steps,
                tf.TensorSpec([], tf.float32),
            ]
            self.run = tf.function(self._loop, autograph=False, input_signature=signature)
        else:
            self.run = self._eager_loop

    def _step(self, idx: Any, mask: Any, beta: Any, lam: Any, train: Any) -> tuple[Any, Any]:
        """Squared error sums (plain, weighted) of the batch ``idx`` (``mask``ed), then one update if ``train``."""
        xs, y, weights = self.data.xs, self.data.y, self.data.weights
        with tf.GradientTape() as tape:
            sq = tf.square(self.forward(*[tf.gather(x, idx) for x in xs])[0] - tf.gather(y, idx))
            sq = sq * tf.reshape(mask, [-1] + [1] * (len(sq.shape) - 1))
            weighted = sq if weights is None else sq * tf.gather(weights, idx)
            per_sample = float(np.prod(sq.shape[1:]))
            rec = tf.reduce_sum(weighted) / (tf.reduce_sum(mask) * per_sample) / self.norm
            regs = [rounding_regularizer(r.h(), beta) for r in self.roundings.values()]
            size = float(sum(r.size for r in self.roundings.values())) or 1.0
            loss = rec + lam * (tf.add_n(regs) / size if regs else 0.0)
        self.adam.apply(tape.gradient(loss, self.variables), train)
        for var, first in zip(self.scales, self.s0, strict=True):  # steps stay positive
            var.assign(tf.maximum(var, 1e-3 * first))
        return tf.reduce_sum(sq), tf.reduce_sum(weighted)

    def _loop(self, idx: Any, mask: Any, beta: Any, lam: Any, train: Any) -> tuple[Any, Any]:
        """Every row of the tables in turn (in the graph); the summed squared errors."""

        def body(t: Any, plain: Any, weighted: Any) -> tuple[Any, Any, Any]:
            a, b = self._step(idx[t], mask[t], beta[t], lam[t], train)
            return t + 1, plain + a, weighted + b

        zero = tf.constant(0.0)
        _, plain, weighted = tf.while_loop(
            lambda t, *_: t < tf.shape(idx)[0], body, [tf.constant(0), zero, zero]
        )
        return plain, weighted

    def _eager_loop(
        self, idx: Any, mask: Any, beta: Any, lam: Any, train: Any
    ) -> tuple[float, float]:
        plain = weighted = 0.0
        for t in range(int(idx.shape[0])):
            a, b = self._step(idx[t], mask[t], beta[t], lam[t], train)
            plain, weighted = plain + float(a), weighted + float(b)
        return plain, weighted

    def evaluate(self) -> tuple[float, float]:
        """(plain MSE, the optimized error: Fisher-weighted or plain) over every sample, nothing updated."""
        batch = self.batch if self.compiled else min(EVAL_BATCH, self.n)
        rows = -(-self.n // batch)
        flat = np.arange(rows * batch)
        idx = (
            (flat % self.n).reshape(rows, batch).astype(np.int32)
        )  # always full batches: no retrace
        mask = (flat < self.n).reshape(rows, batch).astype(np.float32)
        zeros = tf.zeros([rows])
        plain, weighted = self.run(
            tf.constant(idx), tf.constant(mask), zeros, zeros, tf.constant(0.0)
        )
        count = float(np.prod(self.data.y.shape))
        return float(plain) / count, float(weighted) / count

    def optimize(self, seed: int, progress: Callable[[int], None]) -> None:
        """Adam on the rounding variables (and steps) over random calibration batches, QDrop as set."""
        settings = self.settings
        rng = np.random.default_rng([seed, 0x5EED])
        idx = np.stack(
            [rng.choice(self.n, self.batch, replace=False) for _ in range(settings.iterations)]
        )
        schedule = [
            annealed_beta(
                t, settings.iterations, settings.warmup, settings.beta_start, settings.beta_end
            )
            for t in range(settings.iterations)
        ]
        beta = np.array([b for b, _ in schedule], np.float32)
        lam = np.array([settings.reg_weight if on else 0.0 for _, on in schedule], np.float32)
        ones, one = tf.ones([self.CHUNK, self.batch]), tf.constant(1.0)
        self.ex.reseed(seed)
        points = [p for p in self.unit.points if p in self.ex.act_quantizers]
        if settings.qdrop:
            self.ex.set_drop(settings.qdrop, points)
        try:
            for start in range(0, settings.iterations, self.CHUNK):
                sl = slice(start, start + self.CHUNK)
                rows = len(idx[sl])
                self.run(
                    tf.constant(idx[sl].astype(np.int32)),
                    ones[:rows],
                    tf.constant(beta[sl]),
                    tf.constant(lam[sl]),
                    one,
                )
                progress(rows)
        finally:
            if settings.qdrop:
                self.ex.set_drop(0.0, points)


def reconstruct_unit(
    ex: Executor,
    unit: Unit,
    roundings: dict[str, SoftRounding],
    data: _Data,
    settings: Settings,
    seed: int,
    learn_points: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> UnitResult:
    """Learn the rounding of ``unit``'s layers (and the steps of ``learn_points``); leave it hard in ``ex``.

    ``roundings`` (the unit's layers' transforms, installed in ``ex``) end in
    mode HARD, so later units see the chosen rounding; they go back to
    NEAREST (and the steps to their start) when the reconstruction did not
    lower the calibration error.
    """
    start = time.perf_counter()
    scales = [ex.quantizer(p).scale for p in learn_points]
    rec = _Reconstruction(ex, unit, roundings, scales, data, settings)
    for r in roundings.values():
        r.mode.assign(NEAREST)
    mse_nearest, loss_nearest = rec.evaluate()
    rec.norm.assign(max(loss_nearest, 1e-30))
    for r in roundings.values():
        r.mode.assign(SOFT)
    rec.optimize(seed, progress or (lambda n: None))
    for r in roundings.values():
        r.mode.assign(HARD)
    mse, _ = rec.evaluate()
    kept = not mse < mse_nearest
    integers, flipped = {}, 0
    for name, r in roundings.items():
        nearest = r.integers(NEAREST)
        integers[name] = nearest if kept else r.integers(HARD)
        flipped += int(np.sum(integers[name] != nearest))
    learned = {}
    for point, var, s0 in zip(learn_points, scales, rec.s0, strict=True):
        if kept:
            var.assign(s0)
        else:
            learned[point] = float(var.numpy())
    total = sum(r.size for r in roundings.values())
    return UnitResult(
        unit,
        mse_nearest,
        mse_nearest if kept else mse,
        time.perf_counter() - start,
        integers,
        learned,
        flipped / max(total, 1),
        kept,
        mse,
    )
