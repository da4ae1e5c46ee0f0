"""mixed_precision: per-layer bit-widths under flash, RAM, energy and memory-traffic budgets, label-free.

For every quantizable layer (weights) and activation point, a bit-width from
the candidates, chosen by an exact integer program (:mod:`tinyptq.allocation`,
``scipy.optimize.milp``) that minimizes the summed label-free sensitivity
(:mod:`tinyptq.sensitivity`, measured on the state as the earlier stages left
it) under any combination of budgets:

- ``weight_kb``: weight memory (flash), KiB — kernels at their bits, biases at
  32 bits, scales and zero points, other parameters in float;
- ``activation_kb``: peak activation memory (RAM) of a sequential execution in
  the graph's order, KiB;
- ``total_kb``: the two together;
- ``bops``: bit operations per inference (MACs x weight bits x input bits);
- ``memory_io_kb``: bytes moved per inference (weights read, activations
  written and read), KiB.

(see :mod:`tinyptq.cost` for the exact counts). The choice is written into the
QuantConfig as one override per layer and per point, so every later stage
(range setting, rounding, bias correction) and every exporter runs at the
chosen bits. It runs before range_setting. With ``keep_first_last_8bit`` the
first and last layers stay at 8 bits; the model's outputs keep the configured
activation bits (the logits-based sensitivity cannot see their quantizer).
An infeasible budget is a one-line error naming the smallest feasible value.
"""

from __future__ import annotations

import glob
from typing import Any

from tinyptq.allocation import BUDGETS, Allocation, Problem, allocate
from tinyptq.components.range_setting import first_last_layers, first_last_points
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.cost import CostModel
from tinyptq.errors import ConfigError
from tinyptq.params import Integer, IntList, Optional, Options, Real
from tinyptq.pipeline import PTQState, Stage, register
from tinyptq.quant import MAX_BITS, MIN_BITS
from tinyptq.sensitivity import METHODS, Sensitivity, measure

FLOAT_BITS = 32
_BUDGET = Optional(Real(0.0, None, lo_open=True))


@register
class MixedPrecision(Stage):
    """Choose per-layer weight and activation bit-widths under budgets (exact integer program)."""

    name = "mixed_precision"
    precedes = ("range_setting", "adaround", "brecq", "gptq", "bias_correction")
    parameter_constraints = {
        **{b: _BUDGET for b in BUDGETS},
        "weight_candidates": IntList(MIN_BITS, MAX_BITS),
        "act_candidates": IntList(MIN_BITS, MAX_BITS),
        "sensitivity": Options(*METHODS),
        "samples": Integer(1, None),
    }

    def __init__(
        self,
        weight_kb: float | None = None,
        activation_kb: float | None = None,
        total_kb: float | None = None,
        bops: float | None = None,
        memory_io_kb: float | None = None,
        weight_candidates: list[int] = (2, 3, 4, 6, 8),  # type: ignore[assignment]
        act_candidates: list[int] = (4, 6, 8),  # type: ignore[assignment]
        sensitivity: str = "sqnr",
        samples: int = 256,
    ) -> None:
        # validated (lists sorted) against parameter_constraints before this body runs
        self.weight_kb = weight_kb
        self.activation_kb = activation_kb
        self.total_kb = total_kb
        self.bops = bops
        self.memory_io_kb = memory_io_kb
        self.weight_candidates = weight_candidates
        self.act_candidates = act_candidates
        self.sensitivity = sensitivity
        self.samples = samples

    def budgets(self) -> dict[str, float]:
        """The budgets given (name -> value)."""
        return {b: getattr(self, b) for b in BUDGETS if getattr(self, b) is not None}

    def apply(self, state: PTQState) -> PTQState:
        """Measure sensitivity, solve the program, write the bit-widths into the config."""
        budgets = self.budgets()
        if not budgets:
            raise ConfigError(f"mixed_precision needs at least one budget: {', '.join(BUDGETS)}")
        state = state.evolve()
        sens = measure(state, self.weight_candidates, self.act_candidates, self.sensitivity, self.samples)
        cost = CostModel(state.graph)
        problem = self.problem(state, sens, cost)
        choice = allocate(problem, budgets)
        config = state.config.replace(overrides=(*state.config.overrides, *overrides(choice)))
        state.config = keep_float(state.graph, config, choice)
        check = cost.for_config(state.config).summary()
        self.record(state, self.lines(choice, budgets, sens), allocation=_plain(choice),
                    cost=check, sensitivity=sens.to_dict())
        return state

    # ----------------------------------------------------------- the program
    def problem(self, state: PTQState, sens: Sensitivity, cost: CostModel) -> Problem:
        """The integer program's numbers: options with their errors, bytes, MACs, live sets."""
        graph, cfg = state.graph, state.config
        edge_layers, edge_points = first_last_layers(graph), first_last_points(graph)
        keep = cfg.keep_first_last_8bit
        weight_options, weight_bytes, layer_input, macs = {}, {}, {}, {}
        for q in graph.quant_layers():
            spec = cfg.weight_spec(q.name, q.name in edge_layers)
            info = cost.layers[q.name]
            if spec is None:
                options = {FLOAT_BITS: 0.0}
            elif keep and q.name in edge_layers:
                options = {spec.bits: 0.0}
            else:
                options = {b: sens.weight[q.name][b] for b in self.weight_candidates}
            per_channel = spec is not None and spec.per_channel and q.channel_axis is not None
            weight_options[q.name] = options
            weight_bytes[q.name] = {
                b: cost.weight_bits_cost(q.name, None if b == FLOAT_BITS else b, per_channel) / 8 for b in options
            }
            layer_input[q.name] = q.input_point
            macs[q.name] = float(info.macs)
        act_options, act_bytes = {}, {}
        for p in graph.act_points():
            spec = cfg.act_spec(p.name, p.owner, p.name in edge_points)
            if spec is None:
                options = {FLOAT_BITS: 0.0}
            elif p.is_output or (keep and p.name in edge_points):
                options = {spec.bits: 0.0}
            else:
                options = {b: sens.act[p.name][b] for b in self.act_candidates}
            size = cost.points[p.name].size
            act_options[p.name] = options
            act_bytes[p.name] = {b: float(-(-size * b // 8)) for b in options}
        other = 4 * cost.other_params  # parameters outside the quantizable layers stay float32
        return Problem(
            weight_options=weight_options,
            act_options=act_options,
            layer_input=layer_input,
            weight_bytes=weight_bytes,
            act_bytes=act_bytes,
            macs=macs,
            readers={name: info.readers for name, info in cost.points.items()},
            steps=list(cost.steps),
            fixed_bytes=float(other),
        )

    def lines(self, choice: Allocation, budgets: dict[str, float], sens: Sensitivity) -> list[str]:
        """The log: budgets and costs, then the bits per layer and per point."""
        used = ", ".join(f"{k} {choice.costs[k]:.4g} / {v:.4g}" for k, v in budgets.items())
        out = [
            f"budgets: {used}; sensitivity {sens.method} in {sens.seconds:.1f} s; "
            f"summed error {choice.error:.4g}",
            "weights: " + ", ".join(f"{n} {b}" for n, b in choice.weight_bits.items()),
            "activations: " + ", ".join(f"{n} {b}" for n, b in choice.act_bits.items()),
        ]
        return out


def overrides(choice: Allocation) -> list[LayerOverride]:
    """One override per layer (weight bits) and per point (activation bits); float ones stay as they are."""
    out = [
        LayerOverride(pattern=glob.escape(name), weight_bits=bits)
        for name, bits in choice.weight_bits.items()
        if bits != FLOAT_BITS
    ]
    out += [
        LayerOverride(pattern=glob.escape(name), act_bits=bits)
        for name, bits in choice.act_bits.items()
        if bits != FLOAT_BITS
    ]
    return out


def keep_float(graph: Any, config: QuantConfig, choice: Allocation) -> QuantConfig:
    """``config`` with every tensor the allocation left in float (a ``quantize: false`` override) float again.

    An override matches a point by its name or its owner's, and every override
    sets ``quantize`` (True by default): a layer's weight-bits override would
    switch the points it owns back on (and a point's override a layer of the
    same name), against an earlier ``quantize: false`` for them. Those tensors
    get an exact-name ``quantize: false`` override after the allocation's.
    """
    owners = {p.name: p.owner for p in graph.act_points()}
    names = [n for n, b in choice.weight_bits.items() if b == FLOAT_BITS and config.weight_spec(n) is not None]
    names += [
        n for n, b in choice.act_bits.items() if b == FLOAT_BITS and config.act_spec(n, owners[n]) is not None
    ]
    if not names:
        return config
    extra = tuple(LayerOverride(pattern=glob.escape(n), quantize=False) for n in dict.fromkeys(names))
    return config.replace(overrides=(*config.overrides, *extra))


def _plain(choice: Allocation) -> dict[str, Any]:
    return {
        "weight_bits": dict(choice.weight_bits),
        "act_bits": dict(choice.act_bits),
        "error": choice.error,
        "costs": dict(choice.costs),
    }
