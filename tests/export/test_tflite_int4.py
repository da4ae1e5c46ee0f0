"""TFLite export of 2- to 4-bit weights as packed INT4 tensors, run in TFLite Micro."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.export.tflite import KERNEL_OPS, _op_name, owner, tflite_bytes, tflite_kernel_layout
from tinyptq.export.tflite_check import check_tflite, read_tensor_params
from tinyptq.export.tflite_int4 import pack_int4, pack_int4_kernels, read_int4_tensors, unpack_int4
from tinyptq.graph.loading import load_graph

from .conftest import run_pipeline

STAGES = ("range_setting",)  # no batch norm to fold
INT4, INT8 = 17, 9  # schema TensorType


# ------------------------------------------------------------ pack / unpack
def _expected_bytes(values: list[int]) -> bytes:
    """Byte i: element 2i in bits 0-3, element 2i + 1 in bits 4-7 (two's complement nibbles)."""
    out = bytearray()
    for i in range(0, len(values), 2):
        lo = values[i] % 16
        hi = values[i + 1] % 16 if i + 1 < len(values) else 0
        out.append(lo + 16 * hi)
    return bytes(out)


@pytest.mark.parametrize("count", [0, 1, 2, 7, 8, 255, 1000])
def test_pack_unpack_round_trip_low_nibble_first(count):
    rng = np.random.default_rng(count)
    values = rng.integers(-8, 8, size=count)
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
    assert packed.tobytes() == _expected_bytes(values.tolist())
    got = unpack_int4(packed, count)
    assert got.dtype == np.int8 and np.array_equal(got, values)


def test_pack_known_bytes_and_limits():
    assert pack_int4([1, 2, -1, -8, 7]).tobytes() == bytes([0x21, 0x8F, 0x07])
    assert np.array_equal(unpack_int4(bytes([0x21, 0x8F, 0x07]), 5), [1, 2, -1, -8, 7])
    with pytest.raises(ValueError):
        pack_int4([8])
    with pytest.raises(ValueError):
        unpack_int4(bytes(3), 7)


# --------------------------------------------------------- a tiny model
@pytest.fixture(scope="module")
def tiny():
    """(graph, calibration data) of a Conv2D -> DepthwiseConv2D -> Dense model."""
    from tinyptq._tf import keras

    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2d")(i)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise_conv2d")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(5, name="dense")(x)
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)
    return load_graph(keras.Model(i, x)), calib


@pytest.fixture(scope="module")
def exported(tiny):
    """Factory of (state, int4 bytes, int8-container bytes), each configuration built once."""
    graph, calib = tiny
    cache: dict = {}

    def make(weight_bits: int, per_channel: bool = True):
        key = (weight_bits, per_channel)
        if key not in cache:
            state = run_pipeline(graph, calib, weight_bits, 8, per_channel, STAGES)
            cache[key] = state, tflite_bytes(state), tflite_bytes(state, pack_int4=False)
        return cache[key]

    return make


def tflm_predict(data: bytes, x: np.ndarray) -> np.ndarray:
    """Outputs of the TFLite Micro interpreter, one sample at a time."""
    from tflite_micro.python.tflite_micro import runtime

    it = runtime.Interpreter.from_bytes(data)
    out = []
    for sample in x:
        it.set_input(sample[None], 0)
        it.invoke()
        out.append(it.get_output(0).copy())
    return np.concatenate(out)


def kernel_tensors(data: bytes) -> dict[str, tuple[str, object, int]]:
    """Layer -> (op name, kernel tensor, op version) of every kernel op."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    graph = model.subgraphs[0]
    out = {}
    for op in graph.operators:
        name = _op_name(model, op)
        if name in KERNEL_OPS:
            t = graph.tensors[op.inputs[1]]
            out[owner(t.name.decode())] = (name, t, model.operatorCodes[op.opcodeIndex].version)
    return out


def tensor_buffer(data: bytes, tensor) -> bytes:
    """The raw buffer of a tensor of a .tflite."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    return bytes(np.asarray(model.buffers[tensor.buffer].data, np.uint8))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_w4a8_int4_runs_in_tflm_like_int8_containers_and_is_smaller(tiny, exported, per_channel):
    """Per channel the dense layer is a 1x1 CONV_2D, per tensor a FULLY_CONNECTED: both INT4."""
    state, packed, unpacked = exported(4, per_channel)
    kernels = kernel_tensors(packed)
    assert {name: t.type for name, (_, t, _) in kernels.items()} == dict.fromkeys(
        state.integer_kernels(), INT4
    )
    assert {op for op, _, _ in kernels.values()} == (
        {"CONV_2D", "DEPTHWISE_CONV_2D"} if per_channel else set(KERNEL_OPS)
    )
    assert all(t.type == INT8 for _, t, _ in kernel_tensors(unpacked).values())
    x = tiny[1]
    got, want = tflm_predict(packed, x), tflm_predict(unpacked, x)
    assert np.array_equal(got, want)
    assert np.ptp(got) > 0  # not a constant output
    assert len(packed) < len(unpacked)
    check = check_tflite(state, packed)
    assert check.ok, check.problems
    assert set(check.kernels) == set(state.integer_kernels())


def test_int4_tensors_hold_our_integers_scales_and_op_versions(exported):
    state, packed, _ = exported(4)
    ints = state.integer_kernels()
    unpacked = read_int4_tensors(packed)
    for layer, (op_name, tensor, version) in kernel_tensors(packed).items():
        expected = tflite_kernel_layout(ints[layer], op_name)
        assert len(bytes(tensor_buffer(packed, tensor))) == (expected.size + 1) // 2
        assert np.array_equal(unpacked[tensor.name.decode()], expected)
        enc = state.weight_encodings[layer]
        assert np.allclose(tensor.quantization.scale, enc.scale, rtol=1e-6, atol=0)
        assert not np.any(tensor.quantization.zeroPoint)
        assert version == {"CONV_2D": 7, "DEPTHWISE_CONV_2D": 7}[op_name]
    params = {p.name: p for p in read_tensor_params(packed)}
    assert {params[n].dtype for n in unpacked} == {"int4"}
    # tf.lite.Interpreter (TF 2.21) unpacks INT4 constants itself: an independent reading
    from tinyptq.export.tflite import interpreter

    interp = interpreter(packed)
    interp.allocate_tensors()
    for d in interp.get_tensor_details():
        if d["name"] in unpacked:
            assert np.array_equal(interp.get_tensor(d["index"]), unpacked[d["name"]])


def test_w3a8_exports_to_int4_and_runs_in_tflm(tiny, exported):
    state, packed, unpacked = exported(3)
    kernels = kernel_tensors(packed)
    assert {t.type for _, t, _ in kernels.values()} == {INT4}
    values = np.concatenate([v.ravel() for v in read_int4_tensors(packed).values()])
    assert values.min() >= -4 and values.max() <= 3  # 3-bit values in 4-bit containers
    check = check_tflite(state, packed)
    assert check.ok, check.problems
    x = tiny[1][:8]
    assert np.array_equal(tflm_predict(packed, x), tflm_predict(unpacked, x))


def test_mixed_precision_splits_operator_codes(tiny, exported):
    """A 4-bit conv and an 8-bit 1x1-conv dense share CONV_2D: only the INT4 op gets version 7."""
    state4, _, _ = exported(4)
    state8, _, _ = exported(8)
    state = state4.evolve()
    state.weight_encodings["dense"] = state8.weight_encodings["dense"]
    packed = tflite_bytes(state)
    kernels = kernel_tensors(packed)
    assert (kernels["conv2d"][1].type, kernels["conv2d"][2]) == (INT4, 7)
    assert (kernels["dense"][0], kernels["dense"][1].type, kernels["dense"][2]) == (
        "CONV_2D",
        INT8,
        3,
    )
    assert check_tflite(state, packed).ok
    x = tiny[1][:8]
    assert np.array_equal(
        tflm_predict(packed, x), tflm_predict(tflite_bytes(state, pack_int4=False), x)
    )


@pytest.mark.parametrize("weight_bits", [8, 6])
def test_five_to_eight_bits_stay_int8_and_untouched(exported, weight_bits):
    state, packed, unpacked = exported(weight_bits)
    assert packed == unpacked
    assert pack_int4_kernels(unpacked, state) is unpacked
    assert {t.type for _, t, _ in kernel_tensors(packed).values()} == {INT8}
    assert check_tflite(state, packed).ok
