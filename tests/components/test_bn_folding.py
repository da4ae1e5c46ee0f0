"""bn_folding: the float function is unchanged, BNs are gone, unfoldable ones stay and are logged."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.pipeline import PTQState, create_stage

from ..core.test_graph import tiny_resnet


def randomize_bns(model, seed: int = 1) -> None:
    """Give every BN non-trivial statistics (spread gammas, shifted means)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            gamma = rng.choice([-1, 1], n) * np.exp(rng.uniform(-1.5, 1.5, n))
            beta, mean = rng.normal(0, 0.5, n), rng.normal(0, 0.5, n)
            var = np.exp(rng.uniform(-2, 1, n))
            layer.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, var)])


def ds_cnn(seed: int = 0, use_bias: bool = True, act: str = "relu"):
    """A tiny DS-CNN: conv-BN-ReLU, two depthwise-separable blocks (each BN-ReLU), GAP, dense."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 10, 2), name="mfcc")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=use_bias, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn0")(x)
    x = keras.layers.Activation(act, name="act0")(x)
    for i in (1, 2):
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=use_bias, name=f"dw{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_dw{i}")(x)
        x = keras.layers.Activation(act, name=f"act_dw{i}")(x)
        x = keras.layers.Conv2D(8, 1, use_bias=use_bias, name=f"pw{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_pw{i}")(x)
        x = keras.layers.Activation(act, name=f"act_pw{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(4, name="fc")(x)
    model = keras.Model(inp, x)
    randomize_bns(model, seed + 1)
    return model


def state_of(model, n: int = 16, seed: int = 0) -> PTQState:
    """A fresh PTQState over a model, with random calibration inputs."""
    graph = KerasGraph.from_keras(model)
    calib = np.random.default_rng(seed).normal(size=(n, *graph.input_shape[1:])).astype(np.float32)
    return PTQState(graph, QuantConfig(), calib)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def batch_norms(graph: KerasGraph) -> list[str]:
    """Names of the BN nodes still in the graph."""
    return [n.name for n in graph.nodes if n.class_name == "BatchNormalization"]


def fold(state: PTQState) -> PTQState:
    """Run the bn_folding stage."""
    return create_stage("bn_folding").apply(state)


@pytest.mark.parametrize("build", [tiny_resnet, ds_cnn, lambda: ds_cnn(3, use_bias=False)])
def test_folding_keeps_float_outputs_and_removes_bns(build):
    state = state_of(build())
    ref = state.graph.predict(state.calib)
    n_bn = len(batch_norms(state.graph))
    folded = fold(state)
    assert rel_diff(folded.graph.predict(state.calib), ref) < 1e-5
    assert batch_norms(folded.graph) == []
    assert all(q.bn is None for q in folded.graph.quant_layers())
    assert len(folded.bn_stats) == n_bn
    assert folded.log[-1].lines[0] == f"folded {n_bn} batch norms into their layers"


def test_folded_parameters_follow_the_formula_and_are_kept():
    state = state_of(ds_cnn(use_bias=False))
    p = state.graph.bn_params("bn_dw1")
    kernel = state.graph.kernel("dw1")
    folded = fold(state)
    k = p["gamma"] / np.sqrt(p["var"] + p["epsilon"])
    np.testing.assert_allclose(folded.graph.kernel("dw1"), kernel * k[None, None, :, None], rtol=1e-6)
    # the bias is created where there was none
    np.testing.assert_allclose(folded.graph.bias("dw1"), p["beta"] - p["mean"] * k, rtol=1e-5, atol=1e-6)
    stats = folded.bn_stats["dw1"]
    for key in ("gamma", "beta", "mean", "var"):
        np.testing.assert_array_equal(stats[key], p[key])
    assert stats["epsilon"] == pytest.approx(p["epsilon"])


def test_dense_and_depthwise_multiplier_are_folded_per_output():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(inp)
    x = keras.layers.BatchNormalization(name="bn_dw")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, name="fc")(x)
    x = keras.layers.BatchNormalization(name="bn_fc")(x)
    model = keras.Model(inp, x)
    randomize_bns(model)
    state = state_of(model)
    folded = fold(state)
    assert set(folded.bn_stats) == {"dw", "fc"} and batch_norms(folded.graph) == []
    assert rel_diff(folded.graph.predict(state.calib), state.graph.predict(state.calib)) < 1e-5


def test_unfoldable_bns_stay_in_float_and_are_logged():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    a = keras.layers.ReLU(name="r1")(a)
    a = keras.layers.BatchNormalization(name="bn_after_act")(a)
    b = keras.layers.Conv2D(4, 1, name="c2")(a)
    shared = keras.layers.BatchNormalization(name="bn_shared")(b)  # c2 is also read by the Add
    x = keras.layers.Add(name="add")([b, shared])
    x = keras.layers.BatchNormalization(name="bn_after_add")(x)
    x = keras.layers.Conv2D(2, 1, name="c3")(x)
    x = keras.layers.BatchNormalization(name="bn_ok")(x)
    model = keras.Model(inp, x)
    randomize_bns(model)
    state = state_of(model)
    folded = fold(state)
    stay = {"bn_after_act", "bn_shared", "bn_after_add"}
    assert set(batch_norms(folded.graph)) == stay and set(folded.bn_stats) == {"c3"}
    assert rel_diff(folded.graph.predict(state.calib), state.graph.predict(state.calib)) < 1e-5
    line = next(ln for ln in folded.log[-1].lines if "stay in float" in ln)
    assert all(name in line for name in stay)
    assert set(folded.log[-1].details["unfolded"]) == stay


def test_input_state_is_not_mutated():
    state = state_of(ds_cnn())
    before = state.graph.fingerprint()
    folded = fold(state)
    assert state.graph.fingerprint() == before and len(batch_norms(state.graph)) == 5
    assert state.bn_stats == {} and state.log == [] and len(folded.log) == 1
    assert folded.graph is not state.graph


def test_folding_after_range_setting_is_an_order_error():
    state = create_stage("range_setting").apply(state_of(ds_cnn()))
    with pytest.raises(ConfigError, match="bn_folding.*before range_setting"):
        fold(state)


@pytest.mark.parametrize("name", ["ic_resnet8.h5", "kws_dscnn_savedmodel"])
def test_folding_mlperf_models_keeps_outputs(mlperf_dir, name):
    model = keras.models.load_model(mlperf_dir / name, compile=False)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    state = state_of(model, n=8)
    folded = fold(state)
    assert rel_diff(folded.graph.predict(state.calib), state.graph.predict(state.calib)) < 1e-4
    assert batch_norms(folded.graph) == [] and len(folded.bn_stats) == n_bn
