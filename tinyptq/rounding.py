"""Weight rounding by output reconstruction: the machinery shared by ``adaround`` and ``brecq``.

AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding") chooses, per
weight, whether to round down or up so that a layer's output matches the float
one, instead of rounding each weight to its nearest grid value. The choice is
relaxed to a soft variable h(V) in [0, 1] (a rectified sigmoid), the kernel
becomes ``s * (clip(floor(W / s) + h(V) + zp, qmin, qmax) - zp)``, and V is
learned with Adam on the calibration data against

    ||f(W_soft; x) - y||^2 / E_nearest  +  lambda * mean(1 - |2 h(V) - 1|^beta)

where the regularizer, off during a warm-up and then with beta annealed from
20 to 2, drives every h(V) to 0 or 1. Dividing the reconstruction term by the
error of nearest rounding (and averaging the regularizer over the weights)
makes one ``reg_weight`` fit layers of any size and output scale. BRECQ (Li et
al. 2021) does the same per block (a residual or a depthwise-separable pair),
optionally with the squared gradient of the task loss as per-output weights
(Fisher diagonal) and with the block's activation steps learned too (LSQ).
QDrop (Wei et al. 2022) keeps a random part of the activations in float
during the optimization.

A :class:`Unit` is what is reconstructed at once: its layers, the nodes it is
fed (raw values: their own quantizers apply inside), the node whose raw value
is compared with the float model's, and the activation quantizers in between.
Units run in network order; each one's input comes from the network already
rounded upstream (or, on request, from the float network). A unit whose
learned rounding does not lower its error on the calibration data keeps
nearest rounding (and its activation steps), and the log says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tinyptq._tf import tf
from tinyptq.executor import WEIGHT, Executor, Quantizer
from tinyptq.graph.base import ModelGraph
from tinyptq.pipeline import PTQState
from tinyptq.sim import QuantSim

if TYPE_CHECKING:
    from tinyptq.pipeline import Stage

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
SOFT, HARD, NEAREST, FLOAT = 0, 1, 2, 3  # how a SoftRounding rounds (FLOAT: not at all)
EVAL_BATCH = 256
# fewer iterations run eagerly: compiling a step (tracing the sub-graph with its
# gradient, ~1 s) costs more than a few dozen eager steps
COMPILE_FROM = 100


# ----------------------------------------------------------- soft rounding
def rectified_sigmoid(v: Any) -> Any:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(h: Any, beta: Any) -> Any:
    """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1."""
    return tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))


def annealed_beta(step: int, iterations: int, warmup: float, start: float, end: float) -> tuple[float, bool]:
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


# ------------------------------------------------------------------ units
@dataclass(frozen=True)
class Unit:
    """What is reconstructed at once: layers, fed nodes, the compared node, quantizers in between."""

    name: str
    layers: tuple[str, ...]
    inputs: tuple[str, ...]  # fed with their raw values (their quantizers apply inside)
    output: str  # compared raw (before its own quantizer) with the float model
    points: tuple[str, ...]  # activation quantizers applied inside (QDrop, learned steps)


def _inner_points(graph: ModelGraph, inputs: Sequence[str], output: str) -> tuple[str, ...]:
    """The activation points from ``inputs`` (included) up to ``output`` (excluded)."""
    points = {p.name for p in graph.act_points()}
    seen: set[str] = set()
    stack = [output]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in inputs:
            stack.extend(graph.inputs_of(name))
    order = graph.node_names()
    return tuple(n for n in order if n in seen and n in points and n != output)


def layer_units(graph: ModelGraph) -> list[Unit]:
    """One unit per quantizable layer, in network order: its input point to its output point."""
    units = []
    position = {n: i for i, n in enumerate(graph.node_names())}
    for ql in sorted(graph.quant_layers(), key=lambda q: position[q.name]):
        inputs = (ql.input_point or graph.inputs_of(ql.name)[0],)
        output = ql.output_point or ql.name
        units.append(Unit(ql.name, (ql.name,), inputs, output, _inner_points(graph, inputs, output)))
    return units


def block_units(graph: ModelGraph) -> list[Unit]:
    """One unit per reconstruction block (``graph.blocks()``: residual, separable, single layers)."""
    units = []
    for b in graph.blocks():
        inputs = b.input_points or (graph.inputs_of(b.layers[0])[0],)
        units.append(Unit(b.name, b.layers, inputs, b.output_point, _inner_points(graph, inputs, b.output_point)))
    return units


# --------------------------------------------------------------- settings
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
    act_learning_rate: float | None = None  # relative step of learned activation scales; None: fixed


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


class _Adam:
    """Adam over a fixed list of variables, each with its own learning rate (compiled with the step)."""

    def __init__(self, variables: list[Any], rates: list[float], b1: float = 0.9, b2: float = 0.999) -> None:
        self.variables, self.rates, self.b1, self.b2 = variables, rates, b1, b2
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        self.s = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
        self.t = tf.Variable(0.0, trainable=False)

    def apply(self, grads: list[Any], train: Any) -> None:
        """One update when ``train`` is 1.0; none (state untouched) when it is 0.0 (no branch: no retrace)."""
        t = self.t.assign_add(train)
        c1, c2 = 1.0 - tf.pow(self.b1, tf.maximum(t, 1.0)), 1.0 - tf.pow(self.b2, tf.maximum(t, 1.0))
        for var, g, m, s, rate in zip(self.variables, grads, self.m, self.s, self.rates, strict=True):
            if g is None:
                continue
            m.assign(m + train * (1.0 - self.b1) * (g - m))
            s.assign(s + train * (1.0 - self.b2) * (tf.square(g) - s))
            var.assign_sub(train * rate * (m / c1) / (tf.sqrt(s / c2) + 1e-8))


# ---------------------------------------------------------- one unit
def logits_node(graph: ModelGraph) -> str:
    """The node holding the model's logits: its first output, or the input of a final softmax."""
    out = graph.output_names[0]
    return graph.inputs_of(out)[0] if graph.op_type(out) == "softmax" else out


def fisher_weights(ex: Executor, unit: Unit, y: np.ndarray) -> np.ndarray:
    """Squared gradients of the label-free task loss w.r.t. the unit's output (``ex`` in float mode).

    The loss is the cross-entropy of the float model's output with its own
    argmax as the label (a final softmax is taken back to its logits).
    """
    fn = ex.function([logits_node(ex.graph)], inputs=[unit.output]).python_function  # eager: used once
    parts = []
    for start in range(0, len(y), EVAL_BATCH):
        x = tf.constant(y[start : start + EVAL_BATCH])
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = fn(x)[0]
            logits = tf.reshape(logits, [tf.shape(logits)[0], -1])
            label = tf.stop_gradient(tf.argmax(logits, axis=-1))
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(label, logits))
        parts.append(tf.square(tape.gradient(loss, x)).numpy())
    return np.concatenate(parts)


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


@dataclass
class _Data:
    """One unit's fed inputs, float target and Fisher weights (or None), as TF constants."""

    xs: list[Any]
    y: Any
    weights: Any = None


def _collect(fn: Any, names: Sequence[str], wanted: Sequence[str], calib: np.ndarray) -> dict[str, np.ndarray]:
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
        self, ex: Executor, unit: Unit, roundings: dict[str, SoftRounding], scales: list[Any], data: _Data,
        settings: Settings,
    ) -> None:
        self.ex, self.unit, self.roundings, self.data, self.settings = ex, unit, roundings, data, settings
        self.scales = scales
        self.s0 = [float(v.numpy()) for v in scales]
        self.n = int(data.y.shape[0])
        self.batch = min(settings.batch_size, self.n)
        self.norm = tf.Variable(1.0, trainable=False)  # the loss of nearest rounding, once measured
        variables = [r.v for r in roundings.values()] + list(scales)
        rates = [settings.learning_rate] * len(roundings) + [(settings.act_learning_rate or 0.0) * v for v in self.s0]
        self.adam = _Adam(variables, rates)
        self.variables = variables
        # the sub-graph's ops inlined into the step: one trace, no nested function to differentiate
        self.forward = ex.function([unit.output], unit.inputs, raw=[unit.output]).python_function
        self.compiled = settings.iterations >= COMPILE_FROM
        if self.compiled:
            rows, steps = tf.TensorSpec([None, self.batch], tf.int32), tf.TensorSpec([None], tf.float32)
            signature = [rows, tf.TensorSpec([None, self.batch], tf.float32), steps, steps, tf.TensorSpec([], tf.float32)]
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
        _, plain, weighted = tf.while_loop(lambda t, *_: t < tf.shape(idx)[0], body, [tf.constant(0), zero, zero])
        return plain, weighted

    def _eager_loop(self, idx: Any, mask: Any, beta: Any, lam: Any, train: Any) -> tuple[float, float]:
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
        idx = (flat % self.n).reshape(rows, batch).astype(np.int32)  # always full batches: no retrace
        mask = (flat < self.n).reshape(rows, batch).astype(np.float32)
        zeros = tf.zeros([rows])
        plain, weighted = self.run(tf.constant(idx), tf.constant(mask), zeros, zeros, tf.constant(0.0))
        count = float(np.prod(self.data.y.shape))
        return float(plain) / count, float(weighted) / count

    def optimize(self, seed: int, progress: Callable[[int], None]) -> None:
        """Adam on the rounding variables (and steps) over random calibration batches, QDrop as set."""
        settings = self.settings
        rng = np.random.default_rng([seed, 0x5EED])
        idx = np.stack([rng.choice(self.n, self.batch, replace=False) for _ in range(settings.iterations)])
        schedule = [
            annealed_beta(t, settings.iterations, settings.warmup, settings.beta_start, settings.beta_end)
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
                self.run(tf.constant(idx[sl].astype(np.int32)), ones[:rows], tf.constant(beta[sl]), tf.constant(lam[sl]), one)
                progress(rows)
        finally:
            if settings.qdrop:
                self.ex.set_drop(0.0, points)


def reconstruct_unit(
    ex: Executor, unit: Unit, roundings: dict[str, SoftRounding], data: _Data, settings: Settings, seed: int,
    learn_points: Sequence[str] = (), progress: Callable[[int], None] | None = None,
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
        unit, mse_nearest, mse_nearest if kept else mse, time.perf_counter() - start, integers,
        learned, flipped / max(total, 1), kept, mse,
    )


# ------------------------------------------------------------ the stages' loop
def run_reconstruction(
    stage: Stage, state: PTQState, units: list[Unit], settings: Settings, learn_steps: bool = False
) -> PTQState:
    """Reconstruct ``units`` in order; the chosen roundings become ``state.fixed_weights``.

    Every layer's rounding transform is installed once, before the first unit
    (nearest rounding until its unit comes: installing one clears the
    executor's compiled functions). With ``learn_steps`` each activation
    point inside a unit (its inputs and interior points, each once: where
    first read) gets its step learned with the rounding; learned steps become
    the state's activation encodings.
    """
    from tqdm import tqdm

    state = state.evolve()
    ex = QuantSim(state).executor
    units = [u for u in units if any(ex.quantizer(name, WEIGHT).enabled for name in u.layers)]
    roundings = {}
    for name in (name for u in units for name in u.layers if ex.quantizer(name, WEIGHT).enabled):
        roundings[name] = SoftRounding(ex.kernels[name], ex.quantizer(name, WEIGHT))
        roundings[name].mode.assign(NEAREST)
        ex.set_weight_transform(name, roundings[name].transform)
    learned_points: set[str] = set()
    results: list[UnitResult] = []
    bar = tqdm(total=len(units) * settings.iterations, desc=stage.name, unit="it", file=sys.stderr, leave=False)
    try:
        for index, unit in enumerate(units):
            bar.set_postfix_str(unit.name)
            data = _unit_data(ex, unit, roundings, state.calib, settings)
            learn = []
            if learn_steps:
                learn = [p for p in unit.points if p in state.act_encodings and p not in learned_points]
                learned_points.update(learn)
            mine = {n: roundings[n] for n in unit.layers if n in roundings}
            results.append(reconstruct_unit(ex, unit, mine, data, settings, settings.seed + index, learn, bar.update))
    finally:
        bar.close()
    graph = state.graph
    for res in results:
        for name, q in res.integers.items():
            shape = graph.kernel(name).shape
            state.fixed_weights[name] = graph.kernel_layout(name).from_canonical(q, shape).astype(np.int32)
        for point, scale in res.scales.items():
            state.act_encodings[point] = dataclasses.replace(state.act_encodings[point], scale=np.float32(scale))
    stage.record(state, _lines(results), units=[_details(r) for r in results])
    return state


def _unit_data(
    ex: Executor, unit: Unit, roundings: dict[str, SoftRounding], calib: np.ndarray, settings: Settings
) -> _Data:
    """A unit's raw inputs (quantized network, or float on request), float target and Fisher weights.

    The network up to the unit runs eagerly, as the float model (``float_mode``)
    and as quantized so far: a few batches cost less than tracing (and
    optimizing) the network again for every unit.
    """
    every = [*unit.inputs, unit.output]
    forward = ex.function(every, raw=every).python_function
    with float_mode(ex, roundings):
        values = _collect(forward, every, every if settings.input_from == "float" else [unit.output], calib)
        weights = fisher_weights(ex, unit, values[unit.output]) if settings.loss == "fisher" else None
    if settings.input_from != "float":
        values.update(_collect(forward, every, unit.inputs, calib))
    return _Data(
        [tf.constant(values[n]) for n in unit.inputs],
        tf.constant(values[unit.output]),
        None if weights is None else tf.constant(weights),
    )


def _lines(results: list[UnitResult]) -> list[str]:
    """One summary line per unit, then the total."""
    lines = []
    for r in results:
        if r.kept_nearest:
            what = f"nearest rounding kept: the learned one gave {r.mse_learned:.4g}"
        else:
            what = f"{100 * r.flipped:.1f} % of weights rounded the other way"
        steps = f", {len(r.scales)} step{'s' if len(r.scales) > 1 else ''} learned" if r.scales else ""
        lines.append(f"{r.unit.name}: MSE {r.mse_nearest:.4g} -> {r.mse:.4g} ({what}{steps}), {r.seconds:.1f} s")
    lines.append(f"{len(results)} units reconstructed in {sum(r.seconds for r in results):.1f} s")
    return lines


def _details(r: UnitResult) -> dict[str, Any]:
    """Machine-readable record of one unit."""
    return {
        "unit": r.unit.name,
        "layers": list(r.integers),
        "mse_nearest": r.mse_nearest,
        "mse": r.mse,
        "flipped": r.flipped,
        "kept_nearest": r.kept_nearest,
        "mse_learned": r.mse_learned,
        "learned_steps": dict(r.scales),
        "seconds": r.seconds,
    }
