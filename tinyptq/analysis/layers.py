"""Where the loss comes from: weights vs activations, and unit by unit (only this one / all but this one)."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from tinyptq.analysis.probe import Probe, Unit
from tinyptq.executor import ACTIVATION, WEIGHT

SPLIT = ("fp32", "weights only", "activations only", "both")


def loss_split(probe: Probe, fp32_metric: float | None) -> list[dict[str, Any]]:
    """The metric and output SQNR with nothing, only the weights, only the activations, and all quantized.

    ``fp32_metric``: None where the quantized metric has no FP32 value (an SQNR against FP32).
    """
    tensors = probe.all_tensors()
    fp32 = None if fp32_metric is None else round(float(fp32_metric), 4)
    rows = [{"setting": "fp32", "metric": fp32, "sqnr_db": None}]
    for setting, kind in (("weights only", WEIGHT), ("activations only", ACTIVATION), ("both", None)):
        probe.only(t for t in tensors if kind is None or t[0] == kind)
        rows.append({"setting": setting, **probe.score()})
    probe.all_but(())
    return rows


def unit_table(probe: Probe, costs: dict[str, Any], progress: bool = True) -> list[dict[str, Any]]:
    """Per unit, in network order: the metric and output SQNR with only its weights (activations)
    quantized, and with everything but its weights (activations) quantized."""
    rows = []
    for unit in tqdm(probe.units, desc="per layer", disable=not progress, leave=False):
        rows.append(_unit_row(probe, unit, costs))
    probe.all_but(())
    return rows


def _unit_row(probe: Probe, unit: Unit, costs: dict[str, Any]) -> dict[str, Any]:
    weights = [(WEIGHT, unit.layer)] if unit.layer else []
    acts = [(ACTIVATION, p) for p in unit.points]
    row: dict[str, Any] = {
        "name": unit.name,
        "kind": unit.kind,
        "weight_bits": probe.state.weight_encodings[unit.layer].bits if unit.layer else None,
        "act_bits": max((probe.state.act_encodings[p].bits for p in unit.points), default=None),
        "act_points": list(unit.points),
    }
    for key, tensors, mode in (
        ("only_weights", weights, "only"),
        ("only_acts", acts, "only"),
        ("without_weights", weights, "all_but"),
        ("without_acts", acts, "all_but"),
    ):
        if not tensors:
            row[key] = None
            continue
        getattr(probe, mode)(tensors)
        row[key] = probe.score()
    layer_cost = costs.get(unit.name)
    row["weight_bytes"] = int(layer_cost.weight_bytes) if layer_cost is not None else 0
    row["macs"] = int(layer_cost.macs) if layer_cost is not None else 0
    return row
