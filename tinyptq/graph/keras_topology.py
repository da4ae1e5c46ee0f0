"""Which layers are quantizable and where a deployed integer model quantizes tensors.

Placement follows what inference engines do: conv -> BN -> ReLU is one fused
kernel quantized once, after the ReLU; shape-only layers (Flatten, Reshape,
Dropout, max pooling, zero padding) keep their input's grid; every other layer's
output is requantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyptq.errors import ModelError
from tinyptq.graph.base import ActPoint, QuantLayer
from tinyptq.graph.keras_build import Node

COMPUTE = {"Conv2D": "conv", "DepthwiseConv2D": "depthwise", "Dense": "dense"}
PASS_THROUGH = {
    "Flatten",
    "Reshape",
    "Dropout",
    "SpatialDropout2D",
    "MaxPooling2D",
    "GlobalMaxPooling2D",
    "ZeroPadding2D",
}
OTHER = {
    "InputLayer",
    "BatchNormalization",
    "Activation",
    "ReLU",
    "Softmax",
    "Add",
    "Concatenate",
    "Multiply",
    "Subtract",
    "Average",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
}
SUPPORTED = set(COMPUTE) | PASS_THROUGH | OTHER | {"SeparableConv2D"}
_ACTIVATION_HOSTS = set(COMPUTE) | {"SeparableConv2D"}


@dataclass(frozen=True)
class Analysis:
    """Quantizable layers and activation points of a node list."""

    layers: tuple[QuantLayer, ...]
    points: tuple[ActPoint, ...]


def topo_sort(nodes: list[Node]) -> list[Node]:
    """Nodes ordered so that every node comes after its inputs (stable)."""
    by_name = {n.name: n for n in nodes}
    done: set[str] = set()
    order: list[Node] = []
    for start in nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node.name in done:
                continue
            if expanded:
                done.add(node.name)
                order.append(node)
                continue
            stack.append((node, True))
            for i in reversed(node.inputs):
                if i not in by_name:
                    raise ModelError(f"layer '{node.name}' reads unknown layer '{i}'")
                if i not in done:
                    stack.append((by_name[i], False))
    return order


def relu_kind(node: Node) -> str | None:
    """'relu' / 'relu6' when the node is a plain ReLU or ReLU6 activation, else None."""
    cfg = node.config
    if node.class_name == "Activation" and cfg.get("activation") in ("relu", "relu6"):
        return cfg["activation"]
    if node.class_name == "ReLU":
        if float(cfg.get("negative_slope") or 0) != 0 or float(cfg.get("threshold") or 0) != 0:
            return None
        max_value = cfg.get("max_value")
        if max_value is None:
            return "relu"
        return "relu6" if float(max_value) == 6.0 else None
    return None


def normalize(nodes: list[Node], outputs: list[str]) -> tuple[list[Node], list[str]]:
    """Check layer types, split fused activations and separable convolutions.

    Nodes must be in topological order; consumers of a layer whose activation
    is split off (and the model outputs) are rewired to the new Activation node.
    """
    expanded: list[Node] = []
    for node in nodes:
        if node.class_name not in SUPPORTED:
            raise ModelError(
                f"unsupported layer '{node.name}' ({node.class_name}); supported: "
                + ", ".join(sorted(SUPPORTED))
            )
        expanded.extend(_split_separable(node) if node.class_name == "SeparableConv2D" else [node])
    result: list[Node] = []
    renames: dict[str, str] = {}
    for node in expanded:
        node.inputs = [renames.get(i, i) for i in node.inputs]
        result.append(node)
        act = node.config.get("activation")
        if node.class_name in _ACTIVATION_HOSTS and act not in (None, "linear"):
            node.config["activation"] = "linear"
            name = f"{node.name}_act"
            cfg = {"name": name, "activation": act, "trainable": False, "dtype": "float32"}
            result.append(Node(name, "Activation", cfg, [node.name]))
            renames[node.name] = name
    return result, [renames.get(o, o) for o in outputs]


def _split_separable(node: Node) -> list[Node]:
    cfg = node.config
    dw_w, pw_w = node.weights[0], node.weights[1]
    bias = node.weights[2:] if cfg.get("use_bias", True) else []
    dw_cfg = {
        "name": f"{node.name}_dw",
        "kernel_size": cfg["kernel_size"],
        "strides": cfg["strides"],
        "padding": cfg["padding"],
        "depth_multiplier": cfg.get("depth_multiplier", 1),
        "dilation_rate": cfg.get("dilation_rate", (1, 1)),
        "data_format": cfg.get("data_format"),
        "activation": "linear",
        "use_bias": False,
        "dtype": cfg.get("dtype", "float32"),
    }
    pw_cfg = {
        "name": node.name,
        "filters": cfg["filters"],
        "kernel_size": (1, 1),
        "strides": (1, 1),
        "padding": "valid",
        "data_format": cfg.get("data_format"),
        "activation": cfg.get("activation", "linear"),
        "use_bias": bool(bias),
        "dtype": cfg.get("dtype", "float32"),
    }
    dw = Node(f"{node.name}_dw", "DepthwiseConv2D", dw_cfg, list(node.inputs), [dw_w])
    pw = Node(node.name, "Conv2D", pw_cfg, [dw.name], [pw_w, *bias])
    return [dw, pw]


def analyse(nodes: list[Node], outputs: list[str]) -> Analysis:
    """Find quantizable layers, their fused chains and the activation points."""
    consumers: dict[str, list[Node]] = {n.name: [] for n in nodes}
    for n in nodes:
        for i in n.inputs:
            consumers[i].append(n)
    by_name = {n.name: n for n in nodes}

    def fused_into(node: Node) -> bool:
        """Whether the node's output is only read by a follower fused into it."""
        cons = consumers[node.name]
        if len(cons) != 1 or node.name in outputs:
            return False
        nxt = cons[0]
        if nxt.class_name == "BatchNormalization":
            return node.class_name in COMPUTE
        return relu_kind(nxt) is not None and (
            node.class_name in {*COMPUTE, "Add"} or _is_bn_after_compute(node, by_name)
        )

    points: dict[str, ActPoint] = {}
    owner_of: dict[str, str] = {}
    for n in nodes:
        if n.class_name in COMPUTE:
            owner_of[n.name] = n.name
        elif n.inputs and n.inputs[0] in owner_of and fused_into(by_name[n.inputs[0]]):
            owner_of[n.name] = owner_of[n.inputs[0]]
        if n.class_name in PASS_THROUGH or fused_into(n):
            continue
        points[n.name] = ActPoint(
            n.name,
            owner_of.get(n.name),
            is_input=n.class_name == "InputLayer",
            is_output=n.name in outputs,
        )
    layers = tuple(_quant_layer(n, by_name, consumers, points, fused_into) for n in nodes if n.class_name in COMPUTE)
    return Analysis(layers, tuple(points.values()))


def _is_bn_after_compute(node: Node, by_name: dict[str, Node]) -> bool:
    return node.class_name == "BatchNormalization" and by_name[node.inputs[0]].class_name in COMPUTE


def _quant_layer(node, by_name, consumers, points, fused_into) -> QuantLayer:
    # input point: walk back through shape-only layers
    src = node.inputs[0]
    while src not in points and by_name[src].class_name in PASS_THROUGH:
        src = by_name[src].inputs[0]
    bn = act = None
    cur = node
    while fused_into(cur):
        nxt = consumers[cur.name][0]
        if nxt.class_name == "BatchNormalization":
            bn = nxt.name
        else:
            act = relu_kind(nxt)
        cur = nxt
    return QuantLayer(
        name=node.name,
        kind=COMPUTE[node.class_name],
        channel_axis=_channel_axis(node),
        input_point=src if src in points else None,
        output_point=cur.name if cur.name in points else None,
        bn=bn,
        activation=act,
    )


def _channel_axis(node: Node) -> int | None:
    kernel = node.weights[0]
    if node.class_name == "DepthwiseConv2D":
        # (kh, kw, in, multiplier): one output channel per input channel only if multiplier is 1
        return 2 if kernel.shape[3] == 1 else None
    return kernel.ndim - 1
