"""onnxruntime's graph optimizations of a QDQ ONNX file, replayed (the rewrites that matter for tinyptq's exports).

``optimize(model)`` returns the graph onnxruntime (CPU, default graph
optimizations) actually runs, in its order:

1. Identity / Dropout vanish; a Relu read only by a Clip merges into it.
2. WeightBiasQuantization: a Conv / Gemm whose input is dequantized per
   tensor and whose output reaches a QuantizeLinear through Relu / Clip only
   gets its float bias as int32 at scale ``s_x * s_w`` (behind a
   DequantizeLinear) and float weights quantized to int8 per tensor.
3. ReluQuantFusion / ClipQuantFusion: a Relu before a QuantizeLinear whose
   zero point is the type's minimum, and a Clip no narrower than the
   QuantizeLinear's range (within one float32 epsilon), are dropped.
4. QDQS8ToU8 (x86-64): an int8 QuantizeLinear -> DequantizeLinear pair whose
   dequantized tensor has a single reader becomes uint8 (zero point + 128);
   tensors read twice (the residual branches of ResNet-8) stay int8.
5. QDQ selectors: DequantizeLinear -> op -> QuantizeLinear groups of one
   8-bit type become QLinearConv (uint8 activations only: int8 convolutions
   are not fused on x86, 8-bit weights, int32 bias), com.microsoft
   QLinearAdd, QLinearAveragePool, QLinearGlobalAveragePool, QLinearSoftmax
   and QGemm. A Transpose right after the DequantizeLinear does not block
   them (the transpose optimizer moves it), a Flatten does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tinyptq.errors import ModelError
from tinyptq.intsim import ort_kernels as k

INT_LIMITS = {
    TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
    TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
    TensorProto.INT16: (-(2**15), 2**15 - 1), TensorProto.UINT16: (0, 2**16 - 1),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
STORAGE = {
    TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT4: np.int8,
    TensorProto.UINT4: np.uint8, TensorProto.INT16: np.int16, TensorProto.UINT16: np.uint16,
    TensorProto.INT32: np.int32,
}
EIGHT_BIT = frozenset({TensorProto.INT8, TensorProto.UINT8})
NOT_MODELLED = frozenset({"Mul", "MatMul", "Concat", "LeakyRelu", "Sigmoid", "Where"})
EPSILON = np.finfo(np.float32).eps


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of an integer tensor as onnxruntime stores it."""

    scale: float
    zero_point: int


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------- graph
class Graph:
    """An ONNX graph as editable nodes, constants and integer tensor types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.consts: dict[str, np.ndarray] = {}
        self.types: dict[str, int] = {}
        for t in g.initializer:
            self.consts[t.name] = _array(t)
            self.types[t.name] = t.data_type
        self.inputs = [i.name for i in g.input if i.name not in self.consts]
        self.outputs = [o.name for o in g.output]
        self.nodes = [
            Node(n.op_type, list(n.input), list(n.output), {a.name: helper.get_attribute_value(a) for a in n.attribute})
            for n in g.node
        ]
        for n in self.nodes:
            if n.op == "QuantizeLinear":
                self.types[n.outputs[0]] = self.types[n.inputs[2]]
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.opset_q13 = self.opset < 19  # ClipQuantFusion matches QuantizeLinear versions 10 and 13 only
        self._count = 0

    def producer(self, name: str) -> Node | None:
        return next((n for n in self.nodes if name in n.outputs), None)

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def single_reader(self, name: str) -> Node | None:
        """The only node reading ``name`` (None if it has several readers or is a graph output)."""
        readers = self.consumers(name)
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}__ort{self._count}"

    def bypass(self, node: Node) -> None:
        """Remove a one-input node, its readers reading its input instead."""
        src, dst = node.inputs[0], node.outputs[0]
        for n in self.nodes:
            n.inputs = [src if i == dst else i for i in n.inputs]
        self.outputs = [src if o == dst else o for o in self.outputs]
        self.nodes.remove(node)

    def prune(self) -> None:
        """Drop nodes whose outputs nothing reads."""
        changed = True
        while changed:
            used = {i for n in self.nodes for i in n.inputs} | set(self.outputs)
            keep = [n for n in self.nodes if any(o in used for o in n.outputs)]
            changed = len(keep) != len(self.nodes)
            self.nodes = keep


def _array(t: onnx.TensorProto) -> np.ndarray:
    a = numpy_helper.to_array(t)
    if t.data_type in STORAGE:
        return np.asarray(a).astype(np.int64).astype(STORAGE[t.data_type])
    return np.asarray(a)


def scalar(a: np.ndarray | None) -> Any:
    if a is None or a.size != 1:
        return None
    return a.reshape(()).item()


# ------------------------------------------------------------- rewrites
def optimize(model: onnx.ModelProto) -> Graph:
    """The graph onnxruntime runs for a tinyptq QDQ model (see the module docstring)."""
    g = Graph(model)
    _eliminate_identities(g)
    _fuse_relu_clip(g)
    _quantize_biases(g)
    _drop_redundant_activations(g)
    _convert_s8_to_u8(g)
    _fuse_groups(g)
    g.prune()
    return g


def _eliminate_identities(g: Graph) -> None:
    for node in [n for n in g.nodes if n.op in ("Identity", "Dropout")]:
        if node.outputs[0] not in g.outputs:
            g.bypass(node)


def clip_limits(g: Graph, node: Node) -> tuple[float, float] | None:
    """Constant (min, max) of a Clip, or None when an input is not constant."""
    lo, hi = -k.FLT_MAX, k.FLT_MAX
    if "min" in node.attrs or "max" in node.attrs:  # opset 6
        return float(node.attrs.get("min", lo)), float(node.attrs.get("max", hi))
    limits = [lo, hi]
    for pos in (1, 2):
        if len(node.inputs) > pos and node.inputs[pos]:
            v = scalar(g.const(node.inputs[pos]))
            if v is None:
                return None
            limits[pos - 1] = v
    return float(np.float32(limits[0])), float(np.float32(limits[1]))


def _fuse_relu_clip(g: Graph) -> None:
    """FuseReluClip: Relu -> Clip becomes Clip(max(0, min))."""
    for relu in [n for n in g.nodes if n.op == "Relu"]:
        clip = g.single_reader(relu.outputs[0])
        if clip is None or clip.op != "Clip" or "min" in clip.attrs or "max" in clip.attrs:
            continue
        limits = clip_limits(g, clip)
        if limits is None:
            continue
        lo = g.fresh("clip_min")
        g.consts[lo] = np.asarray(max(0.0, limits[0]), np.float32)
        hi = clip.inputs[2] if len(clip.inputs) > 2 else ""
        clip.inputs = [clip.inputs[0], lo, hi]
        g.bypass(relu)


def _dq_source(g: Graph, name: str) -> tuple[Node, list[list[int]]] | None:
    """The DequantizeLinear behind ``name``, looking through single-reader Transposes (and their perms)."""
    perms: list[list[int]] = []
    node = g.producer(name)
    while node is not None and node.op == "Transpose" and g.single_reader(node.outputs[0]) is not None:
        perms.insert(0, list(node.attrs["perm"]))
        node = g.producer(node.inputs[0])
    return (node, perms) if node is not None and node.op == "DequantizeLinear" else None


def _path_to_q(g: Graph, node: Node) -> Node | None:
    """The QuantizeLinear reached from ``node`` through single-reader Relu / Clip nodes."""
    cur = node
    while True:
        nxt = g.single_reader(cur.outputs[0])
        if nxt is None:
            return None
        if nxt.op == "QuantizeLinear":
            return nxt
        if nxt.op not in ("Relu", "Clip"):
            return None
        cur = nxt


def _quantize_biases(g: Graph) -> None:
    """WeightBiasQuantization for Conv / Gemm with a per-tensor dequantized input that reaches a QuantizeLinear.

    Float weights are quantized to int8 per tensor (min / max, asymmetric);
    a float bias becomes int32 at scale ``s_x * s_w``.
    """
    for node in [n for n in g.nodes if n.op in ("Conv", "Gemm")]:
        src = _dq_source(g, node.inputs[0])
        if src is None or scalar(g.const(src[0].inputs[1])) is None or _path_to_q(g, node) is None:
            continue
        w_dq = g.producer(node.inputs[1])
        w_dq = w_dq if w_dq is not None and w_dq.op == "DequantizeLinear" else None
        w_float = g.const(node.inputs[1]) if w_dq is None else None
        if w_dq is None and (w_float is None or w_float.dtype != np.float32):
            continue
        bias = None
        if len(node.inputs) > 2 and node.inputs[2]:
            bias = g.const(node.inputs[2])
            if bias is None or bias.ndim != 1:
                continue
        if w_dq is not None and (bias is None or not _bias_fits(g, node, w_dq, bias)):
            continue
        w_scale = _quantize_weights(g, node, w_float) if w_dq is None else g.const(w_dq.inputs[1])
        if bias is not None and w_scale is not None:
            _add_int32_bias(g, node, bias, float(scalar(g.const(src[0].inputs[1]))), w_scale)


def _bias_fits(g: Graph, node: Node, w_dq: Node, bias: np.ndarray) -> bool:
    """Whether per-channel weight scales line up with the bias (axis 0 for Conv, N for Gemm)."""
    w_scale = g.const(w_dq.inputs[1])
    if w_scale is None or w_scale.size == 1:
        return w_scale is not None
    w = g.const(w_dq.inputs[0])
    axis = int(w_dq.attrs.get("axis", 1)) % (w.ndim if w is not None else 2)
    expected = 0 if node.op == "Conv" else (0 if node.attrs.get("transB", 0) else 1)
    return w_scale.size == bias.size and axis == expected


def _quantize_weights(g: Graph, node: Node, w: np.ndarray) -> np.ndarray:
    """Float weights through QuantizeLinear -> DequantizeLinear at onnxruntime's own int8 parameters."""
    scale, zp = k.dynamic_int8_params(w)
    q, s, z, out = g.fresh("weight_q"), g.fresh("weight_scale"), g.fresh("weight_zp"), g.fresh("weight_dq")
    g.consts[q] = k.quantize_linear(w, scale, zp, np.int8)
    g.consts[s], g.consts[z] = np.asarray(scale, np.float32), np.asarray(zp, np.int8)
    g.types[q] = g.types[z] = TensorProto.INT8
    g.nodes.insert(g.nodes.index(node), Node("DequantizeLinear", [q, s, z], [out]))
    node.inputs[1] = out
    return g.consts[s]


def _add_int32_bias(g: Graph, node: Node, bias: np.ndarray, x_scale: float, w_scale: np.ndarray) -> None:
    q, scale = k.quantize_bias(bias, x_scale, w_scale)
    q_name, s_name, out = g.fresh("bias_int32"), g.fresh("bias_scale"), g.fresh("bias_dq")
    g.consts[q_name], g.consts[s_name] = q.reshape(bias.shape), scale.reshape(np.shape(w_scale))
    g.types[q_name] = TensorProto.INT32
    attrs = {"axis": 0} if np.size(w_scale) > 1 else {}
    g.nodes.insert(g.nodes.index(node), Node("DequantizeLinear", [q_name, s_name], [out], attrs))
    node.inputs[2] = out


def _q_range(g: Graph, q: Node) -> tuple[int, float, int] | None:
    """(type, scale, zero point) of a per-tensor QuantizeLinear with constant parameters."""
    scale, zp = scalar(g.const(q.inputs[1])), scalar(g.const(q.inputs[2]) if len(q.inputs) > 2 else None)
    if scale is None or zp is None:
        return None
    return g.types[q.inputs[2]], float(scale), int(zp)


def _clip_is_redundant(g: Graph, clip: Node, q: Node) -> bool:
    limits, rng = clip_limits(g, clip), _q_range(g, q)
    if limits is None or rng is None or rng[0] not in EIGHT_BIT:
        return False
    qtype, scale, zp = rng
    lo_q, hi_q = INT_LIMITS[qtype]
    s = np.float32(scale)
    lower, upper = s * np.float32(lo_q - zp), s * np.float32(hi_q - zp)
    lo, hi = np.float32(limits[0]), np.float32(limits[1])
    return not (EPSILON < lo - lower or EPSILON < upper - hi)


def _relu_is_redundant(g: Graph, q: Node) -> bool:
    rng = _q_range(g, q)
    if rng is None:
        return False
    qtype, _, zp = rng
    return qtype not in EIGHT_BIT or zp == INT_LIMITS[qtype][0]


def _drop_redundant_activations(g: Graph) -> None:
    """ReluQuantFusion and ClipQuantFusion (opset 13 QuantizeLinear only)."""
    for node in [n for n in g.nodes if n.op in ("Relu", "Clip")]:
        q = g.single_reader(node.outputs[0])
        if q is None or q.op != "QuantizeLinear":
            continue
        if node.op == "Relu" and _relu_is_redundant(g, q):
            g.bypass(node)
        elif node.op == "Clip" and g.opset_q13 and _clip_is_redundant(g, node, q):
            g.bypass(node)


def _convert_s8_to_u8(g: Graph) -> None:
    """QDQS8ToU8Transformer: int8 Q -> DQ pairs with a single dequantized reader become uint8."""
    for q in [n for n in g.nodes if n.op == "QuantizeLinear"]:
        out = q.outputs[0]
        readers = g.consumers(out)
        if out in g.outputs or len(readers) != 1 or readers[0].op != "DequantizeLinear":
            continue
        dq = readers[0]
        copies = len(g.consumers(dq.outputs[0])) + (dq.outputs[0] in g.outputs)
        zq, zd = g.const(q.inputs[2]), g.const(dq.inputs[2]) if len(dq.inputs) > 2 else None
        if copies > 1 or zq is None or zd is None or zq.size != 1 or zd.size != 1:
            continue
        if g.types[q.inputs[2]] != TensorProto.INT8 or g.types[dq.inputs[2]] != TensorProto.INT8 or zq != zd:
            continue
        zp = g.fresh("qdq_s8_to_u8_zp")
        g.consts[zp] = np.asarray(int(scalar(zq)) + 128, np.uint8)
        g.types[zp] = g.types[out] = TensorProto.UINT8
        q.inputs[2] = dq.inputs[2] = zp


# ------------------------------------------------------------ QDQ groups
def _group_io(g: Graph, node: Node, n_inputs: int) -> tuple[list[tuple[Node, list]], Node] | None:
    """The DequantizeLinear sources of the first ``n_inputs`` inputs and the QuantizeLinear after ``node``."""
    if node.outputs[0] in g.outputs:
        return None
    q = g.single_reader(node.outputs[0])
    if q is None or q.op != "QuantizeLinear" or _q_range(g, q) is None:
        return None
    sources = [_dq_source(g, name) for name in node.inputs[:n_inputs]]
    if any(s is None for s in sources):
        return None
    return sources, q  # type: ignore[return-value]


def _dq_params(g: Graph, dq: Node) -> tuple[Any, Any, int]:
    scale = g.const(dq.inputs[1])
    zp = g.const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else np.zeros((), np.int64)
    return scale, zp, g.types.get(dq.inputs[0], TensorProto.FLOAT)


def _int_input(g: Graph, node: Node, source: tuple[Node, list[list[int]]]) -> str:
    """The integer tensor a fused node reads: the DequantizeLinear's input, transposed as the graph does."""
    dq, perms = source
    name = dq.inputs[0]
    for perm in perms:
        out = g.fresh("int_transpose")
        g.nodes.insert(g.nodes.index(node), Node("Transpose", [name], [out], {"perm": perm}))
        g.types[out] = g.types[name]
        name = out
    return name


def _replace(g: Graph, node: Node, q: Node, fused: Node) -> None:
    fused.outputs = [q.outputs[0]]
    g.nodes[g.nodes.index(node)] = fused
    g.nodes.remove(q)


def _fuse_groups(g: Graph) -> None:
    """The QDQ selector / action transformer for the operators tinyptq exports."""
    fusers: dict[str, Callable[[Graph, Node], None]] = {
        "Conv": _fuse_conv, "Add": _fuse_add, "AveragePool": _fuse_unary, "GlobalAveragePool": _fuse_unary,
        "Softmax": _fuse_unary, "Gemm": _fuse_gemm,
    }
    for node in list(g.nodes):
        if node not in g.nodes:
            continue
        if node.op in fusers:
            fusers[node.op](g, node)
        elif node.op in NOT_MODELLED and _group_io(g, node, len(node.inputs)) is not None:
            raise ModelError(f"ort target: onnxruntime fuses the quantized {node.op} '{node.outputs[0]}'; not modelled")


def _out_params(g: Graph, q: Node) -> tuple[float, int, int]:
    qtype, scale, zp = _q_range(g, q)  # type: ignore[misc]
    return scale, zp, qtype


def _fuse_conv(g: Graph, node: Node) -> None:
    io = _group_io(g, node, 2)
    if io is None:
        return
    (x_src, w_src), q = io
    bias = None
    if len(node.inputs) > 2 and node.inputs[2]:
        b_src = _dq_source(g, node.inputs[2])
        if b_src is None or g.types.get(b_src[0].inputs[0]) != TensorProto.INT32:
            return
        bias = g.const(b_src[0].inputs[0])
    xs, xz, xt = _dq_params(g, x_src[0])
    ws, wz, wt = _dq_params(g, w_src[0])
    ys, yz, yt = _out_params(g, q)
    w = g.const(w_src[0].inputs[0])
    if xt != yt or xt != TensorProto.UINT8 or wt not in EIGHT_BIT or w is None or w_src[1] or scalar(xs) is None:
        return  # int8 QLinearConv is not fused on x86 (QDQIsInt8Allowed), nor 4- or 16-bit types
    if bias is None and len(node.inputs) > 2 and node.inputs[2]:
        return
    if np.any(np.asarray(wz) != np.asarray(wz).reshape(-1)[0]):
        return
    fused = Node("QLinearConv", [_int_input(g, node, x_src)], [], {
        "x": (float(scalar(xs)), int(scalar(xz))), "w": w, "w_scale": np.asarray(ws, np.float32),
        "w_zp": int(np.asarray(wz).reshape(-1)[0]), "y": (ys, yz), "bias": bias,
        "window": conv_window(node, w.shape), "group": int(node.attrs.get("group", 1)),
    })
    _replace(g, node, q, fused)


def _fuse_add(g: Graph, node: Node) -> None:
    io = _group_io(g, node, 2)
    if io is None:
        return
    (a_src, b_src), q = io
    (as_, az, at), (bs, bz, bt) = _dq_params(g, a_src[0]), _dq_params(g, b_src[0])
    ys, yz, yt = _out_params(g, q)
    if not at == bt == yt or at not in EIGHT_BIT or scalar(as_) is None or scalar(bs) is None:
        return
    fused = Node("QLinearAdd", [_int_input(g, node, a_src), _int_input(g, node, b_src)], [], {
        "a": (float(scalar(as_)), int(scalar(az))), "b": (float(scalar(bs)), int(scalar(bz))), "y": (ys, yz),
    })
    _replace(g, node, q, fused)


def _fuse_unary(g: Graph, node: Node) -> None:
    io = _group_io(g, node, 1)
    if io is None:
        return
    (x_src,), q = io
    xs, xz, xt = _dq_params(g, x_src[0])
    ys, yz, yt = _out_params(g, q)
    if xt != yt or xt not in EIGHT_BIT or scalar(xs) is None:
        return
    fused = Node(f"QLinear{node.op}", [_int_input(g, node, x_src)], [], {
        **node.attrs, "x": (float(scalar(xs)), int(scalar(xz))), "y": (ys, yz),
    })
    _replace(g, node, q, fused)


def _fuse_gemm(g: Graph, node: Node) -> None:
    io = _group_io(g, node, 2)
    if io is None:
        return
    (a_src, b_src), q = io
    (as_, az, at), (bs, bz, bt) = _dq_params(g, a_src[0]), _dq_params(g, b_src[0])
    ys, yz, yt = _out_params(g, q)
    b = g.const(b_src[0].inputs[0])
    if at != yt or at not in EIGHT_BIT or bt not in EIGHT_BIT or (at == TensorProto.INT8 and bt != at) or b is None:
        return
    bias = None
    if len(node.inputs) > 2 and node.inputs[2]:
        c_src = _dq_source(g, node.inputs[2])
        if c_src is None or g.types.get(c_src[0].inputs[0]) != TensorProto.INT32:
            return
        bias = g.const(c_src[0].inputs[0])
        if float(node.attrs.get("beta", 1.0)) != 1.0:
            return
    fused = Node("QGemm", [_int_input(g, node, a_src)], [], {
        "a": (float(scalar(as_)), int(scalar(az))), "b_q": b, "b_scale": np.asarray(bs, np.float32),
        "b_zp": np.asarray(bz), "y": (ys, yz), "bias": bias, "transA": int(node.attrs.get("transA", 0)),
        "transB": int(node.attrs.get("transB", 0)), "alpha": float(node.attrs.get("alpha", 1.0)),
    })
    _replace(g, node, q, fused)


def conv_window(node: Node, w_shape: tuple[int, ...]) -> k.Window:
    if len(w_shape) != 4:
        raise ModelError(f"ort target: only 2-D convolutions are modelled ('{node.outputs[0]}')")
    if node.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelError(f"ort target: auto_pad is not modelled ('{node.outputs[0]}')")
    return k.window(node.attrs.get("kernel_shape", w_shape[2:]), node.attrs.get("strides"), node.attrs.get("pads"),
                    node.attrs.get("dilations"))


def pool_window(node: Node) -> k.Window:
    if node.attrs.get("ceil_mode", 0) or node.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelError(f"ort target: ceil_mode / auto_pad pooling is not modelled ('{node.outputs[0]}')")
    kernel = node.attrs["kernel_shape"]
    if len(kernel) != 2:
        raise ModelError(f"ort target: only 2-D pooling is modelled ('{node.outputs[0]}')")
    return k.window(kernel, node.attrs.get("strides"), node.attrs.get("pads"), node.attrs.get("dilations"))


# ------------------------------------------------------------- execution
