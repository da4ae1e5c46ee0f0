"""The Keras adapter: faithful float graph, normalization, quantizer placement."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.errors import DataError, ModelError
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.loading import load_graph


def tiny_resnet(seed: int = 0):
    """conv-BN-ReLU, a residual Add+ReLU, separable conv with fused ReLU6, pooling, dense+softmax."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="r1")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="c2")(x)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.ReLU(name="r2")(x)
    x = keras.layers.SeparableConv2D(6, 3, padding="same", activation="relu6", name="sep")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.MaxPooling2D(name="mp")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(5, activation="softmax", name="fc")(x)
    model = keras.Model(inp, x)
    # non-trivial BN statistics
    for bn in ("bn1", "bn2"):
        layer = model.get_layer(bn)
        g, b, m, v = layer.get_weights()
        rng = np.random.default_rng(1)
        layer.set_weights([g * 1.5, b + 0.1, m + rng.normal(size=m.shape), v + 0.5])
    return model


def test_float_graph_reproduces_model_exactly():
    model = tiny_resnet()
    graph = KerasGraph.from_keras(model)
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(graph.predict(x), model.predict(x, verbose=0), atol=1e-6)


def test_normalization_and_quant_layers():
    graph = KerasGraph.from_keras(tiny_resnet())
    layers = {ql.name: ql for ql in graph.quant_layers()}
    # separable conv split into depthwise + pointwise; fused activations split out
    assert set(layers) == {"c1", "c2", "sep_dw", "sep", "dw", "fc"}
    assert layers["c1"].bn == "bn1" and layers["c1"].activation == "relu"
    assert layers["c1"].output_point == "r1" and layers["c1"].input_point == "img"
    assert layers["c2"].bn == "bn2" and layers["c2"].activation is None
    assert layers["sep"].activation == "relu6" and layers["sep"].output_point == "sep_act"
    assert layers["sep_dw"].kind == "depthwise" and layers["sep_dw"].channel_axis == 2
    assert layers["fc"].kind == "dense" and layers["fc"].channel_axis == 1
    assert graph.bias("c2") is None


def test_activation_points_follow_fusion_rules():
    graph = KerasGraph.from_keras(tiny_resnet())
    points = {p.name: p for p in graph.act_points()}
    # input quantized; conv->BN->ReLU quantized once after the ReLU
    assert points["img"].is_input
    assert "c1" not in points and "bn1" not in points and "r1" in points
    # conv->BN feeding an Add: quantized after BN; Add->ReLU fused: after ReLU only
    assert "bn2" in points and "add" not in points and "r2" in points
    # max pooling keeps its input grid; average pooling requantizes
    assert "mp" not in points and "gap" in points
    # logits and softmax output both quantized, softmax output is the model output
    assert "fc" in points and points["fc_act"].is_output
    assert points["r1"].owner == "c1" and points["sep_act"].owner == "sep"


def test_set_bias_creates_bias_and_copy_is_independent():
    graph = KerasGraph.from_keras(tiny_resnet())
    clone = graph.copy()
    clone.set_bias("c2", np.ones(4, np.float32))
    assert graph.bias("c2") is None and np.all(clone.bias("c2") == 1)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    assert not np.allclose(clone.predict(x), graph.predict(x))
    assert clone.fingerprint() != graph.fingerprint()


def test_sequential_models_are_converted():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)]
    )
    graph = KerasGraph.from_keras(model)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(graph.predict(x), model.predict(x, verbose=0), atol=1e-6)
    assert [q.name for q in graph.quant_layers()] == [layer.name for layer in model.layers]


def test_unsupported_layer_is_named():
    inp = keras.Input((5, 3))
    out = keras.layers.LSTM(4, name="my_lstm")(inp)
    with pytest.raises(ModelError, match="my_lstm.*LSTM"):
        KerasGraph.from_keras(keras.Model(inp, out))


def test_wrong_input_shape_is_a_data_error():
    graph = KerasGraph.from_keras(tiny_resnet())
    with pytest.raises(DataError, match=r"\(N, 8, 8, 3\)"):
        graph.predict(np.zeros((2, 9, 8, 3), np.float32))


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_graph(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ModelError, match="bad.h5"):
        load_graph(bad)
    with pytest.raises(ModelError, match="unsupported model format"):
        load_graph(tmp_path)


def test_all_mlperf_models_load_and_match(mlperf_dir):
    rng = np.random.default_rng(0)
    for name in ("ic_resnet8.h5", "kws_dscnn_savedmodel", "vww_mobilenetv1_96.h5", "ad_autoencoder.h5"):
        model = keras.models.load_model(mlperf_dir / name, compile=False)
        graph = KerasGraph.from_keras(model)
        x = rng.normal(size=(2, *model.input_shape[1:])).astype(np.float32)
        np.testing.assert_allclose(graph.predict(x), model.predict(x, verbose=0), atol=1e-5)
        assert graph.param_count() == model.count_params()
        n_bn = sum(type(layer).__name__ == "BatchNormalization" for layer in model.layers)
        assert sum(ql.bn is not None for ql in graph.quant_layers()) == n_bn
