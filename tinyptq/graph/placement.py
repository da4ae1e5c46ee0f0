"""Where a deployed integer model quantizes tensors: one rule for every adapter.

Works on framework-neutral operation types (``ModelGraph.op_type``) only.
Placement follows what inference engines do: conv -> BN -> ReLU is one fused
kernel quantized once, after the ReLU (likewise Add -> ReLU); shape-only
operations (flatten, reshape, transpose, dropout, identity, max pooling, zero
padding) keep their input's grid; every other operation's output is requantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tinyptq.graph.base import ActPoint, QuantLayer

LAYER_KINDS = frozenset({"conv", "depthwise", "dense"})
PASS_THROUGH = frozenset({"identity", "dropout", "flatten", "reshape", "transpose", "max_pool", "pad"})


@dataclass(frozen=True)
class Analysis:
    """Quantizable layers and activation points of a graph."""

    layers: tuple[QuantLayer, ...]
    points: tuple[ActPoint, ...]


def analyse(
    order: list[str],
    kind: dict[str, str],
    inputs: dict[str, list[str]],
    outputs: list[str],
    channel_axis: Callable[[str], int | None],
) -> Analysis:
    """Find quantizable layers, their fused chains and the activation points.

    ``order`` lists node names topologically (the model input first), ``kind``
    gives their neutral operation types, ``inputs`` their data inputs and
    ``channel_axis`` the output-channel axis of a layer's kernel (None: per
    tensor only).
    """
    consumers: dict[str, list[str]] = {n: [] for n in order}
    for n in order:
        for i in inputs[n]:
            consumers[i].append(n)

    def fused_into(name: str) -> bool:
        """Whether the node's output is only read by a follower fused into it."""
        cons = consumers[name]
        if len(cons) != 1 or name in outputs:
            return False
        nxt, k = cons[0], kind[name]
        if kind[nxt] == "batch_norm":
            return k in LAYER_KINDS
        bn_after_layer = k == "batch_norm" and kind[inputs[name][0]] in LAYER_KINDS
        return kind[nxt] in ("relu", "relu6") and (k in LAYER_KINDS or k == "add" or bn_after_layer)

    points: dict[str, ActPoint] = {}
    owner_of: dict[str, str] = {}
    for n in order:
        if kind[n] in LAYER_KINDS:
            owner_of[n] = n
        elif inputs[n] and inputs[n][0] in owner_of and fused_into(inputs[n][0]):
            owner_of[n] = owner_of[inputs[n][0]]
        if kind[n] in PASS_THROUGH or fused_into(n):
            continue
        points[n] = ActPoint(n, owner_of.get(n), is_input=kind[n] == "input", is_output=n in outputs)

    layers = []
    for n in order:
        if kind[n] not in LAYER_KINDS:
            continue
        src = inputs[n][0]
        while src not in points and kind[src] in PASS_THROUGH:
            src = inputs[src][0]
        bn = act = None
        cur = n
        while fused_into(cur):
            cur = consumers[cur][0]
            if kind[cur] == "batch_norm":
                bn = cur
            else:
                act = kind[cur]
        layers.append(
            QuantLayer(
                name=n,
                kind=kind[n],
                channel_axis=channel_axis(n),
                input_point=src if src in points else None,
                output_point=cur if cur in points else None,
                bn=bn,
                activation=act,
            )
        )
    return Analysis(tuple(layers), tuple(points.values()))
