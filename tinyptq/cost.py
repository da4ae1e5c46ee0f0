"""The cost of a quantized model: parameters, weight memory, MACs, BOPs, activation memory, memory I/O.

A CostModel reads a ModelGraph once (framework-neutral queries only: Keras and
ONNX graphs alike) and then evaluates bit assignments quickly, for reports and
for mixed-precision search; its per-layer and per-point figures (``layers``,
``points``, ``steps``) are the coefficients of an integer program. Bits None
mean float (32 bits). Every figure is for one input sample and counts the
graph as it is (batch norms not folded yet are parameters of their own).

Definitions (the contract):

- params: kernel and bias values of the quantizable layers plus every other
  parameter of the graph (``graph.param_count()`` in total).
- weight memory (bytes): per quantized layer, its integers (kernel values and
  one zero point per scale) packed at the kernel's bit width, rounded up to
  whole bytes per layer, plus the bias at 32 bits and one float32 scale per
  output channel (per-channel) or one (per-tensor). A float layer: kernel and
  bias at 32 bits, no scales. Every other parameter (e.g. an unfolded batch
  norm) at 32 bits. A layer whose kernel has no single output-channel axis
  (a Keras depthwise conv with a depth multiplier) falls back to per-tensor,
  as range_setting does.
- MACs: ``graph.layer_macs()`` (quantizable layers only).
- BOPs: per layer, MACs x weight bits x bits of its input activation point
  (32 for float, or when the layer has no input point).
- deployed tensors: the activation points (``graph.act_points()``) are the
  tensors a deployed integer model keeps. A point's inputs are the nearest
  points upstream (fused and pass-through nodes between are looked through);
  its readers are the points that have it as an input. A point holds ``size``
  elements per sample (its shape without the batch dimension) and takes
  ``ceil(size x bits / 8)`` bytes.
- peak activation memory: the points are computed one after the other in the
  graph's topological order (not the order that would minimize the peak). At
  the step that produces a point, live are: that point, its inputs, and every
  earlier point a later step still reads; graph outputs stay live to the end,
  the model input from the start. The peak is the largest sum of live bytes
  over the steps; ``peak_step`` names the point produced at (the first) such step.
- activation bytes: the sum of the bytes of every point.
- memory I/O per inference: the weight memory read once, plus every point
  written once and read once per reader (bytes x (1 + readers)); the model
  input is written once (by the host), reading the outputs is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError, ModelError
from tinyptq.graph.base import ModelGraph
from tinyptq.quant import MAX_BITS, MIN_BITS

if TYPE_CHECKING:
    from tinyptq.pipeline import PTQState

FLOAT_BITS = 32
_SUMMARY_KEYS = ("params", "weight_bytes", "macs", "bops", "peak_activation_bytes", "memory_io_bytes")


@dataclass(frozen=True)
class LayerInfo:
    """What a quantizable layer costs, independent of bits."""

    kind: str  # "conv" | "depthwise" | "dense"
    kernel_size: int  # kernel values
    bias_size: int  # bias values (0 without a bias)
    channels: int  # scales of a per-channel encoding: output channels (1 without a channel axis)
    macs: int
    input_point: str | None
    output_point: str | None


@dataclass(frozen=True)
class PointInfo:
    """An activation point as a deployed tensor."""

    size: int  # elements per sample
    readers: int  # points that read it
    inputs: tuple[str, ...]  # the points it is computed from


@dataclass(frozen=True)
class LayerCost:
    """One layer's row of a ModelCost (bits None: float)."""

    name: str
    kind: str
    params: int
    weight_bits: int | None
    per_channel: bool  # as requested (False for a float layer)
    input_bits: int | None  # bits of the input point
    weight_bytes: int
    macs: int
    bops: int


@dataclass(frozen=True)
class ModelCost:
    """The cost of one bit assignment, per layer and in total (see the module docstring)."""

    layers: list[LayerCost]
    params: int
    weight_bytes: int
    macs: int
    bops: int
    peak_activation_bytes: int
    peak_step: str
    activation_bytes: int
    memory_io_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON, the per-layer rows included."""
        return asdict(self)

    def summary(self) -> dict[str, int]:
        """The totals only: params, weight_bytes, macs, bops, peak_activation_bytes, memory_io_bytes."""
        return {key: getattr(self, key) for key in _SUMMARY_KEYS}

    def markdown(self) -> str:
        """A per-layer table followed by the totals."""
        lines = [
            "| layer | kind | params | weight bits | input bits | weight bytes | MACs | BOPs |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            w_bits = _bits_text(r.weight_bits) + (" pc" if r.per_channel else "")
            lines.append(
                f"| {r.name} | {r.kind} | {r.params:,} | {w_bits} | {_bits_text(r.input_bits)} "
                f"| {r.weight_bytes:,} | {r.macs:,} | {r.bops:,} |"
            )
        other = self.weight_bytes - sum(r.weight_bytes for r in self.layers)
        lines += [
            "",
            f"- params: {self.params:,}",
            f"- weight memory: {self.weight_bytes:,} bytes ({other:,} of them other float parameters)",
            f"- MACs: {self.macs:,}; BOPs: {self.bops:,}",
            f"- peak activation memory: {self.peak_activation_bytes:,} bytes (computing '{self.peak_step}')",
            f"- activation tensors: {self.activation_bytes:,} bytes",
            f"- memory I/O per inference: {self.memory_io_bytes:,} bytes",
        ]
        return "\n".join(lines)


def _bits_text(bits: int | None) -> str:
    return "float" if bits is None else str(bits)


def _check_bits(bits: int | None, what: str) -> None:
    """ConfigError unless ``bits`` is None (float) or a bit-width in MIN_BITS..MAX_BITS."""
    if bits is not None and not (isinstance(bits, (int, np.integer)) and MIN_BITS <= bits <= MAX_BITS):
        raise ConfigError(f"{what}: bits must be None (float) or an integer in {MIN_BITS}..{MAX_BITS}, not {bits!r}")


def _tensor_bytes(size: int, bits: int | None) -> int:
    return -(-size * (bits or FLOAT_BITS) // 8)


class CostModel:
    """A graph's cost figures, read once, for fast evaluation of bit assignments.

    ``layers`` (network order) and ``points`` (graph order) hold what does not
    depend on bits; ``steps[k]`` is the set of points live while
    ``list(points)[k]`` is computed (see the module docstring).
    """

    def __init__(self, graph: ModelGraph) -> None:
        quant = graph.quant_layers()
        macs = graph.layer_macs()
        self.layers: dict[str, LayerInfo] = {}
        for q in quant:
            kernel = graph.kernel(q.name)
            bias = graph.bias(q.name)
            self.layers[q.name] = LayerInfo(
                kind=q.kind,
                kernel_size=int(kernel.size),
                bias_size=0 if bias is None else int(np.size(bias)),
                channels=1 if q.channel_axis is None else int(kernel.shape[q.channel_axis]),
                macs=int(macs[q.name]),
                input_point=q.input_point,
                output_point=q.output_point,
            )
        layer_params = sum(info.kernel_size + info.bias_size for info in self.layers.values())
        self.other_params: int = graph.param_count() - layer_params  # at 32 bits whatever the bits

        act_points = graph.act_points()
        names = [p.name for p in act_points]
        inputs, sources = _point_graph(graph, set(names))
        sizes = _point_sizes(graph, names)
        readers = dict.fromkeys(names, 0)
        for p in names:
            for src in inputs[p]:
                readers[src] += 1
        self.points: dict[str, PointInfo] = {p: PointInfo(sizes[p], readers[p], inputs[p]) for p in names}
        outputs = {p.name for p in act_points if p.is_output} | {s for o in graph.output_names for s in sources[o]}
        self.steps: list[frozenset[str]] = _live_sets(names, inputs, outputs)

        # what QuantConfig resolution needs: the layers and points range_setting keeps at 8 bits on request
        from tinyptq.components.range_setting import first_last_layers, first_last_points

        self._edge_layers = first_last_layers(graph)
        self._edge_points = first_last_points(graph)
        self._owners = {p.name: p.owner for p in act_points}

        # evaluation tables, by position
        self._point_names = names
        index = {p: i for i, p in enumerate(names)}
        self._steps_idx = [tuple(index[p] for p in live) for live in self.steps]
        self._io_factor = [1 + self.points[p].readers for p in names]

    # ------------------------------------------------------------ evaluation
    def weight_bits_cost(self, layer: str, bits: int | None, per_channel: bool) -> int:
        """Bits of storage of the layer's kernel, bias and scales (a multiple of 8: bytes x 8)."""
        info = self.layers[layer]
        if bits is None:
            return (info.kernel_size + info.bias_size) * FLOAT_BITS
        _check_bits(bits, f"weights of '{layer}'")
        scales = info.channels if per_channel else 1
        integers = -(-(info.kernel_size + scales) * bits // 8) * 8  # kernel + zero points, packed
        return integers + (info.bias_size + scales) * FLOAT_BITS

    def evaluate(
        self,
        weight_bits: Mapping[str, int | None],
        act_bits: Mapping[str, int | None],
        per_channel: Mapping[str, bool] | bool = True,
    ) -> ModelCost:
        """The cost of weight bits per layer and activation bits per point (missing: float).

        ``per_channel``: one flag for every quantized kernel, or one per layer
        (missing: True).
        """
        _check_names(weight_bits, self.layers, "layer")
        _check_names(act_bits, self.points, "activation point")
        if not isinstance(per_channel, bool):
            _check_names(per_channel, self.layers, "layer")
        for point, bits in act_bits.items():
            _check_bits(bits, f"activation point '{point}'")
        point_bytes = [_tensor_bytes(info.size, act_bits.get(p)) for p, info in self.points.items()]

        rows = []
        for name, info in self.layers.items():
            w_bits = weight_bits.get(name)
            pc = per_channel if isinstance(per_channel, bool) else per_channel.get(name, True)
            pc = pc and w_bits is not None
            in_bits = act_bits.get(info.input_point) if info.input_point else None
            rows.append(
                LayerCost(
                    name=name,
                    kind=info.kind,
                    params=info.kernel_size + info.bias_size,
                    weight_bits=w_bits,
                    per_channel=pc,
                    input_bits=in_bits,
                    weight_bytes=self.weight_bits_cost(name, w_bits, pc) // 8,
                    macs=info.macs,
                    bops=info.macs * (w_bits or FLOAT_BITS) * (in_bits or FLOAT_BITS),
                )
            )
        weight_bytes = sum(r.weight_bytes for r in rows) + self.other_params * FLOAT_BITS // 8
        live = [sum(point_bytes[i] for i in step) for step in self._steps_idx]
        peak = max(range(len(live)), key=live.__getitem__)  # the first of equal steps
        return ModelCost(
            layers=rows,
            params=sum(r.params for r in rows) + self.other_params,
            weight_bytes=weight_bytes,
            macs=sum(r.macs for r in rows),
            bops=sum(r.bops for r in rows),
            peak_activation_bytes=live[peak],
            peak_step=self._point_names[peak],
            activation_bytes=sum(point_bytes),
            memory_io_bytes=weight_bytes + sum(b * f for b, f in zip(point_bytes, self._io_factor, strict=True)),
        )

    def for_config(self, config: QuantConfig) -> ModelCost:
        """The cost of the bits a QuantConfig gives (first / last layers as range_setting resolves them)."""
        weight_bits: dict[str, int | None] = {}
        per_channel: dict[str, bool] = {}
        for name in self.layers:
            spec = config.weight_spec(name, name in self._edge_layers)
            weight_bits[name] = None if spec is None else spec.bits
            per_channel[name] = spec is not None and spec.per_channel
        act_bits: dict[str, int | None] = {}
        for name, owner in self._owners.items():
            spec = config.act_spec(name, owner, name in self._edge_points)
            act_bits[name] = None if spec is None else spec.bits
        return self.evaluate(weight_bits, act_bits, per_channel)

    def for_state(self, state: PTQState) -> ModelCost:
        """The cost of a state's encodings (a tensor without one is float).

        The cost model must come from ``state.graph`` as it is (stages such as
        bn_folding rename points): an encoding of an unknown name is a ConfigError.
        """
        weight_bits = {n: e.bits for n, e in state.weight_encodings.items()}
        per_channel = {n: e.per_channel for n, e in state.weight_encodings.items()}
        act_bits = {n: e.bits for n, e in state.act_encodings.items()}
        return self.evaluate(weight_bits, act_bits, per_channel)


def _check_names(given: Mapping[str, Any], known: Mapping[str, Any], what: str) -> None:
    unknown = given.keys() - known.keys()
    if unknown:
        raise ConfigError(f"unknown {what} '{sorted(unknown)[0]}' in a bit assignment")


def _point_graph(
    graph: ModelGraph, points: set[str]
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """The deployed-tensor graph: per point its input points; per node the points its output stands for.

    A point stands for itself; any other node (fused into a point downstream,
    or pass-through) for the nearest points upstream of it.
    """
    inputs: dict[str, tuple[str, ...]] = {}
    sources: dict[str, tuple[str, ...]] = {}
    for node in graph.node_names():  # topological: a node's inputs come first
        upstream = tuple(dict.fromkeys(s for i in graph.inputs_of(node) for s in sources[i]))
        if node in points:
            inputs[node] = upstream
        sources[node] = (node,) if node in points else upstream
    return inputs, sources


def _point_sizes(graph: ModelGraph, names: list[str]) -> dict[str, int]:
    """Elements per sample of every point, from one float run on a zero sample."""
    sample = tuple(graph.input_shape[1:])
    if any(d is None for d in sample):
        raise ModelError(f"cannot size the activations: the model input {graph.input_shape} has free dimensions")
    out = graph.run(np.zeros((1, *sample), np.float32), outputs=names)
    return {p: int(math.prod(np.shape(out[p])[1:])) for p in names}


def _live_sets(
    order: list[str], inputs: Mapping[str, tuple[str, ...]], outputs: set[str]
) -> list[frozenset[str]]:
    """Per point in ``order``, the points live while it is computed (see the module docstring)."""
    last_read = {p: (len(order) if p in outputs else -1) for p in order}
    for k, p in enumerate(order):
        for src in inputs[p]:
            last_read[src] = max(last_read[src], k)
    steps = []
    for k, p in enumerate(order):
        held = {q for q in order[:k] if last_read[q] > k}
        steps.append(frozenset({p, *inputs[p], *held}))
    return steps
