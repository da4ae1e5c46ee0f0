"""range_setting: choose the clipping range (and so the encoding) of every quantized tensor.

Weights are observed directly (per channel when the config asks for it);
activations are observed over the calibration batches with streaming
statistics, so memory does not grow with the calibration set.
"""

from __future__ import annotations

from tinyptq.errors import ConfigError
from tinyptq.graph.base import ModelGraph
from tinyptq.pipeline import PTQState, Stage, register
from tinyptq.quant import Encoding
from tinyptq.ranges import RANGE_METHODS, make_observer


def first_last_layers(graph: ModelGraph) -> set[str]:
    """Names of the first and the last quantizable layers (kept at 8 bits on request)."""
    layers = graph.quant_layers()
    return {layers[0].name, layers[-1].name} if layers else set()


@register
class RangeSetting(Stage):
    """Set weight and activation encodings from observed ranges."""

    name = "range_setting"

    def __init__(self, weights: str = "minmax", activations: str = "minmax", batch_size: int = 128) -> None:
        for what, method in (("weights", weights), ("activations", activations)):
            if method not in RANGE_METHODS:
                raise ConfigError(
                    f"unknown range method '{method}' for {what}; valid: {', '.join(sorted(RANGE_METHODS))}"
                )
        self.weights = weights
        self.activations = activations
        self.batch_size = int(batch_size)

    def apply(self, state: PTQState) -> PTQState:
        """Encodings for every quantized weight and activation tensor."""
        state = state.evolve()
        lines = self._set_weight_encodings(state)
        lines += self._set_act_encodings(state)
        self.record(state, lines)
        return state

    def _set_weight_encodings(self, state: PTQState) -> list[str]:
        graph, cfg = state.graph, state.config
        edge = first_last_layers(graph)
        fallback = []
        for layer in graph.quant_layers():
            spec = cfg.weight_spec(layer.name, layer.name in edge)
            if spec is None:
                state.weight_encodings.pop(layer.name, None)
                continue
            axis = layer.channel_axis if spec.per_channel else None
            if spec.per_channel and axis is None:
                fallback.append(layer.name)
            obs = make_observer(self.weights, axis=axis)
            obs.update(graph.kernel(layer.name))
            lo, hi = obs.range(spec)
            state.weight_encodings[layer.name] = Encoding.from_range(lo, hi, spec, axis=axis)
            state.fixed_weights.pop(layer.name, None)  # a new grid voids earlier rounding
        lines = [f"weights: {len(state.weight_encodings)} layers, method {self.weights}"]
        if fallback:
            lines.append(f"per-tensor fallback (no single channel axis): {', '.join(fallback)}")
        return lines

    def _set_act_encodings(self, state: PTQState) -> list[str]:
        graph, cfg = state.graph, state.config
        edge = first_last_layers(graph)
        specs = {}
        for p in graph.act_points():
            spec = cfg.act_spec(p.name, p.owner, p.is_input or p.is_output or p.owner in edge)
            if spec is None:
                state.act_encodings.pop(p.name, None)
            else:
                specs[p.name] = spec
        observers = {name: make_observer(self.activations) for name in specs}
        for batch in graph.iterate(state.calib, list(specs), self.batch_size):
            for name, obs in observers.items():
                obs.update(batch[name])
        for name, obs in observers.items():
            lo, hi = obs.range(specs[name])
            state.act_encodings[name] = Encoding.from_range(lo, hi, specs[name])
        widths = sorted({s.bits for s in specs.values()})
        return [
            f"activations: {len(specs)} tensors, method {self.activations}, "
            f"{len(state.calib)} calibration samples, bits {widths}"
        ]
