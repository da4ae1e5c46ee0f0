"""The Keras adapter: a tf_keras functional model as a mutable graph of layer calls.

The model is read once into a list of nodes (class, config, weights, inputs)
and normalized: fused activations are split into their own Activation node and
SeparableConv2D becomes DepthwiseConv2D + 1x1 Conv2D, so that every stage sees
the same few layer kinds. Float and fake-quantized tf_keras models are rebuilt
from the nodes on demand.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tinyptq._tf import keras
from tinyptq.errors import ModelError
from tinyptq.graph import keras_build
from tinyptq.graph.base import ActPoint, KernelLayout, ModelGraph, QuantLayer
from tinyptq.graph.keras_build import Node, build_keras_model, iter_batches
from tinyptq.graph.keras_topology import COMPUTE, normalize, relu_kind, topo_sort
from tinyptq.graph.placement import analyse
from tinyptq.graph.spec import LayerSpec, same_pads


class KerasGraph(ModelGraph):
    """A tf_keras functional model as tinyptq's mutable graph."""

    def __init__(self, nodes: list[Node], outputs: list[str], name: str = "model") -> None:
        self._nodes = {n.name: n for n in topo_sort(nodes)}
        self._outputs = list(outputs)
        self.name = name
        self._version = 0
        self._analysis: tuple[int, Any] | None = None
        self._models: dict[tuple, Any] = {}

    # ------------------------------------------------------------- creation
    @classmethod
    def from_keras(cls, model: Any) -> KerasGraph:
        """Read a loaded tf_keras model (functional or sequential)."""
        if isinstance(model, keras.Sequential):
            model = _sequential_to_functional(model)
        if not hasattr(model, "get_config") or not hasattr(model, "layers"):
            raise ModelError(f"not a Keras model: {type(model).__name__}")
        try:
            config = model.get_config()
        except NotImplementedError:
            raise ModelError(
                f"model '{model.name}' is a subclassed Keras model; save it as a functional model"
            ) from None
        if len(config.get("input_layers", [])) != 1:
            raise ModelError(f"model '{model.name}' must have exactly one input")
        nodes = [_node_from_config(model, entry) for entry in config["layers"]]
        nodes, outputs = normalize(nodes, [o[0] for o in config["output_layers"]])
        return cls(nodes, outputs, name=model.name)

    @property
    def nodes(self) -> list[Node]:
        """The nodes in topological order (read-only use)."""
        return list(self._nodes.values())

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no layer named '{name}'") from None

    # ------------------------------------------------------------ structure
    @property
    def input_shape(self) -> tuple[int | None, ...]:
        inp = next(n for n in self._nodes.values() if n.class_name == "InputLayer")
        return tuple(inp.config["batch_input_shape"])

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _analyse(self) -> Any:
        if self._analysis is None or self._analysis[0] != self._version:
            names = self.node_names()
            kinds = {n: self.op_type(n) for n in names}
            inputs = {n: self.inputs_of(n) for n in names}
            self._analysis = (self._version, analyse(names, kinds, inputs, self._outputs, self._channel_axis))
        return self._analysis[1]

    def quant_layers(self) -> list[QuantLayer]:
        return list(self._analyse().layers)

    def act_points(self) -> list[ActPoint]:
        return list(self._analyse().points)

    def consumers(self, name: str) -> list[str]:
        """Names of the nodes that read ``name``'s output."""
        return [n.name for n in self._nodes.values() if name in n.inputs]

    # -------------------------------------------------------------- weights
    def kernel(self, layer: str) -> np.ndarray:
        return self.node(layer).weights[0].copy()

    def bias(self, layer: str) -> np.ndarray | None:
        node = self.node(layer)
        return node.weights[1].copy() if node.config.get("use_bias") else None

    def set_kernel(self, layer: str, kernel: np.ndarray) -> None:
        node = self.node(layer)
        if kernel.shape != node.weights[0].shape:
            raise ValueError(f"kernel of '{layer}' has shape {node.weights[0].shape}, not {kernel.shape}")
        node.weights[0] = np.asarray(kernel, np.float32).copy()
        self._touch()

    def set_bias(self, layer: str, bias: np.ndarray) -> None:
        node = self.node(layer)
        bias = np.asarray(bias, np.float32).copy()
        if node.config.get("use_bias"):
            node.weights[1] = bias
        else:
            node.config["use_bias"] = True
            node.weights.insert(1, bias)
        self._touch()

    def bn_params(self, name: str) -> dict[str, np.ndarray]:
        """gamma, beta, mean, var and epsilon of a BatchNormalization node."""
        node = self.node(name)
        cfg, w = node.config, list(node.weights)
        n = w[-1].shape[0]
        gamma = w.pop(0) if cfg.get("scale", True) else np.ones(n, np.float32)
        beta = w.pop(0) if cfg.get("center", True) else np.zeros(n, np.float32)
        return {"gamma": gamma, "beta": beta, "mean": w[0], "var": w[1], "epsilon": cfg["epsilon"]}

    def remove_node(self, name: str) -> None:
        """Drop a single-input node, wiring its consumers to its input."""
        node = self._nodes.pop(name)
        (src,) = node.inputs
        for other in self._nodes.values():
            other.inputs = [src if i == name else i for i in other.inputs]
        self._outputs = [src if o == name else o for o in self._outputs]
        self._touch()

    def _touch(self) -> None:
        self._version += 1
        self._models.clear()

    # ------------------------------------------------------------ execution
    def float_model(self, outputs: Sequence[str] | None = None) -> Any:
        """The float tf_keras model with the given outputs (cached until weights change)."""
        outputs = tuple(outputs or self._outputs)
        key = ("float", outputs)
        if key not in self._models:
            self._models[key] = build_keras_model(self.nodes, outputs, name=f"{self.name}_float")
        return self._models[key]

    def iterate(
        self, x: np.ndarray, outputs: Sequence[str], batch_size: int = 128
    ) -> Iterator[dict[str, np.ndarray]]:
        self.check_input(x)
        outputs = list(outputs)
        model = self.float_model(outputs)
        for batch in iter_batches(model, x, batch_size):
            yield dict(zip(outputs, batch, strict=True))

    def to_keras(self) -> Any:
        """A fresh float tf_keras model of the graph as it is now."""
        return build_keras_model(self.nodes, self._outputs, name=self.name)

    def copy(self) -> KerasGraph:
        clone = KerasGraph.__new__(KerasGraph)
        clone._nodes = {k: copy.deepcopy(v) for k, v in self._nodes.items()}
        clone._outputs = list(self._outputs)
        clone.name = self.name
        clone._version = 0
        clone._analysis = None
        clone._models = {}
        return clone

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n in self._nodes.values():
            h.update(repr((n.name, n.class_name, sorted(n.config.items()), n.inputs)).encode())
            for w in n.weights:
                h.update(np.ascontiguousarray(w).tobytes())
        h.update(repr(self._outputs).encode())
        return h.hexdigest()

    def param_count(self) -> int:
        return int(sum(w.size for n in self._nodes.values() for w in n.weights))

    def layer_macs(self) -> dict[str, int]:
        # every output position of a conv / depthwise / dense layer uses each kernel value once
        model = self.float_model()
        macs = {}
        for layer in self.quant_layers():
            shape = model.get_layer(layer.name).output_shape
            positions = int(np.prod([d for d in shape[1:-1]], dtype=np.int64)) if len(shape) > 2 else 1
            macs[layer.name] = positions * int(self.node(layer.name).weights[0].size)
        return macs

    def to_onnx(self, opset: int = 17) -> Any:
        """The graph as it is now as a float ONNX model: an OnnxView (see graph.base)."""
        from tinyptq.graph.keras_onnx import keras_graph_to_onnx

        return keras_graph_to_onnx(self, opset)

    # ------------------------------------------------ framework-neutral queries
    def node_names(self) -> list[str]:
        return list(self._nodes)

    def op_type(self, name: str) -> str:
        node = self.node(name)
        cls = node.class_name
        if cls in _NEUTRAL_OPS:
            return _NEUTRAL_OPS[cls]
        relu = relu_kind(node)
        if relu is not None:
            return relu
        if cls == "Activation":
            act = node.config.get("activation")
            return "identity" if act in (None, "linear") else "softmax" if act == "softmax" else "other"
        return "other"

    def inputs_of(self, name: str) -> list[str]:
        return list(self.node(name).inputs)

    def batch_norm_names(self) -> list[str]:
        return [n.name for n in self._nodes.values() if n.class_name == "BatchNormalization"]

    def kernel_layout(self, layer: str) -> KernelLayout:
        kind = self.quant_layer(layer).kind
        if kind == "depthwise":  # (kh, kw, in, multiplier): output channel c * multiplier + m
            return KernelLayout((2, 3, 0, 1), self.node(layer).weights[0].shape[2], merge_first_two=True)
        if kind == "dense":  # (in, out)
            return KernelLayout((1, 0))
        groups = int(self.node(layer).config.get("groups", 1) or 1)
        return KernelLayout((3, 2, 0, 1), groups)  # conv (kh, kw, in // groups, out)

    def tensor_channel_axis(self, name: str) -> int:
        return -1  # Keras models here are channels-last

    def _channel_axis(self, layer: str) -> int | None:
        """Output-channel axis of the layer's kernel (None: per-tensor only)."""
        node = self.node(layer)
        kernel = node.weights[0]
        if node.class_name == "DepthwiseConv2D":
            # (kh, kw, in, multiplier): one output channel per input channel only if multiplier is 1
            return 2 if kernel.shape[3] == 1 else None
        return kernel.ndim - 1

    def layer_spec(self, name: str) -> LayerSpec:
        node = self.node(name)
        kind = COMPUTE.get(node.class_name)
        if kind is None:
            raise KeyError(f"'{name}' ({node.class_name}) is not a quantizable layer")
        layout = self.kernel_layout(name)
        kernel = layout.to_canonical(node.weights[0]).astype(np.float32)
        bias = self.bias(name)
        if kind == "dense":
            return LayerSpec(name, kind, kernel, bias)
        cfg = node.config
        if cfg.get("data_format") not in (None, "channels_last"):
            raise ModelError(f"unsupported layer '{name}' ({node.class_name} with data_format={cfg['data_format']})")
        strides = tuple(int(s) for s in cfg.get("strides", (1, 1)))
        dilations = tuple(int(d) for d in cfg.get("dilation_rate", (1, 1)))
        taps = kernel.shape[2:]
        same = cfg.get("padding", "valid") == "same"
        if same:
            size = self.float_model().get_layer(name).input_shape[1:-1]
            known = None not in size  # a free spatial size: the executor pads as TF's "SAME" does
            pads = tuple(same_pads(*a) for a in zip(size, taps, strides, dilations, strict=True)) if known else ()
        elif cfg.get("padding", "valid") == "valid":
            pads = tuple((0, 0) for _ in taps)
        else:
            raise ModelError(f"unsupported layer '{name}' ({node.class_name} with padding={cfg.get('padding')})")
        return LayerSpec(name, kind, kernel, bias, strides, pads, dilations, layout.groups, True, same)

    def node_function(self, name: str) -> Any:
        node = self.node(name)
        if node.class_name == "InputLayer" or node.class_name in COMPUTE:
            raise KeyError(f"'{name}' ({node.class_name}) is run by the executor itself")
        layer = self.float_model().get_layer(name)  # built, with this version's weights
        merge = node.class_name in keras_build.MERGE_LAYERS

        def call(inputs: list[Any]) -> Any:
            return layer(list(inputs) if merge else inputs[0], training=False)

        return call


# ----------------------------------------------------------------- helpers
def _sequential_to_functional(model: Any) -> Any:
    if not model.built:
        raise ModelError(f"sequential model '{model.name}' is not built (no input shape)")
    inp = keras.Input(batch_shape=model.input_shape, name=f"{model.name}_input")
    x = inp
    for layer in model.layers:
        x = layer(x)
    return keras.Model(inp, x, name=model.name)


def _node_from_config(model: Any, entry: dict) -> Node:
    name = entry.get("name") or entry["config"]["name"]
    calls = entry.get("inbound_nodes") or []
    if len(calls) > 1:
        raise ModelError(f"layer '{name}' is called more than once (shared layers are not supported)")
    inputs = []
    for call in calls:
        if not isinstance(call, list):
            raise ModelError(f"unsupported layer '{name}' ({entry['class_name']}): unusual call structure")
        for inbound in call:
            src, node_index, tensor_index = inbound[0], inbound[1], inbound[2]
            if node_index != 0 or tensor_index != 0:
                raise ModelError(f"layer '{name}' reads a multi-output or shared layer '{src}'")
            inputs.append(src)
    weights = [np.asarray(w, np.float32) for w in model.get_layer(name).get_weights()]
    return Node(name, entry["class_name"], copy.deepcopy(entry["config"]), inputs, weights)


# Keras layer classes -> framework-neutral operation types (ModelGraph.op_type)
_NEUTRAL_OPS = {
    **COMPUTE,
    "InputLayer": "input",
    "BatchNormalization": "batch_norm",
    "Softmax": "softmax",
    "Dropout": "dropout",
    "SpatialDropout2D": "dropout",
    "Flatten": "flatten",
    "Reshape": "reshape",
    "MaxPooling2D": "max_pool",
    "GlobalMaxPooling2D": "max_pool",
    "AveragePooling2D": "avg_pool",
    "GlobalAveragePooling2D": "global_avg_pool",
    "ZeroPadding2D": "pad",
    "Add": "add",
    "Concatenate": "concat",
}


__all__ = ["KerasGraph", "keras_build"]
