"""Reconstruction blocks found from the neutral topology (Keras and ONNX graphs alike)."""

from __future__ import annotations

from collections import Counter

import pytest

from tinyptq._tf import keras
from tinyptq.components.bn_folding import fold_bn
from tinyptq.graph.base import ModelGraph
from tinyptq.graph.blocks import Block, find_blocks
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.loading import load_graph
from tinyptq.graph.onnx_graph import OnnxGraph

L = keras.layers


def conv_bn_relu(x, filters, name, kernel=3, strides=1, relu=True):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", name=name)(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def dw_bn_relu(x, name, strides=1):
    x = L.DepthwiseConv2D(3, strides=strides, padding="same", name=name)(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def head(x):
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return L.Dense(3, name="fc")(x)


def graph_of(body, shape=(8, 8, 4)) -> KerasGraph:
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape, name="img")
    return KerasGraph.from_keras(keras.Model(inp, body(inp)))


def structure(blocks: list[Block]) -> list[tuple[str, int]]:
    return [(b.kind, len(b.layers)) for b in blocks]


def assert_partition(graph: ModelGraph, blocks: list[Block]) -> None:
    """Every quantizable layer in exactly one block; blocks and their layers in topological order."""
    order = {n: i for i, n in enumerate(graph.node_names())}
    layers = [ql.name for ql in graph.quant_layers()]
    listed = [layer for b in blocks for layer in b.layers]
    assert sorted(listed) == sorted(layers) and len(set(listed)) == len(listed)
    assert listed == sorted(listed, key=order.__getitem__)
    points = {p.name for p in graph.act_points()}
    for b in blocks:
        assert b.layers and set(b.layers) <= set(b.nodes)
        assert list(b.nodes) == sorted(b.nodes, key=order.__getitem__)
        assert b.output_point in points and b.output_point == b.nodes[-1]
        assert len(b.input_points) == 1 and set(b.input_points) <= points
        assert not set(b.input_points) & set(b.nodes)
    assert len({b.name for b in blocks}) == len(blocks)


# ------------------------------------------------------------ tiny models
def identity_residual(inp):
    x = conv_bn_relu(inp, 4, "c0")
    y = conv_bn_relu(x, 4, "c1")
    y = conv_bn_relu(y, 4, "c2", relu=False)
    x = L.ReLU(name="out_relu")(L.Add(name="add")([x, y]))
    return head(x)


def conv_shortcut_residual(inp):
    x = conv_bn_relu(inp, 4, "c0")
    y = conv_bn_relu(x, 8, "c1", strides=2)
    y = conv_bn_relu(y, 8, "c2", relu=False)
    s = L.Conv2D(8, 1, strides=2, name="shortcut")(x)
    x = L.ReLU(name="out_relu")(L.Add(name="add")([y, s]))
    return head(x)


def test_identity_shortcut_residual_block():
    graph = graph_of(identity_residual)
    blocks = find_blocks(graph)
    assert_partition(graph, blocks)
    assert [(b.name, b.kind, b.layers) for b in blocks] == [
        ("c0", "layer", ("c0",)),
        ("add", "residual", ("c1", "c2")),
        ("fc", "layer", ("fc",)),
    ]
    res = blocks[1]
    assert res.input_points == ("c0_relu",) and res.output_point == "out_relu"
    assert res.nodes == ("c1", "c1_bn", "c1_relu", "c2", "c2_bn", "add", "out_relu")
    assert blocks[0].input_points == ("img",) and blocks[0].output_point == "c0_relu"
    assert blocks[0].nodes == ("c0", "c0_bn", "c0_relu")
    assert blocks[2].input_points == ("gap",) and blocks[2].output_point == "fc"
    assert graph.blocks() == blocks


def test_conv_shortcut_residual_block():
    graph = graph_of(conv_shortcut_residual)
    blocks = graph.blocks()
    assert_partition(graph, blocks)
    res = blocks[1]
    assert res.kind == "residual" and res.layers == ("c1", "c2", "shortcut")
    assert res.input_points == ("c0_relu",) and res.output_point == "out_relu"
    assert "shortcut" in res.nodes and "add" in res.nodes
    assert structure(blocks) == [("layer", 1), ("residual", 3), ("layer", 1)]


def dw_pw_chain(inp):
    x = conv_bn_relu(inp, 4, "c0")
    x = dw_bn_relu(x, "dw1")
    x = conv_bn_relu(x, 8, "pw1", kernel=1)
    x = dw_bn_relu(x, "dw2", strides=2)
    x = L.Dropout(0.1, name="drop")(x)  # shape-only between dw and pw
    x = conv_bn_relu(x, 8, "pw2", kernel=1)
    x = L.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)  # split into sep_dw + sep
    x = dw_bn_relu(x, "dw3")
    x = conv_bn_relu(x, 8, "c3")  # 3x3 after a depthwise: not separable
    x = dw_bn_relu(x, "dw4")
    a = conv_bn_relu(x, 4, "pw_a", kernel=1)  # two readers: not separable
    b = conv_bn_relu(x, 4, "pw_b", kernel=1)
    return head(L.Concatenate(name="cat")([a, b]))


def test_depthwise_pointwise_blocks():
    graph = graph_of(dw_pw_chain)
    blocks = graph.blocks()
    assert_partition(graph, blocks)
    assert [(b.name, b.kind) for b in blocks] == [
        ("c0", "layer"),
        ("dw1+pw1", "separable"),
        ("dw2+pw2", "separable"),
        ("sep_dw+sep", "separable"),
        ("dw3", "layer"),
        ("c3", "layer"),
        ("dw4", "layer"),
        ("pw_a", "layer"),
        ("pw_b", "layer"),
        ("fc", "layer"),
    ]
    by_name = {b.name: b for b in blocks}
    sep1 = by_name["dw1+pw1"]
    assert sep1.layers == ("dw1", "pw1") and sep1.input_points == ("c0_relu",) and sep1.output_point == "pw1_relu"
    assert by_name["dw2+pw2"].nodes == ("dw2", "dw2_bn", "dw2_relu", "drop", "pw2", "pw2_bn", "pw2_relu")
    assert by_name["sep_dw+sep"].output_point == "sep_act"


def plain_stack(inp):
    x = conv_bn_relu(inp, 4, "c0")
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="c1")(x)
    x = L.MaxPooling2D(name="mp")(x)
    x = L.Flatten(name="flat")(x)
    return L.Dense(3, activation="softmax", name="fc")(x)


def test_plain_conv_stack_is_one_block_per_layer():
    graph = graph_of(plain_stack)
    blocks = graph.blocks()
    assert_partition(graph, blocks)
    assert [(b.name, b.kind) for b in blocks] == [("c0", "layer"), ("c1", "layer"), ("fc", "layer")]
    fc = blocks[2]
    # the dense layer reads the ReLU's point through max pooling and flatten
    assert fc.input_points == ("c1_act",) and fc.nodes == ("mp", "flat", "fc") and fc.output_point == "fc"


def outside_read(inp):
    """The branch reads c0's output besides the fork c1: the fork-to-Add region is not closed."""
    p0 = conv_bn_relu(inp, 4, "c0")
    p1 = conv_bn_relu(p0, 4, "c1")
    y = conv_bn_relu(p1, 4, "c2")
    y = L.Concatenate(name="cat")([y, p0])
    y = conv_bn_relu(y, 4, "c3", kernel=1, relu=False)
    return head(L.ReLU(name="out_relu")(L.Add(name="add")([p1, y])))


def outside_reader(inp):
    """A layer after the block reads a point inside it: not closed either."""
    p0 = conv_bn_relu(inp, 4, "c0")
    inner = conv_bn_relu(p0, 4, "c1")
    y = conv_bn_relu(inner, 4, "c2", relu=False)
    x = L.ReLU(name="out_relu")(L.Add(name="add")([p0, y]))
    z = conv_bn_relu(inner, 4, "late")
    return head(L.Concatenate(name="cat")([x, z]))


@pytest.mark.parametrize("body", [outside_read, outside_reader], ids=["outside_read", "outside_reader"])
def test_unclean_residual_falls_back_to_layers(body):
    graph = graph_of(body)
    blocks = graph.blocks()
    assert_partition(graph, blocks)
    assert {b.kind for b in blocks} == {"layer"}
    assert len(blocks) == len(graph.quant_layers())


def nested_residual(inp):
    x = conv_bn_relu(inp, 4, "c0")
    y = conv_bn_relu(x, 4, "c1", relu=False)
    y = L.ReLU(name="inner_relu")(L.Add(name="inner_add")([x, y]))
    y = conv_bn_relu(y, 4, "c2", relu=False)
    return head(L.ReLU(name="outer_relu")(L.Add(name="outer_add")([x, y])))


def test_outermost_residual_wins_when_nested():
    graph = graph_of(nested_residual)
    blocks = graph.blocks()
    assert_partition(graph, blocks)
    assert [(b.name, b.kind, b.layers) for b in blocks] == [
        ("c0", "layer", ("c0",)),
        ("outer_add", "residual", ("c1", "c2")),
        ("fc", "layer", ("fc",)),
    ]
    assert "inner_add" in blocks[1].nodes and blocks[1].output_point == "outer_relu"


@pytest.mark.parametrize("body", [identity_residual, conv_shortcut_residual, plain_stack, nested_residual, outside_read])
def test_onnx_view_of_tiny_models_has_the_same_blocks(body):
    graph = graph_of(body)
    onnx_graph = OnnxGraph.from_onnx(graph.to_onnx().model)
    blocks = onnx_graph.blocks()
    assert_partition(onnx_graph, blocks)
    assert structure(blocks) == structure(graph.blocks())
    assert [b.layers for b in blocks] == [b.layers for b in graph.blocks()]  # the view keeps layer names


def folded(graph: ModelGraph) -> ModelGraph:
    graph = graph.copy()
    for layer in graph.quant_layers():
        if layer.bn is not None:
            fold_bn(graph, layer)
    return graph


def test_onnx_view_of_folded_separable_chain_has_the_same_blocks():
    # The ONNX view writes an unfolded BN as Mul + Add, which the ONNX adapter
    # requantizes: a depthwise output is then read by the Mul, not by the 1x1
    # conv, so separable blocks show in the ONNX view once BNs are folded.
    graph = folded(graph_of(dw_pw_chain))
    onnx_graph = OnnxGraph.from_onnx(graph.to_onnx().model)
    blocks = onnx_graph.blocks()
    assert_partition(onnx_graph, blocks)
    assert [(b.name, b.kind, b.layers) for b in blocks] == [(b.name, b.kind, b.layers) for b in graph.blocks()]


# ------------------------------------------------------------ MLPerf Tiny models
MLPERF = {
    "ic": ("ic_resnet8.h5", [("layer", 1), ("residual", 2), ("residual", 3), ("residual", 3), ("layer", 1)]),
    "vww": ("vww_mobilenetv1_96.h5", [("layer", 1)] + [("separable", 2)] * 13 + [("layer", 1)]),
    "kws": ("kws_dscnn_savedmodel", [("layer", 1)] + [("separable", 2)] * 4 + [("layer", 1)]),
    "ad": ("ad_autoencoder.h5", [("layer", 1)] * 10),
}


@pytest.fixture(scope="module")
def mlperf_graphs(mlperf_dir):
    return {k: load_graph(mlperf_dir / f) for k, (f, _) in MLPERF.items()}


@pytest.mark.parametrize("use_case", list(MLPERF))
def test_mlperf_blocks(mlperf_graphs, use_case):
    graph = mlperf_graphs[use_case]
    blocks = graph.blocks()
    assert_partition(graph, blocks)
    assert structure(blocks) == MLPERF[use_case][1]
    assert blocks[0].input_points == (graph.node_names()[0],)
    assert blocks[-1].layers[0] == graph.quant_layers()[-1].name


def test_resnet8_residual_blocks_chain(mlperf_graphs):
    blocks = mlperf_graphs["ic"].blocks()
    counts = Counter(b.kind for b in blocks)
    assert counts == {"residual": 3, "layer": 2}
    for prev, nxt in zip(blocks, blocks[1:], strict=False):
        assert nxt.input_points == (prev.output_point,) or nxt.kind == "layer"  # the dense reads the pooling


def test_kws_as_onnx_after_bn_folding_has_the_same_blocks(mlperf_graphs):
    graph = folded(mlperf_graphs["kws"])
    onnx_graph = OnnxGraph.from_onnx(graph.to_onnx().model)
    blocks = onnx_graph.blocks()
    assert_partition(onnx_graph, blocks)
    assert structure(blocks) == structure(graph.blocks()) == MLPERF["kws"][1]


def test_resnet8_as_onnx_has_the_same_blocks(mlperf_graphs):
    graph = mlperf_graphs["ic"]
    onnx_graph = OnnxGraph.from_onnx(graph.to_onnx().model)
    blocks = onnx_graph.blocks()
    assert_partition(onnx_graph, blocks)
    assert structure(blocks) == structure(graph.blocks())
    residual = [b for b in blocks if b.kind == "residual"]
    keras_residual = [b for b in graph.blocks() if b.kind == "residual"]
    assert [(b.input_points, b.output_point) for b in residual] == [
        (b.input_points, b.output_point) for b in keras_residual
    ]
