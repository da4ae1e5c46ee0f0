"""range_setting: choose the clipping range (and so the encoding) of every quantized tensor.

Weights are observed directly (per channel when the config asks for it);
activations are observed over the calibration batches with streaming
statistics, so memory does not grow with the calibration set. Weights and
activations choose their method separately (``minmax``, ``percentile``,
``mse``, ``kl``); the method options below apply to whichever uses them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tinyptq.graph.base import ModelGraph
from tinyptq.params import BATCH_SIZE, Integer, Optional, Options, Real, validate
from tinyptq.pipeline import PTQState, Stage, register
from tinyptq.quant import Encoding
from tinyptq.ranges import RANGE_METHODS, RangeObserver, make_observer

# stage option -> observer option, passed to the methods that take it
_OBSERVER_OPTIONS = {
    "percentile": "percentile",
    "mse_p": "p",
    "num_candidates": "num_candidates",
    "num_bins": "num_bins",
    "num_quant_bins": "num_quant_bins",
}


def first_last_layers(graph: ModelGraph) -> set[str]:
    """Names of the first and the last quantizable layers (kept at 8 bits on request)."""
    layers = graph.quant_layers()
    return {layers[0].name, layers[-1].name} if layers else set()


def first_last_points(graph: ModelGraph) -> set[str]:
    """Activation points kept at 8 bits with the first and last layers.

    A layer "at 8 bits" has 8-bit weights, an 8-bit input and an 8-bit output
    (the usual convention of reconstruction papers: the last layer's input is
    8-bit too). So: the model inputs and outputs, and the input and output
    points of the first and the last quantizable layers.
    """
    edge = first_last_layers(graph)
    points = {
        q
        for name in edge
        for q in (graph.quant_layer(name).input_point, graph.quant_layer(name).output_point)
        if q
    }
    return points | {p.name for p in graph.act_points() if p.is_input or p.is_output or p.owner in edge}


def range_ratio(lo: Any, hi: Any, mn: Any, mx: Any) -> float:
    """Width of the chosen range over the min-max width (both widened to 0), mean over channels."""
    width = np.maximum(hi, 0) - np.minimum(lo, 0)
    full = np.maximum(mx, 0) - np.minimum(mn, 0)
    ratio = np.where(full > 0, width / np.where(full > 0, full, 1), 1.0)
    return float(np.mean(ratio))


@register
class RangeSetting(Stage):
    """Set weight and activation encodings from observed ranges."""

    name = "range_setting"
    parameter_constraints = {
        "weights": Options(*sorted(RANGE_METHODS)),
        "activations": Options(*sorted(RANGE_METHODS)),
        "batch_size": BATCH_SIZE,
        "percentile": Real(50.0, 100.0, lo_open=True),
        "mse_p": Real(0.0, 100.0, lo_open=True),
        "num_candidates": Integer(1, 100_000),
        "num_bins": Integer(16, 2**20),
        # at most num_bins as well: check_params
        "num_quant_bins": Optional(Integer(2, 2**20)),
    }

    def __init__(
        self,
        weights: str = "minmax",
        activations: str = "minmax",
        batch_size: int = 128,
        percentile: float = 99.99,
        mse_p: float = 2.0,
        num_candidates: int = 100,
        num_bins: int = 2048,
        num_quant_bins: int | None = None,
    ) -> None:
        # validated against parameter_constraints before this body runs
        self.weights = weights
        self.activations = activations
        self.batch_size = batch_size
        self.percentile = percentile
        self.mse_p = mse_p
        self.num_candidates = num_candidates
        self.num_bins = num_bins
        self.num_quant_bins = num_quant_bins

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """KL's quantized bins cannot outnumber the histogram's bins."""
        if params.get("num_quant_bins") is not None:
            validate(cls.name, "num_quant_bins", params["num_quant_bins"], Integer(2, params["num_bins"]))
        return params

    def _observer(self, method: str, axis: int | None = None) -> RangeObserver:
        """An observer for ``method`` with the options of this stage it takes."""
        accepted = RANGE_METHODS[method].option_names()
        opts = {obs: getattr(self, own) for own, obs in _OBSERVER_OPTIONS.items() if obs in accepted}
        return make_observer(method, axis=axis, **opts)

    def _describe(self, method: str) -> str:
        """'mse (p=2.0, num_candidates=100, num_bins=2048)': the method and its options."""
        accepted = RANGE_METHODS[method].option_names()
        opts = [f"{obs}={getattr(self, own)}" for own, obs in _OBSERVER_OPTIONS.items() if obs in accepted]
        return f"{method} ({', '.join(opts)})" if opts else method

    def apply(self, state: PTQState) -> PTQState:
        """Encodings for every quantized weight and activation tensor."""
        state = state.evolve()
        w_lines, w_ratios = self._set_weight_encodings(state)
        a_lines, a_ratios = self._set_act_encodings(state)
        self.record(state, w_lines + a_lines, weight_range_ratio=w_ratios, act_range_ratio=a_ratios)
        return state

    def _set_weight_encodings(self, state: PTQState) -> tuple[list[str], dict[str, float]]:
        graph, cfg = state.graph, state.config
        edge = first_last_layers(graph)
        fallback, ratios = [], {}
        for layer in graph.quant_layers():
            spec = cfg.weight_spec(layer.name, layer.name in edge)
            if spec is None:
                state.weight_encodings.pop(layer.name, None)
                continue
            axis = layer.channel_axis if spec.per_channel else None
            if spec.per_channel and axis is None:
                fallback.append(layer.name)
            obs = self._observer(self.weights, axis=axis)
            obs.update(graph.kernel(layer.name))
            lo, hi = obs.range(spec)
            ratios[layer.name] = range_ratio(lo, hi, *obs.minmax())
            state.weight_encodings[layer.name] = Encoding.from_range(lo, hi, spec, axis=axis)
            state.fixed_weights.pop(layer.name, None)  # a new grid voids earlier rounding
        lines = [
            f"weights: {len(ratios)} layers, method {self._describe(self.weights)}; "
            f"{_ratio_text(ratios)}"
        ]
        if fallback:
            lines.append(f"per-tensor fallback (no single channel axis): {', '.join(fallback)}")
        return lines, ratios

    def _set_act_encodings(self, state: PTQState) -> tuple[list[str], dict[str, float]]:
        graph, cfg = state.graph, state.config
        edge = first_last_points(graph)
        specs = {}
        for p in graph.act_points():
            spec = cfg.act_spec(p.name, p.owner, p.name in edge)
            if spec is None:
                state.act_encodings.pop(p.name, None)
            else:
                specs[p.name] = spec
        def observe() -> dict[str, RangeObserver]:
            observers = {name: self._observer(self.activations) for name in specs}
            for batch in graph.iterate(state.calib, list(specs), self.batch_size):
                for name, obs in observers.items():
                    obs.update(batch[name])
            return observers

        # the statistics do not depend on bit-widths: runs at other bits reuse them
        if state.cache is None:
            observers = observe()
        else:
            key = (graph.fingerprint(), self._describe(self.activations), self.batch_size, sorted(specs))
            observers = state.cache.get_or_compute("act_statistics", key, observe)
        ratios = {}
        for name, obs in observers.items():
            lo, hi = obs.range(specs[name])
            ratios[name] = range_ratio(lo, hi, *obs.minmax())
            state.act_encodings[name] = Encoding.from_range(lo, hi, specs[name])
        widths = sorted({s.bits for s in specs.values()})
        lines = [
            f"activations: {len(specs)} tensors, method {self._describe(self.activations)}, "
            f"{len(state.calib)} calibration samples, bits {widths}; {_ratio_text(ratios)}"
        ]
        return lines, ratios


def _ratio_text(ratios: dict[str, float]) -> str:
    """'range 0.82x min-max on average (smallest 0.41x at c1)'."""
    if not ratios:
        return "no tensors"
    smallest = min(ratios, key=ratios.get)
    mean = float(np.mean(list(ratios.values())))
    return f"range {mean:.2f}x min-max on average (smallest {ratios[smallest]:.2f}x at {smallest})"
