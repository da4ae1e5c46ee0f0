"""The stages' loop: every unit in network order, the chosen rounding into the state."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from tinyptq._tf import tf
from tinyptq.executor import WEIGHT, Executor
from tinyptq.pipeline import PTQState
from tinyptq.rounding.fisher import fisher_weights
from tinyptq.rounding.reconstruct import Settings, UnitResult, _collect, _Data, reconstruct_unit
from tinyptq.rounding.soft import NEAREST, SoftRounding, float_mode
from tinyptq.rounding.units import Unit
from tinyptq.sim import QuantSim

if TYPE_CHECKING:
    from tinyptq.pipeline import Stage


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
    bar = tqdm(
        total=len(units) * settings.iterations,
        desc=stage.name,
        unit="it",
        file=sys.stderr,
        leave=False,
    )
    try:
        for index, unit in enumerate(units):
            bar.set_postfix_str(unit.name)
            data = _unit_data(ex, unit, roundings, state.calib, settings)
            learn = []
            if learn_steps:
                learn = [
                    p for p in unit.points if p in state.act_encodings and p not in learned_points
                ]
                learned_points.update(learn)
            mine = {n: roundings[n] for n in unit.layers if n in roundings}
            results.append(
                reconstruct_unit(
                    ex, unit, mine, data, settings, settings.seed + index, learn, bar.update
                )
            )
    finally:
        bar.close()
    graph = state.graph
    for res in results:
        for name, q in res.integers.items():
            shape = graph.kernel(name).shape
            state.fixed_weights[name] = (
                graph.kernel_layout(name).from_canonical(q, shape).astype(np.int32)
            )
        for point, scale in res.scales.items():
            state.act_encodings[point] = dataclasses.replace(
                state.act_encodings[point], scale=np.float32(scale)
            )
    stage.record(state, _lines(results), units=[_details(r) for r in results])
    return state


def _unit_data(
    ex: Executor,
    unit: Unit,
    roundings: dict[str, SoftRounding],
    calib: np.ndarray,
    settings: Settings,
) -> _Data:
    """A unit's raw inputs (quantized network, or float on request), float target and Fisher weights.

    The network up to the unit runs eagerly, as the float model (``float_mode``)
    and as quantized so far: a few batches cost less than tracing (and
    optimizing) the network again for every unit.
    """
    every = [*unit.inputs, unit.output]
    forward = ex.function(every, raw=every).python_function
    with float_mode(ex, roundings):
        values = _collect(
            forward, every, every if settings.input_from == "float" else [unit.output], calib
        )
        weights = (
            fisher_weights(ex, unit, values[unit.output]) if settings.loss == "fisher" else None
        )
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
        steps = (
            f", {len(r.scales)} step{'s' if len(r.scales) > 1 else ''} learned" if r.scales else ""
        )
        lines.append(
            f"{r.unit.name}: MSE {r.mse_nearest:.4g} -> {r.mse:.4g} ({what}{steps}), {r.seconds:.1f} s"
        )
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
