"""The numpy TFLM int8 kernels against the real TFLite Micro interpreter: every output value must match.

Each test converts a tiny tf_keras model holding one operator with the TFLite
converter (full-integer int8), reads the operator's options, quantization
parameters and constant tensors back from the flatbuffer, runs TFLM on random
int8 inputs and compares. Some models are then edited (scales, zero points,
tensor types) to reach parameters the converter would not choose: the
QUANTIZE / DEQUANTIZE / requantize cases, multipliers above one, capped
softmax multipliers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from tinyptq._tf import _muted_stderr, keras, tf  # noqa: E402
from tinyptq.fixedpoint import (  # noqa: E402
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_round,
    quantize_multiplier,
)
from tinyptq.intsim import tflite_kernels as k  # noqa: E402

runtime = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
fu = pytest.importorskip("tensorflow.lite.tools.flatbuffer_utils")
schema = pytest.importorskip("tensorflow.lite.python.schema_py_generated")

L = keras.layers
BATCH = 8
OP_NAMES = {v: n for n, v in vars(schema.BuiltinOperator).items() if not n.startswith("_")}
ACTIVATIONS = {0: None, 1: "relu", 2: "relu_n1_to_1", 3: "relu6"}
PADDINGS = {0: "SAME", 1: "VALID"}
DTYPES = {schema.TensorType.INT8: np.int8, schema.TensorType.INT32: np.int32,
          schema.TensorType.FLOAT32: np.float32}


# ---------------------------------------------------------------- helpers
@dataclass
class Tensor:
    """One tensor of a .tflite model: shape, quantization and constant data."""

    shape: tuple[int, ...]
    scale: np.ndarray
    zero_point: np.ndarray
    data: np.ndarray | None


@dataclass
class Op:
    """One operator of a .tflite model."""

    name: str
    options: Any
    inputs: list[Any]
    outputs: list[Tensor]

    @property
    def activation(self) -> str | None:
        """The fused activation of the operator's options."""
        return ACTIVATIONS[self.options.fusedActivationFunction]


def _convert(model: Any, stds: Sequence[float] = (1.0,), *, float_io: bool = False,
             per_tensor_dense: bool = False) -> bytes:
    """Full-integer int8 conversion calibrated on normal data with the given std per input."""
    rng = np.random.default_rng(0)
    shapes = [tuple(i.shape[1:]) for i in model.inputs]

    def representative() -> Any:
        for _ in range(8):
            yield [rng.normal(0.0, sd, (BATCH, *sh)).astype(np.float32)
                   for sh, sd in zip(shapes, stds, strict=True)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not float_io:
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    if per_tensor_dense:
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    with warnings.catch_warnings(), _muted_stderr():
        warnings.simplefilter("ignore")
        return bytes(conv.convert())


def _tensor(model: Any, index: int) -> Tensor | None:
    """A tensor of subgraph 0 with its constant data viewed in its dtype."""
    if index < 0:
        return None
    t = model.subgraphs[0].tensors[index]
    q = t.quantization
    scale = np.asarray([] if q is None or q.scale is None else q.scale, np.float32)
    zp = np.asarray([] if q is None or q.zeroPoint is None else q.zeroPoint, np.int64)
    raw, dtype = model.buffers[t.buffer].data, DTYPES.get(t.type)
    data = None
    if raw is not None and len(raw) and dtype is not None:
        data = np.frombuffer(np.asarray(raw, np.uint8).tobytes(), dtype).reshape(tuple(t.shape))
    return Tensor(tuple(int(d) for d in t.shape), scale, zp, data)


def _op_name(model: Any, op: Any) -> str:
    """The builtin operator name of an operator of the object tree."""
    code = model.operatorCodes[op.opcodeIndex]
    return OP_NAMES[max(code.builtinCode, code.deprecatedBuiltinCode)]


def _ops(data: bytes) -> list[Op]:
    """The operators of a .tflite model with their tensors."""
    model = fu.read_model_from_bytearray(bytearray(data))
    return [Op(_op_name(model, op), op.builtinOptions, [_tensor(model, i) for i in op.inputs],
               [_tensor(model, i) for i in op.outputs]) for op in model.subgraphs[0].operators]


def _single_op(data: bytes, name: str) -> Op:
    """The model's only operator, checked to be ``name`` (so fused activations stayed fused)."""
    ops = _ops(data)
    assert [o.name for o in ops] == [name]
    return ops[0]


def _edit(data: bytes, change: Callable[[Any], None]) -> bytes:
    """The model with its object tree changed in place by ``change``."""
    model = fu.read_model_from_bytearray(bytearray(data))
    change(model)
    return bytes(fu.convert_object_to_bytearray(model))


def _with_params(data: bytes, **params: tuple[Any, Any]) -> bytes:
    """The model with new (scale, zero point) on operator 0's tensors, named in0, in1, ..., out0."""

    def change(model: Any) -> None:
        sg = model.subgraphs[0]
        op = sg.operators[0]
        for key, (scale, zp) in params.items():
            ids = op.inputs if key.startswith("in") else op.outputs
            q = sg.tensors[ids[int(key[-1])]].quantization
            q.scale, q.zeroPoint = list(np.atleast_1d(scale)), list(np.atleast_1d(zp))

    return _edit(data, change)


def _graph_inputs_by_op_input(data: bytes) -> list[int]:
    """For each graph input, in the interpreter's order, its position among operator 0's inputs."""
    sg = fu.read_model_from_bytearray(bytearray(data)).subgraphs[0]
    return [list(sg.operators[0].inputs).index(i) for i in sg.inputs]


def _tflm(data: bytes, *inputs: np.ndarray) -> np.ndarray:
    """Output 0 of the TFLite Micro interpreter."""
    interp = runtime.Interpreter.from_bytes(data, arena_size=1 << 20)
    for i, x in enumerate(inputs):
        interp.set_input(x, i)
    interp.invoke()
    return interp.get_output(0)


def _int8(shape: Sequence[int], seed: int) -> np.ndarray:
    """Uniform random int8 values over the whole range."""
    return np.random.default_rng(seed).integers(-128, 128, size=tuple(shape), dtype=np.int8)


def _qp(t: Tensor) -> tuple[float, int]:
    """(scale, zero point) of a per-tensor quantized tensor."""
    assert t.scale.size == 1
    return float(t.scale[0]), int(t.zero_point[0])


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Identical shape, dtype and values."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = int(np.count_nonzero(got != want))
    assert diff == 0, f"{diff} of {want.size} values differ"


def _model(input_shape: Sequence[int], *layers: Any) -> Any:
    """A Sequential model with a fixed batch of BATCH."""
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input(tuple(input_shape), batch_size=BATCH), *layers])


# -------------------------------------------------------------- conv-like
def _run_conv(data: bytes, seed: int) -> Op:
    """CONV_2D of a model against TFLM; the operator."""
    op = _single_op(data, "CONV_2D")
    x, w, b = (op.inputs + [None])[:3]
    y, o = op.outputs[0], op.options
    xs = _int8(x.shape, seed)
    got = k.conv2d(xs, x.zero_point[0], x.scale[0], w.data.transpose(1, 2, 3, 0), w.scale,
                   None if b is None else b.data, y.scale[0], y.zero_point[0], (o.strideH, o.strideW),
                   PADDINGS[o.padding], (o.dilationHFactor, o.dilationWFactor), op.activation)
    _assert_same(got, _tflm(data, xs))
    return op


@pytest.mark.parametrize(("shape", "layer", "activation", "std"), [
    ((11, 10, 3), L.Conv2D(8, 3, strides=2, padding="same", activation="relu"), "relu", 1.0),
    ((9, 9, 4), L.Conv2D(6, (3, 2), padding="valid", use_bias=False), None, 1.0),
    ((12, 12, 5), L.Conv2D(7, 4, padding="same", dilation_rate=2, activation="relu6"), "relu6", 3.0),
    ((8, 7, 4), L.Conv2D(6, 3, groups=2, strides=(1, 2), padding="same"), None, 1.0),
], ids=["stride2-same-relu", "valid-nobias", "dilated-even-relu6", "grouped"])
def test_conv2d(shape: tuple[int, ...], layer: Any, activation: str | None, std: float) -> None:
    op = _run_conv(_convert(_model(shape, layer), stds=(std,)), 10)
    assert op.activation == activation and op.inputs[1].scale.size == layer.filters


def test_conv2d_per_tensor_weights_large_multiplier() -> None:
    """One weight scale; output scales making M > 1 (left shift, int32 wrap) and M << 1."""
    data = _convert(_model((6, 6, 8), L.Conv2D(5, 3, padding="same")))
    w_scale = float(np.max(_single_op(data, "CONV_2D").inputs[1].scale))
    for out in ((1e-7, 3), (5.0, -20)):
        _run_conv(_with_params(data, in1=(w_scale, 0), out0=out), 13)


def _check_depthwise(multiplier: int, strides: int, padding: str, seed: int) -> None:
    model = _model((10, 9, 4), L.DepthwiseConv2D(3, strides=strides, padding=padding,
                                                  depth_multiplier=multiplier, activation="relu"))
    data = _convert(model)
    op = _single_op(data, "DEPTHWISE_CONV_2D")
    x, w, b = op.inputs
    y, o = op.outputs[0], op.options
    assert op.activation == "relu" and w.scale.size == 4 * multiplier
    kernel = w.data.reshape(*w.shape[1:3], 4, multiplier)
    xs = _int8(x.shape, seed)
    got = k.depthwise_conv2d(xs, x.zero_point[0], x.scale[0], kernel, w.scale, b.data, y.scale[0],
                             y.zero_point[0], (o.strideH, o.strideW), PADDINGS[o.padding],
                             (o.dilationHFactor, o.dilationWFactor), op.activation)
    _assert_same(got, _tflm(data, xs))


def test_depthwise_multiplier_1() -> None:
    _check_depthwise(1, 1, "same", 20)


def test_depthwise_multiplier_2_stride2() -> None:
    _check_depthwise(2, 2, "valid", 21)


@pytest.mark.parametrize(("shape", "per_tensor"), [((24,), False), ((24,), True), ((3, 5, 24), False)])
def test_fully_connected(shape: tuple[int, ...], per_tensor: bool) -> None:
    data = _convert(_model(shape, L.Dense(10, activation="relu")), per_tensor_dense=per_tensor)
    op = _single_op(data, "FULLY_CONNECTED")
    x, w, b = op.inputs
    y = op.outputs[0]
    assert op.activation == "relu" and w.scale.size == (1 if per_tensor else 10)
    xs = _int8(x.shape, 30 + per_tensor)
    got = k.fully_connected(xs, x.zero_point[0], x.scale[0], w.data.T, w.scale,
                            None if b is None else b.data, y.scale[0], y.zero_point[0], op.activation)
    _assert_same(got, _tflm(data, xs))


# ------------------------------------------------------------ elementwise
def test_add_different_scales_relu() -> None:
    keras.utils.set_random_seed(1)
    a, b = keras.Input((6, 5, 3), batch_size=BATCH), keras.Input((6, 5, 3), batch_size=BATCH)
    data = _convert(keras.Model([a, b], L.ReLU()(L.Add()([a, b]))), stds=(1.0, 7.0))
    xa, xb = _int8((BATCH, 6, 5, 3), 40), _int8((BATCH, 6, 5, 3), 41)
    # as converted, equal input scales, an output scale far below the inputs' (most values clamp)
    for params in ({}, {"in0": (0.03, 4), "in1": (0.03, -9)},
                   {"in0": (0.2, 0), "in1": (0.07, 1), "out0": (0.01, -100)}):
        edited = _with_params(data, **params)
        op = _single_op(edited, "ADD")
        ta, tb = op.inputs
        assert op.activation == "relu"
        got = k.add(xa, *_qp(ta)[::-1], xb, *_qp(tb)[::-1], *_qp(op.outputs[0]), op.activation)
        _assert_same(got, _tflm(edited, *[(xa, xb)[i] for i in _graph_inputs_by_op_input(edited)]))


def test_add_uses_double_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """ADD parameters where MultiplyByQuantizedMultiplierSmallerThanOneExp's two builds disagree."""
    keras.utils.set_random_seed(1)
    a, b = keras.Input((4, 5), batch_size=BATCH), keras.Input((4, 5), batch_size=BATCH)
    data = _convert(keras.Model([a, b], L.Add()([a, b])), stds=(1.0, 2.0))
    qa, qb, qo = (0.08845030516386032, 8), (0.16544298827648163, 18), (0.12903623282909393, 5)
    data = _with_params(data, in0=qa, in1=qb, out0=qo)
    pa, pb = np.repeat(np.arange(-128, 128), 256), np.tile(np.arange(-128, 128), 256)
    double = k.add(pa, qa[1], qa[0], pb, qb[1], qb[0], *qo)
    monkeypatch.setattr(k, "SINGLE_ROUNDING", True)
    split = np.flatnonzero(k.add(pa, qa[1], qa[0], pb, qb[1], qb[0], *qo) != double)
    monkeypatch.setattr(k, "SINGLE_ROUNDING", False)
    assert split.size > 0
    xa, xb = _int8((BATCH, 4, 5), 42), _int8((BATCH, 4, 5), 43)
    xa.reshape(-1)[:split.size], xb.reshape(-1)[:split.size] = pa[split], pb[split]
    want = _tflm(data, *[(xa, xb)[i] for i in _graph_inputs_by_op_input(data)])
    _assert_same(k.add(xa, qa[1], qa[0], xb, qb[1], qb[0], *qo), want)
    assert np.array_equal(want.reshape(-1)[:split.size], double[split].astype(np.int8))


# ---------------------------------------------------------------- pooling
@pytest.mark.parametrize(("pool", "strides", "padding", "shape"), [
    (2, 2, "valid", (8, 8, 4)),
    (3, 2, "same", (9, 8, 3)),
    ((6, 5), 1, "valid", (6, 5, 4)),
], ids=["2x2", "3x3-same", "global"])
def test_avg_pool(pool: Any, strides: int, padding: str, shape: tuple[int, ...]) -> None:
    data = _convert(_model(shape, L.AveragePooling2D(pool, strides, padding)))
    op = _single_op(data, "AVERAGE_POOL_2D")
    o, x = op.options, op.inputs[0]
    xs = _int8(x.shape, 50)
    got = k.avg_pool2d(xs, (o.filterHeight, o.filterWidth), (o.strideH, o.strideW), PADDINGS[o.padding],
                       op.activation, *_qp(x))
    _assert_same(got, _tflm(data, xs))


@pytest.mark.parametrize(("pool", "strides", "padding"), [(2, 2, "valid"), (3, 2, "same")])
def test_max_pool(pool: int, strides: int, padding: str) -> None:
    data = _convert(_model((9, 7, 3), L.MaxPooling2D(pool, strides, padding)))
    op = _single_op(data, "MAX_POOL_2D")
    o, x = op.options, op.inputs[0]
    xs = _int8(x.shape, 60)
    got = k.max_pool2d(xs, (o.filterHeight, o.filterWidth), (o.strideH, o.strideW), PADDINGS[o.padding],
                       op.activation, *_qp(x))
    _assert_same(got, _tflm(data, xs))


@pytest.mark.parametrize(("shape", "std"), [((5, 7, 6), 1.0), ((16, 16, 3), 0.05)])
def test_mean_global_average_pooling(shape: tuple[int, ...], std: float) -> None:
    converted = _convert(_model(shape, L.GlobalAveragePooling2D()), stds=(std,))
    # as converted, then with the input / output scale ratio above one and far below one
    for params in ({}, {"in0": (0.5, -7), "out0": (0.01, 3)}, {"in0": (0.002, 100), "out0": (0.3, -90)}):
        data = _with_params(converted, **params)
        op = _single_op(data, "MEAN")
        x, axes = op.inputs
        y = op.outputs[0]
        assert sorted(axes.data.tolist()) == [1, 2] and op.options.keepDims is False
        xs = _int8(x.shape, 70)
        got = k.mean_hw(xs, *_qp(x)[::-1], *_qp(y)[::-1], keep_dims=op.options.keepDims)
        _assert_same(got, _tflm(data, xs))


def test_pad() -> None:
    data = _convert(_model((5, 6, 3), L.ZeroPadding2D(((1, 2), (0, 3)))))
    op = _single_op(data, "PAD")
    x, pads = op.inputs
    xs = _int8(x.shape, 80)
    _assert_same(k.pad(xs, pads.data, _qp(op.outputs[0])[1]), _tflm(data, xs))


# ---------------------------------------------------------------- softmax
@pytest.fixture(scope="module")
def softmax_model() -> bytes:
    """A converted int8 SOFTMAX over 37 classes."""
    return _convert(_model((37,), L.Softmax()), stds=(4.0,))


# input scales: as converted, tiny (every difference counts), large (few survive the diff_min cut),
# above 16 (the multiplier caps at 2**31 - 1, only the maxima survive)
@pytest.mark.parametrize(("in_scale", "seed"), [(None, 90), (0.0007, 91), (0.04, 92), (0.9, 93), (3.3, 94),
                                                (40.0, 95)])
def test_softmax(softmax_model: bytes, in_scale: float | None, seed: int) -> None:
    data = softmax_model if in_scale is None else _with_params(softmax_model, in0=(in_scale, 5))
    op = _single_op(data, "SOFTMAX")
    x, y = op.inputs[0], op.outputs[0]
    rng = np.random.default_rng(seed)
    xs = _int8(x.shape, seed)
    xs[0] = 127  # all equal
    xs[1] = -128
    xs[1, 5] = 127  # one winner, the rest 255 steps below
    xs[2] = rng.integers(100, 128, size=x.shape[1])  # a narrow range
    xs[3] = rng.choice([-128, -60, 0, 127], size=x.shape[1])
    got = k.softmax(xs, *_qp(x), *_qp(y), beta=op.options.beta)
    _assert_same(got, _tflm(data, xs))


# ------------------------------------------------ quantize / dequantize
@pytest.fixture(scope="module")
def reshape_model() -> bytes:
    """float -> QUANTIZE -> RESHAPE -> DEQUANTIZE -> float, to be edited by the tests."""
    data = _convert(_model((64, 8), L.Reshape((512,))), float_io=True)
    assert [o.name for o in _ops(data)] == ["QUANTIZE", "RESHAPE", "DEQUANTIZE"]
    return data


def _pin(data: bytes, *, drop: str, mid_q: tuple[float, int], in_q: tuple[float, int] | None = None) -> bytes:
    """Drop QUANTIZE or DEQUANTIZE, set the int8 tensors' (scale, zp), make the input int8 with ``in_q``."""

    def change(model: Any) -> None:
        sg = model.subgraphs[0]
        ops = {_op_name(model, o): o for o in sg.operators}
        quant, reshape, dequant = ops["QUANTIZE"], ops["RESHAPE"], ops["DEQUANTIZE"]
        for i in (quant.outputs[0], reshape.outputs[0]):
            q = sg.tensors[i].quantization
            q.scale, q.zeroPoint = [mid_q[0]], [mid_q[1]]
        if drop == "DEQUANTIZE":
            sg.operators, sg.outputs = [quant, reshape], [reshape.outputs[0]]
        else:
            sg.operators, sg.inputs = [reshape, dequant], [reshape.inputs[0]]
        if in_q is not None:
            t = sg.tensors[quant.inputs[0]]
            t.type = schema.TensorType.INT8
            t.quantization = schema.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [in_q[0]], [in_q[1]]

    return _edit(data, change)


def _all_int8() -> np.ndarray:
    """Every int8 value, repeated to the reshape model's input shape."""
    return np.resize(np.arange(-128, 128, dtype=np.int8), (BATCH, 64, 8))


@pytest.mark.parametrize(("scale", "zp"), [(0.0625, -3), (0.0123, 17)])
def test_quantize_ties_and_overflow(reshape_model: bytes, scale: float, zp: int) -> None:
    data = _pin(reshape_model, drop="DEQUANTIZE", mid_q=(scale, zp))
    s = np.float32(scale)
    ks = np.arange(-150, 150, dtype=np.float32)
    ties = (ks + np.float32(0.5)) * s  # exact ties at scale 1/16
    near = ks * s + s * np.float32(0.4999)
    special = np.array([1e20, -1e20, 3e9, -3e9, np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
    x = np.concatenate([ties, near, special])
    x = np.concatenate([x, np.zeros(BATCH * 512 - x.size, np.float32)]).reshape(BATCH, 64, 8)
    _assert_same(k.quantize(x, scale, zp).reshape(BATCH, 512), _tflm(data, x))


def test_dequantize(reshape_model: bytes) -> None:
    data = _pin(reshape_model, drop="QUANTIZE", mid_q=(0.0123, 9))
    got = k.dequantize(_all_int8(), 0.0123, 9).reshape(BATCH, 512)
    want = _tflm(data, _all_int8())
    assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize(("in_q", "out_q"), [
    ((0.05, 3), (0.0123, -7)),
    ((0.0123, -7), (0.05, 3)),
    ((0.3, 0), (0.3 * 0.375, 0)),
    ((0.5, 0), (1e-9, 0)),  # shift 29: (q - zp) << 29 wraps in int32
])
def test_requantize(reshape_model: bytes, in_q: tuple[float, int], out_q: tuple[float, int]) -> None:
    data = _pin(reshape_model, drop="DEQUANTIZE", in_q=in_q, mid_q=out_q)
    got = k.requantize(_all_int8(), *in_q, *out_q).reshape(BATCH, 512)
    _assert_same(got, _tflm(data, _all_int8()))


def test_tflm_uses_double_rounding(reshape_model: bytes) -> None:
    """A requantization where single and double rounding disagree: TFLM gives the double-rounding values."""
    in_q, out_q = (1.0, 0), (1.0 / 0.1337, 0)
    mult, shift = quantize_multiplier(np.float64(np.float32(in_q[0])) / np.float64(np.float32(out_q[0])))
    q = _all_int8().astype(np.int64)
    double = np.clip(multiply_by_quantized_multiplier(q, mult, shift), -128, 127)
    single = np.clip(multiply_by_quantized_multiplier_single_round(q, mult, shift), -128, 127)
    assert np.count_nonzero(double != single) > 0
    want = _tflm(_pin(reshape_model, drop="DEQUANTIZE", in_q=in_q, mid_q=out_q), q.astype(np.int8))
    assert np.array_equal(want.reshape(q.shape), double)
    assert not k.SINGLE_ROUNDING


# ------------------------------------------------------------ pure checks
def test_activation_range() -> None:
    assert k.activation_range(None, 0.1, 5) == (-128, 127)
    assert k.activation_range("relu", 0.1, -20) == (-20, 127)
    assert k.activation_range("relu6", 0.05, -128) == (-128, -8)
    assert k.activation_range("relu6", 0.01, -128) == (-128, 127)
    assert k.activation_range("relu_n1_to_1", 0.02, 0) == (-50, 50)
    with pytest.raises(ValueError):
        k.activation_range("gelu", 0.1, 0)


def test_quantize_rounds_halves_away_from_zero() -> None:
    x = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5], np.float32) * np.float32(0.25)
    assert k.quantize(x, 0.25, 0).tolist() == [1, -1, 2, -2, 3, -3]


def test_conv2d_long_accumulations_stay_exact() -> None:
    """Sums longer than float32's exact range (chunked GEMMs) and grouped sums, against int64 einsum."""
    rng = np.random.default_rng(5)
    for shape, kshape in (((2, 7, 7, 1100), (3, 3, 1100, 3)), ((3, 6, 6, 8), (2, 3, 4, 6))):
        x = rng.integers(-128, 128, shape, dtype=np.int8).astype(np.int64) + 128  # x - zp for zp = -128
        w = rng.integers(0, 128, kshape, dtype=np.int8).astype(np.int64)  # no cancellation: sums beyond 2**24
        groups, per = shape[-1] // kshape[2], kshape[3] // (shape[-1] // kshape[2])
        taps = k._Taps(x.astype(np.float32), kshape[:2], 2, "same", 1, 0)
        got = k._conv_acc(taps, w.astype(np.float32), groups)
        want = np.zeros_like(got)
        for ky in range(kshape[0]):
            for kx in range(kshape[1]):
                v = taps.view(ky, kx).astype(np.int64)
                for g in range(groups):
                    cin, out = slice(g * kshape[2], (g + 1) * kshape[2]), slice(g * per, (g + 1) * per)
                    want[..., out] += np.einsum("nhwc,co->nhwo", v[..., cin], w[ky, kx, :, out])
        assert np.abs(want).max() > 2**24 or kshape[2] <= k.F32_EXACT_TERMS
        np.testing.assert_array_equal(got, want)
