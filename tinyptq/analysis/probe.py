"""The analyzer's view of a quantized model: its units, and one simulation switched unit by unit.

A *unit* is what a user can keep at higher precision with one override: a
layer with a kernel (its weights and the activation points it owns, i.e. its
fused output) or an activation point no layer owns (the model input, an Add,
a pooling output). Every quantizer of the state belongs to exactly one unit.

:class:`Probe` holds one QuantSim of the final state and switches quantizers
on and off in place (no rebuild), scoring each setting on the evaluation set
(the use case's metric, and the output SQNR against FP32) or on calibration
samples (the output's noise-to-signal ratio, label-free).

Stages after range setting may rewrite biases for the quantized network (bias
correction). A layer whose kernel is switched back to float gets its float
bias back too (from ``float_graph``, the model as it was before any stage
quantized it), so "float" means float for that layer. A layer raised to
higher bits gets its float bias as well: the rewritten one mostly corrects
the layer's own error on the old grid, which the raise removes (measured: on a
layer whose 4-bit grid destroyed it, keeping the correction made the raise
look harmful). The applied fix runs the pipeline's own correction again.
"""


from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyptq.executor import ACTIVATION, WEIGHT
from tinyptq.pipeline import PTQState
from tinyptq.quant import Encoding
from tinyptq.sim import QuantSim


@dataclass(frozen=True)
class Unit:
    """A layer (kernel + owned points) or an ownerless activation point, in network order."""

    name: str
    kind: str  # "conv" | "depthwise" | "dense" | "point"
    layer: str | None  # the quantized kernel's layer (None: float kernel or a point unit)
    points: tuple[str, ...] = field(default=())  # quantized activation points of the unit

    @property
    def tensors(self) -> list[tuple[str, str]]:
        """(kind, name) of every quantizer of the unit."""
        return ([(WEIGHT, self.layer)] if self.layer else []) + [(ACTIVATION, p) for p in self.points]


def units(state: PTQState) -> list[Unit]:
    """Every unit of the state with at least one quantizer, in the graph's topological order."""
    graph = state.graph
    order = {n: i for i, n in enumerate(graph.node_names())}
    layers = {q.name: q for q in graph.quant_layers()}
    owned: dict[str, list[str]] = {}
    loose: list[str] = []
    for p in graph.act_points():
        if p.name not in state.act_encodings:
            continue
        if p.owner in layers:
            owned.setdefault(p.owner, []).append(p.name)
        else:
            loose.append(p.name)
    out = []
    for name, q in layers.items():
        layer = name if name in state.weight_encodings else None
        if layer or owned.get(name):
            out.append(Unit(name, q.kind, layer, tuple(owned.get(name, ()))))
    out += [Unit(p, "point", None, (p,)) for p in loose]
    # the input comes first even where the adapter does not list it as a node
    return sorted(out, key=lambda u: order.get(u.name, order.get(u.points[0], -1) if u.points else -1))


def nsr(reference: np.ndarray, test: np.ndarray) -> float:
    """Noise-to-signal ratio ``sum (test - ref)^2 / sum ref^2`` (0: identical)."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((np.asarray(test, np.float64) - ref) ** 2))
    return noise / max(float(np.sum(ref**2)), 1e-30)


def db(ratio: float) -> float | None:
    """A noise-to-signal ratio as SQNR in dB; None for no noise (infinite SQNR)."""
    return None if ratio <= 0 else round(-10.0 * math.log10(ratio), 3)


class Probe:
    """One simulation of the final state, with quantizers switched per setting and scored."""

    def __init__(
        self,
        state: PTQState,
        uc: Any,
        data: Any,
        fp32_scores: np.ndarray,
        calib: np.ndarray,
        float_graph: Any = None,
    ) -> None:
        self.state = state
        self.float_graph = float_graph if float_graph is not None else state.graph
        self.uc = uc
        self.data = data
        self.fp32_scores = fp32_scores
        self.calib = np.asarray(calib, np.float32)
        self.sim = QuantSim(state)
        self.units = units(state)
        self.calib_ref = self.float_graph.predict(self.calib)
        self._raised: dict[tuple[str, str], Encoding] = {}
        # layers whose bias a stage rewrote for the quantized network: (quantized bias, float bias)
        self._biases = {}
        for unit in self.units:
            if unit.layer:
                quantized, fp = state.graph.bias(unit.layer), self.float_graph.bias(unit.layer)
                if quantized is not None and fp is not None and not np.array_equal(quantized, fp):
                    self._biases[unit.layer] = (quantized, fp)

    # ------------------------------------------------------------ settings
    def reset(self) -> None:
        """The state's simulation again (after the sim was loaded with another state)."""
        self.sim.load(self.state)
        self._raised = {}
        self.all_but(())

    def all_tensors(self) -> list[tuple[str, str]]:
        """(kind, name) of every quantizer."""
        return [t for u in self.units for t in u.tensors]

    def only(self, tensors: Iterable[tuple[str, str]]) -> None:
        """Switch on exactly ``tensors``; every other quantizer off."""
        on = set(tensors)
        for kind, name in self.all_tensors():
            self.sim.quantizer(name, kind).enable((kind, name) in on)
        self._set_biases(on)

    def _set_biases(self, on: set[tuple[str, str]]) -> None:
        for layer, (quantized, fp) in self._biases.items():
            key = (WEIGHT, layer)
            self.sim.set_bias(layer, quantized if key in on and key not in self._raised else fp)

    def all_but(self, tensors: Iterable[tuple[str, str]]) -> None:
        """Switch every quantizer on except ``tensors``."""
        off = set(tensors)
        self.only(t for t in self.all_tensors() if t not in off)

    def raise_bits(self, raised: dict[tuple[str, str], Encoding]) -> None:
        """Quantize these tensors with these (higher-precision) encodings instead; {} restores the state's."""
        for kind, name in set(self._raised) - set(raised):
            self._restore(kind, name)
        for (kind, name), enc in raised.items():
            if kind == WEIGHT and name in self.state.fixed_weights:
                self.sim.set_kernel(name, self.state.graph.kernel(name))  # the stored rounding was for the old grid
            self.sim.set_encoding(name, enc, kind)
        self._raised = dict(raised)
        self._set_biases({t for t in self.all_tensors() if self.sim.quantizer(t[1], t[0]).enabled})

    def _restore(self, kind: str, name: str) -> None:
        if kind == WEIGHT:
            enc = self.state.weight_encodings[name]
            if name in self.state.fixed_weights:
                self.sim.set_kernel(name, enc.dequantize(np.rint(self.state.fixed_weights[name])))
            self.sim.set_encoding(name, enc, WEIGHT)
        else:
            self.sim.set_encoding(name, self.state.act_encodings[name], ACTIVATION)

    # ------------------------------------------------------------- scores
    def score(self) -> dict[str, float | None]:
        """The use case's metric and the output SQNR (dB) against FP32, on the evaluation set."""
        scores = self.sim.predict(self.data.x)
        metric = self.uc.metric(self.data, scores, self.fp32_scores)
        return {"metric": round(float(metric.value), 4), "sqnr_db": db(nsr(self.fp32_scores, scores))}

    def noise(self) -> float:
        """The output's noise-to-signal ratio against FP32 on the calibration samples (label-free)."""
        return nsr(self.calib_ref, self.sim.predict(self.calib))
