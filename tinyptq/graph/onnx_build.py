"""Turning an OnnxGraph's nodes back into ONNX models and running them with onnxruntime.

The float model and the fake-quantized simulation are written from the same
node list; the simulation only differs by its kernels (already on their grids)
and a QuantizeLinear -> DequantizeLinear pair after each activation point,
bit-identical to tinyptq.quant's fake quantization: for grids narrower than
the 8-bit integer type a Clip to the grid limits comes first (QuantizeLinear
would only saturate at the type's limits), and grids wider than 8 bits, which
QuantizeLinear cannot hold before opset 21, use the same formula in float ops
(Div, Round half to even, Add, Clip, Sub, Mul).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

from tinyptq.errors import ModelError, first_line
from tinyptq.graph.onnx_topology import OnnxNode
from tinyptq.quant import Encoding

MAX_ORT_IR_VERSION = 13  # the newest IR onnxruntime 1.31 loads (onnx.helper writes 14)


def emit_nodes(nodes: Sequence[OnnxNode]) -> list[NodeProto]:
    """NodeProtos of the graph (a MatMul with a bias input is written as MatMul + Add)."""
    protos = []
    for node in nodes:
        if node.op_type == "MatMul" and len(node.inputs) == 3:
            mid = f"{node.output}__matmul"
            protos.append(helper.make_node("MatMul", node.inputs[:2], [mid], name=node.name))
            protos.append(helper.make_node("Add", [mid, node.inputs[2]], [node.output], name=f"{node.name}__bias_add"))
            continue
        proto = helper.make_node(node.op_type, node.inputs, [node.output], name=node.name)
        proto.attribute.extend(node.attrs)
        protos.append(proto)
    return protos


def make_model(
    protos: list[NodeProto],
    init: dict[str, np.ndarray],
    graph_input: ValueInfoProto,
    outputs: list[ValueInfoProto],
    opsets: dict[str, int],
    ir_version: int,
    name: str = "tinyptq",
) -> ModelProto:
    """An ONNX model of the given nodes, with only the initializers they read."""
    used = {i for p in protos for i in p.input}
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in init.items() if k in used]
    graph = helper.make_graph(protos, name, [graph_input], outputs, tensors)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        producer_name="tinyptq",
    )
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = min(max(ir_version, needed), MAX_ORT_IR_VERSION)
    return model


def output_info(name: str, known: dict[str, ValueInfoProto]) -> ValueInfoProto:
    """The model's own value info for an output, else a float tensor of unknown shape."""
    if name in known:
        vi = ValueInfoProto()
        vi.CopyFrom(known[name])
        return vi
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


# --------------------------------------------------------------- fake quant
def fake_quant_nodes(
    src: str, dst: str, enc: Encoding, ndim_hint: int | None = None
) -> tuple[list[NodeProto], dict[str, np.ndarray]]:
    """Nodes computing ``dst = enc.fake_quant(src)`` bit for bit, and their initializers."""
    p = f"{dst}__"
    scale = enc.scale.astype(np.float32)
    axis_attr = {}
    if enc.per_channel:
        axis_attr = {"axis": int(enc.axis)}
    init: dict[str, np.ndarray] = {f"{p}scale": scale}
    if enc.bits <= 8:
        dtype = np.int8 if enc.signed else np.uint8
        info = np.iinfo(dtype)
        init[f"{p}zp"] = enc.zero_point.astype(dtype)
        nodes, x = [], src
        if (enc.qmin, enc.qmax) != (info.min, info.max):
            # QuantizeLinear saturates at the int8 / uint8 limits: clip to the grid first.
            # Clip takes scalars, so a per-channel grid clips with Max / Min instead.
            lo, hi = _broadcastable(enc.min, enc, ndim_hint), _broadcastable(enc.max, enc, ndim_hint)
            init[f"{p}lo"], init[f"{p}hi"] = lo, hi
            if enc.per_channel:
                nodes += [
                    helper.make_node("Max", [x, f"{p}lo"], [f"{p}max"]),
                    helper.make_node("Min", [f"{p}max", f"{p}hi"], [f"{p}clipped"]),
                ]
            else:
                nodes.append(helper.make_node("Clip", [x, f"{p}lo", f"{p}hi"], [f"{p}clipped"]))
            x = f"{p}clipped"
        nodes += [
            helper.make_node("QuantizeLinear", [x, f"{p}scale", f"{p}zp"], [f"{p}q"], **axis_attr),
            helper.make_node("DequantizeLinear", [f"{p}q", f"{p}scale", f"{p}zp"], [dst], **axis_attr),
        ]
        return nodes, init
    # wider grids: q = clip(round(x / s) + zp, qmin, qmax); x_hat = (q - zp) * s, all exact in float32
    init[f"{p}scale"] = _broadcastable(scale, enc, ndim_hint)
    init[f"{p}zp"] = _broadcastable(enc.zero_point.astype(np.float32), enc, ndim_hint)
    init[f"{p}qmin"], init[f"{p}qmax"] = np.float32(enc.qmin), np.float32(enc.qmax)
    s, z = f"{p}scale", f"{p}zp"
    nodes = [
        helper.make_node("Div", [src, s], [f"{p}div"]),
        helper.make_node("Round", [f"{p}div"], [f"{p}round"]),
        helper.make_node("Add", [f"{p}round", z], [f"{p}shift"]),
        helper.make_node("Max", [f"{p}shift", f"{p}qmin"], [f"{p}lo"]),
        helper.make_node("Min", [f"{p}lo", f"{p}qmax"], [f"{p}q"]),
        helper.make_node("Sub", [f"{p}q", z], [f"{p}int"]),
        helper.make_node("Mul", [f"{p}int", s], [dst]),
    ]
    return nodes, init


def _broadcastable(values: np.ndarray, enc: Encoding, ndim: int | None) -> np.ndarray:
    """Per-tensor values as scalars; per-channel ones shaped to broadcast along ``enc.axis``."""
    values = np.asarray(values, np.float32)
    if not enc.per_channel:
        return values.reshape(())
    if ndim is None:
        raise ModelError("a per-channel activation encoding needs the tensor's rank")
    shape = [1] * ndim
    shape[enc.axis % ndim] = values.size
    return values.reshape(shape)


def insert_fake_quant(
    protos: list[NodeProto],
    graph_input: str,
    act_encodings: dict[str, tuple[str, Encoding, int | None]],
) -> tuple[list[NodeProto], dict[str, np.ndarray], dict[str, str]]:
    """Put fake-quant nodes after tensors; readers are rewired to the quantized copy.

    ``act_encodings`` maps a tensor to (a name to derive new names from, its
    encoding, its rank when known). Returns the nodes in topological order,
    the new initializers and tensor -> quantized tensor.
    """
    renamed = {t: f"{t}__fq" for t in act_encodings}
    out: list[NodeProto] = []
    init: dict[str, np.ndarray] = {}

    def add_quantizer(tensor: str) -> None:
        _, enc, ndim = act_encodings[tensor]
        nodes, params = fake_quant_nodes(tensor, renamed[tensor], enc, ndim)
        out.extend(nodes)
        init.update(params)

    if graph_input in act_encodings:
        add_quantizer(graph_input)
    for proto in protos:
        new = NodeProto()
        new.CopyFrom(proto)
        new.input[:] = [renamed.get(i, i) for i in proto.input]
        out.append(new)
        for o in proto.output:
            if o in act_encodings:
                add_quantizer(o)
    return out, init, renamed


# --------------------------------------------------------------- execution
def make_session(model: ModelProto, optimize: bool = True) -> Any:
    """An onnxruntime CPU session of ``model``.

    Float models get the basic graph optimizations; simulations none: already
    at the basic level onnxruntime rewrites QuantizeLinear / DequantizeLinear
    pairs around a Conv so that the result is no longer the fake-quantized one.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_BASIC if optimize else level.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot run the model: {first_line(exc, 200)}") from None


def run_batches(
    session: Any, input_name: str, x: np.ndarray, tensors: Sequence[str], batch_size: int
) -> Iterator[list[np.ndarray]]:
    """The requested tensors for each batch of ``x`` (the input tensor itself straight from ``x``)."""
    import onnxruntime as ort

    wanted = [t for t in dict.fromkeys(tensors) if t != input_name]
    x = np.asarray(x, np.float32)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the failure becomes our one-line error, not a log line too
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        try:
            outs = session.run(wanted, {input_name: batch}, quiet) if wanted else []
        except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidArgument, ...)
            raise ModelError(f"onnxruntime cannot run the model: {first_line(exc, 200)}") from None
        values = dict(zip(wanted, outs, strict=True))
        values[input_name] = batch
        yield [values[t] for t in tensors]


class OnnxSim:
    """A fake-quantized ONNX model: ``predict`` / ``run`` evaluate it with onnxruntime in batches."""

    def __init__(self, model: ModelProto, output_names: Sequence[str], tensors: Sequence[str]) -> None:
        self.model = model
        self.output_names = list(output_names)
        self._tensors = list(tensors)
        self._session: Any = None

    @property
    def session(self) -> Any:
        """The onnxruntime session (created on first use)."""
        if self._session is None:
            self._session = make_session(self.model, optimize=False)
        return self._session

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The simulated model's first output for ``x``."""
        return self.run(x, batch_size)[self.output_names[0]]

    def run(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """All requested outputs by name."""
        parts: list[list[np.ndarray]] = [[] for _ in self._tensors]
        input_name = self.model.graph.input[0].name
        for batch in run_batches(self.session, input_name, x, self._tensors, batch_size):
            for i, b in enumerate(batch):
                parts[i].append(b)
        return {n: np.concatenate(p, axis=0) for n, p in zip(self.output_names, parts, strict=True)}
