"""Writing a KerasGraph as a float ONNX model, node by node.

The nodes are emitted directly (no tf2onnx) so that every Keras node's output
is one ONNX tensor named after the node: the exporters then know exactly where
each activation point, kernel and bias lives. The model keeps the Keras input
layout (NHWC); 4-D tensors are transposed to NCHW once for the ONNX
convolutions and pools, and back to NHWC only where the layout shows (Flatten,
Reshape, Dense, the model outputs), so that flattening keeps Keras' order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tinyptq.errors import ModelError
from tinyptq.graph.base import OnnxView
from tinyptq.graph.keras_build import Node

KERAS = "keras"  # channels last, the layout the Keras model has
NCHW = "nchw"  # channels first (4-D tensors only)
_TO_NCHW = (0, 3, 1, 2)
_TO_KERAS = (0, 2, 3, 1)
#: kernel layout change per layer kind: Keras -> ONNX
KERNEL_PERMS = {
    "Conv2D": (3, 2, 0, 1),  # (kh, kw, in, out) -> (out, in, kh, kw)
    "DepthwiseConv2D": (2, 3, 0, 1),  # (kh, kw, in, mult) -> (in, mult, kh, kw)
    "Dense": (0, 1),  # (in, out), read by Gemm / MatMul as is
}


def min_ir_version(opset: int) -> int:
    """The IR version an ONNX model of ``opset`` needs (onnxruntime rejects newer ones)."""
    return max(8, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


class _Emitter:
    """Accumulates ONNX nodes and initializers while walking the Keras nodes."""

    def __init__(self, graph: Any, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, tuple] = {}  # Keras node -> output shape (Keras layout)
        self.out: dict[str, tuple[str, str]] = {}  # Keras node -> (ONNX tensor, layout)
        self.kernels: dict[str, str] = {}
        self.kernel_perms: dict[str, tuple[int, ...]] = {}
        self.biases: dict[str, str] = {}
        self._layout_cache: dict[tuple[str, str], str] = {}
        self._names: set[str] = set()
        # Keras node names are kept for their own outputs only
        self._reserved = {n.name for n in graph.nodes}
        self._current: str | None = None

    # ------------------------------------------------------------- basics
    def unique(self, base: str) -> str:
        """A tensor / node name not used yet."""
        name, n = base, 1
        while name in self._names or (name in self._reserved and name != self._current):
            name, n = f"{base}_{n}", n + 1
        self._names.add(name)
        return name

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        """Add an initializer and return its name."""
        name = self.unique(name)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        """Add a node with one output (named ``output`` exactly when unused) and return it."""
        output = self.unique(output)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def rank(self, node: str) -> int:
        return len(self.shapes[node])

    def as_layout(self, node: str, layout: str) -> str:
        """The ONNX tensor of Keras node ``node`` in ``layout`` (a cached Transpose when needed)."""
        tensor, have = self.out[node]
        if have == layout or self.rank(node) != 4:
            return tensor
        key = (tensor, layout)
        if key not in self._layout_cache:
            perm = _TO_NCHW if layout == NCHW else _TO_KERAS
            self._layout_cache[key] = self.op("Transpose", [tensor], f"{tensor}__{layout}", perm=list(perm))
        return self._layout_cache[key]

    def onnx_axis(self, node: str, keras_axis: int, layout: str) -> int:
        """A Keras axis of ``node``'s output as an axis of its ONNX tensor in ``layout``."""
        rank = self.rank(node)
        axis = keras_axis % rank
        if layout == NCHW and rank == 4:
            return _TO_NCHW.index(axis)
        return axis

    # ------------------------------------------------------------ emitters
    def emit(self, node: Node) -> None:
        fn = _EMITTERS.get(node.class_name)
        if fn is None:
            raise ModelError(f"cannot write layer '{node.name}' ({node.class_name}) as ONNX")
        fmt = node.config.get("data_format")
        if fmt not in (None, "channels_last"):
            raise ModelError(f"cannot write layer '{node.name}' as ONNX: data_format '{fmt}' (use channels_last)")
        self._current = node.name
        self.out[node.name] = fn(self, node)
        self._current = None

    def spatial_pads(self, node: Node, kernel: tuple, strides: tuple, dilations: tuple) -> dict[str, Any]:
        """ONNX pads of a Keras 'valid' / 'same' window over the node's input."""
        padding = str(node.config.get("padding", "valid")).lower()
        if padding == "valid":
            return {"pads": [0, 0, 0, 0]}
        if padding != "same":
            raise ModelError(f"cannot write layer '{node.name}' as ONNX: padding '{padding}'")
        sizes = self.shapes[node.inputs[0]][1:3]
        if any(s is None for s in sizes):
            return {"auto_pad": "SAME_UPPER"}  # TF's rule: the odd pixel goes to the end
        begin, end = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            begin.append(total // 2)
            end.append(total - total // 2)
        return {"pads": begin + end}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


# ------------------------------------------------------------ per class
def _input(e: _Emitter, node: Node) -> tuple[str, str]:
    shape = ["N", *e.shapes[node.name][1:]]
    shape = [d if d is not None else f"d{i}" for i, d in enumerate(shape)]
    e.unique(node.name)
    e.inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, shape))
    return node.name, KERAS


def _conv(e: _Emitter, node: Node) -> tuple[str, str]:
    cfg, kind = node.config, node.class_name
    x = e.as_layout(node.inputs[0], NCHW)
    kernel = node.weights[0]
    perm = KERNEL_PERMS[kind]
    w = e.const(f"{node.name}/kernel", np.transpose(kernel, perm))
    e.kernels[node.name], e.kernel_perms[node.name] = w, perm
    ksize, strides = kernel.shape[:2], _pair(cfg.get("strides", 1))
    dilations = _pair(cfg.get("dilation_rate", 1))
    if kind == "DepthwiseConv2D":
        group = kernel.shape[2]
        if kernel.shape[3] != 1:  # (in, mult, kh, kw) -> (in * mult, 1, kh, kw)
            shape = e.const(f"{node.name}/kernel_shape", [group * kernel.shape[3], 1, *ksize], np.int64)
            w = e.op("Reshape", [w, shape], f"{node.name}/kernel_grouped")
    else:
        group = int(cfg.get("groups", 1) or 1)
    inputs = [x, w]
    if cfg.get("use_bias", True) and len(node.weights) > 1:
        inputs.append(e.const(f"{node.name}/bias", node.weights[1]))
        e.biases[node.name] = inputs[-1]
    attrs = e.spatial_pads(node, ksize, strides, dilations)
    out = e.op(
        "Conv", inputs, node.name, kernel_shape=list(ksize), strides=list(strides),
        dilations=list(dilations), group=int(group), **attrs,
    )
    return out, NCHW


def _dense(e: _Emitter, node: Node) -> tuple[str, str]:
    x = e.as_layout(node.inputs[0], KERAS)
    w = e.const(f"{node.name}/kernel", node.weights[0])
    e.kernels[node.name], e.kernel_perms[node.name] = w, KERNEL_PERMS["Dense"]
    bias = None
    if node.config.get("use_bias", True) and len(node.weights) > 1:
        bias = e.const(f"{node.name}/bias", node.weights[1])
        e.biases[node.name] = bias
    if e.rank(node.inputs[0]) == 2:
        return e.op("Gemm", [x, w] + ([bias] if bias else []), node.name), KERAS
    if bias is None:
        return e.op("MatMul", [x, w], node.name), KERAS
    y = e.op("MatMul", [x, w], f"{node.name}/matmul")
    return e.op("Add", [y, bias], node.name), KERAS


def _batch_norm(e: _Emitter, node: Node) -> tuple[str, str]:
    axis = node.config.get("axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    rank = e.rank(node.inputs[0])
    if not isinstance(axis, int) or axis % rank != rank - 1:
        raise ModelError(f"cannot write layer '{node.name}' as ONNX: batch norm over axis {axis}")
    p = e.graph.bn_params(node.name)
    # as TF's inference batch norm: x * (gamma / sqrt(var + eps)) + (beta - mean * that)
    mult = (p["gamma"] / np.sqrt(p["var"] + np.float32(p["epsilon"]))).astype(np.float32)
    shift = (p["beta"] - p["mean"] * mult).astype(np.float32)
    tensor, layout = e.out[node.inputs[0]]
    if layout == NCHW and rank == 4:
        mult, shift = mult.reshape(-1, 1, 1), shift.reshape(-1, 1, 1)
    y = e.op("Mul", [tensor, e.const(f"{node.name}/multiplier", mult)], f"{node.name}/scaled")
    return e.op("Add", [y, e.const(f"{node.name}/offset", shift)], node.name), layout


def _activation_fn(e: _Emitter, node: Node, tensor: str, layout: str, name: str) -> str:
    act = node.config.get("activation", "linear")
    act = act.get("class_name", act) if isinstance(act, dict) else act
    act = str(act).lower()
    simple = {
        "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "elu": "Elu", "selu": "Selu",
        "softplus": "Softplus", "softsign": "Softsign", "exponential": "Exp",
    }
    if act == "linear":
        return e.op("Identity", [tensor], name)
    if act in simple:
        return e.op(simple[act], [tensor], name)
    if act == "relu6":
        return _clip(e, tensor, 0.0, 6.0, name)
    if act == "softmax":
        return e.op("Softmax", [tensor], name, axis=e.onnx_axis(node.inputs[0], -1, layout))
    if act in ("swish", "silu"):
        sig = e.op("Sigmoid", [tensor], f"{name}/sigmoid")
        return e.op("Mul", [tensor, sig], name)
    if act == "hard_sigmoid":
        return e.op("HardSigmoid", [tensor], name, alpha=0.2, beta=0.5)
    raise ModelError(f"cannot write layer '{node.name}' as ONNX: activation '{act}'")


def _clip(e: _Emitter, tensor: str, lo: float | None, hi: float | None, name: str) -> str:
    lo_name = e.const(f"{name}/min", lo) if lo is not None else ""
    hi_name = e.const(f"{name}/max", hi) if hi is not None else ""
    return e.op("Clip", [tensor, lo_name, hi_name], name)


def _activation(e: _Emitter, node: Node) -> tuple[str, str]:
    tensor, layout = e.out[node.inputs[0]]
    return _activation_fn(e, node, tensor, layout, node.name), layout


def _relu(e: _Emitter, node: Node) -> tuple[str, str]:
    cfg, name = node.config, node.name
    tensor, layout = e.out[node.inputs[0]]
    slope = float(cfg.get("negative_slope") or 0.0)
    threshold = float(cfg.get("threshold") or 0.0)
    max_value = cfg.get("max_value")
    last = name if max_value is None else f"{name}/unclipped"
    if threshold != 0.0:
        # Keras: x where x > threshold else 0, minus slope * relu(threshold - x)
        t = e.const(f"{name}/threshold", threshold)
        keep = e.op("Greater", [tensor, t], f"{name}/above")
        zero = e.const(f"{name}/zero", 0.0)
        if slope:
            y = e.op("Where", [keep, tensor, zero], f"{name}/kept")
            below = e.op("Relu", [e.op("Sub", [t, tensor], f"{name}/under")], f"{name}/below")
            leak = e.op("Mul", [below, e.const(f"{name}/slope", slope)], f"{name}/leak")
            y = e.op("Sub", [y, leak], last)
        else:
            y = e.op("Where", [keep, tensor, zero], last)
    elif slope:
        y = e.op("LeakyRelu", [tensor], last, alpha=slope)
    else:
        y = e.op("Relu", [tensor], last)
    if max_value is not None:
        y = _clip(e, y, None, float(max_value), name)
    return y, layout


def _softmax(e: _Emitter, node: Node) -> tuple[str, str]:
    tensor, layout = e.out[node.inputs[0]]
    axis = node.config.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ModelError(f"cannot write layer '{node.name}' as ONNX: softmax over axes {axis}")
        axis = axis[0]
    return e.op("Softmax", [tensor], node.name, axis=e.onnx_axis(node.inputs[0], axis, layout)), layout


def _merge_inputs(e: _Emitter, node: Node) -> tuple[list[str], str]:
    """The inputs of a merge layer in one common layout (NCHW when any has it)."""
    layouts = {e.out[i][1] for i in node.inputs if e.rank(i) == 4}
    layout = NCHW if NCHW in layouts else KERAS
    return [e.as_layout(i, layout) for i in node.inputs], layout


def _chain(op_type: str) -> Callable[[_Emitter, Node], tuple[str, str]]:
    def emit(e: _Emitter, node: Node) -> tuple[str, str]:
        xs, layout = _merge_inputs(e, node)
        y = xs[0]
        for k, x in enumerate(xs[1:], start=1):  # left to right, as Keras adds them
            y = e.op(op_type, [y, x], node.name if k == len(xs) - 1 else f"{node.name}/{k}")
        return y, layout

    return emit


def _average(e: _Emitter, node: Node) -> tuple[str, str]:
    xs, layout = _merge_inputs(e, node)
    y = xs[0]
    for k, x in enumerate(xs[1:], start=1):
        y = e.op("Add", [y, x], f"{node.name}/{k}")
    return e.op("Div", [y, e.const(f"{node.name}/count", float(len(xs)))], node.name), layout


def _concat(e: _Emitter, node: Node) -> tuple[str, str]:
    xs, layout = _merge_inputs(e, node)
    axis = e.onnx_axis(node.inputs[0], int(node.config.get("axis", -1)), layout)
    return e.op("Concat", xs, node.name, axis=axis), layout


def _pool(op_type: str) -> Callable[[_Emitter, Node], tuple[str, str]]:
    def emit(e: _Emitter, node: Node) -> tuple[str, str]:
        x = e.as_layout(node.inputs[0], NCHW)
        pool = _pair(node.config.get("pool_size", 2))
        strides = _pair(node.config.get("strides") or pool)
        attrs = e.spatial_pads(node, pool, strides, (1, 1))
        if op_type == "AveragePool":
            attrs["count_include_pad"] = 0  # TF averages over the valid pixels only
        return e.op(op_type, [x], node.name, kernel_shape=list(pool), strides=list(strides), **attrs), NCHW

    return emit


def _global_pool(op_type: str) -> Callable[[_Emitter, Node], tuple[str, str]]:
    def emit(e: _Emitter, node: Node) -> tuple[str, str]:
        x = e.as_layout(node.inputs[0], NCHW)
        if node.config.get("keepdims"):
            return e.op(op_type, [x], node.name), NCHW
        y = e.op(op_type, [x], f"{node.name}/pooled")
        return e.op("Flatten", [y], node.name, axis=1), KERAS

    return emit


def _flatten(e: _Emitter, node: Node) -> tuple[str, str]:
    x = e.as_layout(node.inputs[0], KERAS)
    return e.op("Flatten", [x], node.name, axis=1), KERAS


def _reshape(e: _Emitter, node: Node) -> tuple[str, str]:
    x = e.as_layout(node.inputs[0], KERAS)
    target = [int(d) for d in node.config["target_shape"]]
    shape = e.const(f"{node.name}/shape", [0, *target], np.int64)  # 0: keep the batch size
    return e.op("Reshape", [x, shape], node.name), KERAS


def _identity(e: _Emitter, node: Node) -> tuple[str, str]:
    tensor, layout = e.out[node.inputs[0]]
    return e.op("Identity", [tensor], node.name), layout


def _zero_pad(e: _Emitter, node: Node) -> tuple[str, str]:
    x = e.as_layout(node.inputs[0], NCHW)
    padding = node.config.get("padding", 1)
    if isinstance(padding, int):
        (top, bottom), (left, right) = (padding, padding), (padding, padding)
    else:
        rows, cols = padding
        top, bottom = _pair(rows)
        left, right = _pair(cols)
    pads = e.const(f"{node.name}/pads", [0, 0, top, left, 0, 0, bottom, right], np.int64)
    return e.op("Pad", [x, pads], node.name, mode="constant"), NCHW


_EMITTERS: dict[str, Callable[[_Emitter, Node], tuple[str, str]]] = {
    "InputLayer": _input,
    "Conv2D": _conv,
    "DepthwiseConv2D": _conv,
    "Dense": _dense,
    "BatchNormalization": _batch_norm,
    "Activation": _activation,
    "ReLU": _relu,
    "Softmax": _softmax,
    "Add": _chain("Add"),
    "Subtract": _chain("Sub"),
    "Multiply": _chain("Mul"),
    "Average": _average,
    "Concatenate": _concat,
    "AveragePooling2D": _pool("AveragePool"),
    "MaxPooling2D": _pool("MaxPool"),
    "GlobalAveragePooling2D": _global_pool("GlobalAveragePool"),
    "GlobalMaxPooling2D": _global_pool("GlobalMaxPool"),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Dropout": _identity,
    "SpatialDropout2D": _identity,
    "ZeroPadding2D": _zero_pad,
}


def keras_graph_to_onnx(graph: Any, opset: int = 17) -> OnnxView:
    """A KerasGraph as a float ONNX model taking the Keras input layout (see OnnxView)."""
    if opset < 13:
        raise ModelError(f"ONNX opset {opset} is too old: use 13 or newer")
    model = graph.float_model()
    emitter = _Emitter(graph, opset)
    for layer in model.layers:
        shape = layer.output_shape
        emitter.shapes[layer.name] = tuple(shape[0] if isinstance(shape, list) else shape)
    for node in graph.nodes:
        if node.name in emitter.shapes:  # nodes that feed no output are not computed
            emitter.emit(node)
    outputs = []
    for name in graph.output_names:
        tensor = emitter.as_layout(name, KERAS)
        dims = ["N", *emitter.shapes[name][1:]]
        dims = [d if d is not None else f"{tensor}_d{i}" for i, d in enumerate(dims)]
        outputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, dims))
    onnx_graph = helper.make_graph(emitter.nodes, graph.name, emitter.inputs, outputs, emitter.inits)
    proto = helper.make_model(
        onnx_graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tinyptq"
    )
    proto.ir_version = min_ir_version(opset)
    onnx.checker.check_model(proto)
    tensors = {p.name: emitter.out[p.name][0] for p in graph.act_points() if p.name in emitter.out}
    return OnnxView(proto, tensors, emitter.kernels, emitter.kernel_perms, emitter.biases)
