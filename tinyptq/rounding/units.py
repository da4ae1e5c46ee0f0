"""Reconstruction units: what is reconstructed at once (a layer, or a block of ``graph.blocks()``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tinyptq.graph.base import ModelGraph


@dataclass(frozen=True)
class Unit:
    """What is reconstructed at once: layers, fed nodes, the compared node, quantizers in between."""

    name: str
    layers: tuple[str, ...]
    inputs: tuple[str, ...]  # fed with their raw values (their quantizers apply inside)
    output: str  # compared raw (before its own quantizer) with the float model
    points: tuple[str, ...]  # activation quantizers applied inside (QDrop, learned steps)


def _inner_points(graph: ModelGraph, inputs: Sequence[str], output: str) -> tuple[str, ...]:
    """The activation points from ``inputs`` (included) up to ``output`` (excluded)."""
    points = {p.name for p in graph.act_points()}
    seen: set[str] = set()
    stack = [output]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in inputs:
            stack.extend(graph.inputs_of(name))
    order = graph.node_names()
    return tuple(n for n in order if n in seen and n in points and n != output)


def layer_units(graph: ModelGraph) -> list[Unit]:
    """One unit per quantizable layer, in network order: its input point to its output point."""
    units = []
    position = {n: i for i, n in enumerate(graph.node_names())}
    for ql in sorted(graph.quant_layers(), key=lambda q: position[q.name]):
        inputs = (ql.input_point or graph.inputs_of(ql.name)[0],)
        output = ql.output_point or ql.name
        units.append(
            Unit(ql.name, (ql.name,), inputs, output, _inner_points(graph, inputs, output))
        )
    return units


def block_units(graph: ModelGraph) -> list[Unit]:
    """One unit per reconstruction block (``graph.blocks()``: residual, separable, single layers)."""
    units = []
    for b in graph.blocks():
        inputs = b.input_points or (graph.inputs_of(b.layers[0])[0],)
        units.append(
            Unit(
                b.name,
                b.layers,
                inputs,
                b.output_point,
                _inner_points(graph, inputs, b.output_point),
            )
        )
    return units
