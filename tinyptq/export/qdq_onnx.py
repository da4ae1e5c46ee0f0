"""QDQ ONNX export: the simulated model as onnxruntime runs it, integer weights included.

Built from the graph's float ONNX view (:class:`~tinyptq.graph.base.OnnxView`)
and the state's encodings only:

- every quantized kernel becomes an integer initializer (int8 / uint8, int16 /
  uint16 above 8 bits, optionally INT4 / UINT4 at 4 bits or fewer) holding
  exactly :meth:`PTQState.integer_kernels`, read through a DequantizeLinear
  (per channel along the kernel's output axis in ONNX layout);
- every activation point with an encoding goes through QuantizeLinear ->
  DequantizeLinear. When the grid is narrower than the integer type (4 bits in
  a uint8, a narrow range), a Clip to the grid's float limits comes first, so
  the result equals :meth:`Encoding.fake_quant` bit for bit;
- unsigned activation grids are stored in signed types by default (a uint8
  grid with zero point z is the int8 grid with zero point z - 128: the same
  values). onnxruntime's integer kernels then run int8 x int8, which does not
  saturate on x86 CPUs without VNNI the way its uint8 x int8 kernels do
  (measured on the ic model: 84.8 % instead of 88.8 % at W8A8);
- biases stay float (as in the simulation), or on request int32 with scale
  ``s_in * s_w`` and zero point 0 (as integer engines store them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tinyptq import __version__
from tinyptq.errors import ConfigError, ModelError
from tinyptq.graph.base import OnnxView
from tinyptq.quant import Encoding

DEFAULT_OPSET = 17
INT_OPSET = 21  # INT4 / UINT4 and 16-bit QuantizeLinear need opset 21


@dataclass(frozen=True)
class Container:
    """The ONNX integer type that stores a grid, and its limits."""

    onnx_type: int
    numpy_type: Any
    lo: int
    hi: int
    opset: int  # smallest opset with QuantizeLinear / DequantizeLinear of this type


_CONTAINERS = {
    (4, True): Container(TensorProto.INT4, np.int8, -8, 7, INT_OPSET),
    (4, False): Container(TensorProto.UINT4, np.uint8, 0, 15, INT_OPSET),
    (8, True): Container(TensorProto.INT8, np.int8, -128, 127, 13),
    (8, False): Container(TensorProto.UINT8, np.uint8, 0, 255, 13),
    (16, True): Container(TensorProto.INT16, np.int16, -(2**15), 2**15 - 1, INT_OPSET),
    (16, False): Container(TensorProto.UINT16, np.uint16, 0, 2**16 - 1, INT_OPSET),
}


def container(enc: Encoding, int4: bool = False) -> Container:
    """The smallest integer type holding ``enc``'s grid (INT4 only when asked for)."""
    width = 4 if int4 and enc.bits <= 4 else (8 if enc.bits <= 8 else 16)
    return _CONTAINERS[(width, enc.signed)]


def _width(box: Container) -> int:
    return next(w for (w, signed), b in _CONTAINERS.items() if b is box)


def _int_tensor(name: str, values: np.ndarray, box: Container) -> onnx.TensorProto:
    values = np.asarray(values)
    if box.onnx_type in (TensorProto.INT4, TensorProto.UINT4):  # packed two per byte by onnx
        return helper.make_tensor(name, box.onnx_type, list(values.shape), values.astype(np.int32).ravel().tolist())
    return numpy_helper.from_array(values.astype(box.numpy_type), name)


class _QdqBuilder:
    """Rewrites a float ONNX model in place: integer kernels, Q/DQ pairs at the activation points."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.head: list[onnx.NodeProto] = []  # nodes that only read initializers / inputs
        self.after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> nodes to insert after its producer
        self.inits = {t.name: t for t in self.graph.initializer}
        self.names = {t.name for t in self.graph.initializer} | {i.name for i in self.graph.input}
        for node in self.graph.node:
            self.names.update(node.output)
            self.names.add(node.name)

    def unique(self, base: str) -> str:
        name, n = base, 1
        while name in self.names:
            name, n = f"{base}_{n}", n + 1
        self.names.add(name)
        return name

    def add_init(self, tensor: onnx.TensorProto) -> str:
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor
        return tensor.name

    def qparams(self, base: str, enc: Encoding, box: Container, shift: int = 0) -> tuple[str, str]:
        """Scale and zero-point initializers of an encoding (integers moved by ``shift``)."""
        scale = self.add_init(numpy_helper.from_array(enc.scale.astype(np.float32), self.unique(f"{base}__scale")))
        zp = self.add_init(_int_tensor(self.unique(f"{base}__zero_point"), enc.zero_point + shift, box))
        return scale, zp

    def float_init(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise ModelError(f"ONNX view names initializer '{name}' that the model does not have")
        return numpy_helper.to_array(self.inits[name])

    def replace_init(self, name: str, q: np.ndarray, enc: Encoding, box: Container, axis: int | None) -> None:
        """Swap float initializer ``name`` for integers + DequantizeLinear writing ``name``."""
        old = self.inits.pop(name)
        self.graph.initializer.remove(old)
        q_name = self.add_init(_int_tensor(self.unique(f"{name}__q"), q, box))
        scale, zp = self.qparams(name, enc, box)
        attrs = {"axis": axis} if axis is not None else {}
        node_name = self.unique(f"{name}__dq")
        self.head.append(helper.make_node("DequantizeLinear", [q_name, scale, zp], [name], name=node_name, **attrs))

    def quantize_tensor(self, tensor: str, enc: Encoding, box: Container, shift: int = 0) -> None:
        """Route ``tensor`` through (Clip ->) QuantizeLinear -> DequantizeLinear.

        ``shift`` moves the integers (and the zero point) without changing the
        grid: -128 stores a uint8 grid in an int8.
        """
        graph_inputs = {i.name for i in self.graph.input}
        if tensor in graph_inputs:
            src, dst = tensor, self.unique(f"{tensor}__dq")
            for node in self.graph.node:  # consumers read the dequantized input
                node.input[:] = [dst if i == tensor else i for i in node.input]
        else:
            producer = next((n for n in self.graph.node if tensor in n.output), None)
            if producer is None:
                raise ModelError(f"ONNX view names tensor '{tensor}' that no node produces")
            # the producer writes a renamed float tensor; the DQ takes over the name, so every
            # consumer and graph output reads the quantized value without rewiring
            src = self.unique(f"{tensor}__float")
            producer.output[:] = [src if o == tensor else o for o in producer.output]
            dst = tensor
        nodes = []
        x = src
        if (enc.qmin + shift, enc.qmax + shift) != (box.lo, box.hi):  # the type would saturate too late
            lo = self.add_init(numpy_helper.from_array(enc.min.astype(np.float32), self.unique(f"{tensor}__grid_min")))
            hi = self.add_init(numpy_helper.from_array(enc.max.astype(np.float32), self.unique(f"{tensor}__grid_max")))
            x = self.unique(f"{tensor}__clipped")
            nodes.append(helper.make_node("Clip", [src, lo, hi], [x], name=x))
        scale, zp = self.qparams(tensor, enc, box, shift)
        q = self.unique(f"{tensor}__q")
        nodes.append(helper.make_node("QuantizeLinear", [x, scale, zp], [q], name=q))
        nodes.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dst], name=self.unique(f"{tensor}__dq")))
        self.after.setdefault(src, []).extend(nodes)

    def finish(self) -> None:
        """Put the new nodes in topological order."""
        inputs = {i.name for i in self.graph.input}
        order = list(self.head)
        for name in inputs:
            order.extend(self.after.pop(name, []))
        for node in self.graph.node:
            order.append(node)
            for out in node.output:
                order.extend(self.after.pop(out, []))
        del self.graph.node[:]
        self.graph.node.extend(order)


def required_opset(state: Any, int4: bool = False) -> int:
    """The smallest opset that holds every encoding of ``state`` (17, or 21 for INT4 / 16-bit)."""
    encs = [*state.weight_encodings.values(), *state.act_encodings.values()]
    return max([DEFAULT_OPSET, *(container(e, int4).opset for e in encs)])


def qdq_model(
    state: Any,
    opset: int | None = None,
    int4: bool = False,
    int32_bias: bool = False,
    view: OnnxView | None = None,
    signed_activations: bool = True,
) -> onnx.ModelProto:
    """The QDQ ONNX model of a PTQState (see the module docstring); checked with onnx.checker.

    ``opset`` defaults to the smallest that holds the types (17, or 21 for INT4 /
    16-bit); ``int4`` stores grids of 4 bits or fewer in INT4 / UINT4;
    ``int32_bias`` quantizes biases; ``signed_activations=False`` keeps uint8
    activations; ``view`` reuses a float view of the graph.
    """
    ints = state.integer_kernels()
    boxes = {k: container(e, int4) for k, e in state.weight_encodings.items() if k in ints}
    boxes.update({f"act:{k}": container(e, int4) for k, e in state.act_encodings.items()})
    needed = required_opset(state, int4)
    if opset is None:
        opset = needed
    elif opset < needed:
        raise ConfigError(f"ONNX opset {opset} cannot hold these encodings (INT4 or 16-bit types): use opset {needed}")
    if view is None:
        view = onnx_view(state.graph, opset)
    model = onnx.ModelProto()
    model.CopyFrom(view.model)
    _set_opset(model, opset)
    builder = _QdqBuilder(model)
    for layer, q in ints.items():
        enc = state.weight_encodings[layer]
        _check_on_grid(layer, q, enc)
        _add_kernel(builder, view, layer, q, enc, boxes[layer])
        if int32_bias and layer in view.biases:
            _add_int32_bias(builder, state, view, layer, enc)
    for point, enc in state.act_encodings.items():
        if point not in view.tensors:
            raise ModelError(f"activation point '{point}' has no tensor in the ONNX model")
        if enc.per_channel:
            raise ConfigError(f"activation '{point}' has a per-channel encoding; QDQ export needs per-tensor activations")
        box, shift = boxes[f"act:{point}"], 0
        if signed_activations and not enc.signed:
            signed = _CONTAINERS[(_width(box), True)]
            box, shift = signed, signed.lo - box.lo
        builder.quantize_tensor(view.tensors[point], enc, box, shift)
    builder.finish()
    model.producer_name, model.producer_version = "tinyptq", __version__
    _set_meta(model, {"tinyptq.format": "qdq", "tinyptq.weight_bits": state.config.weight_bits,
                      "tinyptq.act_bits": state.config.act_bits,
                      "tinyptq.signed_activations": signed_activations})
    onnx.checker.check_model(model, full_check=True)
    return model


def export_qdq(
    state: Any,
    path: str | Path,
    opset: int | None = None,
    int4: bool = False,
    int32_bias: bool = False,
    view: OnnxView | None = None,
    signed_activations: bool = True,
) -> Path:
    """Write the QDQ ONNX model of ``state`` to ``path`` (options as :func:`qdq_model`); return the path."""
    model = qdq_model(state, opset, int4, int32_bias, view, signed_activations)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return path


def onnx_session(model: onnx.ModelProto | str | Path, integer_kernels: bool = False) -> Any:
    """An onnxruntime CPU session of a QDQ model.

    By default QuantizeLinear / DequantizeLinear run as written (the session
    option ``session.disable_quant_qdq``), so the float operators between them
    compute what the simulation computes. ``integer_kernels=True`` lets
    onnxruntime fuse them into its integer operators (QLinearConv, ...): the
    deployment path, whose uint8 x int8 kernels can saturate on x86 CPUs
    without VNNI (onnxruntime's documented U8S8 limitation).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not integer_kernels:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the named tensors (e.g. the logits before softmax)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in have:
            copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def onnx_predict(session: Any, x: np.ndarray, batch_size: int = 256, output: str | None = None) -> np.ndarray:
    """The first (or the named) output of an onnxruntime session over ``x``, in batches."""
    name = session.get_inputs()[0].name
    wanted = [output] if output else [session.get_outputs()[0].name]
    parts = [
        session.run(wanted, {name: np.asarray(x[i : i + batch_size], np.float32)})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts, axis=0)


# ----------------------------------------------------------------- helpers
def onnx_view(graph: Any, opset: int = DEFAULT_OPSET, optional: bool = False) -> OnnxView | None:
    """The graph's float ONNX view; None (when ``optional``) or ModelError for graphs without one."""
    try:
        return graph.to_onnx(opset)
    except NotImplementedError as exc:
        if optional:
            return None
        raise ModelError(f"cannot export to ONNX: {exc}") from None


def _set_opset(model: onnx.ModelProto, opset: int) -> None:
    from tinyptq.graph.keras_onnx import min_ir_version

    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if imp.version > opset:
                raise ConfigError(f"the float ONNX model uses opset {imp.version}, newer than the requested {opset}")
            imp.version = opset
    model.ir_version = max(model.ir_version, min_ir_version(opset))


def _set_meta(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def _check_on_grid(layer: str, q: np.ndarray, enc: Encoding) -> None:
    if q.size and (q.min() < enc.qmin or q.max() > enc.qmax):
        raise ConfigError(
            f"integer kernel of '{layer}' leaves its {enc.bits}-bit grid [{enc.qmin}, {enc.qmax}]"
        )


def _add_kernel(builder: _QdqBuilder, view: OnnxView, layer: str, q: np.ndarray, enc: Encoding, box: Container) -> None:
    if layer not in view.kernels:
        raise ModelError(f"layer '{layer}' has no kernel initializer in the ONNX model")
    name, perm = view.kernels[layer], tuple(view.kernel_perms[layer])
    q_onnx = np.transpose(q, perm)
    shape = tuple(builder.float_init(name).shape)
    if q_onnx.shape != shape:
        raise ModelError(f"kernel of '{layer}' has shape {shape} in ONNX, not {q_onnx.shape}")
    axis = perm.index(enc.axis % q.ndim) if enc.per_channel else None
    builder.replace_init(name, q_onnx, enc, box, axis)


def _add_int32_bias(builder: _QdqBuilder, state: Any, view: OnnxView, layer: str, w_enc: Encoding) -> None:
    """Bias as int32 with scale s_in * s_w (zero point 0), when the layer's input is quantized."""
    q_layer = state.graph.quant_layer(layer)
    in_enc = state.act_encodings.get(q_layer.input_point) if q_layer.input_point else None
    if in_enc is None or in_enc.per_channel:
        return  # a float input: no integer accumulator to match, the bias stays float
    name = view.biases[layer]
    bias = builder.float_init(name).astype(np.float32)
    scale = (in_enc.scale * w_enc.scale).astype(np.float32)
    lim = np.float64(2**31 - 1)
    q = np.clip(np.rint(bias.astype(np.float64) / scale.astype(np.float64)), -lim, lim).astype(np.int32)
    old = builder.inits.pop(name)
    builder.graph.initializer.remove(old)
    q_name = builder.add_init(numpy_helper.from_array(q, builder.unique(f"{name}__q")))
    s_name = builder.add_init(numpy_helper.from_array(scale, builder.unique(f"{name}__scale")))
    z_name = builder.add_init(numpy_helper.from_array(np.zeros(scale.shape, np.int32), builder.unique(f"{name}__zero_point")))
    attrs = {"axis": 0} if scale.ndim else {}
    builder.head.append(
        helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [name], name=builder.unique(f"{name}__dq"), **attrs)
    )
