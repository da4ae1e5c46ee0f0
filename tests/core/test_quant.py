"""The quantization core: numpy, TF and onnxruntime agree bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tinyptq._tf import tf
from tinyptq.errors import ConfigError
from tinyptq.quant import Encoding, QuantSpec, check_bits, grid_limits


def _random_encoding(rng, bits, per_channel, symmetric, shape=(4, 5, 6)):
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 5.0)).astype(np.float32)
    axis = 1 if per_channel else None
    if per_channel:
        red = tuple(i for i in range(x.ndim) if i != axis)
        lo, hi = x.min(axis=red), x.max(axis=red)
    else:
        lo, hi = x.min(), x.max()
    spec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel)
    enc = Encoding.from_range(lo * 0.8, hi * 0.8, spec, axis=axis)  # some values clamp
    return x, enc


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_numpy_and_tf_fake_quant_agree_exactly(bits, per_channel, symmetric):
    rng = np.random.default_rng(bits * 10 + per_channel * 2 + symmetric)
    x, enc = _random_encoding(rng, bits, per_channel, symmetric)
    # add exact ties (k + 0.5) * scale so the rounding mode is exercised
    x[0] = (np.arange(x[0].size).reshape(x[0].shape) % 7 - 3 + 0.5) * float(np.ravel(enc.scale)[0])
    ref = enc.fake_quant(x)
    got = enc.fake_quant_tf(tf.constant(x)).numpy()
    np.testing.assert_array_equal(ref, got)
    q = enc.quantize(x)
    assert q.min() >= enc.qmin and q.max() <= enc.qmax
    assert len(np.unique(q)) <= 2**bits


def test_rounding_is_half_to_even():
    enc = Encoding(8, np.float32(1.0), np.int32(0), signed=True)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    np.testing.assert_array_equal(enc.quantize(x), [0, 2, 2, 0, -2, -2])
    np.testing.assert_array_equal(enc.fake_quant_tf(x).numpy(), [0, 2, 2, 0, -2, -2])


def _ort_qdq(x, enc):
    signed = enc.signed
    np_q = np.int8 if signed else np.uint8
    inits = [
        numpy_helper.from_array(enc.scale.astype(np.float32), "scale"),
        numpy_helper.from_array(enc.zero_point.astype(np_q), "zp"),
    ]
    attrs = {"axis": enc.axis} if enc.per_channel else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_8bit_matches_onnxruntime_qdq_including_ties(per_channel, symmetric):
    rng = np.random.default_rng(7)
    x, enc = _random_encoding(rng, 8, per_channel, symmetric, shape=(3, 8, 50))
    # exact ties on the grid of every channel
    scales = np.broadcast_to(enc._broadcast(enc.scale, 3), (1, 8, 1))
    ties = (rng.integers(-60, 60, size=(1, 8, 50)) + 0.5) * scales
    x = np.concatenate([x, ties.astype(np.float32)], axis=0)
    ours = enc.fake_quant(x)
    np.testing.assert_array_equal(ours, _ort_qdq(x, enc))
    np.testing.assert_array_equal(ours, enc.fake_quant_tf(x).numpy())


def test_ste_gradient_passes_inside_and_blocks_outside():
    enc = Encoding.from_range(-1.0, 1.0, QuantSpec(bits=4))
    x = tf.constant([-3.0, -0.3, 0.2, 0.9, 5.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(enc.fake_quant_tf(x))
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 0])


def test_from_range_properties():
    spec = QuantSpec(bits=8, symmetric=False)
    enc = Encoding.from_range(-1.0, 3.0, spec)
    assert not enc.signed and enc.qmin == 0 and enc.qmax == 255
    assert enc.fake_quant(np.float32(0.0)) == 0.0  # zero is exact
    assert enc.min <= -1.0 + enc.scale and enc.max >= 3.0 - enc.scale
    relu = Encoding.from_range(0.0, 6.0, QuantSpec(bits=4, symmetric=True))
    assert not relu.signed and relu.qmax == 15 and np.isclose(relu.scale, 6.0 / 15)
    signed = Encoding.from_range(-2.0, 1.0, QuantSpec(bits=4, symmetric=True))
    assert signed.signed and signed.qmin == -8 and np.isclose(signed.scale, 2.0 / 7)
    narrow = Encoding.from_range(-1.0, 1.0, QuantSpec(bits=8, narrow_range=True))
    assert narrow.qmin == -127
    empty = Encoding.from_range(0.0, 0.0, QuantSpec(bits=8))
    assert empty.scale == 1.0 and empty.fake_quant(np.float32(0.0)) == 0.0


def test_per_channel_any_axis_and_roundtrip_dict():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    for axis in range(4):
        red = tuple(i for i in range(4) if i != axis)
        enc = Encoding.from_range(w.min(axis=red), w.max(axis=red), QuantSpec(bits=4), axis=axis)
        err = np.abs(enc.fake_quant(w) - w)
        assert np.all(err <= enc._broadcast(enc.scale, 4) / 2 + 1e-7)
        again = Encoding.from_dict(enc.to_dict())
        np.testing.assert_array_equal(again.fake_quant(w), enc.fake_quant(w))


def test_unsigned_narrow_and_16_bit_grids():
    assert grid_limits(16, True) == (-32768, 32767)
    assert grid_limits(2, False, narrow_range=True) == (1, 3)
    enc = Encoding.from_range(-1.0, 1.0, QuantSpec(bits=16))
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    assert np.max(np.abs(enc.fake_quant(x) - x)) <= enc.scale / 2


@pytest.mark.parametrize("bad", [1, 17, 0, -3, 4.5, "8", True, None])
def test_bits_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="bits"):
        check_bits(bad)
    with pytest.raises(ConfigError):
        QuantSpec(bits=bad)


def test_invalid_encodings_rejected():
    with pytest.raises(ConfigError):
        Encoding(8, np.float32(0.0), np.int32(0))
    with pytest.raises(ConfigError):
        Encoding(8, np.ones(3, np.float32), np.zeros(3, np.int32))  # no axis
    with pytest.raises(ConfigError):
        Encoding(4, np.float32(1.0), np.int32(20), signed=False)
    with pytest.raises(ConfigError, match="NaN"):
        Encoding.from_range(np.nan, 1.0, QuantSpec())
