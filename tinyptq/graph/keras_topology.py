"""The Keras layer classes tinyptq reads, and the normalization of a Keras node list.

Which tensors are quantized is decided for every adapter alike, over neutral
operation types, in tinyptq.graph.placement.
"""

from __future__ import annotations

from tinyptq.errors import ModelError
from tinyptq.graph.keras_build import Node

COMPUTE = {"Conv2D": "conv", "DepthwiseConv2D": "depthwise", "Dense": "dense"}
SUPPORTED = set(COMPUTE) | {
    "InputLayer",
    "SeparableConv2D",  # split into depthwise + pointwise by normalize
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
    "Flatten",
    "Reshape",
    "Dropout",
    "SpatialDropout2D",
    "MaxPooling2D",
    "GlobalMaxPooling2D",
    "ZeroPadding2D",
}
_ACTIVATION_HOSTS = set(COMPUTE) | {"SeparableConv2D"}


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
