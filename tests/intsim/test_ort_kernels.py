"""The numpy onnxruntime kernels against onnxruntime itself: every output value must match.

Each test builds a one-operator model with onnx.helper, runs it in an
onnxruntime CPU session with the default graph optimizations and compares.
Quantized operators are written as DequantizeLinear -> op -> QuantizeLinear
groups, the form tinyptq exports: the test also reads the optimized model to
check which kernel onnxruntime chose (QLinearConv, QLinearAdd, ...). Float
kernels get float inputs built from quantized values, as they see them
between DequantizeLinear and QuantizeLinear. Scales chosen as powers of two
put many results exactly on rounding ties.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tinyptq.intsim import ort_kernels as k  # noqa: E402

F32 = np.float32
THREADS = 2  # intra-op threads of every session (matters for one-image float convolutions)
ONNX_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8, np.float32: TensorProto.FLOAT,
              np.int32: TensorProto.INT32}


# ---------------------------------------------------------------- helpers
def _run(nodes: list[Any], feeds: dict[str, np.ndarray], inits: dict[str, np.ndarray], tmp_path: Path,
         opset: int = 17) -> tuple[np.ndarray, list[str]]:
    """Run a one-output model on ``feeds``; return the output and the optimized graph's operator types."""
    inputs = [helper.make_tensor_value_info(n, ONNX_TYPES[v.dtype.type], list(v.shape)) for n, v in feeds.items()]
    out = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "one_op", inputs, [helper.make_empty_tensor_value_info(out)],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = THREADS
    path = tmp_path / f"optimized_{len(list(tmp_path.iterdir()))}.onnx"
    opts.optimized_model_filepath = str(path)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = session.run(None, feeds)[0]
    return y, [n.op_type for n in onnx.load(str(path)).graph.node]


def _qdq(op: Any, x_dtype: type, xs: float, xz: int, ys: float, yz: int) -> tuple[list[Any], dict[str, np.ndarray]]:
    """DequantizeLinear -> ``op`` (reading "xf", writing "yf") -> QuantizeLinear, input "x", output "y"."""
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]), op,
             helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])]
    inits = {"xs": np.asarray(xs, F32), "xz": np.asarray(xz, x_dtype), "ys": np.asarray(ys, F32),
             "yz": np.asarray(yz, x_dtype)}
    return nodes, inits


def _ints(rng: np.random.Generator, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    lo, hi = k.int_limits(dtype)
    return rng.integers(lo, hi + 1, shape).astype(dtype)


def _dequantized(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.0371, lo: int = -128,
                 hi: int = 127) -> np.ndarray:
    """Float32 values as a DequantizeLinear produces them."""
    return (F32(scale) * rng.integers(lo, hi + 1, shape).astype(F32)).astype(F32)


def _weights(rng: np.random.Generator, shape: tuple[int, ...], bits: int = 8) -> np.ndarray:
    q = rng.integers(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), shape).astype(F32)
    return (q * rng.uniform(0.001, 0.02, shape[0]).astype(F32).reshape(-1, *[1] * (len(shape) - 1))).astype(F32)


def _exact_fma(a: float, b: float, c: float) -> F32:
    """float32(a * b + c) rounded once, half to even, from exact rational arithmetic."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    near = F32(float(exact))
    cands = {near, np.nextafter(near, F32(np.inf)), np.nextafter(near, F32(-np.inf))}
    best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.asarray(v).view(np.int32)) & 1))
    return F32(best)


# ------------------------------------------------------------ arithmetic
def test_fma_is_rounded_once() -> None:
    rng = np.random.default_rng(0)
    a = _dequantized(rng, (3000,), 0.0137)
    b = _weights(rng, (3000,))
    c = rng.normal(0, 2, 3000).astype(F32)
    got = k.fma(a, b, c)
    want = np.array([_exact_fma(float(x), float(y), float(z)) for x, y, z in zip(a, b, c, strict=True)], F32)
    assert np.array_equal(got, want)


def test_round_sum_corrects_double_rounding() -> None:
    # 1 + 2**-24 is the float32 midpoint between 1 and 1 + 2**-23; the tiny term decides the side
    mid = np.array([1.0 + 2.0**-24] * 3)
    tiny = np.array([2.0**-60, -(2.0**-60), 0.0])
    got = k.round_sum(mid, tiny)
    assert got.tolist() == [F32(1.0 + 2.0**-23), F32(1.0), F32(1.0)]  # the exact tie goes to even
    assert mid.astype(F32)[0] == F32(1.0)  # where a plain float64 sum rounded twice goes wrong


# ---------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("dtype,zp", [(np.uint8, 128), (np.int8, -3), (np.uint8, 0)])
def test_quantize_linear_divides_and_rounds_ties_to_even(tmp_path: Path, dtype: type, zp: int) -> None:
    s = F32(0.0371)
    ties = ((np.arange(-300, 300) + 0.5) * np.float64(s)).astype(F32)
    x = np.concatenate([(ties.view(np.int32) + d).view(F32) for d in range(-3, 4)])
    x = np.concatenate([x, np.array([1e9, -1e9, 0.0, 2.5, -2.5], F32), np.arange(-8, 9, dtype=F32) * F32(0.5) * s])
    op = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    y, _ = _run([op], {"x": x}, {"s": np.asarray(s), "z": np.asarray(zp, dtype)}, tmp_path)
    assert np.array_equal(y, k.quantize_linear(x, s, zp, dtype))
    lo, hi = k.int_limits(dtype)
    by_reciprocal = np.clip(np.rint(x * (F32(1) / s)) + zp, lo, hi)
    assert (by_reciprocal != y).any()  # the inputs tell a division from a multiplication


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_dequantize_linear(tmp_path: Path, axis: int | None) -> None:
    rng = np.random.default_rng(1)
    q = _ints(rng, np.int8, (6, 5, 3))
    n = q.shape[axis] if axis is not None else 1
    scale = rng.uniform(0.001, 0.2, n).astype(F32).reshape(-1 if axis is not None else ())
    zp = rng.integers(-10, 10, n).astype(np.int8).reshape(scale.shape)
    attrs = {"axis": axis} if axis is not None else {}
    op = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)
    y, _ = _run([op], {"q": q}, {"s": scale, "z": zp}, tmp_path)
    assert np.array_equal(y, k.dequantize_linear(q, scale, zp, axis if axis is not None else 1))


def test_weight_bias_quantization(tmp_path: Path) -> None:
    """A float bias of a quantized Conv becomes int32 at s_x * s_w (onnxruntime's WeightBiasQuantization)."""
    rng = np.random.default_rng(2)
    x = _ints(rng, np.uint8, (1, 8, 6, 6))
    w = _ints(rng, np.int8, (16, 8, 3, 3))
    sw = rng.uniform(0.001, 0.02, 16).astype(F32)
    bias = rng.normal(0, 1, 16).astype(F32)
    bias[:4] = (np.arange(4) + 0.5).astype(F32) * (F32(0.25) * sw[:4])  # near ties of b / (s_x s_w)
    conv = helper.make_node("Conv", ["xf", "wf", "b"], ["yf"], kernel_shape=[3, 3])
    nodes, inits = _qdq(conv, np.uint8, 0.25, 3, 0.1, 7)
    nodes.insert(1, helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0))
    inits.update(w=w, sw=sw, zw=np.zeros(16, np.int8), b=bias)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "bias.onnx")
    graph = helper.make_graph(nodes, "bias", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    folded = {t.name: numpy_helper.to_array(t) for t in onnx.load(opts.optimized_model_filepath).graph.initializer}
    int32 = [v for v in folded.values() if v.dtype == np.int32 and v.shape == (16,)]
    q, _ = k.quantize_bias(bias, 0.25, sw)  # its scale feeds the float Conv of test_fused_conv_between_qdq
    assert len(int32) == 1 and np.array_equal(int32[0], q)


# ------------------------------------------------------- integer kernels
CONV_CASES = {
    "3x3": dict(c=16, h=12, m=16, kernel=3, stride=1, pads=(1, 1, 1, 1)),
    "3x3_stride2_same": dict(c=16, h=12, m=32, kernel=3, stride=2, pads=(0, 0, 1, 1)),
    "1x1_stride2": dict(c=16, h=12, m=32, kernel=1, stride=2, pads=(0, 0, 0, 0)),
    "1x1": dict(c=64, h=5, m=64, kernel=1, stride=1, pads=(0, 0, 0, 0)),
    "depthwise": dict(c=32, h=9, m=32, kernel=3, stride=1, pads=(1, 1, 1, 1), group=32),
    "first_layer": dict(c=3, h=12, m=16, kernel=3, stride=1, pads=(1, 1, 1, 1)),
    "ties": dict(c=16, h=8, m=16, kernel=3, stride=1, pads=(1, 1, 1, 1), ties=True),
    "ties_depthwise": dict(c=16, h=8, m=16, kernel=3, stride=1, pads=(1, 1, 1, 1), group=16, ties=True),
    "per_tensor": dict(c=16, h=8, m=8, kernel=3, stride=1, pads=(1, 1, 1, 1), per_tensor=True),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_qlinear_conv(tmp_path: Path, case: str) -> None:
    p = dict(CONV_CASES[case])
    rng = np.random.default_rng(3)
    group, ties = p.get("group", 1), p.get("ties", False)
    xs, xz, ys, yz = (0.25, 7, 1.0, 3) if ties else (0.0372, 7, 0.05, 3)  # ties: multiplier 0.5
    sw = np.full(p["m"], 2.0 if ties else 0.0123, F32) if ties or p.get("per_tensor") else \
        rng.uniform(0.001, 0.02, p["m"]).astype(F32)
    x = _ints(rng, np.uint8, (2, p["c"], p["h"], p["h"]))
    w = rng.integers(-3 if ties else -127, 4 if ties else 128, (p["m"], p["c"] // group, p["kernel"], p["kernel"]))
    w = w.astype(np.int8)
    bias = rng.integers(-2000, 2000, p["m"]).astype(np.int32)
    conv = helper.make_node("Conv", ["xf", "wf", "bf"], ["yf"], kernel_shape=[p["kernel"]] * 2,
                            strides=[p["stride"]] * 2, pads=list(p["pads"]), group=group)
    nodes, inits = _qdq(conv, np.uint8, xs, xz, ys, yz)
    w_scale = sw[:1].reshape(()) if p.get("per_tensor") else sw
    axis = {} if p.get("per_tensor") else {"axis": 0}
    nodes[1:1] = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], **axis),
                  helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], **axis)]
    inits.update(w=w, sw=w_scale, zw=np.zeros(w_scale.shape, np.int8), b=bias,
                 sb=(F32(xs) * w_scale).astype(F32), zb=np.zeros(w_scale.shape, np.int32))
    y, ops = _run(nodes, {"x": x}, inits, tmp_path)
    assert "QLinearConv" in ops
    want = k.qlinear_conv(x, xs, xz, w, w_scale, 0, ys, yz, bias, k.window([p["kernel"]] * 2, [p["stride"]] * 2,
                                                                           p["pads"]), group)
    assert int((y != want).sum()) == 0


@pytest.mark.parametrize("dtype,scales,zps", [
    (np.uint8, (0.031, 0.047, 0.06), (120, 133, 128)),
    (np.uint8, (0.5, 0.25, 1.0), (120, 133, 128)),  # ties
    (np.uint8, (0.031, 0.047, 0.02), (17, 200, 0)),  # saturation
    (np.int8, (0.031, 0.047, 0.06), (-5, 3, 0)),
])
def test_qlinear_add(tmp_path: Path, dtype: type, scales: tuple[float, ...], zps: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    a, b = _ints(rng, dtype, (2, 16, 9, 9)), _ints(rng, dtype, (2, 16, 9, 9))
    nodes = [helper.make_node("DequantizeLinear", ["a", "as", "az"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bf"]),
             helper.make_node("Add", ["af", "bf"], ["yf"]), helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])]
    inits = {f"{n}s": np.asarray(s, F32) for n, s in zip("aby", scales, strict=True)}
    inits.update({f"{n}z": np.asarray(z, dtype) for n, z in zip("aby", zps, strict=True)})
    y, ops = _run(nodes, {"a": a, "b": b}, inits, tmp_path)
    assert ops == ["QLinearAdd"]
    want = k.qlinear_add(a, scales[0], zps[0], b, scales[1], zps[1], scales[2], zps[2])
    assert int((y != want).sum()) == 0


@pytest.mark.parametrize("shape,op,dtype", [
    ((4, 64, 8, 8), "AveragePool", np.uint8),  # the ic pooling: a window over the whole image
    ((4, 64, 25, 5), "AveragePool", np.uint8),  # kws
    ((4, 64, 8, 8), "GlobalAveragePool", np.uint8),
    ((4, 16, 5, 5), "AveragePool", np.int8),
])
def test_qlinear_global_average_pool(tmp_path: Path, shape: tuple[int, ...], op: str, dtype: type) -> None:
    rng = np.random.default_rng(5)
    x = _ints(rng, dtype, shape)
    attrs = {"kernel_shape": list(shape[2:])} if op == "AveragePool" else {}
    nodes, inits = _qdq(helper.make_node(op, ["xf"], ["yf"], **attrs), dtype, 0.05, 3, 0.02, 5)
    y, ops = _run(nodes, {"x": x}, inits, tmp_path)
    assert ops == [f"QLinear{op}"]
    assert int((y != k.qlinear_global_avg_pool(x, 0.05, 3, 0.02, 5)).sum()) == 0
    if op == "AveragePool":
        assert np.array_equal(y, k.qlinear_avg_pool(x, 0.05, 3, 0.02, 5, k.window(shape[2:])))


@pytest.mark.parametrize("include_pad", [0, 1])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_average_pool_window(tmp_path: Path, include_pad: int, dtype: type) -> None:
    rng = np.random.default_rng(6)
    x = _ints(rng, dtype, (3, 16, 9, 9))
    op = helper.make_node("AveragePool", ["xf"], ["yf"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                          count_include_pad=include_pad)
    nodes, inits = _qdq(op, dtype, 0.05, 3, 0.02, 5)
    y, ops = _run(nodes, {"x": x}, inits, tmp_path)
    assert ops == ["QLinearAveragePool"]
    want = k.qlinear_avg_pool(x, 0.05, 3, 0.02, 5, k.window([3, 3], [2, 2], [1, 1, 1, 1]), bool(include_pad))
    assert int((y != want).sum()) == 0


@pytest.mark.parametrize("dtype,d,xs,xz,ys,yz", [
    (np.uint8, 10, 0.08, 100, 1 / 256, 0),
    (np.uint8, 10, 0.08, 100, 1 / 255, 0),  # floor(1 / ys) is 254 or 255 in float32
    (np.uint8, 12, 0.3, 100, 0.0039, 0),
    (np.int8, 10, 0.08, 10, 1 / 256, -128),
    (np.int8, 10, 0.02, 10, 1 / 256, 0),  # saturates at 127
])
def test_qlinear_softmax(tmp_path: Path, dtype: type, d: int, xs: float, xz: int, ys: float, yz: int) -> None:
    rng = np.random.default_rng(7)
    x = _ints(rng, dtype, (500, d))
    nodes, inits = _qdq(helper.make_node("Softmax", ["xf"], ["yf"], axis=-1), dtype, xs, xz, ys, yz)
    y, ops = _run(nodes, {"x": x}, inits, tmp_path)
    assert ops == ["QLinearSoftmax"]
    assert int((y != k.qlinear_softmax(x, xs, xz, ys, yz)).sum()) == 0


@pytest.mark.parametrize("batch,per_channel,ties", [(16, True, False), (16, False, False), (1, True, False),
                                                    (16, True, True)])
def test_qgemm(tmp_path: Path, batch: int, per_channel: bool, ties: bool) -> None:
    rng = np.random.default_rng(8)
    depth, n = 64, 10
    a = _ints(rng, np.uint8, (batch, depth))
    b = rng.integers(-3 if ties else -127, 4 if ties else 128, (depth, n)).astype(np.int8)
    sa, za, sy, zy = (0.25, 7, 1.0, 120) if ties else (0.05, 7, 0.1, 120)
    sb = np.full(n, 2.0, F32) if ties else rng.uniform(0.001, 0.02, n).astype(F32)
    sb = sb if per_channel else sb[:1].reshape(())
    bias = rng.integers(-3000, 3000, n).astype(np.int32)
    nodes, inits = _qdq(helper.make_node("Gemm", ["xf", "bf", "cf"], ["yf"]), np.uint8, sa, za, sy, zy)
    nodes[1:1] = [helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bf"], **({"axis": 1} if per_channel else {})),
                  helper.make_node("DequantizeLinear", ["c", "cs", "cz"], ["cf"], **({"axis": 0} if per_channel else {}))]
    inits.update(b=b, bs=sb, bz=np.zeros(sb.shape, np.int8), c=bias if per_channel else bias,
                 cs=(F32(sa) * sb).astype(F32), cz=np.zeros(sb.shape, np.int32))
    if not per_channel:
        inits["c"] = bias
    y, ops = _run(nodes, {"x": a}, inits, tmp_path)
    assert ops == ["QGemm"]
    assert int((y != k.qgemm(a, sa, za, b, sb, 0, sy, zy, bias)).sum()) == 0


# --------------------------------------------------------- float kernels
FLOAT_CONV_CASES = {
    "3x3": (4, 16, 32, 16, 3, 1, (1, 1, 1, 1), 1),  # K = 144: two K blocks
    "first_layer": (4, 3, 32, 16, 3, 1, (1, 1, 1, 1), 1),
    "3x3_stride2_same": (4, 16, 32, 32, 3, 2, (0, 0, 1, 1), 1),
    "3x3_wide": (4, 64, 8, 64, 3, 1, (1, 1, 1, 1), 1),  # K = 576 over 64 outputs: N < K
    "1x1_stride2": (4, 16, 32, 32, 1, 2, (0, 0, 0, 0), 1),
    "1x1_gemm_direct": (4, 64, 8, 64, 1, 1, (0, 0, 0, 0), 1),
    "depthwise": (4, 64, 12, 64, 3, 1, (1, 1, 1, 1), 64),  # one filter per group: MLAS's M=1 kernel
    "one_image": (1, 16, 32, 16, 3, 1, (1, 1, 1, 1), 1),
    "one_image_threads": (1, 16, 10, 16, 3, 1, (1, 1, 1, 1), 1),  # K blocks depend on the thread split
    "one_image_1x1": (1, 64, 8, 64, 1, 1, (0, 0, 0, 0), 1),
    "more_filters_than_outputs": (2, 32, 4, 64, 3, 1, (1, 1, 1, 1), 1),
}


@pytest.mark.parametrize("case", list(FLOAT_CONV_CASES))
def test_conv_float(tmp_path: Path, case: str) -> None:
    n, c, h, m, kernel, stride, pads, group = FLOAT_CONV_CASES[case]
    rng = np.random.default_rng(9)
    x = _dequantized(rng, (n, c, h, h))
    w = _weights(rng, (m, c // group, kernel, kernel))
    bias = rng.normal(0, 0.5, m).astype(F32)
    op = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[kernel] * 2, strides=[stride] * 2,
                          pads=list(pads), group=group)
    y, _ = _run([op], {"x": x, "w": w, "b": bias}, {}, tmp_path)  # weights as inputs: MlasConv, not NCHWc
    want = k.conv_float(x, w, bias, k.window([kernel] * 2, [stride] * 2, pads), group, threads=THREADS)
    assert int((y != want).sum()) == 0
    cols, filt = _operands64(x, w, kernel, stride, pads, group)
    rounded_once = (np.einsum("ngkp,gmk->ngmp", cols, filt).reshape(want.shape) + bias.reshape(1, -1, 1, 1))
    assert (rounded_once.astype(F32) != want).any()  # MLAS's float32 arithmetic is what the test checks


def _operands64(x: np.ndarray, w: np.ndarray, kernel: int, stride: int, pads: tuple[int, ...],
                group: int) -> tuple[np.ndarray, np.ndarray]:
    cols, _ = k._im2col(x.astype(np.float64), k.window([kernel] * 2, [stride] * 2, pads), 0.0)
    n, c, taps, p = cols.shape
    return cols.reshape(n, group, c // group * taps, p), w.astype(np.float64).reshape(group, w.shape[0] // group, -1)


def test_fused_conv_between_qdq(tmp_path: Path) -> None:
    """DQ -> Conv -> Clip (a 4-bit grid in a uint8) -> Q stays float: FusedConv, then QuantizeLinear."""
    rng = np.random.default_rng(10)
    x = rng.integers(0, 16, (4, 16, 16, 16)).astype(np.uint8)
    wq = rng.integers(-7, 8, (32, 16, 3, 3)).astype(np.int8)
    sw = rng.uniform(0.01, 0.1, 32).astype(F32)
    bias = rng.normal(0, 0.3, 32).astype(F32)
    xs, ys, lo, hi = F32(0.21), F32(0.17), F32(0.0), F32(15 * 0.17)
    conv = helper.make_node("Conv", ["xf", "wf", "b"], ["cf"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])
    nodes, inits = _qdq(conv, np.uint8, xs, 0, ys, 0)
    nodes[1:2] = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0), conv,
                  helper.make_node("Relu", ["cf"], ["rf"]), helper.make_node("Clip", ["rf", "lo", "hi"], ["yf"])]
    inits.update(w=wq, sw=sw, zw=np.zeros(32, np.int8), b=bias, lo=np.asarray(lo), hi=np.asarray(hi))
    y, ops = _run(nodes, {"x": x}, inits, tmp_path)
    assert "FusedConv" in ops and "QLinearConv" not in ops
    bq, bs = k.quantize_bias(bias, xs, sw)
    yf = k.conv_float(k.dequantize_linear(x, xs, 0), k.dequantize_linear(wq, sw, np.zeros(32, np.int64), axis=0),
                      k.dequantize_linear(bq, bs, np.zeros(32, np.int64), axis=0),
                      k.window([3, 3], [2, 2], [0, 0, 1, 1]), activation=k.Activation("clip", lo, hi),
                      threads=THREADS)
    assert int((y != k.quantize_linear(yf, ys, 0, np.uint8)).sum()) == 0


@pytest.mark.parametrize("batch,depth,n", [(32, 64, 10), (1, 64, 10), (128, 64, 12), (7, 300, 20), (200, 64, 10)])
def test_gemm_float(tmp_path: Path, batch: int, depth: int, n: int) -> None:
    rng = np.random.default_rng(11)
    a = _dequantized(rng, (batch, depth), 0.05, 0, 255)
    b = _weights(rng, (n, depth)).T.copy()
    c = rng.normal(0, 0.5, n).astype(F32)
    y, _ = _run([helper.make_node("Gemm", ["a", "b", "c"], ["y"])], {"a": a, "b": b, "c": c}, {}, tmp_path)
    assert int((y != k.gemm_float(a, b, c, threads=THREADS)).sum()) == 0


@pytest.mark.parametrize("d", [3, 10, 12, 17, 100])
def test_softmax_float(tmp_path: Path, d: int) -> None:
    rng = np.random.default_rng(12)
    x = (_dequantized(rng, (2000, d), 0.13, 0, 255) - F32(3)).astype(F32)
    y, _ = _run([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], {"x": x}, {}, tmp_path)
    assert int((y != k.softmax_float(x)).sum()) == 0
    assert (y != (np.exp(x.astype(np.float64) - x.max(1, keepdims=True)).astype(F32))
            / np.exp(x.astype(np.float64) - x.max(1, keepdims=True)).sum(1, keepdims=True).astype(F32)).any()


@pytest.mark.parametrize("opset", [17, 21])  # AveragePool-11 (MlasPool) and AveragePool-19
@pytest.mark.parametrize("channels", [16, 10])  # NCHWc pooling, plain pooling
@pytest.mark.parametrize("shape,kernel,strides,pads,include_pad", [
    ((3, 8, 8), [8, 8], [8, 8], [0, 0, 0, 0], 0),
    ((3, 25, 5), [25, 5], [1, 1], [0, 0, 0, 0], 0),
    ((3, 9, 9), [3, 3], [2, 2], [1, 1, 1, 1], 0),
    ((3, 9, 9), [3, 3], [2, 2], [1, 1, 1, 1], 1),
    ((3, 10, 7), [3, 2], [1, 2], [0, 1, 2, 0], 0),
    ((3, 12, 12), [3, 3], [3, 3], [1, 1, 1, 1], 0),
])
def test_average_pool_float(tmp_path: Path, opset: int, channels: int, shape: tuple[int, ...], kernel: list[int],
                            strides: list[int], pads: list[int], include_pad: int) -> None:
    rng = np.random.default_rng(13)
    x = _dequantized(rng, (shape[0], channels, *shape[1:]), 0.0371, 0, 255)
    op = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=kernel, strides=strides, pads=pads,
                          count_include_pad=include_pad)
    y, ops = _run([op], {"x": x}, {}, tmp_path, opset=opset)
    assert ("ReorderInput" in ops) == (channels % k.NCHWC_BLOCK == 0)  # NCHWc pooling
    mlas_pool = opset < 19 and channels % k.NCHWC_BLOCK != 0
    want = k.avg_pool_float(x, k.window(kernel, strides, pads), bool(include_pad), mlas_pool)
    assert int((y != want).sum()) == 0


@pytest.mark.parametrize("channels", [16, 64, 10, 7])
@pytest.mark.parametrize("hw", [(8, 8), (25, 5), (5, 3)])
def test_global_average_pool_float(tmp_path: Path, channels: int, hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(14)
    x = _dequantized(rng, (3, channels, *hw), 0.0371, 0, 255)
    y, _ = _run([helper.make_node("GlobalAveragePool", ["x"], ["y"])], {"x": x}, {}, tmp_path)
    assert int((y != k.global_avg_pool_float(x)).sum()) == 0


def test_max_pool(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    x = _dequantized(rng, (2, 8, 9, 9))
    op = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y, _ = _run([op], {"x": x}, {}, tmp_path)
    assert np.array_equal(y, k.max_pool(x, k.window([3, 3], [2, 2], [1, 1, 1, 1])))


def test_softmax_table_matches_exp() -> None:
    table = k.softmax_table(0.08, 10)
    shift = max(0.0, math.log(float(np.finfo(F32).max) / 10) - 5.0) / float(F32(0.08))
    assert table[255] == F32(math.exp(shift * float(F32(0.08))))
    assert np.all(np.diff(table) > 0)
