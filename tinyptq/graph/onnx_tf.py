"""TensorFlow implementations of the non-layer ONNX nodes, for the differentiable executor.

A builder per op family reads a node's attributes and constant inputs once
(ModelError for what is unsupported) and returns a callable over the inputs
aligned with ``node.inputs``: TF tensors (data, channels first), numpy arrays
(initializers), None (omitted). Pooling runs channels-last: TF's CPU pooling is NHWC only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tinyptq._tf import tf
from tinyptq.errors import ModelError
from tinyptq.graph.onnx_topology import OnnxNode

Args = list[Any]  # aligned with node.inputs: tf.Tensor (data), np.ndarray (constant), None (omitted)
Run = Callable[[Args], Any]
Builder = Callable[[OnnxNode, list[Any], int], Run]


def node_function(
    node: OnnxNode,
    init: dict[str, np.ndarray],
    data_inputs: list[str],
    opset: int,
    input_ranks: list[int | None],
) -> Callable[[list[Any]], Any]:
    """A differentiable TF callable computing ``node`` from the tensors of ``data_inputs`` (in order)."""
    builder = _BUILDERS.get(node.op_type)
    if builder is None:
        raise _unsupported(node, "has no TF implementation")
    for t in node.inputs:
        if t and t not in init and t not in data_inputs:
            raise ModelError(f"ONNX node '{node.name}' ({node.op_type}): input '{t}' is neither data nor constant")
    const = [init.get(t) if t and t not in data_inputs else None for t in node.inputs]
    run = builder(node, const, opset)
    ranks = dict(zip(data_inputs, input_ranks, strict=False))

    def call(tensors: list[Any]) -> Any:
        given = dict(zip(data_inputs, tensors, strict=True))
        args = [
            None if not t else _with_rank(given[t], ranks.get(t)) if t in given else c
            for t, c in zip(node.inputs, const, strict=True)
        ]
        return run(args)

    return call


# ------------------------------------------------------------------ helpers
def _unsupported(node: OnnxNode, what: str) -> ModelError:
    return ModelError(f"unsupported ONNX node '{node.name}' ({node.op_type} {what})")


def _constant(node: OnnxNode, const: list[Any], i: int, what: str) -> np.ndarray | None:
    """Constant input ``i`` (None when omitted); ModelError when it is computed at run time."""
    if i >= len(node.inputs) or not node.inputs[i]:
        return None
    if const[i] is None:
        raise _unsupported(node, f"with a non-constant {what}")
    return np.asarray(const[i])


def _scalar(v: np.ndarray) -> float:
    return float(np.ravel(v)[0])


def _with_rank(x: Any, rank: int | None) -> Any:
    """Give a tensor of unknown rank the rank the graph knows for it."""
    return tf.ensure_shape(x, [None] * rank) if x.shape.rank is None and rank is not None else x


def _f32(v: Any) -> Any:
    return tf.cast(v, tf.float32) if tf.is_tensor(v) else tf.constant(np.asarray(v, np.float32))


def _dims(x: Any) -> list[Any]:
    """Each dimension of ``x``: a Python int when static, else a scalar tensor."""
    dynamic = tf.shape(x)
    return [d if d is not None else dynamic[i] for i, d in enumerate(x.shape)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ------------------------------------------------------------- element-wise
def _unary(fn: Callable[[Any], Any]) -> Builder:
    return lambda node, const, opset: lambda a: fn(a[0])


def _binary(fn: Callable[[Any, Any], Any]) -> Builder:
    return lambda node, const, opset: lambda a: fn(_f32(a[0]), _f32(a[1]))


def _leaky_relu(node: OnnxNode, const: list[Any], opset: int) -> Run:
    alpha = float(node.attr("alpha", 0.01))
    return lambda a: tf.nn.leaky_relu(a[0], alpha=alpha)


def _dropout(node: OnnxNode, const: list[Any], opset: int) -> Run:
    training = _constant(node, const, 2, "training_mode")
    if training is not None and bool(training):
        raise _unsupported(node, "in training mode")
    return lambda a: tf.identity(a[0])


def _clip(node: OnnxNode, const: list[Any], opset: int) -> Run:
    # opset >= 11: bounds are optional inputs; before: attributes
    lo, hi = (_constant(node, const, i, "bound") for i in (1, 2))
    lo = _scalar(lo) if lo is not None else float(node.attr("min", -np.inf))
    hi = _scalar(hi) if hi is not None else float(node.attr("max", np.inf))
    return lambda a: tf.minimum(tf.maximum(a[0], lo), hi)


def _batch_norm(node: OnnxNode, const: list[Any], opset: int) -> Run:
    if node.attr("training_mode", 0):
        raise _unsupported(node, "in training mode")
    scale, bias, mean, var = (_constant(node, const, i, "parameter").astype(np.float32) for i in (1, 2, 3, 4))
    mult = scale / np.sqrt(var + np.float32(node.attr("epsilon", 1e-5)))
    shift = bias - mean * mult

    def run(a: Args) -> Any:
        shape = [-1] + [1] * (a[0].shape.rank - 2)  # parameters run along axis 1
        return a[0] * tf.reshape(mult, shape) + tf.reshape(shift, shape)

    return run


def _softmax(node: OnnxNode, const: list[Any], opset: int) -> Run:
    axis = int(node.attr("axis", 1 if opset < 13 else -1))
    if opset >= 13:
        return lambda a: tf.nn.softmax(a[0], axis=axis)

    def run(a: Args) -> Any:
        # before opset 13: normalize over all dims from `axis` on (the input flattened to 2-D)
        x = a[0]
        axes = list(range(_axis(axis, x.shape.rank), x.shape.rank))
        e = tf.exp(x - tf.stop_gradient(tf.reduce_max(x, axes, keepdims=True)))
        return e / tf.reduce_sum(e, axes, keepdims=True)

    return run


def _concat(node: OnnxNode, const: list[Any], opset: int) -> Run:
    axis = int(node.attr("axis"))
    return lambda a: tf.concat([_f32(v) for v in a if v is not None], axis=axis)


# ------------------------------------------------------------------- shapes
def _flatten(node: OnnxNode, const: list[Any], opset: int) -> Run:
    axis = int(node.attr("axis", 1))

    def run(a: Args) -> Any:
        dims = _dims(a[0])
        split = _axis(axis, len(dims))
        return tf.reshape(a[0], [math.prod(dims[:split]), math.prod(dims[split:])])

    return run


def _reshape(node: OnnxNode, const: list[Any], opset: int) -> Run:
    shape = [int(s) for s in _constant(node, const, 1, "shape").reshape(-1)]
    keep_zero = bool(node.attr("allowzero", 0))

    def run(a: Args) -> Any:
        dims = _dims(a[0])
        copied = {i for i, s in enumerate(shape) if s == 0 and not keep_zero}
        target = [dims[i] if i in copied else s for i, s in enumerate(shape)]
        # resolve -1 here when the dims not copied are static, so a free batch keeps the rest static
        rest = [d for i, d in enumerate(dims) if i not in copied]
        known = math.prod(s for i, s in enumerate(shape) if i not in copied and s != -1)
        if -1 in shape and known > 0 and all(isinstance(d, int) for d in rest):
            target[shape.index(-1)] = math.prod(rest) // known
        return tf.reshape(a[0], target)

    return run


def _axes(node: OnnxNode, const: list[Any]) -> list[int] | None:
    """Squeeze / Unsqueeze axes: a constant input from opset 13, an attribute before."""
    axes = _constant(node, const, 1, "axes")
    axes = axes if axes is not None else node.attr("axes")
    return None if axes is None else [int(v) for v in np.ravel(axes)]


def _squeeze(node: OnnxNode, const: list[Any], opset: int) -> Run:
    axes = _axes(node, const)
    return lambda a: tf.squeeze(a[0], axis=axes)


def _unsqueeze(node: OnnxNode, const: list[Any], opset: int) -> Run:
    axes = _axes(node, const)
    if not axes:
        raise _unsupported(node, "without axes")

    def run(a: Args) -> Any:
        x, rank = a[0], a[0].shape.rank + len(axes)  # axes index the output
        for axis in sorted(_axis(v, rank) for v in axes):
            x = tf.expand_dims(x, axis)
        return x

    return run


def _transpose(node: OnnxNode, const: list[Any], opset: int) -> Run:
    perm = node.attr("perm")  # None: reverse the dims
    return lambda a: tf.transpose(a[0], None if perm is None else [int(p) for p in perm])


# ------------------------------------------------------------------ padding
def _pad(node: OnnxNode, const: list[Any], opset: int) -> Run:
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "edge", "reflect"):
        raise _unsupported(node, f"with mode={mode}")
    pads = _constant(node, const, 1, "pads")  # an input from opset 11, an attribute before
    pads = [int(p) for p in np.ravel(pads if pads is not None else node.attr("pads", []))]
    value = _constant(node, const, 2, "constant value")
    value = _scalar(value) if value is not None else float(node.attr("value", 0.0))
    axes = _constant(node, const, 3, "axes")
    if axes is not None and len(pads) != 2 * axes.size:
        raise _unsupported(node, f"with {len(pads)} pads for {axes.size} axes")

    def run(a: Args) -> Any:
        rank = a[0].shape.rank
        chosen = list(range(rank)) if axes is None else [_axis(int(v), rank) for v in np.ravel(axes)]
        if len(pads) != 2 * len(chosen):
            raise _unsupported(node, f"with {len(pads)} pads for an input of rank {rank}")
        full = [[0, 0] for _ in range(rank)]
        for j, axis in enumerate(chosen):
            full[axis] = [pads[j], pads[j + len(chosen)]]
        return _pad_tensor(a[0], full, mode, value)

    return run


def _pad_tensor(x: Any, pads: list[list[int]], mode: str = "constant", value: float = 0.0) -> Any:
    """Pad ``x`` by (begin, end) per axis; negative pads crop."""
    grow = [[max(b, 0), max(e, 0)] for b, e in pads]
    if mode == "edge":  # repeat the border values: gather with clamped indices
        for axis, (b, e) in enumerate(grow):
            if b or e:
                n = _dims(x)[axis]
                idx = np.arange(-b, n + e) if isinstance(n, int) else tf.range(-b, n + e)
                x = tf.gather(x, tf.clip_by_value(idx, 0, n - 1), axis=axis)
    elif any(b or e for b, e in grow):
        x = tf.pad(x, grow, mode="REFLECT") if mode == "reflect" else tf.pad(x, grow, constant_values=value)
    if any(b < 0 or e < 0 for b, e in pads):
        x = x[tuple(slice(max(-b, 0), e if e < 0 else None) for b, e in pads)]
    return x


# ------------------------------------------------------------------ pooling
def _pool(node: OnnxNode, const: list[Any], opset: int) -> Run:
    kind = "MAX" if node.op_type == "MaxPool" else "AVG"
    kernel = [int(k) for k in node.attr("kernel_shape", [])]
    n = len(kernel)
    if n not in (1, 2, 3):
        raise _unsupported(node, f"with {n} spatial dimensions")
    strides = [int(s) for s in node.attr("strides", [1] * n)]
    dilations = [int(d) for d in node.attr("dilations", [1] * n)]
    pads = [int(p) for p in node.attr("pads", [0] * 2 * n)]
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise _unsupported(node, f"with auto_pad={auto_pad}")
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n:
        raise _unsupported(node, "with strides / dilations / pads not matching kernel_shape")
    ceil_mode = bool(node.attr("ceil_mode", 0))
    include_pad = bool(node.attr("count_include_pad", 0))
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]  # a window's extent
    # storage_order only changes MaxPool's second output (indices), which tinyptq never reads

    def run(a: Args) -> Any:
        x = a[0]
        if x.shape.rank != n + 2:
            raise _unsupported(node, f"with a {n}-D kernel on an input of rank {x.shape.rank}")
        spatial = _pool_pads(node, list(x.shape[2:]), reach, strides, pads, auto_pad, ceil_mode)
        fill = -np.inf if kind == "MAX" else 0.0
        padded = _pad_tensor(x, [[0, 0], [0, 0], *([b, e + c] for b, e, c in spatial)], value=fill)
        y = _pool_valid(_channels_last(padded), kind, kernel, strides, dilations)
        if kind == "AVG" and any(c or (not include_pad and (b or e)) for b, e, c in spatial):
            # divide by ONNX's count: the input values, plus the explicit pads with count_include_pad
            mask = tf.ones(tf.stack([1, *_dims(x)[2:], 1]))
            mask = _pad_tensor(mask, [[0, 0], *([b, e] for b, e, _ in spatial), [0, 0]], value=float(include_pad))
            mask = _pad_tensor(mask, [[0, 0], *([0, c] for _, _, c in spatial), [0, 0]])
            y = y / _pool_valid(mask, kind, kernel, strides, dilations)
        return _channels_first(y)

    return run


def _pool_pads(
    node: OnnxNode, sizes: list[int | None], reach: list[int], strides: list[int], pads: list[int], auto_pad: str, ceil: bool
) -> list[tuple[int, int, int]]:
    """Per spatial dim: the (begin, end) pads and the end padding ceil_mode adds (never counted)."""
    n, out = len(reach), []
    for i, (size, r, s) in enumerate(zip(sizes, reach, strides, strict=True)):
        if size is None and (ceil or auto_pad.startswith("SAME")):
            raise _unsupported(node, f"with auto_pad={auto_pad}, ceil_mode={int(ceil)} on a dynamic spatial size")
        if auto_pad.startswith("SAME"):  # output size ceil(size / stride)
            total = max(0, (-(-size // s) - 1) * s + r - size)
            b = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            out.append((b, total - b, 0))
            continue
        b, e = (0, 0) if auto_pad == "VALID" else (pads[i], pads[i + n])
        extra = 0
        if ceil:
            count = -(-(size + b + e - r) // s) + 1
            if (count - 1) * s >= size + b:  # the last window must start in the input or its begin pad
                count -= 1
            extra = max(0, (count - 1) * s + r - (size + b + e))
        out.append((b, e, extra))
    return out


def _pool_valid(x: Any, kind: str, kernel: list[int], strides: list[int], dilations: list[int]) -> Any:
    """Channels-last pooling without padding.

    TF dilates only with unit strides and refuses strides larger than the
    window: pool with unit strides then, and subsample.
    """
    dilated = any(d > 1 for d in dilations) and any(s > 1 for s in strides)
    if dilated or any(s > k for s, k in zip(strides, kernel, strict=True)):
        y = tf.nn.pool(x, kernel, kind, strides=[1] * len(kernel), padding="VALID", dilations=dilations)
        return y[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
    return tf.nn.pool(x, kernel, kind, strides=strides, padding="VALID", dilations=dilations)


def _channels_last(x: Any) -> Any:
    return tf.transpose(x, [0, *range(2, x.shape.rank), 1])


def _channels_first(x: Any) -> Any:
    return tf.transpose(x, [0, x.shape.rank - 1, *range(1, x.shape.rank - 1)])


def _global_pool(node: OnnxNode, const: list[Any], opset: int) -> Run:
    reduce = tf.reduce_max if node.op_type == "GlobalMaxPool" else tf.reduce_mean
    return lambda a: reduce(a[0], axis=list(range(2, a[0].shape.rank)), keepdims=True)


_BUILDERS: dict[str, Builder] = {
    "BatchNormalization": _batch_norm,
    "Relu": _unary(tf.nn.relu),
    "Clip": _clip,
    "Identity": _unary(tf.identity),
    "Dropout": _dropout,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalMaxPool": _global_pool,
    "GlobalAveragePool": _global_pool,
    "Pad": _pad,
    "Add": _binary(tf.add),
    "Sub": _binary(tf.subtract),
    "Mul": _binary(tf.multiply),
    "Concat": _concat,
    "Softmax": _softmax,
    "Sigmoid": _unary(tf.sigmoid),
    "Tanh": _unary(tf.tanh),
    "LeakyRelu": _leaky_relu,
}
