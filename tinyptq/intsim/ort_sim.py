"""The ``ort`` simulation target: a state run as onnxruntime runs its QDQ ONNX export.

onnxruntime (CPU, default graph optimizations) does not run the file of
tinyptq.export.qdq_onnx as written: its optimizers rewrite it first. This
module builds that file (``qdq_model``), replays on its graph the rewrites
that matter for tinyptq's exports, in onnxruntime's order, and runs every
operator left with the numpy kernels of tinyptq.intsim.ort_kernels:

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

Everything else runs in float32 exactly as MLAS computes it (Conv / Gemm /
pooling / Softmax / Add / Relu / Clip) between DequantizeLinear and
QuantizeLinear. Layout rewrites (NHWC QLinearConv, NCHWc pooling) and
activation fusions (FusedConv) move data without changing a value.

Where onnxruntime's arithmetic depends on the batch (a single image takes
other MLAS kernels), ``predict`` runs the batches onnxruntime would be
given; ``threads`` (the session's intra-op threads, by default the CPU
count as onnxruntime's default) matters for one-image batches only.
OrtRunner runs any QDQ ONNX model of these operators the same way.
"""

from __future__ import annotations

import os
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
class _Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------- graph
class _Graph:
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
            _Node(n.op_type, list(n.input), list(n.output), {a.name: helper.get_attribute_value(a) for a in n.attribute})
            for n in g.node
        ]
        for n in self.nodes:
            if n.op == "QuantizeLinear":
                self.types[n.outputs[0]] = self.types[n.inputs[2]]
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.opset_q13 = self.opset < 19  # ClipQuantFusion matches QuantizeLinear versions 10 and 13 only
        self._count = 0

    def producer(self, name: str) -> _Node | None:
        return next((n for n in self.nodes if name in n.outputs), None)

    def consumers(self, name: str) -> list[_Node]:
        return [n for n in self.nodes if name in n.inputs]

    def single_reader(self, name: str) -> _Node | None:
        """The only node reading ``name`` (None if it has several readers or is a graph output)."""
        readers = self.consumers(name)
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}__ort{self._count}"

    def bypass(self, node: _Node) -> None:
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


def _scalar(a: np.ndarray | None) -> Any:
    if a is None or a.size != 1:
        return None
    return a.reshape(()).item()


# ------------------------------------------------------------- rewrites
def optimize(model: onnx.ModelProto) -> _Graph:
    """The graph onnxruntime runs for a tinyptq QDQ model (see the module docstring)."""
    g = _Graph(model)
    _eliminate_identities(g)
    _fuse_relu_clip(g)
    _quantize_biases(g)
    _drop_redundant_activations(g)
    _convert_s8_to_u8(g)
    _fuse_groups(g)
    g.prune()
    return g


def _eliminate_identities(g: _Graph) -> None:
    for node in [n for n in g.nodes if n.op in ("Identity", "Dropout")]:
        if node.outputs[0] not in g.outputs:
            g.bypass(node)


def _clip_limits(g: _Graph, node: _Node) -> tuple[float, float] | None:
    """Constant (min, max) of a Clip, or None when an input is not constant."""
    lo, hi = -k.FLT_MAX, k.FLT_MAX
    if "min" in node.attrs or "max" in node.attrs:  # opset 6
        return float(node.attrs.get("min", lo)), float(node.attrs.get("max", hi))
    limits = [lo, hi]
    for pos in (1, 2):
        if len(node.inputs) > pos and node.inputs[pos]:
            v = _scalar(g.const(node.inputs[pos]))
            if v is None:
                return None
            limits[pos - 1] = v
    return float(np.float32(limits[0])), float(np.float32(limits[1]))


def _fuse_relu_clip(g: _Graph) -> None:
    """FuseReluClip: Relu -> Clip becomes Clip(max(0, min))."""
    for relu in [n for n in g.nodes if n.op == "Relu"]:
        clip = g.single_reader(relu.outputs[0])
        if clip is None or clip.op != "Clip" or "min" in clip.attrs or "max" in clip.attrs:
            continue
        limits = _clip_limits(g, clip)
        if limits is None:
            continue
        lo = g.fresh("clip_min")
        g.consts[lo] = np.asarray(max(0.0, limits[0]), np.float32)
        hi = clip.inputs[2] if len(clip.inputs) > 2 else ""
        clip.inputs = [clip.inputs[0], lo, hi]
        g.bypass(relu)


def _dq_source(g: _Graph, name: str) -> tuple[_Node, list[list[int]]] | None:
    """The DequantizeLinear behind ``name``, looking through single-reader Transposes (and their perms)."""
    perms: list[list[int]] = []
    node = g.producer(name)
    while node is not None and node.op == "Transpose" and g.single_reader(node.outputs[0]) is not None:
        perms.insert(0, list(node.attrs["perm"]))
        node = g.producer(node.inputs[0])
    return (node, perms) if node is not None and node.op == "DequantizeLinear" else None


def _path_to_q(g: _Graph, node: _Node) -> _Node | None:
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


def _quantize_biases(g: _Graph) -> None:
    """WeightBiasQuantization for Conv / Gemm with a per-tensor dequantized input that reaches a QuantizeLinear.

    Float weights are quantized to int8 per tensor (min / max, asymmetric);
    a float bias becomes int32 at scale ``s_x * s_w``.
    """
    for node in [n for n in g.nodes if n.op in ("Conv", "Gemm")]:
        src = _dq_source(g, node.inputs[0])
        if src is None or _scalar(g.const(src[0].inputs[1])) is None or _path_to_q(g, node) is None:
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
            _add_int32_bias(g, node, bias, float(_scalar(g.const(src[0].inputs[1]))), w_scale)


def _bias_fits(g: _Graph, node: _Node, w_dq: _Node, bias: np.ndarray) -> bool:
    """Whether per-channel weight scales line up with the bias (axis 0 for Conv, N for Gemm)."""
    w_scale = g.const(w_dq.inputs[1])
    if w_scale is None or w_scale.size == 1:
        return w_scale is not None
    w = g.const(w_dq.inputs[0])
    axis = int(w_dq.attrs.get("axis", 1)) % (w.ndim if w is not None else 2)
    expected = 0 if node.op == "Conv" else (0 if node.attrs.get("transB", 0) else 1)
    return w_scale.size == bias.size and axis == expected


def _quantize_weights(g: _Graph, node: _Node, w: np.ndarray) -> np.ndarray:
    """Float weights through QuantizeLinear -> DequantizeLinear at onnxruntime's own int8 parameters."""
    scale, zp = k.dynamic_int8_params(w)
    q, s, z, out = g.fresh("weight_q"), g.fresh("weight_scale"), g.fresh("weight_zp"), g.fresh("weight_dq")
    g.consts[q] = k.quantize_linear(w, scale, zp, np.int8)
    g.consts[s], g.consts[z] = np.asarray(scale, np.float32), np.asarray(zp, np.int8)
    g.types[q] = g.types[z] = TensorProto.INT8
    g.nodes.insert(g.nodes.index(node), _Node("DequantizeLinear", [q, s, z], [out]))
    node.inputs[1] = out
    return g.consts[s]


def _add_int32_bias(g: _Graph, node: _Node, bias: np.ndarray, x_scale: float, w_scale: np.ndarray) -> None:
    q, scale = k.quantize_bias(bias, x_scale, w_scale)
    q_name, s_name, out = g.fresh("bias_int32"), g.fresh("bias_scale"), g.fresh("bias_dq")
    g.consts[q_name], g.consts[s_name] = q.reshape(bias.shape), scale.reshape(np.shape(w_scale))
    g.types[q_name] = TensorProto.INT32
    attrs = {"axis": 0} if np.size(w_scale) > 1 else {}
    g.nodes.insert(g.nodes.index(node), _Node("DequantizeLinear", [q_name, s_name], [out], attrs))
    node.inputs[2] = out


def _q_range(g: _Graph, q: _Node) -> tuple[int, float, int] | None:
    """(type, scale, zero point) of a per-tensor QuantizeLinear with constant parameters."""
    scale, zp = _scalar(g.const(q.inputs[1])), _scalar(g.const(q.inputs[2]) if len(q.inputs) > 2 else None)
    if scale is None or zp is None:
        return None
    return g.types[q.inputs[2]], float(scale), int(zp)


def _clip_is_redundant(g: _Graph, clip: _Node, q: _Node) -> bool:
    limits, rng = _clip_limits(g, clip), _q_range(g, q)
    if limits is None or rng is None or rng[0] not in EIGHT_BIT:
        return False
    qtype, scale, zp = rng
    lo_q, hi_q = INT_LIMITS[qtype]
    s = np.float32(scale)
    lower, upper = s * np.float32(lo_q - zp), s * np.float32(hi_q - zp)
    lo, hi = np.float32(limits[0]), np.float32(limits[1])
    return not (EPSILON < lo - lower or EPSILON < upper - hi)


def _relu_is_redundant(g: _Graph, q: _Node) -> bool:
    rng = _q_range(g, q)
    if rng is None:
        return False
    qtype, _, zp = rng
    return qtype not in EIGHT_BIT or zp == INT_LIMITS[qtype][0]


def _drop_redundant_activations(g: _Graph) -> None:
    """ReluQuantFusion and ClipQuantFusion (opset 13 QuantizeLinear only)."""
    for node in [n for n in g.nodes if n.op in ("Relu", "Clip")]:
        q = g.single_reader(node.outputs[0])
        if q is None or q.op != "QuantizeLinear":
            continue
        if node.op == "Relu" and _relu_is_redundant(g, q):
            g.bypass(node)
        elif node.op == "Clip" and g.opset_q13 and _clip_is_redundant(g, node, q):
            g.bypass(node)


def _convert_s8_to_u8(g: _Graph) -> None:
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
        g.consts[zp] = np.asarray(int(_scalar(zq)) + 128, np.uint8)
        g.types[zp] = g.types[out] = TensorProto.UINT8
        q.inputs[2] = dq.inputs[2] = zp


# ------------------------------------------------------------ QDQ groups
def _group_io(g: _Graph, node: _Node, n_inputs: int) -> tuple[list[tuple[_Node, list]], _Node] | None:
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


def _dq_params(g: _Graph, dq: _Node) -> tuple[Any, Any, int]:
    scale = g.const(dq.inputs[1])
    zp = g.const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else np.zeros((), np.int64)
    return scale, zp, g.types.get(dq.inputs[0], TensorProto.FLOAT)


def _int_input(g: _Graph, node: _Node, source: tuple[_Node, list[list[int]]]) -> str:
    """The integer tensor a fused node reads: the DequantizeLinear's input, transposed as the graph does."""
    dq, perms = source
    name = dq.inputs[0]
    for perm in perms:
        out = g.fresh("int_transpose")
        g.nodes.insert(g.nodes.index(node), _Node("Transpose", [name], [out], {"perm": perm}))
        g.types[out] = g.types[name]
        name = out
    return name


def _replace(g: _Graph, node: _Node, q: _Node, fused: _Node) -> None:
    fused.outputs = [q.outputs[0]]
    g.nodes[g.nodes.index(node)] = fused
    g.nodes.remove(q)


def _fuse_groups(g: _Graph) -> None:
    """The QDQ selector / action transformer for the operators tinyptq exports."""
    fusers: dict[str, Callable[[_Graph, _Node], None]] = {
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


def _out_params(g: _Graph, q: _Node) -> tuple[float, int, int]:
    qtype, scale, zp = _q_range(g, q)  # type: ignore[misc]
    return scale, zp, qtype


def _fuse_conv(g: _Graph, node: _Node) -> None:
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
    if xt != yt or xt != TensorProto.UINT8 or wt not in EIGHT_BIT or w is None or w_src[1] or _scalar(xs) is None:
        return  # int8 QLinearConv is not fused on x86 (QDQIsInt8Allowed), nor 4- or 16-bit types
    if bias is None and len(node.inputs) > 2 and node.inputs[2]:
        return
    if np.any(np.asarray(wz) != np.asarray(wz).reshape(-1)[0]):
        return
    fused = _Node("QLinearConv", [_int_input(g, node, x_src)], [], {
        "x": (float(_scalar(xs)), int(_scalar(xz))), "w": w, "w_scale": np.asarray(ws, np.float32),
        "w_zp": int(np.asarray(wz).reshape(-1)[0]), "y": (ys, yz), "bias": bias,
        "window": _conv_window(node, w.shape), "group": int(node.attrs.get("group", 1)),
    })
    _replace(g, node, q, fused)


def _fuse_add(g: _Graph, node: _Node) -> None:
    io = _group_io(g, node, 2)
    if io is None:
        return
    (a_src, b_src), q = io
    (as_, az, at), (bs, bz, bt) = _dq_params(g, a_src[0]), _dq_params(g, b_src[0])
    ys, yz, yt = _out_params(g, q)
    if not at == bt == yt or at not in EIGHT_BIT or _scalar(as_) is None or _scalar(bs) is None:
        return
    fused = _Node("QLinearAdd", [_int_input(g, node, a_src), _int_input(g, node, b_src)], [], {
        "a": (float(_scalar(as_)), int(_scalar(az))), "b": (float(_scalar(bs)), int(_scalar(bz))), "y": (ys, yz),
    })
    _replace(g, node, q, fused)


def _fuse_unary(g: _Graph, node: _Node) -> None:
    io = _group_io(g, node, 1)
    if io is None:
        return
    (x_src,), q = io
    xs, xz, xt = _dq_params(g, x_src[0])
    ys, yz, yt = _out_params(g, q)
    if xt != yt or xt not in EIGHT_BIT or _scalar(xs) is None:
        return
    fused = _Node(f"QLinear{node.op}", [_int_input(g, node, x_src)], [], {
        **node.attrs, "x": (float(_scalar(xs)), int(_scalar(xz))), "y": (ys, yz),
    })
    _replace(g, node, q, fused)


def _fuse_gemm(g: _Graph, node: _Node) -> None:
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
    fused = _Node("QGemm", [_int_input(g, node, a_src)], [], {
        "a": (float(_scalar(as_)), int(_scalar(az))), "b_q": b, "b_scale": np.asarray(bs, np.float32),
        "b_zp": np.asarray(bz), "y": (ys, yz), "bias": bias, "transA": int(node.attrs.get("transA", 0)),
        "transB": int(node.attrs.get("transB", 0)), "alpha": float(node.attrs.get("alpha", 1.0)),
    })
    _replace(g, node, q, fused)


def _conv_window(node: _Node, w_shape: tuple[int, ...]) -> k.Window:
    if len(w_shape) != 4:
        raise ModelError(f"ort target: only 2-D convolutions are modelled ('{node.outputs[0]}')")
    if node.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelError(f"ort target: auto_pad is not modelled ('{node.outputs[0]}')")
    return k.window(node.attrs.get("kernel_shape", w_shape[2:]), node.attrs.get("strides"), node.attrs.get("pads"),
                    node.attrs.get("dilations"))


def _pool_window(node: _Node) -> k.Window:
    if node.attrs.get("ceil_mode", 0) or node.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelError(f"ort target: ceil_mode / auto_pad pooling is not modelled ('{node.outputs[0]}')")
    kernel = node.attrs["kernel_shape"]
    if len(kernel) != 2:
        raise ModelError(f"ort target: only 2-D pooling is modelled ('{node.outputs[0]}')")
    return k.window(kernel, node.attrs.get("strides"), node.attrs.get("pads"), node.attrs.get("dilations"))


# ------------------------------------------------------------- execution
class _Runner:
    """Runs an optimized graph on one batch with the numpy kernels."""

    def __init__(self, graph: _Graph, threads: int) -> None:
        self.g = graph
        self.threads = threads
        self.qtypes: dict[str, int] = dict(graph.types)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = dict(self.g.consts)
        values[self.g.inputs[0]] = np.asarray(x, np.float32)
        for node in self.g.nodes:
            method = getattr(self, f"_op_{node.op}", None)
            if method is None:
                raise ModelError(f"ort target: unsupported operator {node.op} ('{node.outputs[0]}')")
            ins = [values[i] if i else None for i in node.inputs]
            values[node.outputs[0]] = method(node, ins)
        return values

    # quantization
    def _op_QuantizeLinear(self, node: _Node, ins: list[Any]) -> np.ndarray:
        x, scale, zp = ins[0], ins[1], ins[2]
        if scale.size != 1:
            raise ModelError(f"ort target: per-channel QuantizeLinear is not modelled ('{node.outputs[0]}')")
        t = self.qtypes[node.inputs[2]]
        return k.quantize_linear(x, float(_scalar(scale)), int(_scalar(zp)), STORAGE[t], INT_LIMITS[t])

    def _op_DequantizeLinear(self, node: _Node, ins: list[Any]) -> np.ndarray:
        zp = ins[2] if len(ins) > 2 and ins[2] is not None else 0
        return k.dequantize_linear(ins[0], ins[1], zp, int(node.attrs.get("axis", 1)))

    # fused integer kernels
    def _op_QLinearConv(self, node: _Node, ins: list[Any]) -> np.ndarray:
        a = node.attrs
        return k.qlinear_conv(ins[0], *a["x"], a["w"], a["w_scale"], a["w_zp"], *a["y"], a["bias"], a["window"],
                              a["group"])

    def _op_QLinearAdd(self, node: _Node, ins: list[Any]) -> np.ndarray:
        a, b = ins
        if a.shape != b.shape:
            raise ModelError(f"ort target: broadcasting QLinearAdd is not modelled ('{node.outputs[0]}')")
        return k.qlinear_add(a, *node.attrs["a"], b, *node.attrs["b"], *node.attrs["y"])

    def _op_QLinearAveragePool(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return k.qlinear_avg_pool(ins[0], *node.attrs["x"], *node.attrs["y"], _pool_window(node),
                                  bool(node.attrs.get("count_include_pad", 0)))

    def _op_QLinearGlobalAveragePool(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return k.qlinear_global_avg_pool(ins[0], *node.attrs["x"], *node.attrs["y"])

    def _op_QLinearSoftmax(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return k.qlinear_softmax(ins[0], *node.attrs["x"], *node.attrs["y"], int(node.attrs.get("axis", -1)))

    def _op_QGemm(self, node: _Node, ins: list[Any]) -> np.ndarray:
        a = node.attrs
        if a["transA"] or a["alpha"] != 1.0:
            raise ModelError(f"ort target: transposed / scaled QGemm is not modelled ('{node.outputs[0]}')")
        b = a["b_q"].T if a["transB"] else a["b_q"]
        return k.qgemm(ins[0], *a["a"], b, a["b_scale"], a["b_zp"], *a["y"], a["bias"])

    # float operators
    def _op_Conv(self, node: _Node, ins: list[Any]) -> np.ndarray:
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        return k.conv_float(x, w, bias, _conv_window(node, w.shape), int(node.attrs.get("group", 1)),
                            threads=self.threads)

    def _op_Gemm(self, node: _Node, ins: list[Any]) -> np.ndarray:
        a, b = ins[0], ins[1]
        attrs = node.attrs
        if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
            raise ModelError(f"ort target: Gemm with transA / alpha / beta is not modelled ('{node.outputs[0]}')")
        if attrs.get("transB", 0):
            if a.shape[0] == 1:
                raise ModelError("ort target: a one-row Gemm with transB (MLAS's M=1 transposed kernel) is not modelled")
            b = np.ascontiguousarray(b.T)
        bias = ins[2] if len(ins) > 2 else None
        return k.gemm_float(a, b, bias, threads=self.threads)

    def _op_Add(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return np.add(ins[0], ins[1], dtype=np.float32)

    def _op_Relu(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return np.maximum(ins[0], np.float32(0.0))

    def _op_Clip(self, node: _Node, ins: list[Any]) -> np.ndarray:
        limits = _clip_limits(self.g, node)
        if limits is None:
            raise ModelError(f"ort target: Clip with computed limits is not modelled ('{node.outputs[0]}')")
        return np.minimum(np.maximum(ins[0], np.float32(limits[0])), np.float32(limits[1]))

    def _op_AveragePool(self, node: _Node, ins: list[Any]) -> np.ndarray:
        mlas_pool = self.g.opset < 19 and ins[0].shape[1] % k.NCHWC_BLOCK != 0  # else NCHWc or AveragePool-19
        return k.avg_pool_float(ins[0], _pool_window(node), bool(node.attrs.get("count_include_pad", 0)), mlas_pool)

    def _op_GlobalAveragePool(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return k.global_avg_pool_float(ins[0])

    def _op_MaxPool(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return k.max_pool(ins[0], _pool_window(node))

    def _op_Softmax(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return k.softmax_float(ins[0], int(node.attrs.get("axis", -1)))

    # data movement (any type)
    def _op_Transpose(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return np.transpose(ins[0], node.attrs["perm"])

    def _op_Flatten(self, node: _Node, ins: list[Any]) -> np.ndarray:
        axis = int(node.attrs.get("axis", 1)) % max(ins[0].ndim, 1)
        return ins[0].reshape(int(np.prod(ins[0].shape[:axis])), -1)

    def _op_Reshape(self, node: _Node, ins: list[Any]) -> np.ndarray:
        shape = [int(d) for d in ins[1]]
        shape = [ins[0].shape[i] if d == 0 and not node.attrs.get("allowzero", 0) else d for i, d in enumerate(shape)]
        return ins[0].reshape(shape)

    def _op_Squeeze(self, node: _Node, ins: list[Any]) -> np.ndarray:
        axes = ins[1] if len(ins) > 1 and ins[1] is not None else node.attrs.get("axes")
        return np.squeeze(ins[0], axis=None if axes is None else tuple(int(a) for a in axes))

    def _op_Identity(self, node: _Node, ins: list[Any]) -> np.ndarray:
        return ins[0]

    _op_Dropout = _op_Identity


class OrtRunner:
    """Any QDQ ONNX model of the supported operators, run as onnxruntime's CPU provider runs it."""

    def __init__(self, model: onnx.ModelProto, threads: int | None = None) -> None:
        self.graph = optimize(model)
        self.threads = threads or os.cpu_count() or 1
        self._runner = _Runner(self.graph, self.threads)

    def plan(self) -> list[str]:
        """The operators onnxruntime runs, in order (fused integer kernels under their onnxruntime names)."""
        return [n.op for n in self.graph.nodes]

    def values(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor (and constant) of the optimized graph for one batch ``x``."""
        return self._runner.run(x)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph outputs (by ONNX name) for one batch ``x``."""
        values = self.values(x)
        return {name: values[name] for name in self.graph.outputs}


class OrtSim:
    """A state run as onnxruntime (CPU, default optimizations) runs its QDQ ONNX export."""

    def __init__(self, state: Any, threads: int | None = None, *, int4: bool = False, int32_bias: bool = False,
                 signed_activations: bool = True) -> None:
        from tinyptq.export.qdq_onnx import onnx_view, qdq_model

        view = onnx_view(state.graph)
        if view is None:
            raise ModelError("ort target: the graph has no ONNX view")
        self.model = qdq_model(state, int4=int4, int32_bias=int32_bias, view=view, signed_activations=signed_activations)
        self.runner = OrtRunner(self.model, threads)
        onnx_outputs = [o.name for o in self.model.graph.output]
        names = state.graph.output_names
        self.outputs = {n: view.tensors.get(n, onnx_outputs[i]) for i, n in enumerate(names)}

    def plan(self) -> list[str]:
        """The operators onnxruntime runs, in order (see OrtRunner.plan)."""
        return self.runner.plan()

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output (by the graph's output names) for one batch ``x``, float32 as onnxruntime returns it."""
        values = self.runner.values(x)
        return {name: values[tensor] for name, tensor in self.outputs.items()}

    def run_int(self, x: np.ndarray) -> dict[str, tuple[np.ndarray, QParams]]:
        """The integer outputs for one batch ``x``: the values the final DequantizeLinear reads, and their grid.

        Integer types are onnxruntime's (uint8 where it converted the export's int8).
        """
        values = self.runner.values(x)
        out = {}
        for name, tensor in self.outputs.items():
            dq = self.runner.graph.producer(tensor)
            if dq is None or dq.op != "DequantizeLinear":
                raise ModelError(f"ort target: output '{name}' is not quantized")
            zp = values[dq.inputs[2]] if len(dq.inputs) > 2 and dq.inputs[2] else np.zeros((), np.int64)
            out[name] = (values[dq.inputs[0]], QParams(float(_scalar(values[dq.inputs[1]])), int(_scalar(zp))))
        return out

    def predict(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """The model's (first) output as onnxruntime returns it when run on batches of ``batch_size``."""
        name = next(iter(self.outputs))
        parts = [self.run(x[i: i + batch_size])[name] for i in range(0, len(x), batch_size)]
        return np.concatenate(parts, axis=0)
