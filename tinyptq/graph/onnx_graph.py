"""The ONNX adapter: an ONNX model as a mutable graph of single-output nodes.

Nodes are named by their ONNX node name (made unique; the output tensor name
when a node has none) and the model input by its tensor name; a node's name
stands for its output tensor in ``iterate`` and ``ort_sim``. Kernels keep the
ONNX layout: Conv (out, in / group, kh, kw), Gemm as its transB says, MatMul
(in, out). The input layout is the model's own (NCHW for PyTorch exports,
NHWC for tf2onnx conversions of Keras models, which transpose inside).
Float runs go through onnxruntime; the simulation is tinyptq's TF executor
(``ort_sim`` builds the onnxruntime QDQ reference it is checked against).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from onnx import ModelProto, shape_inference, version_converter

from tinyptq.errors import ModelError, first_line
from tinyptq.graph.base import ActPoint, KernelLayout, ModelGraph, OnnxView, QuantLayer
from tinyptq.graph.onnx_build import (
    OnnxSim,
    emit_nodes,
    insert_fake_quant,
    make_model,
    make_session,
    output_info,
    run_batches,
)
from tinyptq.graph.onnx_topology import PARAM_INPUTS, OnnxNode, OnnxParts, op_kind, read_model
from tinyptq.graph.placement import Analysis, analyse
from tinyptq.graph.spec import LayerSpec, same_pads
from tinyptq.quant import Encoding

_LAYER_OPS = ("Conv", "Gemm", "MatMul")
_CONSTANT_OPERANDS = ("Add", "Sub", "Mul")  # their constant inputs count as parameters


class OnnxGraph(ModelGraph):
    """An ONNX model (one float input) as tinyptq's mutable graph."""

    def __init__(self, parts: OnnxParts, name: str = "model") -> None:
        self._nodes = {n.name: n for n in parts.nodes}
        self._init = dict(parts.init)
        self._input = parts.input
        self._output_infos = {vi.name: vi for vi in parts.outputs}
        self._opsets = dict(parts.opsets)
        self._ir_version = parts.ir_version
        self.name = name
        self._version = 0
        self._cache: dict[Any, Any] = {}
        producer = {n.output: n.name for n in parts.nodes} | {self._input.name: self._input.name}
        self._outputs = [producer[vi.name] for vi in parts.outputs]
        if not self._input.type.tensor_type.HasField("shape"):
            raise ModelError(f"ONNX model input '{self._input.name}' has no shape")

    @classmethod
    def from_onnx(cls, model: ModelProto, name: str | None = None) -> OnnxGraph:
        """Read an onnx.ModelProto (checked and normalized; ModelError when unsupported)."""
        return cls(read_model(model), name=name or model.graph.name or "model")

    # ------------------------------------------------------------ structure
    @property
    def input_shape(self) -> tuple[int | None, ...]:
        dims = self._input.type.tensor_type.shape.dim
        return tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _index(self) -> dict[str, Any]:
        """Producers, readers and operation types of the current nodes (cached per version)."""
        key = ("index", self._version)
        if key not in self._cache:
            producer = {self._input.name: self._input.name} | {n.output: n.name for n in self._nodes.values()}
            readers: dict[str, list[str]] = {}
            for n in self._nodes.values():
                for t in dict.fromkeys(n.inputs):
                    readers.setdefault(t, []).append(n.name)
            kinds = {self._input.name: "input"} | {n.name: op_kind(n, self._init) for n in self._nodes.values()}
            self._cache[key] = {"producer": producer, "readers": readers, "kinds": kinds}
        return self._cache[key]

    def _analyse(self) -> Analysis:
        key = ("analysis", self._version)
        if key not in self._cache:
            names = [self._input.name, *self._nodes]
            inputs = {n: self.inputs_of(n) for n in names}
            kinds = self._index()["kinds"]
            self._cache[key] = analyse(names, kinds, inputs, self._outputs, self._channel_axis)
        return self._cache[key]

    def quant_layers(self) -> list[QuantLayer]:
        return list(self._analyse().layers)

    def act_points(self) -> list[ActPoint]:
        return list(self._analyse().points)

    def consumers(self, name: str) -> list[str]:
        return list(self._index()["readers"].get(self._tensor(name), []))

    def node_names(self) -> list[str]:
        return [self._input.name, *self._nodes]

    def op_type(self, name: str) -> str:
        self._tensor(name)  # KeyError for unknown names
        return self._index()["kinds"][name]

    def inputs_of(self, name: str) -> list[str]:
        if name == self._input.name:
            return []
        producer = self._index()["producer"]
        return [producer[t] for t in self._node(name).inputs if t and t not in self._init and t in producer]

    def batch_norm_names(self) -> list[str]:
        return [n.name for n in self._nodes.values() if n.op_type == "BatchNormalization"]

    def kernel_layout(self, layer: str) -> KernelLayout:
        node = self._layer(layer)
        if node.op_type == "Conv":  # (out, in / group, *taps): already canonical
            return KernelLayout(tuple(range(self._init[node.inputs[1]].ndim)), int(node.attr("group", 1)))
        if node.op_type == "Gemm" and node.attr("transB", 0):
            return KernelLayout((0, 1))
        return KernelLayout((1, 0))  # (in, out)

    def tensor_channel_axis(self, name: str) -> int:
        # ONNX tensors are channels-first, except what MatMul / Gemm produce (features last)
        return -1 if self.op_type(name) == "dense" else 1

    def _channel_axis(self, layer: str) -> int:
        return self.kernel_layout(layer).perm[0]

    def layer_spec(self, name: str) -> LayerSpec:
        node = self._layer(name)
        layout = self.kernel_layout(name)
        kernel = layout.to_canonical(self.kernel(name)).astype(np.float32)
        bias = self.bias(name)
        kind = self.op_type(name)
        if node.op_type != "Conv":
            return LayerSpec(name, kind, kernel, bias)
        taps = kernel.shape[2:]
        n = len(taps)
        strides = tuple(int(v) for v in node.attr("strides", [1] * n))
        dilations = tuple(int(v) for v in node.attr("dilations", [1] * n))
        auto_pad = node.attr("auto_pad", "NOTSET")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = self._shapes().get(node.inputs[0], [None] * (n + 2))[2:]
            if len(size) != n or None in size:
                raise ModelError(f"unsupported ONNX node '{name}' (Conv with auto_pad {auto_pad} on a free size)")
            pads = tuple(same_pads(*a) for a in zip(size, taps, strides, dilations, strict=True))
            if auto_pad == "SAME_LOWER":
                pads = tuple((after, before) for before, after in pads)
        elif auto_pad == "VALID":
            pads = tuple((0, 0) for _ in taps)
        else:
            flat = [int(v) for v in node.attr("pads", [0] * (2 * n))]
            pads = tuple((flat[i], flat[i + n]) for i in range(n))
        return LayerSpec(name, kind, kernel, bias, strides, pads, dilations, layout.groups, channels_last=False)

    def node_function(self, name: str) -> Any:
        from tinyptq.graph.onnx_tf import node_function

        node = self._node(name)
        if node.op_type in _LAYER_OPS:
            raise KeyError(f"'{name}' ({node.op_type}) is run by the executor itself")
        data = [t for t in node.inputs if t and t not in self._init]
        shapes = self._shapes()
        ranks = [len(shapes[t]) if t in shapes else None for t in data]
        return node_function(node, self._init, data, self._opsets.get("", 0), ranks)

    def _node(self, name: str) -> OnnxNode:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no node named '{name}'") from None

    def _layer(self, name: str) -> OnnxNode:
        node = self._node(name)
        if node.op_type not in _LAYER_OPS:
            raise KeyError(f"'{name}' ({node.op_type}) is not a quantizable layer")
        return node

    def _tensor(self, name: str) -> str:
        """The tensor a node name stands for (the model input for its own name)."""
        return self._input.name if name == self._input.name else self._node(name).output

    # -------------------------------------------------------------- weights
    def kernel(self, layer: str) -> np.ndarray:
        return np.array(self._init[self._layer(layer).inputs[1]], np.float32)

    def bias(self, layer: str) -> np.ndarray | None:
        node = self._layer(layer)
        has = len(node.inputs) > 2 and node.inputs[2]
        return np.array(self._init[node.inputs[2]], np.float32) if has else None

    def set_kernel(self, layer: str, kernel: np.ndarray) -> None:
        name = self._layer(layer).inputs[1]
        if kernel.shape != self._init[name].shape:
            raise ValueError(f"kernel of '{layer}' has shape {self._init[name].shape}, not {kernel.shape}")
        self._init[name] = np.asarray(kernel, np.float32).copy()
        self._touch()

    def set_bias(self, layer: str, bias: np.ndarray) -> None:
        node = self._layer(layer)
        bias = np.asarray(bias, np.float32).reshape(-1).copy()
        if len(node.inputs) > 2 and node.inputs[2]:
            self._init[node.inputs[2]] = bias
        else:
            name, i = f"{layer}__bias", 1
            while name in self._init:
                name, i = f"{layer}__bias{i}", i + 1
            self._init[name] = bias
            node.inputs = [*node.inputs[:2], name]
        self._touch()

    def bn_params(self, name: str) -> dict[str, np.ndarray]:
        node = self._node(name)
        if node.op_type != "BatchNormalization":
            raise KeyError(f"'{name}' is not a BatchNormalization")
        gamma, beta, mean, var = (np.array(self._init[t], np.float32) for t in node.inputs[1:5])
        return {"gamma": gamma, "beta": beta, "mean": mean, "var": var, "epsilon": float(node.attr("epsilon", 1e-5))}

    def remove_node(self, name: str) -> None:
        node = self._node(name)
        data = [t for t in node.inputs if t and t not in self._init]
        if len(data) != 1:
            raise ValueError(f"'{name}' has {len(data)} data inputs; only single-input nodes can be removed")
        src = data[0]
        index = self._index()
        producer = index["producer"][src]
        graph_outputs = {self._tensor(o) for o in self._outputs}
        del self._nodes[name]
        if producer in self._nodes and index["readers"][src] == [name] and src not in graph_outputs:
            self._nodes[producer].output = node.output  # readers and model outputs keep their tensor
        else:
            for other in self._nodes.values():
                other.inputs = [src if t == node.output else t for t in other.inputs]
        self._outputs = [producer if o == name else o for o in self._outputs]
        used = {t for n in self._nodes.values() for t in n.inputs}
        self._init = {k: v for k, v in self._init.items() if k in used}
        self._touch()

    def _touch(self) -> None:
        self._version += 1
        self._cache.clear()

    # ------------------------------------------------------------ execution
    def float_model(self, outputs: Sequence[str] | None = None) -> ModelProto:
        """The float ONNX model with the named nodes' tensors as outputs (default: the model's)."""
        tensors = [self._tensor(n) for n in (outputs or self._outputs)]
        return self._model(emit_nodes(self._nodes.values()), self._init, tensors)

    def _model(
        self, protos: list, init: dict[str, np.ndarray], tensors: Sequence[str], renamed: dict | None = None
    ) -> ModelProto:
        """A model with ``tensors`` as outputs (the input itself is served by run_batches)."""
        wanted = [t for t in dict.fromkeys(tensors) if t != self._input.name]
        infos = []
        for t in wanted or [self._tensor(self._outputs[0])]:
            source = (renamed or {}).get(t, t)
            info = output_info(source, self._output_infos)
            info.name = t
            infos.append(info)
        return make_model(protos, init, self._input, infos, self._opsets, self._ir_version, self.name)

    def _session(self, tensors: tuple[str, ...]) -> Any:
        key = ("session", tensors)
        if key not in self._cache:
            model = self._model(emit_nodes(self._nodes.values()), self._init, tensors)
            self._cache[key] = make_session(model)
        return self._cache[key]

    def iterate(
        self, x: np.ndarray, outputs: Sequence[str], batch_size: int = 128
    ) -> Iterator[dict[str, np.ndarray]]:
        self.check_input(x)
        names = list(outputs)
        tensors = [self._tensor(n) for n in names]
        session = self._session(tuple(dict.fromkeys(tensors)))
        for batch in run_batches(session, self._input.name, x, tensors, batch_size):
            yield dict(zip(names, batch, strict=True))

    def ort_sim(
        self,
        weights: dict[str, np.ndarray],
        act_encodings: dict[str, Encoding],
        outputs: Sequence[str] | None = None,
    ) -> OnnxSim:
        """The QDQ reference: QuantizeLinear -> DequantizeLinear after every point, run by onnxruntime.

        Not the simulation (that is tinyptq.sim.QuantSim, for ONNX models too):
        a check that the TF program and onnxruntime's QDQ arithmetic agree.
        ``weights`` are kernels already on their grids.
        """
        init = dict(self._init)
        for layer, kernel in weights.items():
            name = self._layer(layer).inputs[1]
            if kernel.shape != init[name].shape:
                raise ValueError(f"kernel of '{layer}' has shape {init[name].shape}, not {kernel.shape}")
            init[name] = np.asarray(kernel, np.float32)
        known = {self._input.name, *self._nodes}
        ranks = self._ranks() if any(e.per_channel for e in act_encodings.values()) else {}
        acts = {}
        for point, enc in act_encodings.items():
            if point in known:
                t = self._tensor(point)
                acts[t] = (point, enc, ranks.get(t))
        protos, fq_init, renamed = insert_fake_quant(emit_nodes(self._nodes.values()), self._input.name, acts)
        names = list(outputs or self._outputs)
        tensors = [renamed.get(self._tensor(n), self._tensor(n)) for n in names]
        back = {v: k for k, v in renamed.items()}
        model = self._model(protos, {**init, **fq_init}, tensors, back)
        return OnnxSim(model, names, tensors)

    def to_onnx(self, opset: int = 17) -> OnnxView:
        model = self.float_model()
        if opset != self._opsets.get("", 0):
            try:
                model = version_converter.convert_version(model, opset)
            except Exception as exc:  # the converter raises plain RuntimeErrors
                reason = first_line(exc, 160)
                raise ModelError(f"cannot convert '{self.name}' to ONNX opset {opset}: {reason}") from None
        layers = self.quant_layers()
        return OnnxView(
            model=model,
            tensors={p.name: self._tensor(p.name) for p in self.act_points()},
            kernels={q.name: self._nodes[q.name].inputs[1] for q in layers},
            kernel_perms={q.name: tuple(range(self.kernel(q.name).ndim)) for q in layers},
            biases={q.name: self._nodes[q.name].inputs[2] for q in layers if self.bias(q.name) is not None},
        )

    # ---------------------------------------------------------------- misc
    def _shapes(self) -> dict[str, list[int | None]]:
        """Static tensor shapes from ONNX shape inference (None where unknown)."""
        key = ("shapes", self._version)
        if key not in self._cache:
            inferred = shape_inference.infer_shapes(self.float_model())
            shapes = {}
            for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
                tt = vi.type.tensor_type
                if tt.HasField("shape"):
                    shapes[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
            self._cache[key] = shapes
        return self._cache[key]

    def _ranks(self) -> dict[str, int]:
        return {name: len(shape) for name, shape in self._shapes().items()}

    def layer_macs(self) -> dict[str, int]:
        # every output position of a conv / dense layer uses each kernel value once
        shapes, macs = self._shapes(), {}
        for layer in self.quant_layers():
            shape = shapes.get(self._tensor(layer.name))
            spatial = None if shape is None else shape[2:] if layer.kind != "dense" else shape[1:-1]
            if spatial is None or any(d is None for d in spatial):
                raise ModelError(f"cannot count MACs of '{layer.name}': its output shape is not static")
            macs[layer.name] = int(np.prod(spatial, dtype=np.int64)) * int(self._init[self._nodes[layer.name].inputs[1]].size)
        return macs

    def copy(self) -> OnnxGraph:
        clone = OnnxGraph.__new__(OnnxGraph)
        clone.__dict__.update(self.__dict__)
        clone._nodes = {k: copy.deepcopy(v) for k, v in self._nodes.items()}
        clone._init = {k: v.copy() for k, v in self._init.items()}
        clone._outputs = list(self._outputs)
        clone._version = 0
        clone._cache = {}
        return clone

    def __getstate__(self) -> dict[str, Any]:
        # onnxruntime sessions do not pickle; they are rebuilt on demand
        return {**self.__dict__, "_cache": {}}

    def _params(self) -> dict[str, np.ndarray]:
        """The initializers that are weights (layers, batch norms, constant operands)."""
        names = set()
        for n in self._nodes.values():
            positions = PARAM_INPUTS.get(n.op_type, range(len(n.inputs)) if n.op_type in _CONSTANT_OPERANDS else ())
            names.update(n.inputs[i] for i in positions if i < len(n.inputs) and n.inputs[i] in self._init)
        return {k: self._init[k] for k in sorted(names)}

    def param_count(self) -> int:
        return int(sum(v.size for v in self._params().values()))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self._input.SerializeToString())
        for n in self._nodes.values():
            h.update(repr((n.name, n.op_type, n.inputs, n.output)).encode())
            for a in n.attrs:
                h.update(a.SerializeToString())
        used = {t for n in self._nodes.values() for t in n.inputs}
        for k in sorted(used & set(self._init)):
            v = np.ascontiguousarray(self._init[k])
            h.update(repr((k, v.dtype.str, v.shape)).encode())
            h.update(v.tobytes())
        h.update(repr(self._outputs).encode())
        return h.hexdigest()

