"""KerasGraph.to_onnx: the float ONNX model computes what the Keras model computes, tensor by tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tinyptq._tf import keras
from tinyptq.export.qdq_onnx import onnx_predict, onnx_session, with_outputs
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.loading import load_graph

MLPERF = ["ic_resnet8.h5", "kws_dscnn_savedmodel", "vww_mobilenetv1_96.h5", "ad_autoencoder.h5"]


def _inputs(graph, n=6, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *graph.input_shape[1:])) * scale).astype(np.float32)


def _assert_matches_keras(graph, x, atol=1e-4):
    """Every activation point and every output equal in ONNX (NCHW inside) and Keras."""
    view = graph.to_onnx()
    onnx.checker.check_model(view.model, full_check=True)
    points = [p.name for p in graph.act_points()]
    assert set(view.tensors) == set(points)
    session = onnx_session(with_outputs(view.model, [view.tensors[p] for p in points]))
    ref = graph.run(x, list(dict.fromkeys(points + graph.output_names)))
    out = onnx_predict(session, x)
    assert out.shape == ref[graph.output_names[0]].shape
    np.testing.assert_allclose(out, ref[graph.output_names[0]], atol=atol, rtol=1e-4)
    for p in points:
        got = onnx_predict(session, x, output=view.tensors[p])
        want = ref[p]
        if got.shape != want.shape:  # a 4-D tensor kept in NCHW inside the ONNX model
            got = got.transpose(0, 2, 3, 1)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, atol=atol * scale, rtol=1e-4, err_msg=p)
    return view


@pytest.mark.parametrize("name", MLPERF)
def test_mlperf_models_match_keras(mlperf_dir, name):
    graph = load_graph(mlperf_dir / name)
    view = _assert_matches_keras(graph, _inputs(graph, scale=60.0 if name.startswith("ic") else 1.0))
    assert view.model.ir_version <= 10  # onnxruntime 1.31 loads it (checked by running it above)
    kernels = {i.name: i for i in view.model.graph.initializer}
    for layer in graph.quant_layers():
        perm = view.kernel_perms[layer.name]
        stored = onnx.numpy_helper.to_array(kernels[view.kernels[layer.name]])
        np.testing.assert_array_equal(stored, np.transpose(graph.kernel(layer.name), perm))
        assert view.biases[layer.name] in kernels
    # the model takes the Keras (NHWC) input and gives the Keras output names
    inp = view.model.graph.input[0]
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == list(graph.input_shape[1:])
    assert [o.name for o in view.model.graph.output] == graph.output_names


@pytest.mark.slow
def test_fsdd_kws_model_matches_keras(data_dir):
    from tinyptq.models.training import kws_fsdd_model

    graph = load_graph(kws_fsdd_model(data_dir, progress=False))
    _assert_matches_keras(graph, _inputs(graph))


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = weights
            weights = [rng.uniform(0.5, 1.5, gamma.shape), rng.normal(size=beta.shape),
                       rng.normal(size=mean.shape) * 0.1, rng.uniform(0.5, 2.0, var.shape)]
        else:
            weights = [rng.normal(size=w.shape) * 0.3 for w in weights]
        layer.set_weights([np.asarray(w, np.float32) for w in weights])
    return model


def many_layers_model():
    """A small functional model with every kind of layer the Keras adapter supports."""
    L = keras.layers
    inp = keras.Input((9, 11, 3), name="image")
    x = L.ZeroPadding2D(((1, 0), (2, 1)))(inp)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)  # odd size, stride 2
    a = L.SeparableConv2D(8, 3, padding="same", depth_multiplier=2)(x)  # depthwise x2 + 1x1
    a = L.BatchNormalization()(a)
    a = L.ReLU(max_value=6.0)(a)
    b = L.DepthwiseConv2D(3, padding="same", dilation_rate=2)(x)
    b = L.ReLU(negative_slope=0.1, threshold=0.2)(b)
    c = L.Concatenate()([L.Add()([a, b]), L.Subtract()([a, b]), L.Multiply()([a, b]), L.Average()([a, b])])
    c = L.Activation("swish")(c)
    p = L.MaxPooling2D(2, padding="same")(c)
    p = L.AveragePooling2D(3, strides=2, padding="same")(p)
    p = L.Conv2D(6, 1, activation="tanh")(L.Dropout(0.5)(p))
    g = L.GlobalAveragePooling2D()(p)
    m = L.Flatten()(L.GlobalMaxPooling2D(keepdims=True)(p))
    s = L.Dense(4, activation="hard_sigmoid")(L.Reshape((2, -1))(L.Flatten()(p)))  # Dense on 3-D
    s = L.Flatten()(s)
    h = L.Concatenate()([g, m, s])
    h = L.Dense(10, activation="sigmoid")(h)
    h = L.BatchNormalization()(h)
    out = L.Softmax()(L.Dense(5)(h))
    return _randomize(keras.Model(inp, out, name="many"))


def test_every_supported_layer_kind_matches_keras():
    graph = KerasGraph.from_keras(many_layers_model())
    view = _assert_matches_keras(graph, _inputs(graph, n=5))
    # the separable convolution's depthwise half has a multiplier: its kernel is reshaped in ONNX
    assert view.kernel_perms["separable_conv2d_dw"] == (2, 3, 0, 1)


def test_sequential_model_without_4d_tensors():
    model = keras.Sequential([keras.Input((7,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])
    graph = KerasGraph.from_keras(_randomize(model))
    _assert_matches_keras(graph, _inputs(graph))


def test_opset_21_model_loads():
    graph = KerasGraph.from_keras(many_layers_model())
    view = graph.to_onnx(21)
    assert view.model.opset_import[0].version == 21 and view.model.ir_version == 10
    x = _inputs(graph, n=2)
    np.testing.assert_allclose(onnx_predict(onnx_session(view.model), x), graph.predict(x), atol=1e-5)
