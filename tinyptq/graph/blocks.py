"""Reconstruction units (BRECQ blocks) found from a ModelGraph's topology.

Block reconstruction optimizes the weights of one block at a time against the
block's float output, so the blocks must be single-entry, single-exit pieces of
the graph: a residual block (fork to Add), a depthwise-separable pair, or a
single layer. They are found with the framework-neutral queries only
(``node_names``, ``op_type``, ``inputs_of``, ``consumers``, ``act_points``,
``quant_layers``, and ``kernel_layout`` / ``kernel`` to recognize a 1x1
convolution), so Keras and ONNX graphs give the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinyptq.graph.base import ModelGraph, QuantLayer

# nodes that only move values around: a depthwise output read through these
# by a 1x1 convolution still forms a separable block
SHAPE_ONLY = frozenset({"identity", "dropout", "flatten", "reshape", "transpose"})


@dataclass(frozen=True)
class Block:
    """One reconstruction unit: the layers optimized together and where it reads and writes."""

    name: str
    kind: str  # "residual" | "separable" | "layer"
    layers: tuple[str, ...]  # quantizable layers, topological order
    input_points: tuple[str, ...]  # activation points the block reads (normally one)
    output_point: str  # activation point of the block's output, as quantized when deployed
    nodes: tuple[str, ...]  # every graph node inside the block, topological order


class _Topology:
    """The neutral queries of a graph, read once, with ancestor sets."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.order = list(graph.node_names())
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.kind = {n: graph.op_type(n) for n in self.order}
        self.inputs = {n: list(graph.inputs_of(n)) for n in self.order}
        self.readers = {n: list(dict.fromkeys(graph.consumers(n))) for n in self.order}
        self.points = {p.name for p in graph.act_points()}
        self.outputs = set(graph.output_names)
        self.layers: dict[str, QuantLayer] = {ql.name: ql for ql in graph.quant_layers()}
        self.ancestors: dict[str, set[str]] = {}
        for n in self.order:  # topological: inputs are done before their readers
            anc: set[str] = set()
            for i in self.inputs[n]:
                anc |= self.ancestors[i]
                anc.add(i)
            self.ancestors[n] = anc

    def point_after(self, name: str) -> str | None:
        """The activation point that ``name``'s value becomes, walking single-reader chains forward."""
        cur = name
        while cur not in self.points:
            nxt = self.readers[cur]
            if len(nxt) != 1 or cur in self.outputs or len(self.inputs[nxt[0]]) != 1:
                return None
            cur = nxt[0]
        return cur

    def point_before(self, name: str) -> str | None:
        """The activation point ``name`` reads, walking single-input nodes backwards."""
        ins = self.inputs[name]
        while len(ins) == 1:
            if ins[0] in self.points:
                return ins[0]
            ins = self.inputs[ins[0]]
        return None

    def region(self, entries: tuple[str, ...], exit_: str) -> set[str]:
        """Nodes after any of ``entries`` that the value of ``exit_`` depends on (``exit_`` included)."""
        inside = self.ancestors[exit_] | {exit_}
        return {n for n in inside if n not in entries and any(e in self.ancestors[n] for e in entries)}

    def is_closed(self, nodes: set[str], entries: tuple[str, ...], exit_: str) -> bool:
        """Whether nothing inside reads from outside (except the entries) or is read from outside (except the exit)."""
        for n in nodes:
            if any(i not in nodes and i not in entries for i in self.inputs[n]):
                return False
            if n != exit_ and (n in self.outputs or any(r not in nodes for r in self.readers[n])):
                return False
        return True

    def is_pointwise(self, layer: str) -> bool:
        """A 1x1 convolution without groups."""
        if self.layers[layer].kind != "conv":
            return False
        layout = self.graph.kernel_layout(layer)
        taps = layout.to_canonical(self.graph.kernel(layer)).shape[2:]
        return layout.groups == 1 and len(taps) > 0 and all(t == 1 for t in taps)

    def make(self, name: str, kind: str, entries: tuple[str, ...], exit_: str, nodes: set[str]) -> Block:
        ordered = tuple(sorted(nodes, key=self.pos.__getitem__))
        layers = tuple(n for n in ordered if n in self.layers)
        return Block(name, kind, layers, entries, exit_, ordered)


def find_blocks(graph: ModelGraph) -> list[Block]:
    """The reconstruction units of ``graph`` in topological order: residual, separable, then single layers.

    Every quantizable layer is in exactly one block. A residual block runs from
    the fork (the nearest activation point both inputs of an Add depend on) to
    the Add's output point; it is kept only when it is closed (nothing inside
    reads from or is read from outside, but the fork and the output), the
    outermost one winning when they nest. A depthwise layer whose output point
    only a 1x1 convolution reads (through shape-only nodes) forms a separable
    block with it. Every other layer is a block of its own.
    """
    topo = _Topology(graph)
    blocks = _residual_blocks(topo)
    taken = {layer for b in blocks for layer in b.layers}
    for ql in topo.layers.values():
        if ql.kind == "depthwise" and ql.name not in taken:
            block = _separable_block(topo, ql, taken)
            if block is not None:
                blocks.append(block)
                taken.update(block.layers)
    for ql in topo.layers.values():
        if ql.name not in taken:
            blocks.append(_layer_block(topo, ql))
    return sorted(blocks, key=lambda b: topo.pos[b.layers[0]])


def _residual_blocks(topo: _Topology) -> list[Block]:
    """Closed fork-to-Add regions with layers inside, outermost first when nested, disjoint."""
    candidates = [b for n in topo.order if topo.kind[n] == "add" and (b := _residual_block(topo, n)) is not None]
    chosen: list[Block] = []
    used: set[str] = set()
    for block in sorted(candidates, key=lambda b: -len(b.nodes)):  # outermost (largest) first
        if used.isdisjoint(block.nodes):
            chosen.append(block)
            used.update(block.nodes)
    return chosen


def _residual_block(topo: _Topology, add: str) -> Block | None:
    ins = topo.inputs[add]
    if len(ins) < 2:
        return None
    common = set.intersection(*(topo.ancestors[i] | {i} for i in ins))
    forks = [n for n in common if n in topo.points]
    exit_ = topo.point_after(add)  # through the fused ReLU when there is one
    if not forks or exit_ is None:
        return None
    entries = (max(forks, key=topo.pos.__getitem__),)
    nodes = topo.region(entries, exit_)
    if not topo.is_closed(nodes, entries, exit_) or not any(n in topo.layers for n in nodes):
        return None
    return topo.make(add, "residual", entries, exit_, nodes)


def _separable_block(topo: _Topology, dw: QuantLayer, taken: set[str]) -> Block | None:
    mid = dw.output_point or topo.point_after(dw.name)
    if mid is None or mid in topo.outputs:
        return None
    readers: set[str] = set()
    frontier = [mid]
    while frontier:  # look through shape-only nodes to the real readers
        for r in topo.readers[frontier.pop()]:
            if topo.kind[r] in SHAPE_ONLY and r not in topo.outputs:
                frontier.append(r)
            else:
                readers.add(r)
    if len(readers) != 1:
        return None
    pw = readers.pop()
    if pw not in topo.layers or pw in taken or len(topo.inputs[pw]) != 1 or not topo.is_pointwise(pw):
        return None
    entry = dw.input_point or topo.point_before(dw.name)
    exit_ = topo.layers[pw].output_point or topo.point_after(pw)
    if entry is None or exit_ is None:
        return None
    entries = (entry,)
    nodes = topo.region(entries, exit_)
    if not topo.is_closed(nodes, entries, exit_):
        return None
    return topo.make(f"{dw.name}+{pw}", "separable", entries, exit_, nodes)


def _layer_block(topo: _Topology, ql: QuantLayer) -> Block:
    entry = ql.input_point or topo.point_before(ql.name)
    # a layer whose value is not quantized right away (never with the current
    # placement rules) ends at the next point it determines; else at its own output
    exit_ = ql.output_point or topo.point_after(ql.name) or ql.name
    entries = (entry,) if entry is not None else ()
    nodes = topo.region(entries, exit_) if entries else {ql.name}
    return topo.make(ql.name, "layer", entries, exit_, nodes)
