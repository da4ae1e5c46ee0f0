"""The ``ort`` simulation target: a state run as onnxruntime runs its QDQ ONNX export.

onnxruntime (CPU, default graph optimizations) does not run the file of
tinyptq.export.qdq_onnx as written: its optimizers rewrite it first. This
module builds that file (``qdq_model``), replays on its graph the rewrites
that matter for tinyptq's exports, in onnxruntime's order
(tinyptq.intsim.ort_graph), and runs every operator left with the numpy
kernels of tinyptq.intsim.ort_kernels: the fused integer kernels as
onnxruntime computes them; everything else runs in float32 exactly as MLAS computes it (Conv / Gemm /
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
from typing import Any

import numpy as np
import onnx

from tinyptq.errors import ModelError
from tinyptq.intsim import ort_kernels as k
from tinyptq.intsim.ort_graph import (
    INT_LIMITS,
    STORAGE,
    Graph,
    Node,
    QParams,
    clip_limits,
    conv_window,
    optimize,
    pool_window,
    scalar,
)


class _Runner:
    """Runs an optimized graph on one batch with the numpy kernels."""

    def __init__(self, graph: Graph, threads: int) -> None:
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
    def _op_QuantizeLinear(self, node: Node, ins: list[Any]) -> np.ndarray:
        x, scale, zp = ins[0], ins[1], ins[2]
        if scale.size != 1:
            raise ModelError(f"ort target: per-channel QuantizeLinear is not modelled ('{node.outputs[0]}')")
        t = self.qtypes[node.inputs[2]]
        return k.quantize_linear(x, float(scalar(scale)), int(scalar(zp)), STORAGE[t], INT_LIMITS[t])

    def _op_DequantizeLinear(self, node: Node, ins: list[Any]) -> np.ndarray:
        zp = ins[2] if len(ins) > 2 and ins[2] is not None else 0
        return k.dequantize_linear(ins[0], ins[1], zp, int(node.attrs.get("axis", 1)))

    # fused integer kernels
    def _op_QLinearConv(self, node: Node, ins: list[Any]) -> np.ndarray:
        a = node.attrs
        return k.qlinear_conv(ins[0], *a["x"], a["w"], a["w_scale"], a["w_zp"], *a["y"], a["bias"], a["window"],
                              a["group"])

    def _op_QLinearAdd(self, node: Node, ins: list[Any]) -> np.ndarray:
        a, b = ins
        if a.shape != b.shape:
            raise ModelError(f"ort target: broadcasting QLinearAdd is not modelled ('{node.outputs[0]}')")
        return k.qlinear_add(a, *node.attrs["a"], b, *node.attrs["b"], *node.attrs["y"])

    def _op_QLinearAveragePool(self, node: Node, ins: list[Any]) -> np.ndarray:
        return k.qlinear_avg_pool(ins[0], *node.attrs["x"], *node.attrs["y"], pool_window(node),
                                  bool(node.attrs.get("count_include_pad", 0)))

    def _op_QLinearGlobalAveragePool(self, node: Node, ins: list[Any]) -> np.ndarray:
        return k.qlinear_global_avg_pool(ins[0], *node.attrs["x"], *node.attrs["y"])

    def _op_QLinearSoftmax(self, node: Node, ins: list[Any]) -> np.ndarray:
        return k.qlinear_softmax(ins[0], *node.attrs["x"], *node.attrs["y"], int(node.attrs.get("axis", -1)))

    def _op_QGemm(self, node: Node, ins: list[Any]) -> np.ndarray:
        a = node.attrs
        if a["transA"] or a["alpha"] != 1.0:
            raise ModelError(f"ort target: transposed / scaled QGemm is not modelled ('{node.outputs[0]}')")
        b = a["b_q"].T if a["transB"] else a["b_q"]
        return k.qgemm(ins[0], *a["a"], b, a["b_scale"], a["b_zp"], *a["y"], a["bias"])

    # float operators
    def _op_Conv(self, node: Node, ins: list[Any]) -> np.ndarray:
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        return k.conv_float(x, w, bias, conv_window(node, w.shape), int(node.attrs.get("group", 1)),
                            threads=self.threads)

    def _op_Gemm(self, node: Node, ins: list[Any]) -> np.ndarray:
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

    def _op_Add(self, node: Node, ins: list[Any]) -> np.ndarray:
        return np.add(ins[0], ins[1], dtype=np.float32)

    def _op_Relu(self, node: Node, ins: list[Any]) -> np.ndarray:
        return np.maximum(ins[0], np.float32(0.0))

    def _op_Clip(self, node: Node, ins: list[Any]) -> np.ndarray:
        limits = clip_limits(self.g, node)
        if limits is None:
            raise ModelError(f"ort target: Clip with computed limits is not modelled ('{node.outputs[0]}')")
        return np.minimum(np.maximum(ins[0], np.float32(limits[0])), np.float32(limits[1]))

    def _op_AveragePool(self, node: Node, ins: list[Any]) -> np.ndarray:
        mlas_pool = self.g.opset < 19 and ins[0].shape[1] % k.NCHWC_BLOCK != 0  # else NCHWc or AveragePool-19
        return k.avg_pool_float(ins[0], pool_window(node), bool(node.attrs.get("count_include_pad", 0)), mlas_pool)

    def _op_GlobalAveragePool(self, node: Node, ins: list[Any]) -> np.ndarray:
        return k.global_avg_pool_float(ins[0])

    def _op_MaxPool(self, node: Node, ins: list[Any]) -> np.ndarray:
        return k.max_pool(ins[0], pool_window(node))

    def _op_Softmax(self, node: Node, ins: list[Any]) -> np.ndarray:
        return k.softmax_float(ins[0], int(node.attrs.get("axis", -1)))

    # data movement (any type)
    def _op_Transpose(self, node: Node, ins: list[Any]) -> np.ndarray:
        return np.transpose(ins[0], node.attrs["perm"])

    def _op_Flatten(self, node: Node, ins: list[Any]) -> np.ndarray:
        axis = int(node.attrs.get("axis", 1)) % max(ins[0].ndim, 1)
        return ins[0].reshape(int(np.prod(ins[0].shape[:axis])), -1)

    def _op_Reshape(self, node: Node, ins: list[Any]) -> np.ndarray:
        shape = [int(d) for d in ins[1]]
        shape = [ins[0].shape[i] if d == 0 and not node.attrs.get("allowzero", 0) else d for i, d in enumerate(shape)]
        return ins[0].reshape(shape)

    def _op_Squeeze(self, node: Node, ins: list[Any]) -> np.ndarray:
        axes = ins[1] if len(ins) > 1 and ins[1] is not None else node.attrs.get("axes")
        return np.squeeze(ins[0], axis=None if axes is None else tuple(int(a) for a in axes))

    def _op_Identity(self, node: Node, ins: list[Any]) -> np.ndarray:
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
            out[name] = (values[dq.inputs[0]], QParams(float(scalar(values[dq.inputs[1]])), int(scalar(zp))))
        return out

    def predict(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """The model's (first) output as onnxruntime returns it when run on batches of ``batch_size``."""
        name = next(iter(self.outputs))
        parts = [self.run(x[i: i + batch_size])[name] for i in range(0, len(x), batch_size)]
        return np.concatenate(parts, axis=0)
