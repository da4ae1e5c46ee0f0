"""bias_correction: remove the mean output error that weight quantization adds to each layer.

Rounding the kernel W to W_q shifts the expected output of every channel by
E[y_q - y]; subtracting that shift from the (float) bias removes it.

- ``empirical``: the shift is measured on the calibration data, layer by layer
  in topological order, so that each correction sees the already-corrected
  upstream network (quantized weights and activations) against the float one.
- ``analytical`` (data-free, Nagel et al. 2019, "Data-Free Quantization"):
  the shift is (W_q - W) E[x], with E[x] derived from the batch-norm statistics
  of the layer feeding the input: its pre-activation output is taken as
  N(beta, gamma^2) and passed through its ReLU / ReLU6 in closed form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import norm

from tinyptq.errors import ConfigError
from tinyptq.graph.base import KernelLayout, ModelGraph, QuantLayer
from tinyptq.kernels import constant_input_response, input_channels
from tinyptq.params import BATCH_SIZE, Options
from tinyptq.pipeline import PTQState, Stage, register
from tinyptq.sim import QuantSim

METHODS = ("empirical", "analytical")

# Operations (ModelGraph.op_type) between a batch norm's activation and the
# next layer that keep the per-channel mean (zero padding only at the borders,
# ignored as for 'same' padding; Flatten / Reshape keep the channel order).
_MEAN_PRESERVING = {"dropout", "flatten", "reshape", "avg_pool", "global_avg_pool", "pad"}
_ACTIVATIONS = {"relu", "relu6", "identity"}
_LAYERS = {"conv", "depthwise", "dense"}


# ------------------------------------------------------------ closed forms
def relu_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[max(0, z)] for z ~ N(mu, sigma^2), elementwise."""
    mu = np.asarray(mu, np.float64)
    sigma = np.maximum(np.abs(np.asarray(sigma, np.float64)), 1e-12)
    a = mu / sigma
    return sigma * norm.pdf(a) + mu * norm.cdf(a)


def activation_mean(mu: np.ndarray, sigma: np.ndarray, activation: str | None) -> np.ndarray:
    """E[act(z)] for z ~ N(mu, sigma^2) and act in {None, 'relu', 'relu6'}."""
    if activation is None:
        return np.asarray(mu, np.float64)
    mean = relu_mean(mu, sigma)
    if activation == "relu6":
        # clip(z, 0, 6) = max(z, 0) - max(z - 6, 0)
        mean = mean - relu_mean(np.asarray(mu) - 6.0, sigma)
    return mean


def weight_error_shift(layout: KernelLayout, delta_w: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """(W_q - W) E[x] per output channel (spatial taps all see the same E[x_c])."""
    return constant_input_response(layout.to_canonical(delta_w), layout.groups, mean_x)


def channel_means(y: np.ndarray, axis: int = -1) -> tuple[np.ndarray, int]:
    """Sum over all but the channel axis, and the number of values summed per channel."""
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1)
    flat = y.reshape(-1, y.shape[-1])
    return flat.sum(axis=0), flat.shape[0]


# -------------------------------------------------------- analytical E[x]
def _bn_source(graph: ModelGraph, state: PTQState, src: str) -> tuple[dict | None, str | None, str, str]:
    """Walk back from a layer input to its batch norm: (stats, activation, reason when none, node)."""
    act, seen_act = None, False
    while True:
        op = graph.op_type(src)
        if op in _MEAN_PRESERVING and not seen_act:
            src = graph.inputs_of(src)[0]
        elif op in _ACTIVATIONS and not seen_act:
            act, seen_act, src = (None if op == "identity" else op), True, graph.inputs_of(src)[0]
        elif op == "batch_norm":
            return graph.bn_params(src), act, "", src
        elif op == "input":
            return None, None, "reads the model input (no BN statistics)", src
        elif op in _LAYERS:
            stats = state.bn_stats.get(src)
            reason = f"input from '{src}' has no BN statistics"
            return (stats, act, "", src) if stats is not None else (None, None, reason, src)
        else:
            return None, None, f"input from {op} '{src}' (no BN statistics)", src


def analytical_input_mean(graph: ModelGraph, state: PTQState, layer: QuantLayer) -> tuple[np.ndarray | None, str]:
    """E[x] per input channel of ``layer`` from upstream BN statistics, or None and why not."""
    stats, act, reason, end = _bn_source(graph, state, graph.inputs_of(layer.name)[0])
    if stats is None:
        return None, reason
    mean = activation_mean(np.asarray(stats["beta"]), np.asarray(stats["gamma"]), act)
    layout = graph.kernel_layout(layer.name)
    need = input_channels(layout.to_canonical(graph.kernel(layer.name)), layout.groups)
    if need % mean.size:
        return None, f"{need} input channels do not fit {mean.size} BN channels"
    # a flattened tensor: channels vary fastest when they are last, slowest when first
    if graph.tensor_channel_axis(end) == -1:
        return np.tile(mean, need // mean.size), ""
    return np.repeat(mean, need // mean.size), ""


# --------------------------------------------------------- empirical E[y_q]
def quantized_means(sim: QuantSim, name: str, calib: np.ndarray, batch_size: int) -> np.ndarray:
    """E[y_q] per output channel of layer ``name`` in the quantized network, before its own output quantizer.

    The error to correct is that of the weights and of the upstream network,
    not the rounding of y itself, so the layer's raw output is read.
    """
    total, count = 0.0, 0
    axis = sim.state.graph.tensor_channel_axis(name)
    for start in range(0, len(calib), batch_size):
        y = sim.run(calib[start : start + batch_size], batch_size, outputs=[name], raw=[name])[name]
        s, n = channel_means(y, axis)
        total, count = total + s, count + n
    return total / count


# ------------------------------------------------------------------ stage
@register
class BiasCorrection(Stage):
    """Subtract the expected per-channel output error of quantized weights from the biases."""

    name = "bias_correction"
    requires = ("range_setting",)

    parameter_constraints = {"method": Options(*METHODS), "batch_size": BATCH_SIZE}

    def __init__(self, method: str = "empirical", batch_size: int = 128) -> None:
        # validated against parameter_constraints before this body runs
        self.method = method
        self.batch_size = batch_size

    def apply(self, state: PTQState) -> PTQState:
        """A new state whose quantized layers have corrected biases (kernels and encodings unchanged)."""
        if not state.weight_encodings:
            raise ConfigError("bias_correction needs weight encodings: put range_setting before it in the pipeline")
        state = state.evolve(copy_graph=True)
        layers = state.graph.quant_layers()
        skipped = {ql.name: "weights not quantized" for ql in layers if ql.name not in state.weight_encodings}
        todo = [ql for ql in layers if ql.name in state.weight_encodings]
        if self.method == "empirical":
            shifts = self._empirical(state, todo)
        else:
            shifts = self._analytical(state, todo, skipped)
        self.record(state, self._lines(shifts, skipped), **_details(shifts, skipped))
        return state

    # --------------------------------------------------------------- methods
    def _empirical(self, state: PTQState, layers: list[QuantLayer]) -> dict[str, np.ndarray]:
        """Measure and remove E[y_q - y] layer by layer, each after correcting the layers before it."""
        graph, names = state.graph, [ql.name for ql in layers]
        float_means = self._float_means(state, names)  # the graph is still uncorrected here
        for name in names:  # zero biases first (no change in function), so the sim has them all
            if graph.bias(name) is None:
                graph.set_bias(name, np.zeros(float_means[name].shape, np.float32))
        sim = QuantSim(state)  # one simulation; each corrected bias goes straight into it
        shifts = {}
        for name in names:
            shifts[name] = quantized_means(sim, name, state.calib, self.batch_size) - float_means[name]
            _shift_bias(graph, name, shifts[name])
            sim.set_bias(name, graph.bias(name))  # now, so that downstream layers see it
        return shifts

    def _float_means(self, state: PTQState, names: list[str]) -> dict[str, np.ndarray]:
        """Per-channel means of the float outputs of ``names`` over the calibration data."""
        sums: dict[str, np.ndarray] = {}
        count: dict[str, int] = {}
        axes = {name: state.graph.tensor_channel_axis(name) for name in names}
        for batch in state.graph.iterate(state.calib, names, self.batch_size):
            for name in names:
                s, n = channel_means(batch[name], axes[name])
                sums[name] = sums.get(name, 0) + s
                count[name] = count.get(name, 0) + n
        return {name: sums[name] / count[name] for name in names}

    def _analytical(self, state: PTQState, layers: list[QuantLayer], skipped: dict[str, str]) -> dict[str, np.ndarray]:
        """Remove (W_q - W) E[x] from each layer whose input mean follows from BN statistics."""
        graph = state.graph
        kernels = state.quantized_kernels()
        shifts = {}
        for ql in layers:
            mean_x, reason = analytical_input_mean(graph, state, ql)
            if mean_x is None:
                skipped[ql.name] = reason
                continue
            delta = kernels[ql.name].astype(np.float64) - graph.kernel(ql.name)
            shifts[ql.name] = weight_error_shift(graph.kernel_layout(ql.name), delta, mean_x)
        for name, shift in shifts.items():  # biases do not enter E[x], so order does not matter
            _shift_bias(graph, name, shift)
        return shifts

    # ------------------------------------------------------------------ log
    def _lines(self, shifts: dict[str, np.ndarray], skipped: dict[str, str]) -> list[str]:
        """Summary lines: method, corrected layers, skipped layers and why, mean |correction|."""
        mean_abs = float(np.mean(np.concatenate([np.abs(s) for s in shifts.values()]))) if shifts else 0.0
        lines = [
            f"method {self.method}: {len(shifts)} layer{'' if len(shifts) == 1 else 's'} corrected"
            + (f" ({', '.join(shifts)})" if shifts else ""),
            f"mean |correction| {mean_abs:.4g}",
        ]
        lines += [f"skipped {name}: {why}" for name, why in skipped.items()]
        return lines


def _shift_bias(graph: ModelGraph, name: str, shift: np.ndarray) -> None:
    """bias -= shift (a zero bias is created for layers without one)."""
    bias = graph.bias(name)
    if bias is None:
        bias = np.zeros(shift.shape, np.float64)
    graph.set_bias(name, (bias - shift).astype(np.float32))


def _details(shifts: dict[str, np.ndarray], skipped: dict[str, str]) -> dict[str, Any]:
    """Machine-readable record: the correction per layer and the skipped layers."""
    return {
        "corrections": {name: s.astype(np.float32).tolist() for name, s in shifts.items()},
        "skipped": dict(skipped),
    }
