"""Per-layer quantization sensitivity, label-free: what each layer costs at each candidate bit-width.

For every quantizable layer and candidate weight bit-width, and for every
activation point and candidate activation bit-width, one number: the damage to
the model's output when only that tensor is quantized at those bits (every
other quantizer off). Measured through the changeable simulation (one
QuantSim, encodings swapped in place, no rebuilds) on the state as the earlier
stages left it, with unlabelled calibration samples only. Methods:

- ``sqnr`` (default): noise-to-signal ratio of the logits, ``sum (y_q - y)^2 /
  sum y^2`` (reported as output SQNR in dB). Noise powers of independent
  quantizers add, so the sum over layers is the integer program's objective.
- ``kl``: mean KL divergence of the quantized model's softmax from the float
  one's.
- ``myqasr``: statistics of the full-precision activations only, no quantized
  forward pass (after myQASR, Fish et al. 2023): a layer's weight error is the
  squared median magnitude of its input activations times its kernel's
  quantization error energy; an activation point's error is its own
  quantization noise power. Cheapest; the forward-pass methods are more exact.
- ``fisher``: a second-order estimate (HAWQ-style, with the label-free Fisher
  standing in for the Hessian): ``1/2 sum F_ii dW_i^2`` for kernels and
  ``1/2 E[sum g_i^2 dx_i^2]`` for activations, where the gradients are those
  of the cross-entropy with the float model's own prediction as the label.

Candidate encodings come from the state's granularity with MSE ranges (as
``range_setting`` sets them). The result is cached per (graph fingerprint —
which covers the stages before —, quant granularity, candidates, method,
calibration data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from tinyptq.config import LayerOverride
from tinyptq.executor import ACTIVATION, WEIGHT
from tinyptq.pipeline import MemoryCache, PTQState, StageCache
from tinyptq.quant import Encoding

METHODS = ("sqnr", "kl", "myqasr", "fisher")
_FISHER_SAMPLES = 64  # per-sample gradients for the kernels' Fisher diagonal


@dataclass
class Sensitivity:
    """Errors per (layer, weight bits) and per (point, activation bits); lower is better."""

    method: str
    weight: dict[str, dict[int, float]] = field(default_factory=dict)
    act: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (bit keys as strings)."""
        return {
            "method": self.method,
            "seconds": round(self.seconds, 2),
            "weight": {k: {str(b): v for b, v in d.items()} for k, d in self.weight.items()},
            "act": {k: {str(b): v for b, v in d.items()} for k, d in self.act.items()},
        }

    def sqnr_db(self, error: float) -> float:
        """An ``sqnr`` error as output SQNR in dB (inf for no error)."""
        return math.inf if error <= 0 else -10.0 * math.log10(error)

    def markdown(self) -> str:
        """One row per layer / point, one column per candidate bit-width."""
        lines = []
        for kind, table in (("weights", self.weight), ("activations", self.act)):
            bits = sorted({b for d in table.values() for b in d})
            if not bits:
                continue
            unit = "output SQNR (dB)" if self.method == "sqnr" else f"{self.method} error"
            lines += [f"{kind}: {unit}", "", f"| {kind[:-1]} | " + " | ".join(f"{b} bits" for b in bits) + " |"]
            lines.append("|---|" + "---|" * len(bits))
            for name, d in table.items():
                cells = [
                    "" if b not in d else (f"{self.sqnr_db(d[b]):.1f}" if self.method == "sqnr" else f"{d[b]:.3g}")
                    for b in bits
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)


def _without_bits(overrides: Sequence[LayerOverride]) -> tuple[LayerOverride, ...]:
    """The overrides with their bit-widths removed (what stays float, and the granularity)."""
    return tuple(dataclasses.replace(o, weight_bits=None, act_bits=None) for o in overrides)


def candidate_encodings(
    state: PTQState, weight_bits: Sequence[int], act_bits: Sequence[int], cache: StageCache
) -> tuple[dict[str, dict[int, Encoding]], dict[str, dict[int, Encoding]]]:
    """MSE-range encodings of every kernel and activation point at every candidate bit-width.

    The state's granularity (per-channel, symmetric, with its per-layer
    overrides) is kept; bit-widths of overrides and the first/last rule are not
    applied (every layer gets every candidate); layers or points the overrides
    leave in float get none. Every override is kept with its bits removed: each
    one sets ``quantize``, so a later one may switch back on what an earlier
    ``quantize: false`` left in float.
    """
    from tinyptq.components.range_setting import RangeSetting

    base = state.config.replace(keep_first_last_8bit=False, overrides=_without_bits(state.config.overrides))
    stage = RangeSetting(weights="mse", activations="mse")
    weights: dict[str, dict[int, Encoding]] = {}
    acts: dict[str, dict[int, Encoding]] = {}
    wb, ab = sorted(weight_bits), sorted(act_bits)
    for i in range(max(len(wb), len(ab))):
        w, a = wb[min(i, len(wb) - 1)], ab[min(i, len(ab) - 1)]
        probe = PTQState(state.graph, base.replace(weight_bits=w, act_bits=a), state.calib, seed=state.seed, cache=cache)
        probe = stage.apply(probe)
        for name, enc in probe.weight_encodings.items():
            weights.setdefault(name, {})[w] = enc
        for name, enc in probe.act_encodings.items():
            acts.setdefault(name, {})[a] = enc
    return weights, acts


def measure(
    state: PTQState,
    weight_bits: Sequence[int] = (2, 3, 4, 6, 8),
    act_bits: Sequence[int] = (4, 6, 8),
    method: str = "sqnr",
    samples: int = 256,
    progress: bool = True,
) -> Sensitivity:
    """The sensitivity of every layer and point of ``state`` at every candidate (cached, see module doc)."""
    import time

    cache = state.cache if state.cache is not None else MemoryCache()
    x = np.asarray(state.calib[:samples], np.float32)
    cfg = state.config
    key = (
        state.graph.fingerprint(),
        cfg.weight_per_channel, cfg.weight_symmetric, cfg.act_symmetric, cfg.weight_narrow_range,
        tuple(repr(o) for o in _without_bits(cfg.overrides)),
        tuple(sorted(weight_bits)), tuple(sorted(act_bits)), method, hashlib.sha256(x.tobytes()).hexdigest(),
    )

    def compute() -> Sensitivity:
        start = time.perf_counter()
        weights, acts = candidate_encodings(state, weight_bits, act_bits, cache)
        result = _MEASURES[method](state, x, weights, acts, progress)
        result.seconds = time.perf_counter() - start
        return result

    return cache.get_or_compute("sensitivity", key, compute)


# ------------------------------------------------------------- the methods
def _sim(state: PTQState, weights: dict, acts: dict):
    """A QuantSim of the state with every quantizer off and an encoding ready at every tensor."""
    from tinyptq.sim import QuantSim

    probe = state.evolve(
        weight_encodings={k: v[max(v)] for k, v in weights.items()},
        act_encodings={k: v[max(v)] for k, v in acts.items()},
        fixed_weights={},
    )
    sim = QuantSim(probe)
    for name in weights:
        sim.disable(name, WEIGHT)
    for name in acts:
        sim.disable(name, ACTIVATION)
    return sim


def _output_measure(kind: str) -> Callable[..., Sensitivity]:
    """``sqnr`` / ``kl``: switch one quantizer on at a time and compare the logits with float."""
    from tinyptq.rounding.fisher import logits_node

    def run(state: PTQState, x: np.ndarray, weights: dict, acts: dict, progress: bool) -> Sensitivity:
        sim = _sim(state, weights, acts)
        logits = logits_node(state.graph)
        ref = sim.run(x, outputs=[logits])[logits].reshape(len(x), -1).astype(np.float64)

        def error(y: np.ndarray) -> float:
            y = y.reshape(len(x), -1).astype(np.float64)
            if kind == "sqnr":
                return float(np.sum((y - ref) ** 2) / max(np.sum(ref**2), 1e-30))
            p, q = _softmax(ref), _softmax(y)
            return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))

        out = Sensitivity(kind)
        jobs = [(WEIGHT, n, b, e) for n, d in weights.items() for b, e in d.items()]
        jobs += [(ACTIVATION, n, b, e) for n, d in acts.items() for b, e in d.items()]
        for what, name, bits, enc in tqdm(jobs, desc=f"sensitivity ({kind})", disable=not progress, leave=False):
            sim.set_encoding(name, enc, what)
            sim.enable(name, what)
            value = error(sim.run(x, outputs=[logits])[logits])
            sim.disable(name, what)
            (out.weight if what == WEIGHT else out.act).setdefault(name, {})[bits] = value
        return out

    return run


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _myqasr(state: PTQState, x: np.ndarray, weights: dict, acts: dict, progress: bool) -> Sensitivity:
    """Float activations only: each layer's and point's own noise-to-signal ratio, no quantized pass.

    A kernel's error is ``||Q(W) - W||^2 E[x^2] / E[y^2]`` with ``x`` the layer's
    float input and ``y`` its float output (myQASR ranks layers by the median
    activation magnitude; on ReLU inputs the median is often 0, so the mean
    square is used); a point's error is its quantization noise power over its
    signal power.
    """
    graph = state.graph
    layers = {q.name: q for q in graph.quant_layers()}
    inputs = {n: q.input_point or graph.inputs_of(n)[0] for n, q in layers.items()}
    outputs = {n: q.output_point or n for n, q in layers.items()}
    wanted = sorted(set(inputs.values()) | set(outputs.values()) | set(acts))
    values = graph.run(x, wanted)
    power = {k: max(float(np.mean(np.square(v, dtype=np.float64))), 1e-30) for k, v in values.items()}
    out = Sensitivity("myqasr")
    for name, cands in weights.items():
        kernel = graph.kernel(name)
        axis = layers[name].channel_axis
        channels = kernel.shape[axis] if axis is not None else 1
        # an output value sums its weights times inputs: E[dy^2] = ||dW||^2 E[x^2] / channels
        gain = power[inputs[name]] / (channels * power[outputs[name]])
        out.weight[name] = {
            b: gain * float(np.sum((e.fake_quant(kernel) - kernel) ** 2, dtype=np.float64)) for b, e in cands.items()
        }
    for name, cands in acts.items():
        v = values[name]
        out.act[name] = {b: float(np.mean((e.fake_quant(v) - v) ** 2)) / power[name] for b, e in cands.items()}
    return out


def _fisher(state: PTQState, x: np.ndarray, weights: dict, acts: dict, progress: bool) -> Sensitivity:
    """1/2 sum F dW^2 (kernels, per-sample gradients) and 1/2 E[sum g^2 dx^2] (activation points)."""
    from tinyptq._tf import tf
    from tinyptq.rounding.fisher import logits_node

    sim = _sim(state, weights, acts)
    ex = sim.executor
    logits = logits_node(state.graph)

    def ce(z: Any) -> Any:
        z = tf.reshape(z, [tf.shape(z)[0], -1])
        label = tf.stop_gradient(tf.argmax(z, axis=-1))
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(label, z))

    out = Sensitivity("fisher")
    fn = ex.function([logits])
    names = list(weights)
    variables = [ex.kernels[n] for n in names]
    fisher = [np.zeros(v.shape, np.float64) for v in variables]
    n = min(len(x), _FISHER_SAMPLES)
    for i in tqdm(range(n), desc="sensitivity (fisher, kernels)", disable=not progress, leave=False):
        with tf.GradientTape() as tape:
            loss = ce(fn(tf.constant(x[i : i + 1]))[0])
        for f, g in zip(fisher, tape.gradient(loss, variables), strict=True):
            f += np.square(g.numpy()) / n
    for name, f, var in zip(names, fisher, variables, strict=True):
        kernel = var.numpy()
        canon = weights[name]
        layout = state.graph.kernel_layout(name)
        out.weight[name] = {}
        for b, e in canon.items():
            dq = layout.to_canonical(e.fake_quant(state.graph.kernel(name)).astype(np.float32)) - kernel
            out.weight[name][b] = 0.5 * float(np.sum(f * dq**2))
    for name, cands in tqdm(acts.items(), desc="sensitivity (fisher, activations)", disable=not progress, leave=False):
        value = ex.run(x, [name], raw=[name])[name]
        if name == ex.input_name:
            f_in = ex.function([logits], inputs=[name]).python_function
            feeds = lambda v: [v]  # noqa: E731
        else:
            f_in = ex.function([logits], inputs=[ex.input_name, name]).python_function
            feeds = lambda v, s: [tf.constant(x[s]), v]  # noqa: E731
        grads = []
        for start in range(0, len(x), 128):
            v = tf.constant(value[start : start + 128])
            with tf.GradientTape() as tape:
                tape.watch(v)
                args = feeds(v) if name == ex.input_name else feeds(v, slice(start, start + 128))
                loss = ce(f_in(*args)[0])
            grad = tape.gradient(loss, v)  # None: the logits do not read this point
            grads.append(np.zeros(v.shape, np.float32) if grad is None else np.square(grad.numpy()))
        g2 = np.concatenate(grads)
        out.act[name] = {b: 0.5 * float(np.mean(np.sum((g2 * (e.fake_quant(value) - value) ** 2).reshape(len(x), -1), 1))) for b, e in cands.items()}
    return out


_MEASURES: dict[str, Callable[..., Sensitivity]] = {
    "sqnr": _output_measure("sqnr"),
    "kl": _output_measure("kl"),
    "myqasr": _myqasr,
    "fisher": _fisher,
}
