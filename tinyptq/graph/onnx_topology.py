"""Reading an ONNX model into tinyptq's node list, and where its tensors are quantized.

A model is read once into single-output nodes over named tensors plus a dict
of initializers, and normalized so that the stages see the same few layer
kinds as with Keras: Constant nodes become initializers, Identity / Dropout
disappear, MatMul + Add(bias) becomes one dense layer (a MatMul node with the
bias as third input, written back as MatMul + Add), Gemm's alpha / beta are
folded into its weights, and a fixed batch dimension is freed.

Quantizer placement follows the Keras adapter (and integer engines): conv ->
BN -> ReLU is quantized once, after the ReLU; Add -> ReLU after the ReLU;
shape-only nodes (Flatten, Reshape, Transpose, max pooling, padding) keep
their input's grid; everything else is requantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import AttributeProto, ModelProto, ValueInfoProto, helper, numpy_helper

from tinyptq.errors import ModelError

# ONNX op -> neutral operation type (Conv, Clip and Pad are decided per node)
OP_TYPES = {
    "Conv": "conv",
    "Gemm": "dense",
    "MatMul": "dense",
    "BatchNormalization": "batch_norm",
    "Relu": "relu",
    "Clip": "other",
    "Identity": "identity",
    "Dropout": "dropout",
    "Flatten": "flatten",
    "Reshape": "reshape",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Transpose": "transpose",
    "MaxPool": "max_pool",
    "GlobalMaxPool": "max_pool",
    "AveragePool": "avg_pool",
    "GlobalAveragePool": "global_avg_pool",
    "Pad": "pad",
    "Add": "add",
    "Concat": "concat",
    "Softmax": "softmax",
    "Sub": "other",
    "Mul": "other",
    "Sigmoid": "other",
    "Tanh": "other",
    "LeakyRelu": "other",
}
MIN_OPSET = 11  # Clip with min / max inputs, Round; older models: re-export or upgrade

# the initializer inputs that are parameters of each op (counted by param_count, never shared)
PARAM_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1, 2), "BatchNormalization": (1, 2, 3, 4)}


@dataclass
class OnnxNode:
    """One ONNX node with a single output tensor (a MatMul may carry its bias as a third input)."""

    name: str
    op_type: str
    inputs: list[str]  # tensor names; '' marks an omitted optional input
    output: str
    attrs: list[AttributeProto] = field(default_factory=list)

    def attr(self, name: str, default: Any = None) -> Any:
        """The value of attribute ``name`` (strings decoded), or ``default``."""
        for a in self.attrs:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def set_attr(self, name: str, value: Any) -> None:
        """Set (or add) an attribute."""
        self.attrs = [a for a in self.attrs if a.name != name] + [helper.make_attribute(name, value)]


@dataclass
class OnnxParts:
    """A normalized model: nodes in topological order, initializers, input and outputs."""

    nodes: list[OnnxNode]
    init: dict[str, np.ndarray]
    input: ValueInfoProto  # the one graph input, batch dimension free
    outputs: list[ValueInfoProto]  # graph outputs, batch dimension free
    opsets: dict[str, int]  # domain -> version
    ir_version: int


# ------------------------------------------------------------------ reading
def read_model(model: ModelProto) -> OnnxParts:
    """Check and normalize an ONNX model; ModelError names the first unsupported node."""
    graph = model.graph
    opsets = {o.domain or "": int(o.version) for o in model.opset_import}
    if opsets.get("", 0) < MIN_OPSET:
        raise ModelError(f"ONNX model uses opset {opsets.get('', 0)}; tinyptq needs opset {MIN_OPSET} or later (re-export it)")
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in init]
    if len(inputs) != 1:
        raise ModelError(f"ONNX model has {len(inputs)} inputs; tinyptq needs exactly one")
    inp = _free_batch(inputs[0])
    if inp.type.tensor_type.elem_type != 1:
        raise ModelError(f"ONNX model input '{inp.name}' is not float32")
    nodes, taken = [], {inp.name}
    for proto in graph.node:
        if proto.op_type == "Constant":
            init[proto.output[0]] = _constant_value(proto)
            continue
        node = _check_node(proto, taken)
        taken.add(node.name)
        nodes.append(node)
    outputs = [_free_batch(vi) for vi in graph.output]
    _check_single_outputs(graph, {n.output for n in nodes} | {inp.name})
    nodes = _drop_identities(nodes, {o.name for o in outputs})
    nodes = _fuse_matmul_bias(nodes, init, {o.name for o in outputs})
    for node in nodes:
        _normalize_node(node, init)
    _unshare_params(nodes, init)
    if _fixed_batch(inputs[0]) == 1:
        _free_reshape_batch(nodes, init)
    return OnnxParts(nodes, init, inp, outputs, opsets, int(model.ir_version))


def _check_node(proto: Any, taken: set[str]) -> OnnxNode:
    label = proto.name or proto.output[0]
    if proto.domain not in ("", "ai.onnx") or proto.op_type not in OP_TYPES:
        domain = f"{proto.domain}." if proto.domain not in ("", "ai.onnx") else ""
        raise ModelError(
            f"unsupported ONNX node '{label}' ({domain}{proto.op_type}); supported: {', '.join(sorted(OP_TYPES))}"
        )
    name, i = label, 1
    while name in taken:
        name, i = f"{label}_{i}", i + 1
    return OnnxNode(name, proto.op_type, list(proto.input), proto.output[0], [_copy(a) for a in proto.attribute])


def _copy(attr: AttributeProto) -> AttributeProto:
    new = AttributeProto()
    new.CopyFrom(attr)
    return new


def _constant_value(proto: Any) -> np.ndarray:
    (attr,) = proto.attribute
    value = helper.get_attribute_value(attr)
    if attr.name == "value":
        return numpy_helper.to_array(value)
    if attr.name in ("value_float", "value_floats"):
        return np.asarray(value, np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.asarray(value, np.int64)
    raise ModelError(f"unsupported ONNX Constant '{proto.name or proto.output[0]}' ({attr.name})")


def _check_single_outputs(graph: Any, main_outputs: set[str]) -> None:
    """Extra outputs (BN statistics, MaxPool indices, Dropout masks) must not be read."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for proto in graph.node:
        for extra in proto.output[1:]:
            if extra and extra in used:
                raise ModelError(
                    f"unsupported ONNX node '{proto.name or proto.output[0]}' ({proto.op_type}): "
                    f"its second output '{extra}' is used"
                )


def _fixed_batch(vi: ValueInfoProto) -> int | None:
    dims = vi.type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None


def _free_batch(vi: ValueInfoProto) -> ValueInfoProto:
    """A copy of a value info whose first dimension is a free batch dimension."""
    new = ValueInfoProto()
    new.CopyFrom(vi)
    dims = new.type.tensor_type.shape.dim
    if len(dims) and not dims[0].dim_param:
        dims[0].Clear()
        dims[0].dim_param = "batch"
    return new


def _free_reshape_batch(nodes: list[OnnxNode], init: dict[str, np.ndarray]) -> None:
    """A model exported with batch 1 reshapes to (1, ...): make that 'copy the batch dimension'."""
    for node in nodes:
        if node.op_type == "Reshape" and node.inputs[1] in init and not node.attr("allowzero", 0):
            shape = init[node.inputs[1]]
            if shape.ndim == 1 and shape.size and shape[0] == 1:
                new = shape.copy()
                new[0] = 0
                name = f"{node.name}__shape"
                init[name] = new
                node.inputs[1] = name


def _drop_identities(nodes: list[OnnxNode], graph_outputs: set[str]) -> list[OnnxNode]:
    """Remove Identity and inference-time Dropout nodes (kept where they produce a model output)."""
    renames: dict[str, str] = {}
    kept = []
    for node in nodes:
        node.inputs = [renames.get(i, i) for i in node.inputs]
        if node.op_type in ("Identity", "Dropout") and node.output not in graph_outputs:
            renames[node.output] = node.inputs[0]
        else:
            kept.append(node)
    return kept


def _fuse_matmul_bias(nodes: list[OnnxNode], init: dict[str, np.ndarray], graph_outputs: set[str]) -> list[OnnxNode]:
    """MatMul(x, W) followed by Add(bias) becomes one MatMul node with the bias as third input."""
    readers: dict[str, list[OnnxNode]] = {}
    for node in nodes:
        for i in node.inputs:
            readers.setdefault(i, []).append(node)
    fused: set[str] = set()
    for node in nodes:
        if node.op_type != "MatMul" or node.output in graph_outputs or len(readers.get(node.output, [])) != 1:
            continue
        add = readers[node.output][0]
        if add.op_type != "Add" or node.inputs[1] not in init:
            continue
        other = add.inputs[1] if add.inputs[0] == node.output else add.inputs[0]
        n_out = init[node.inputs[1]].shape[-1]
        if other in init and init[other].size == n_out and init[other].shape[-1] == n_out:
            init[f"{node.name}__bias"] = init[other].reshape(-1).astype(np.float32)
            node.inputs = [node.inputs[0], node.inputs[1], f"{node.name}__bias"]
            node.output = add.output  # consumers and model outputs keep reading the same tensor
            fused.add(add.name)
    return [n for n in nodes if n.name not in fused]


def _normalize_node(node: OnnxNode, init: dict[str, np.ndarray]) -> None:
    """Check that weights are constant; fold Gemm's alpha / beta into them."""
    const = [i for i in PARAM_INPUTS.get(node.op_type, ()) if i < len(node.inputs) and node.inputs[i]]
    for i in const:
        if node.inputs[i] not in init:
            what = "two activations" if node.op_type == "MatMul" else f"a non-constant input '{node.inputs[i]}'"
            raise ModelError(f"unsupported ONNX node '{node.name}' ({node.op_type}): multiplies {what}")
    if node.op_type == "MatMul" and init[node.inputs[1]].ndim != 2:
        raise ModelError(f"unsupported ONNX node '{node.name}' (MatMul): weight of rank {init[node.inputs[1]].ndim}")
    if node.op_type == "BatchNormalization" and node.attr("training_mode", 0):
        raise ModelError(f"unsupported ONNX node '{node.name}' (BatchNormalization in training mode)")
    if node.op_type == "Gemm":
        _normalize_gemm(node, init)


def _normalize_gemm(node: OnnxNode, init: dict[str, np.ndarray]) -> None:
    if node.attr("transA", 0):
        raise ModelError(f"unsupported ONNX node '{node.name}' (Gemm with transA=1)")
    w = init[node.inputs[1]].astype(np.float32) * np.float32(node.attr("alpha", 1.0))
    init[node.inputs[1]] = w
    n_out = w.shape[0] if node.attr("transB", 0) else w.shape[1]
    if len(node.inputs) > 2 and node.inputs[2]:
        c = init[node.inputs[2]].astype(np.float32) * np.float32(node.attr("beta", 1.0))
        if c.size not in (1, n_out) or (c.size == n_out and c.shape[-1] != n_out):
            raise ModelError(f"unsupported ONNX node '{node.name}' (Gemm): bias of shape {c.shape}")
        init[node.inputs[2]] = np.broadcast_to(c.reshape(-1), (n_out,)).copy()
    node.set_attr("alpha", 1.0)
    node.set_attr("beta", 1.0)


def _unshare_params(nodes: list[OnnxNode], init: dict[str, np.ndarray]) -> None:
    """Give every layer its own weight initializers, so that rewriting one never changes another."""
    seen: set[str] = set()
    for node in nodes:
        for i in PARAM_INPUTS.get(node.op_type, ()):
            if i >= len(node.inputs) or not node.inputs[i]:
                continue
            name = node.inputs[i]
            if name in seen:
                new = f"{node.name}__param{i}"
                init[new] = init[name].copy()
                node.inputs[i] = new
            seen.add(node.inputs[i])


# ------------------------------------------------------------------ kinds
def op_kind(node: OnnxNode, init: dict[str, np.ndarray]) -> str:
    """The neutral operation type of a node (ModelGraph.op_type)."""
    if node.op_type == "Conv":
        groups, w = int(node.attr("group", 1)), init[node.inputs[1]]
        return "depthwise" if groups > 1 and w.shape[1] == 1 else "conv"
    if node.op_type == "Clip":
        lo, hi = (_scalar(init, node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
        if lo == 0.0 and hi == 6.0:
            return "relu6"
        return "relu" if lo == 0.0 and (hi is None or hi == np.inf) else "other"
    if node.op_type == "Pad" and node.attr("mode", "constant") == "constant":
        value = _scalar(init, node.inputs[2]) if len(node.inputs) > 2 else None
        return "pad" if value in (None, 0.0) else "other"
    return OP_TYPES[node.op_type]


def _scalar(init: dict[str, np.ndarray], name: str) -> float | None:
    """A constant scalar input's value; None when omitted; NaN when not constant."""
    if not name:
        return None
    if name not in init or init[name].size != 1:
        return float("nan")
    return float(init[name].reshape(-1)[0])
