"""cle: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

For two layers ``layer1 -> [ReLU] -> layer2`` where layer1's output is read by
layer2 only, scaling layer1's output channel i by ``1 / s_i`` and layer2's input
channel i by ``s_i`` leaves the float function unchanged (ReLU is positive
homogeneous; Dropout, max pooling and zero padding in between commute with it).
With ``r1_i`` the weight range of layer1's output channel i and ``r2_i`` that of
layer2's input channel i, ``s_i = sqrt(r1_i / r2_i)`` makes both ``sqrt(r1_i r2_i)``:
the choice that maximizes the per-tensor quantization precision of the pair.
Chains (conv -> depthwise -> pointwise) share layers between pairs, so the pairs
are swept repeatedly until every scale is within ``tolerance`` of 1.

Dead channels (a BN that never saw its channel fire folds into ~1e-30 weights)
are left unscaled: Nagel's s would multiply their constant ReLU'd bias by up to
1e15 and wreck the per-tensor activation grid. Where such a channel always
outputs 0 (ReLU, bias <= 0), layer2's weights reading it are set to 0 (exact):
BN folding over a zero-variance input leaves them huge, setting the grid.

Pairs with a ReLU6 between them are skipped (clipping at 6 does not commute
with scaling), as are pairs whose layer1 still has a batch norm: put
``bn_folding`` first. Like bn_folding, CLE must run before range_setting.

Optional high-bias absorption moves ``c = max(0, beta - 3|gamma|)`` (from the
folded BN's statistics in ``state.bn_stats``) from layer1's bias into layer2's:
exact as long as the pre-activation stays above c, except at zero-padded
borders of layer2. ``state.bn_stats`` is updated to the rescaled layers, so
that it keeps describing each layer's output distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyptq.graph.base import KernelLayout, ModelGraph, QuantLayer
from tinyptq.kernels import (
    canonical_kernel,
    constant_input_response,
    input_channels,
    input_ranges,
    output_channels,
    output_ranges,
    scale_input_channels,
    scale_output_channels,
)
from tinyptq.params import Boolean, Integer, Real
from tinyptq.pipeline import PTQState, Stage, register, require_no_encodings

# A channel whose weight range is below this fraction of its layer's largest is
# treated as dead: BN folding of a channel that never fired leaves ~1e-30 weights.
DEAD_RANGE = 1e-12


@dataclass(frozen=True)
class CLEPair:
    """Two layers whose channels can be rescaled against each other."""

    first: QuantLayer
    second: QuantLayer

    @property
    def label(self) -> str:
        """'first -> second' for log lines."""
        return f"{self.first.name} -> {self.second.name}"


# ------------------------------------------------------------------- pairs
def _sole_reader(graph: ModelGraph, start: str, layer_names: set[str], points: set[str]) -> str | None:
    """The quantizable layer that alone reads ``start`` through shape-only nodes, if any."""
    outputs, cur = set(graph.output_names), start
    while cur not in outputs:
        readers = graph.consumers(cur)
        if len(readers) != 1:
            return None
        cur = readers[0]
        if cur in layer_names:
            return cur
        if cur in points or graph.op_type(cur) == "transpose":
            return None  # a requantized node (Add, pooling, ...) or moved channels in between
    return None


def cle_pairs(graph: ModelGraph) -> list[CLEPair]:
    """Every (layer1, layer2) where layer1's fused output feeds only layer2, channel for channel.

    Between them may sit layer1's BN and ReLU / ReLU6 and shape-only nodes; the
    caller decides which activations and unfolded BNs it can handle.
    """
    layers = {q.name: q for q in graph.quant_layers()}
    points = {p.name: p for p in graph.act_points()}
    pairs = []
    for first in layers.values():
        end = first.output_point
        if end is None or points[end].is_output:
            continue
        second = _sole_reader(graph, end, set(layers), set(points))
        if second is None:
            continue
        n_out = output_channels(canonical_kernel(graph, first.name))
        if n_out == input_channels(canonical_kernel(graph, second), graph.kernel_layout(second).groups):
            pairs.append(CLEPair(first, layers[second]))
    return pairs


# -------------------------------------------------------------- equalizing
@dataclass
class _Weights:
    """float64 working copies of the kernels (canonical layout) and biases CLE rewrites."""

    kernels: dict[str, np.ndarray]
    biases: dict[str, np.ndarray | None]
    groups: dict[str, int]
    layouts: dict[str, tuple[KernelLayout, tuple[int, ...]]]  # layout and graph shape, to write back

    @classmethod
    def read(cls, graph: ModelGraph, pairs: list[CLEPair]) -> _Weights:
        """Copies of every layer in ``pairs``."""
        names = {q.name for p in pairs for q in (p.first, p.second)}
        biases = {n: graph.bias(n) for n in names}
        layouts = {n: (graph.kernel_layout(n), graph.kernel(n).shape) for n in names}
        return cls(
            {n: canonical_kernel(graph, n) for n in names},
            {n: None if b is None else b.astype(np.float64) for n, b in biases.items()},
            {n: lay.groups for n, (lay, _) in layouts.items()},
            layouts,
        )

    def write(self, graph: ModelGraph) -> None:
        """Store the rewritten kernels and biases in the graph."""
        for name, kernel in self.kernels.items():
            layout, shape = self.layouts[name]
            graph.set_kernel(name, layout.from_canonical(kernel, shape).astype(np.float32))
            if self.biases[name] is not None:
                graph.set_bias(name, self.biases[name].astype(np.float32))


def dead_channels(kernel: np.ndarray) -> np.ndarray:
    """Output channels whose weights are numerically zero next to the layer's largest channel."""
    r = output_ranges(kernel)
    return r <= DEAD_RANGE * r.max()


def zero_dead_inputs(w: _Weights, pair: CLEPair) -> int:
    """Zero layer2's weights on inputs that are always 0 (dead weights, bias <= 0, ReLU); how many."""
    a, b = pair.first, pair.second
    if a.activation != "relu":
        return 0
    bias = w.biases[a.name]
    zero = dead_channels(w.kernels[a.name]) & ((bias <= 0) if bias is not None else True)
    w.kernels[b.name] = scale_input_channels(w.kernels[b.name], w.groups[b.name], np.where(zero, 0.0, 1.0))
    return int(zero.sum())


def equalize_pair(w: _Weights, pair: CLEPair) -> np.ndarray:
    """Rescale one pair so that its channel ranges meet; the scales s (layer1 divided by s)."""
    a, b = pair.first, pair.second
    r1 = output_ranges(w.kernels[a.name])
    r2 = input_ranges(w.kernels[b.name], w.groups[b.name])
    # a dead layer1 channel outputs its (ReLU'd) bias: growing it would only inflate that constant
    ok = ~dead_channels(w.kernels[a.name]) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    w.kernels[a.name] = scale_output_channels(w.kernels[a.name], 1.0 / s)
    if w.biases[a.name] is not None:
        w.biases[a.name] = w.biases[a.name] / s
    w.kernels[b.name] = scale_input_channels(w.kernels[b.name], w.groups[b.name], s)
    return s


def equalize(
    w: _Weights, pairs: list[CLEPair], tolerance: float, max_iterations: int
) -> tuple[list[np.ndarray], int, float]:
    """Sweep the pairs until max |log s| < tolerance: cumulative scales, sweeps, last max |log s|."""
    total = [np.ones(output_channels(w.kernels[p.first.name])) for p in pairs]
    worst, sweeps = np.inf, 0
    while worst >= tolerance and sweeps < max_iterations:
        sweeps, worst = sweeps + 1, 0.0
        for i, pair in enumerate(pairs):
            s = equalize_pair(w, pair)
            total[i] *= s
            worst = max(worst, float(np.max(np.abs(np.log(s)), initial=0.0)))
    return total, sweeps, worst


def absorb_high_bias(w: _Weights, pair: CLEPair, stats: dict[str, Any]) -> np.ndarray:
    """Move c = max(0, beta - 3|gamma|) from layer1's bias into layer2's; returns c."""
    a, b = pair.first, pair.second
    beta, gamma = np.asarray(stats["beta"], np.float64), np.asarray(stats["gamma"], np.float64)
    c = np.maximum(0.0, beta - 3.0 * np.abs(gamma))
    if w.biases[a.name] is None or not np.any(c > 0):
        return np.zeros_like(c)
    w.biases[a.name] = w.biases[a.name] - c
    shift = constant_input_response(w.kernels[b.name], w.groups[b.name], c)
    base = w.biases[b.name]
    w.biases[b.name] = shift if base is None else base + shift
    return c


def rescaled_stats(stats: dict[str, Any], scale: np.ndarray, absorbed: np.ndarray) -> dict[str, Any]:
    """BN statistics of a layer whose output was divided by ``scale`` and shifted by ``-absorbed``."""
    new = dict(stats)
    new["gamma"] = (np.asarray(stats["gamma"], np.float64) / scale).astype(np.float32)
    new["beta"] = (np.asarray(stats["beta"], np.float64) / scale - absorbed).astype(np.float32)
    return new


def precision(w: _Weights, pairs: list[CLEPair]) -> float:
    """Mean over the pairs' layers of mean(r_c) / max(r_c) over live channels: 1 is ideal."""
    names = {q.name for p in pairs for q in (p.first, p.second)}
    values = []
    for name in sorted(names):
        r = output_ranges(w.kernels[name])
        r = r[r > DEAD_RANGE * r.max()]  # dead channels cost no precision
        values.append(float(r.mean() / r.max()) if r.size and r.max() > 0 else 1.0)
    return float(np.mean(values)) if values else 1.0


# ------------------------------------------------------------------- stage
@register
class CrossLayerEqualization(Stage):
    """Rescale consecutive layers' channels so that per-tensor weight grids fit all channels."""

    name = "cle"
    # with batch norms still in the model CLE could equalize only the pairs
    # without one; on a model without any, bn_folding is not needed (batch_norms_only)
    requires = ("bn_folding",)
    precedes = ("range_setting",)
    uses_quant_config = False

    parameter_constraints = {
        "tolerance": Real(0.0, None, lo_open=True),
        "max_iterations": Integer(1, None),
        "high_bias_absorption": Boolean(),
    }

    def __init__(
        self, tolerance: float = 1e-4, max_iterations: int = 1000, high_bias_absorption: bool = False
    ) -> None:
        # validated against parameter_constraints before this body runs
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self.high_bias_absorption = high_bias_absorption

    def split(self, pairs: list[CLEPair]) -> tuple[list[CLEPair], list[str]]:
        """The pairs CLE can equalize, and a reason line for each one it cannot."""
        usable, skipped = [], []
        for p in pairs:
            if p.first.bn is not None:
                why = f"'{p.first.name}' still has batch norm '{p.first.bn}' (put bn_folding before cle)"
                skipped.append(f"skipped {p.label}: {why}")
            elif p.first.activation == "relu6":
                skipped.append(f"skipped {p.label}: ReLU6 between them is not scale-invariant")
            else:
                usable.append(p)
        return usable, skipped

    def apply(self, state: PTQState) -> PTQState:
        """A new state with equalized weights (the input state is untouched)."""
        require_no_encodings(state, self.name)
        state = state.evolve(copy_graph=True)
        pairs, lines = self.split(cle_pairs(state.graph))
        if not pairs:
            self.record(state, ["no layer pairs to equalize", *lines], pairs=[])
            return state
        w = _Weights.read(state.graph, pairs)
        before = precision(w, pairs)
        zeroed = sum(zero_dead_inputs(w, p) for p in pairs)  # in order: a zeroed channel may die next
        scales, sweeps, worst = equalize(w, pairs, self.tolerance, self.max_iterations)
        status = "converged" if worst < self.tolerance else f"not converged (max |log s| {worst:.2g})"
        head = [
            f"equalized {len(pairs)} pairs in {sweeps} sweeps, {status}",
            f"per-tensor weight precision mean(r)/max(r): {before:.3f} -> {precision(w, pairs):.3f}",
        ]
        if zeroed:
            head.append(f"zeroed the weights of {zeroed} input channels that are always 0 (dead ReLU channels)")
        head += self._update_stats(state, w, pairs, scales)
        w.write(state.graph)
        self.record(state, head + lines, pairs=[p.label for p in pairs], sweeps=sweeps)
        return state

    def _update_stats(
        self, state: PTQState, w: _Weights, pairs: list[CLEPair], scales: list[np.ndarray]
    ) -> list[str]:
        """Rescale bn_stats (and absorb high biases when asked); the log lines of absorption."""
        absorbed = 0
        for pair, scale in zip(pairs, scales, strict=True):
            stats = state.bn_stats.get(pair.first.name)
            if stats is None:
                continue
            c = np.zeros_like(scale)
            new = rescaled_stats(stats, scale, c)
            if self.high_bias_absorption and pair.first.activation == "relu":
                c = absorb_high_bias(w, pair, new)
                absorbed += int(np.any(c > 0))
                new = rescaled_stats(stats, scale, c)
            state.bn_stats[pair.first.name] = new
        if not self.high_bias_absorption:
            return []
        return [f"high-bias absorption: bias moved forward in {absorbed} ReLU pairs"]
