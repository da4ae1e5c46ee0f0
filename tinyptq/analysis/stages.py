"""Through the pipeline: each layer's reconstruction error after every stage, and which stages changed it.

The pipeline's state is kept after every stage (``Pipeline.run(on_state=)``).
A snapshot with encodings is measured as it is; one from before range
setting (as loaded, after BN folding, CLE, mixed precision) is quantized with
the pipeline's own range setting first ("reference ranges"), so what a
float-rewriting stage does for quantization shows too. A layer's error is the
SQNR of its output (before its output quantizer) in the fully quantized
simulation against the same snapshot's float model, on calibration samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from tinyptq.analysis.probe import db, nsr
from tinyptq.pipeline import PTQState, Stage
from tinyptq.quant import Encoding
from tinyptq.sim import QuantSim


def stage_table(
    snapshots: list[tuple[str, PTQState]],
    reference: Stage,
    x: np.ndarray,
    progress: bool = True,
    sim: QuantSim | None = None,
) -> dict[str, Any]:
    """Columns (snapshot names), how each was quantized, and per layer the SQNR and the changed flags.

    ``reference`` quantizes the snapshots that have no encodings yet (with
    their own calibration data, as the pipeline would); ``x``: the samples
    the errors are measured on; ``sim``: a simulation to load the snapshots of
    its graph's structure into (it is left holding the last one).
    """
    layers = [q.name for q in snapshots[-1][1].graph.quant_layers()]
    columns, quantized_by, sqnr = [], [], []
    # one simulation per graph structure, loaded with each snapshot in turn
    sims: dict[tuple[str, ...], QuantSim] = {} if sim is None else {tuple(sim.executor.order): sim}
    for name, state in tqdm(snapshots, desc="through the pipeline", disable=not progress, leave=False):
        probe = state
        if not state.weight_encodings and not state.act_encodings:
            probe = reference.apply(state.evolve(log=[]))
        columns.append(name)
        quantized_by.append("pipeline" if probe is state else "reference ranges")
        key = tuple(probe.graph.node_names())
        if key in sims:
            sims[key].load(probe)
        else:
            sims[key] = QuantSim(probe)
        sqnr.append(_layer_sqnr(sims[key], layers, x))
    rows = []
    for layer in layers:
        changed = [False] + [
            _changed(before, after, layer) for (_, before), (_, after) in zip(snapshots, snapshots[1:], strict=False)
        ]
        rows.append({"layer": layer, "sqnr_db": [col.get(layer) for col in sqnr], "changed": changed})
    return {"columns": columns, "quantized_by": quantized_by, "layers": rows}


def _output(state: PTQState, layer: str) -> str:
    q = state.graph.quant_layer(layer)
    return q.output_point or layer


def _layer_sqnr(sim: QuantSim, layers: list[str], x: np.ndarray) -> dict[str, float | None]:
    state = sim.state
    names = {q.name for q in state.graph.quant_layers()}
    present = [layer for layer in layers if layer in names]
    points = sorted({_output(state, layer) for layer in present})
    floats = state.graph.run(x, points)
    quantized = sim.run(x, outputs=points, raw=points)
    return {layer: db(nsr(floats[_output(state, layer)], quantized[_output(state, layer)])) for layer in present}


def _same_encoding(a: Encoding | None, b: Encoding | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.bits == b.bits and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)
    )


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and np.array_equal(a, b)


def _changed(before: PTQState, after: PTQState, layer: str) -> bool:
    """Whether a stage changed the layer: its kernel, bias, rounding, or its weight or output encoding."""
    names = {q.name for q in before.graph.quant_layers()}
    if layer not in names:
        return True
    g0, g1 = before.graph, after.graph
    out0, out1 = _output(before, layer), _output(after, layer)
    return not (
        _same_array(g0.kernel(layer), g1.kernel(layer))
        and _same_array(g0.bias(layer), g1.bias(layer))
        and _same_array(before.fixed_weights.get(layer), after.fixed_weights.get(layer))
        and _same_encoding(before.weight_encodings.get(layer), after.weight_encodings.get(layer))
        and _same_encoding(before.act_encodings.get(out0), after.act_encodings.get(out1))
    )
