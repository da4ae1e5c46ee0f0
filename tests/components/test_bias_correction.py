"""bias_correction: the mean output error of quantized layers goes away, analytical ~ empirical."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.components.bias_correction import activation_mean
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.sim import QuantSim


def skewed_model(seed: int = 0):
    """conv-ReLU, depthwise-ReLU, bias-free 1x1 conv-BN-ReLU, GAP, dense logits + softmax.

    Kernels are skewed (mostly small positive weights, a few large ones), so
    3-bit rounding flushes many weights to zero: a biased per-channel error.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.ReLU(name="r2")(x)
    x = keras.layers.Conv2D(6, 1, use_bias=False, name="pw")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="r3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(4, activation="softmax", name="fc")(x)
    model = keras.Model(inp, x)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name in ("c1", "dw", "pw", "fc"):
            w = layer.get_weights()
            shape = w[0].shape
            sign = np.where(rng.random(shape) < 0.8, 1.0, -1.0)
            w[0] = (sign * rng.lognormal(-2.5, 1.0, shape)).astype(np.float32)
            layer.set_weights(w)
    bn = model.get_layer("bn")
    bn.set_weights([np.full(6, 1.2), np.full(6, 0.1), np.full(6, 0.5), np.full(6, 2.0)])
    return model


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 8, 8, 3)).astype(np.float32)


def _calibrated(config: QuantConfig, model=None, calib=None) -> PTQState:
    graph = KerasGraph.from_keras(model if model is not None else skewed_model())
    calib = _images(128, 0) if calib is None else calib
    return create_stage("range_setting", {"batch_size": 64}).apply(PTQState(graph, config, calib))


def _mean_errors(state: PTQState, float_graph: KerasGraph, names: list[str]) -> dict[str, np.ndarray]:
    """E[y_q - y] per output channel of each layer (its pre-quantization output) on state.calib."""
    # a layer's own output quantizer (here: the logits of fc) is rounding of y, not weight error
    acts = {k: v for k, v in state.act_encodings.items() if k not in names}
    quant = QuantSim(state.evolve(act_encodings=acts), outputs=names).run(state.calib)
    ref = float_graph.run(state.calib, names)
    return {n: (quant[n] - ref[n]).reshape(-1, ref[n].shape[-1]).mean(axis=0) for n in names}


@pytest.mark.parametrize("per_channel", [False, True])
def test_empirical_removes_mean_output_error_of_every_layer(per_channel):
    before = _calibrated(QuantConfig(weight_bits=3, weight_per_channel=per_channel))
    after = create_stage("bias_correction", {"method": "empirical", "batch_size": 32}).apply(before)
    names = [ql.name for ql in before.graph.quant_layers()]
    err_before = _mean_errors(before, before.graph, names)
    err_after = _mean_errors(after, before.graph, names)
    for name in names:
        pre, post = np.abs(err_before[name]).mean(), np.abs(err_after[name]).mean()
        assert pre > 1e-3, name  # the model really has a biased error to remove
        assert post < 0.05 * pre and post < 1e-4, (name, pre, post)
    # only biases changed: kernels and encodings stay; the bias-free layer got one
    assert before.graph.bias("pw") is None and after.graph.bias("pw") is not None
    corrections = after.log[-1].details["corrections"]
    for name in names:
        np.testing.assert_array_equal(after.graph.kernel(name), before.graph.kernel(name))
        old = before.graph.bias(name)
        old = np.zeros_like(after.graph.bias(name)) if old is None else old
        np.testing.assert_allclose(old - after.graph.bias(name), corrections[name], atol=1e-6)
    assert after.weight_encodings == before.weight_encodings
    assert after.act_encodings == before.act_encodings


def test_empirical_reduces_output_error_on_held_out_data():
    held_out = _images(256, 7)
    for per_channel in (False, True):
        before = _calibrated(QuantConfig(weight_bits=3, weight_per_channel=per_channel))
        after = create_stage("bias_correction").apply(before)
        ref = before.graph.predict(held_out)
        err = [np.mean((QuantSim(s).predict(held_out) - ref) ** 2) for s in (before, after)]
        assert err[1] < 0.2 * err[0], (per_channel, err)


def test_log_names_method_layers_and_mean_correction():
    state = create_stage("bias_correction").apply(_calibrated(QuantConfig(weight_bits=3)))
    rec = state.log[-1]
    assert rec.stage == "bias_correction" and rec.params == {"method": "empirical", "batch_size": 128}
    assert rec.lines[0] == "method empirical: 4 layers corrected (c1, dw, pw, fc)"
    assert rec.lines[1].startswith("mean |correction| ")
    assert float(rec.lines[1].split()[-1]) > 0


# ----------------------------------------------------------------- analytical
def bn_fed_model(kind: str, activation: str | None, seed: int = 0):
    """A 1x1 conv turning N(0, 1) inputs into N(beta, gamma^2) channels, activation, then layer L.

    The statistics handed to the analytical method (gamma, beta of c1) are
    then exactly those of L's input, as they are after folding a BN into c1.
    """
    rng = np.random.default_rng(seed)
    channels = 5
    gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    beta = np.array([-1.0, -0.2, 0.5, 1.5, 5.5], np.float32)  # 5.5: ReLU6 clipping matters
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, channels), name="img")
    x = keras.layers.Conv2D(channels, 1, name="c1")(inp)
    if activation is not None:
        x = keras.layers.Activation(activation, name="act")(x)
    if kind == "conv":
        x = keras.layers.Conv2D(4, 3, name="L")(x)
    elif kind == "depthwise":
        x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="L")(x)
    else:
        x = keras.layers.AveragePooling2D(2, name="pool")(x)
        x = keras.layers.Flatten(name="flat")(x)
        x = keras.layers.Dense(4, name="L")(x)
    x = keras.layers.ReLU(name="out")(x)
    model = keras.Model(inp, x)
    model.get_layer("c1").set_weights([np.diag(gamma)[None, None], beta])
    w = model.get_layer("L").get_weights()
    w[0] = rng.normal(0.3, 0.3, w[0].shape).astype(np.float32)  # mean-shifted kernel
    model.get_layer("L").set_weights(w)
    stats = {"gamma": gamma, "beta": beta, "mean": np.zeros(channels), "var": np.ones(channels), "epsilon": 0.0}
    return model, stats


@pytest.mark.parametrize(
    "kind, activation",
    [("conv", "relu"), ("conv", None), ("depthwise", "relu6"), ("dense", "relu")],
)
def test_analytical_matches_empirical_when_inputs_follow_bn_statistics(kind, activation):
    model, stats = bn_fed_model(kind, activation)
    calib = np.random.default_rng(1).normal(size=(1024, 6, 6, 5)).astype(np.float32)
    # per-channel 3-bit weights: c1's diagonal kernel stays exact; 16-bit activations
    cfg = QuantConfig(weight_bits=3, act_bits=16, weight_per_channel=True)
    state = _calibrated(cfg, model, calib)
    state.bn_stats["c1"] = stats
    results = {}
    for method in ("analytical", "empirical"):
        out = create_stage("bias_correction", {"method": method, "batch_size": 256}).apply(state)
        results[method] = np.asarray(out.log[-1].details["corrections"]["L"])
        if method == "analytical":
            assert out.log[-1].details["skipped"] == {"c1": "reads the model input (no BN statistics)"}
    emp, ana = results["empirical"], results["analytical"]
    assert np.abs(emp).max() > 0.05  # a real correction to compare
    np.testing.assert_allclose(ana, emp, atol=0.015 * np.abs(emp).max())


def test_analytical_uses_unfolded_batch_norm_and_skips_layers_after_add():
    from ..core.test_graph import tiny_resnet

    graph = KerasGraph.from_keras(tiny_resnet())
    calib = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    state = create_stage("range_setting").apply(PTQState(graph, QuantConfig(weight_bits=3), calib))
    out = create_stage("bias_correction", {"method": "analytical"}).apply(state)
    rec = out.log[-1]
    assert list(rec.details["corrections"]) == ["c2"]  # reads ReLU(bn1(c1))
    assert rec.details["skipped"]["sep_dw"] == "input from add 'add' (no BN statistics)"
    assert "skipped c1: reads the model input (no BN statistics)" in rec.lines


def test_gaussian_activation_means_match_sampling():
    rng = np.random.default_rng(0)
    mu, sigma = np.array([-1.0, 0.0, 2.0, 5.5]), np.array([0.5, 1.0, 2.0, 1.5])
    z = rng.normal(mu, sigma, size=(400_000, 4))
    for act, f in (("relu", lambda v: np.maximum(v, 0)), ("relu6", lambda v: np.clip(v, 0, 6)), (None, lambda v: v)):
        np.testing.assert_allclose(activation_mean(mu, sigma, act), f(z).mean(axis=0), atol=0.01)


# ----------------------------------------------------------------- contract
def test_requires_range_setting_and_leaves_input_state_untouched():
    graph = KerasGraph.from_keras(skewed_model())
    state = PTQState(graph, QuantConfig(weight_bits=3), _images(8, 0))
    fp = graph.fingerprint()
    with pytest.raises(ConfigError, match="range_setting"):
        create_stage("bias_correction").apply(state)
    assert graph.fingerprint() == fp and not state.weight_encodings and not state.log
    # and a successful run changes only the new state's graph
    calibrated = _calibrated(QuantConfig(weight_bits=3))
    fp = calibrated.graph.fingerprint()
    n_log = len(calibrated.log)
    for method in ("empirical", "analytical"):
        out = create_stage("bias_correction", {"method": method}).apply(calibrated)
        assert out.graph is not calibrated.graph
    assert calibrated.graph.fingerprint() == fp and len(calibrated.log) == n_log


@pytest.mark.parametrize("options", [{"method": "exact"}, {"batch_size": 0}, {"batch_size": "8"}])
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        create_stage("bias_correction", options)


def test_in_place_bias_updates_equal_a_rebuilt_simulation(monkeypatch):
    """Corrections measured through one simulation changed in place (set_bias) equal those
    measured with a simulation rebuilt from the corrected graph for every layer."""
    from tinyptq.components import bias_correction as bc

    state = _calibrated(QuantConfig(weight_bits=3, weight_per_channel=True))
    in_place = create_stage("bias_correction").apply(state).log[-1].details["corrections"]
    measure = bc.quantized_means

    def rebuilt(sim, name, calib, batch_size):
        fresh = QuantSim(sim.state.evolve())  # the graph as corrected so far, no in-place change
        return measure(fresh, name, calib, batch_size)

    monkeypatch.setattr(bc, "quantized_means", rebuilt)
    again = create_stage("bias_correction").apply(state).log[-1].details["corrections"]
    assert list(again) == list(in_place)
    for name in in_place:
        np.testing.assert_array_equal(again[name], in_place[name])
