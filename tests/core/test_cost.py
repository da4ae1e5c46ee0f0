"""CostModel: hand-counted figures of a small model, ResNet-8's MACs, QuantConfig / state resolution, ONNX twin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.cost import CostModel
from tinyptq.errors import ConfigError
from tinyptq.graph.loading import load_graph
from tinyptq.models.usecases import get_use_case
from tinyptq.pipeline import PTQState, create_stage


def small_model():
    """img -> c1 (conv 3x3, 4) -> r1 (ReLU) -> dw (depthwise 3x3) -> pw (conv 1x1, no bias) -> bn
    -> add (with r1) -> gap -> fc (dense 5)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="img")
    r1 = keras.layers.ReLU(name="r1")(keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp))
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(r1)
    y = keras.layers.Conv2D(4, 1, use_bias=False, name="pw")(y)
    y = keras.layers.BatchNormalization(name="bn")(y)
    x = keras.layers.Add(name="add")([r1, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(5, name="fc")(x))


@pytest.fixture(scope="module")
def small():
    graph = load_graph(small_model())
    return graph, CostModel(graph)


@pytest.fixture(scope="module")
def resnet8(data_dir):
    graph = get_use_case("ic", data_dir).load_graph()
    return graph, CostModel(graph)


# mixed bits: c1 W4 per-channel, dw W8 per-tensor, pw W5 per-channel, fc float;
# activations 8 bits, but dw's output at 4 bits and fc's output float
MIXED_W = {"c1": 4, "dw": 8, "pw": 5, "fc": None}
MIXED_PC = {"c1": True, "dw": False, "pw": True, "fc": False}
MIXED_A = {"img": 8, "r1": 8, "dw": 4, "bn": 8, "add": 8, "gap": 8, "fc": None}


def test_small_model_structure(small):
    _, cm = small
    assert list(cm.layers) == ["c1", "dw", "pw", "fc"]
    c1, dw, pw, fc = cm.layers.values()
    assert (c1.kernel_size, c1.bias_size, c1.channels) == (3 * 3 * 3 * 4, 4, 4)
    assert (dw.kernel_size, dw.bias_size, dw.channels) == (3 * 3 * 4, 4, 4)
    assert (pw.kernel_size, pw.bias_size, pw.channels) == (1 * 1 * 4 * 4, 0, 4)
    assert (fc.kernel_size, fc.bias_size, fc.channels) == (4 * 5, 5, 5)
    assert (pw.input_point, pw.output_point) == ("dw", "bn")  # pw -> bn fused, quantized after bn
    assert cm.other_params == 4 * 4  # bn: gamma, beta, mean, var of 4 channels
    # the deployed tensors: sizes per sample, inputs and readers
    assert {p: i.size for p, i in cm.points.items()} == {
        "img": 8 * 8 * 3, "r1": 8 * 8 * 4, "dw": 8 * 8 * 4, "bn": 8 * 8 * 4, "add": 8 * 8 * 4, "gap": 4, "fc": 5,
    }
    assert cm.points["add"].inputs == ("r1", "bn") and cm.points["bn"].inputs == ("dw",)
    assert {p: i.readers for p, i in cm.points.items()} == {
        "img": 1, "r1": 2, "dw": 1, "bn": 1, "add": 1, "gap": 1, "fc": 0,
    }
    assert cm.steps == [
        {"img"},
        {"r1", "img"},
        {"dw", "r1"},  # r1 held for add
        {"bn", "dw", "r1"},
        {"add", "r1", "bn"},
        {"gap", "add"},
        {"fc", "gap"},
    ]


def test_small_model_hand_counted(small):
    _, cm = small
    cost = cm.evaluate(MIXED_W, MIXED_A, MIXED_PC)
    # params: c1 108 + 4, dw 36 + 4, pw 16, bn 16, fc 20 + 5
    assert cost.params == 112 + 40 + 16 + 16 + 25 == 209
    # MACs: 64 positions x kernel values for the convs, kernel values for the dense layer
    assert cost.macs == 64 * 108 + 64 * 36 + 64 * 16 + 20 == 10260
    # weight bytes: ceil((kernel + zero points) x bits / 8) + 4 x (bias + scales)
    c1 = (108 + 4) * 4 // 8 + 4 * (4 + 4)  # 56 + 32 = 88
    dw = (36 + 1) * 8 // 8 + 4 * (4 + 1)  # 37 + 20 = 57 (per-tensor: one scale)
    pw = -(-(16 + 4) * 5 // 8) + 4 * (0 + 4)  # ceil(100 bits / 8) = 13, + 16 = 29
    fc = 4 * (20 + 5)  # float: 100
    bn = 4 * 16  # other parameters, float: 64
    assert [r.weight_bytes for r in cost.layers] == [c1, dw, pw, fc] == [88, 57, 29, 100]
    assert cost.weight_bytes == c1 + dw + pw + fc + bn == 338
    assert cm.weight_bits_cost("pw", 5, True) == 8 * 29
    # BOPs: MACs x weight bits x input bits (c1 reads img, dw r1, pw dw at 4 bits, fc gap; float = 32)
    assert [r.bops for r in cost.layers] == [6912 * 4 * 8, 2304 * 8 * 8, 1024 * 5 * 4, 20 * 32 * 8]
    assert cost.bops == 221184 + 147456 + 20480 + 5120 == 394240
    # tensor bytes: img 192, r1 256, dw 128 (4 bits), bn 256, add 256, gap 4, fc 20 (float)
    assert cost.activation_bytes == 192 + 256 + 128 + 256 + 256 + 4 + 20 == 1112
    # live bytes per step: img 192 | r1+img 448 | dw+r1 384 | bn+dw+r1 640 | add+r1+bn 768 | gap+add 260 | fc+gap 24
    assert cost.peak_activation_bytes == 256 + 256 + 256 == 768 and cost.peak_step == "add"
    # I/O: weights once, each tensor written once and read per reader
    io = 192 * 2 + 256 * 3 + 128 * 2 + 256 * 2 + 256 * 2 + 4 * 2 + 20 * 1
    assert io == 2460 and cost.memory_io_bytes == 338 + io == 2798
    assert cost.summary() == {
        "params": 209, "weight_bytes": 338, "macs": 10260, "bops": 394240,
        "peak_activation_bytes": 768, "memory_io_bytes": 2798,
    }
    assert json.loads(json.dumps(cost.to_dict()))["layers"][1]["weight_bytes"] == 57
    table = cost.markdown()
    assert "| pw | conv | 16 | 5 pc | 4 | 29 | 1,024 | 20,480 |" in table and "| fc | dense | 25 | float |" in table


def test_float_model_and_bad_assignments(small):
    graph, cm = small
    cost = cm.evaluate({}, {})  # everything float
    assert cost.weight_bytes == 4 * graph.param_count() and cost.bops == cost.macs * 32 * 32
    assert cost.activation_bytes == 4 * sum(p.size for p in cm.points.values())
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        cm.evaluate({"nope": 8}, {})
    with pytest.raises(ConfigError, match="unknown activation point 'c1'"):
        cm.evaluate({}, {"c1": 8})  # c1's output is fused into r1: not a point
    with pytest.raises(ConfigError, match="bits"):
        cm.evaluate({"c1": 1}, {})


def test_for_config_keeps_first_last_at_8_bits(small):
    _, cm = small
    w8, w4 = cm.for_config(QuantConfig(weight_bits=8)), cm.for_config(QuantConfig(weight_bits=4))
    # per-tensor: ceil((kernel + 1) x bits / 8) + 4 x (bias + 1) per layer; at 4 bits the integers halve
    shrink = sum((k + 1) - -(-(k + 1) // 2) for k in (108, 36, 16, 20))  # 109-55, 37-19, 17-9, 21-11
    assert w8.weight_bytes - w4.weight_bytes == shrink == 54 + 18 + 8 + 10
    edge = cm.for_config(QuantConfig(weight_bits=4, act_bits=4, keep_first_last_8bit=True))
    assert {r.name: r.weight_bits for r in edge.layers} == {"c1": 8, "dw": 4, "pw": 4, "fc": 8}
    # inputs: img (model input) and gap (the last layer's input) stay at 8 bits, dw's input r1 (c1's output) too
    assert {r.name: r.input_bits for r in edge.layers} == {"c1": 8, "dw": 8, "pw": 4, "fc": 8}
    assert edge.weight_bytes == w8.weight_bytes - (37 - 19) - (17 - 9)
    off = QuantConfig(weight_per_channel=True, overrides=(LayerOverride("fc", quantize=False),))
    assert cm.for_config(off).layers[-1].weight_bits is None
    assert cm.for_config(off).layers[0].weight_bytes == 108 + 4 + 4 * (4 + 4)


def test_for_state_reads_the_encodings(small):
    graph, cm = small
    config = QuantConfig(
        weight_bits=4, weight_per_channel=True,
        overrides=(LayerOverride("dw", weight_bits=8, weight_per_channel=False), LayerOverride("fc", quantize=False)),
    )
    calib = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    state = create_stage("range_setting").apply(PTQState(graph, config, calib))
    assert not state.weight_encodings["dw"].per_channel and "fc" not in state.weight_encodings
    assert cm.for_state(state) == cm.for_config(config)
    del state.act_encodings["gap"]
    assert cm.for_state(state).layers[-1].input_bits is None
    folded = create_stage("bn_folding").apply(PTQState(graph.copy(), config, calib))
    folded = create_stage("range_setting").apply(folded)
    with pytest.raises(ConfigError, match="unknown activation point 'pw'"):  # bn's point is pw's after folding
        cm.for_state(folded)
    assert CostModel(folded.graph).for_state(folded).params == 209 - 16 + 4  # bn folded into a bias of pw


def test_resnet8_macs_from_an_independent_count(data_dir, resnet8):
    graph, cm = resnet8
    model = keras.models.load_model(get_use_case("ic", data_dir).model_path(), compile=False)
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):  # (kh, kw, in, out) at every output position
            _, h, w, _ = layer.output_shape
            macs += h * w * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            macs += int(np.prod(layer.kernel.shape))
    cost = cm.for_config(QuantConfig())
    assert cost.macs == macs
    # by hand: conv 32x32x27x16; stack 1: 2 x 32x32x144x16; stack 2: 16x16x144x32 + 16x16x288x32
    # + shortcut 16x16x16x32; stack 3: 8x8x288x64 + 8x8x576x64 + shortcut 8x8x32x64; dense 64x10
    hand = 442368 + 2 * 2359296 + 1179648 + 2359296 + 131072 + 1179648 + 2359296 + 131072 + 640
    assert macs == hand == 12_501_632  # the MLPerf Tiny paper's 12.5 M
    assert cost.params == model.count_params() == 78_666


def test_resnet8_uniform_bits(resnet8):
    graph, cm = resnet8
    w8 = cm.for_config(QuantConfig(weight_bits=8, act_bits=8))
    w4 = cm.for_config(QuantConfig(weight_bits=4, act_bits=8))
    kernels = [graph.kernel(q.name).size for q in graph.quant_layers()]
    assert w8.weight_bytes - w4.weight_bytes == sum((k + 1) - -(-(k + 1) // 2) for k in kernels)
    assert w8.bops == 2 * w4.bops == w8.macs * 64
    kept = cm.for_config(QuantConfig(weight_bits=4, act_bits=8, keep_first_last_8bit=True))
    first, last = kernels[0], kernels[-1]
    assert kept.weight_bytes - w4.weight_bytes == (first + 1) // 2 + (last + 1) // 2  # 449 -> 225, 641 -> 321
    # 32x32x16 int8 tensors: the first block holds its input, the residual and the conv output
    assert w8.peak_activation_bytes == 3 * 16384


def _fold_batch_norms(graph):
    calib = np.zeros((1, *graph.input_shape[1:]), np.float32)
    return create_stage("bn_folding").apply(PTQState(graph.copy(), QuantConfig(), calib)).graph


@pytest.mark.parametrize("model", ["small", "resnet8"])
def test_onnx_twin_costs_the_same(model, request):
    # folded first: to_onnx writes an unfolded batch norm as Mul + Add (other parameters, two more points)
    graph = _fold_batch_norms(request.getfixturevalue(model)[0])
    assert not graph.batch_norm_names()
    cm, twin = CostModel(graph), CostModel(load_graph(graph.to_onnx().model))
    assert list(twin.layers) == list(cm.layers) and len(twin.points) == len(cm.points)
    mixed = QuantConfig(
        weight_bits=4, act_bits=6, weight_per_channel=True, keep_first_last_8bit=True,
        overrides=(LayerOverride("dw", weight_bits=8, weight_per_channel=False), LayerOverride("fc", quantize=False)),
    )
    for cfg in (QuantConfig(), mixed):
        assert twin.for_config(cfg).summary() == cm.for_config(cfg).summary()
