"""cle: float function unchanged, channel ranges equalized, per-tensor quantization error reduced."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.components.cle import cle_pairs
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.quant import Encoding, QuantSpec
from tinyptq.sim import QuantSim

from ..core.test_graph import tiny_resnet
from .test_bn_folding import ds_cnn, fold, rel_diff, state_of

DS_PAIRS = [("conv", "dw1"), ("dw1", "pw1"), ("pw1", "dw2"), ("dw2", "pw2")]


def cle(state: PTQState, **options) -> PTQState:
    """Run the cle stage."""
    return create_stage("cle", options).apply(state)


# independent of the module's helpers: Keras layouts spelled out
def out_ranges(graph: KerasGraph, name: str) -> np.ndarray:
    """max |W| per output channel."""
    w = np.abs(graph.kernel(name))
    return w.max(axis=(0, 1, 3)) if graph.quant_layer(name).kind == "depthwise" else w.reshape(-1, w.shape[-1]).max(0)


def in_ranges(graph: KerasGraph, name: str) -> np.ndarray:
    """max |W| per input channel."""
    w = np.abs(graph.kernel(name))
    return w.max(axis=1) if w.ndim == 2 else w.max(axis=(0, 1, 3))


def rescale_pair(state: PTQState, first: str, second: str, f: np.ndarray) -> None:
    """Multiply first's output channels (and BN stats) by f, divide second's inputs by f: same function."""
    graph = state.graph
    stats = state.bn_stats[first]
    state.bn_stats[first] = {**stats, "gamma": stats["gamma"] * f, "beta": stats["beta"] * f}
    k1 = graph.kernel(first)
    graph.set_kernel(first, k1 * (f[:, None] if graph.quant_layer(first).kind == "depthwise" else f))
    graph.set_bias(first, graph.bias(first) * f)
    k2 = graph.kernel(second)
    graph.set_kernel(second, k2 / (f[:, None] if k2.ndim == 2 else f[None, None, :, None]))


def imbalanced_ds_cnn(seed: int = 0) -> PTQState:
    """A folded DS-CNN whose channels were rescaled by factors up to 100x either way."""
    state = fold(state_of(ds_cnn(seed), n=64))
    rng = np.random.default_rng(seed)
    for first, second in DS_PAIRS:
        rescale_pair(state, first, second, 10 ** rng.uniform(-2, 2, 8).astype(np.float32))
    return state


def per_tensor_output_mse(state: PTQState, bits: int, only: str | None = None) -> float:
    """MSE of the per-tensor W<bits>A8 simulation against float (``only``: that layer alone, else W16A16)."""
    cfg = QuantConfig(weight_bits=bits, act_bits=8, weight_per_channel=False)
    if only is not None:
        cfg = QuantConfig(weight_bits=16, act_bits=16).with_override(LayerOverride(only, weight_bits=bits))
    quant = create_stage("range_setting").apply(state.evolve(config=cfg))
    ref = state.graph.predict(state.calib)
    return float(np.mean((QuantSim(quant).predict(state.calib) - ref) ** 2))


def channel_weight_error(graph: KerasGraph, bits: int) -> float:
    """Mean over layers and output channels of ||Q(w_c) - w_c||^2 / ||w_c||^2, per-tensor grids."""

    def by_channel(a: np.ndarray, kind: str) -> np.ndarray:
        """(values, output channels) view of a kernel."""
        a = np.moveaxis(a, 2, -1) if kind == "depthwise" else a  # depthwise: (kh, kw, 1, in)
        return a.reshape(-1, a.shape[-1])

    errs = []
    for ql in graph.quant_layers():
        w = graph.kernel(ql.name)
        m = np.abs(w).max()
        q = Encoding.from_range(-m, m, QuantSpec(bits=bits, signed=True)).fake_quant(w)
        d, ref = by_channel(q - w, ql.kind), by_channel(w, ql.kind)
        errs.append(np.mean((d**2).sum(0) / (ref**2).sum(0)))
    return float(np.mean(errs))


# ------------------------------------------------------------------ pairs
def test_pairs_of_depthwise_separable_chain_and_resnet():
    pairs = cle_pairs(fold(state_of(ds_cnn())).graph)
    assert [(p.first.name, p.second.name) for p in pairs] == DS_PAIRS
    # c1's output also feeds the Add: no pair; sep -> dw has ReLU6 between them
    pairs = cle_pairs(fold(state_of(tiny_resnet())).graph)
    assert [(p.first.name, p.second.name) for p in pairs] == [("sep_dw", "sep"), ("sep", "dw")]


def test_pairs_through_shape_only_layers_need_matching_channels():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c1")(inp)
    x = keras.layers.ZeroPadding2D()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Flatten()(x)  # 4x4x5 values: no channel-for-channel pair with fc
    x = keras.layers.Dense(3, name="fc")(x)
    state = state_of(keras.Model(inp, x))
    assert [(p.first.name, p.second.name) for p in cle_pairs(state.graph)] == [("c1", "c2")]
    out = cle(state)
    assert rel_diff(out.graph.predict(state.calib), state.graph.predict(state.calib)) < 1e-5
    np.testing.assert_allclose(out_ranges(out.graph, "c1"), in_ranges(out.graph, "c2"), rtol=1e-3)


# ------------------------------------------------------------- properties
@pytest.mark.parametrize("seed", [0, 1])
def test_cle_keeps_float_outputs_and_equalizes_each_pair(seed):
    state = imbalanced_ds_cnn(seed)
    ref = state.graph.predict(state.calib)
    out = cle(state)
    assert rel_diff(out.graph.predict(state.calib), ref) < 1e-5
    # Nagel's optimum: each channel's range is the same on both sides, sqrt(r1 r2)
    for first, second in DS_PAIRS:
        np.testing.assert_allclose(out_ranges(out.graph, first), in_ranges(out.graph, second), rtol=1e-3)
    assert out.log[-1].lines[0].startswith("equalized 4 pairs in ")
    assert "converged" in out.log[-1].lines[0] and "not converged" not in out.log[-1].lines[0]


def test_cle_reduces_per_tensor_quantization_error():
    state = imbalanced_ds_cnn(0)
    out = cle(state)
    before, after = channel_weight_error(state.graph, 4), channel_weight_error(out.graph, 4)
    assert after < 0.5 * before
    for bits in (4, 6):
        assert per_tensor_output_mse(out, bits) < 0.5 * per_tensor_output_mse(state, bits)


def test_bn_stats_follow_the_rescaled_outputs():
    state = imbalanced_ds_cnn(0)
    out = cle(state)
    for first, _ in DS_PAIRS:
        # the layer's output channel c was divided by s_c: so are its bias, BN mean and std
        s = state.graph.bias(first) / out.graph.bias(first)
        h_old, h_new = (st.graph.run(state.calib, [first])[first] for st in (state, out))
        np.testing.assert_allclose(h_new * s, h_old, rtol=1e-3, atol=1e-4 * np.abs(h_old).max())
        old, new = state.bn_stats[first], out.bn_stats[first]
        np.testing.assert_allclose(new["gamma"], old["gamma"] / s, rtol=1e-4)
        np.testing.assert_allclose(new["beta"], old["beta"] / s, rtol=1e-4)


def test_relu6_pairs_are_skipped_and_outputs_unchanged():
    state = fold(state_of(ds_cnn(act="relu6")))
    out = cle(state)
    assert out.graph.fingerprint() == state.graph.fingerprint()
    assert out.log[-1].lines[0] == "no layer pairs to equalize"
    assert sum("ReLU6" in ln for ln in out.log[-1].lines) == 4
    # mixed: tiny_resnet equalizes sep_dw -> sep, skips sep -> dw (ReLU6)
    state = fold(state_of(tiny_resnet()))
    out = cle(state)
    assert rel_diff(out.graph.predict(state.calib), state.graph.predict(state.calib)) < 1e-5
    assert any("skipped sep -> dw: ReLU6" in ln for ln in out.log[-1].lines)
    np.testing.assert_array_equal(out.graph.kernel("dw"), state.graph.kernel("dw"))


def test_unfolded_bn_pairs_are_skipped_with_a_hint():
    state = state_of(ds_cnn())
    out = cle(state)
    assert out.graph.fingerprint() == state.graph.fingerprint()
    hints = [ln for ln in out.log[-1].lines if "put bn_folding before cle" in ln]
    assert len(hints) == 4


def test_input_state_is_not_mutated_and_order_is_checked():
    state = imbalanced_ds_cnn(0)
    before = state.graph.fingerprint()
    stats = {k: dict(v) for k, v in state.bn_stats.items()}
    out = cle(state, high_bias_absorption=True)
    assert state.graph.fingerprint() == before and out.graph.fingerprint() != before
    for name, old in stats.items():
        assert all(np.array_equal(state.bn_stats[name][k], old[k]) for k in ("gamma", "beta"))
    with pytest.raises(ConfigError, match="cle.*before range_setting"):
        cle(create_stage("range_setting").apply(state))
    with pytest.raises(ConfigError, match="tolerance"):
        create_stage("cle", {"tolerance": 0})


def test_dead_channels_are_neither_inflated_nor_left_as_outliers():
    """A channel that never fired: ~0 weights after folding, and huge folded weights downstream."""
    state = fold(state_of(ds_cnn(), n=64))
    g = state.graph
    k, b = g.kernel("conv"), g.bias("conv")
    k[..., [3, 5]] = 1e-30
    b[3], b[5] = -0.5, 0.7  # channel 3 always outputs 0, channel 5 the constant 0.7
    g.set_kernel("conv", k)
    g.set_bias("conv", b)
    dw = g.kernel("dw1")
    dw[:, :, 3] *= 50  # BN folding over a zero-variance input blows such weights up
    g.set_kernel("dw1", dw)
    out = cle(state)
    assert rel_diff(out.graph.predict(state.calib), state.graph.predict(state.calib)) < 1e-5
    assert np.all(out.graph.kernel("dw1")[:, :, 3] == 0)
    assert any("zeroed the weights of 1 input channels" in ln for ln in out.log[-1].lines)
    # the constant channel keeps its value instead of being scaled up by 1/s ~ 1e15
    assert out.graph.bias("conv")[5] == pytest.approx(0.7)
    act = out.graph.run(state.calib, ["act0"])["act0"]
    np.testing.assert_allclose(act[..., 5], 0.7, rtol=1e-6)
    # the outlier no longer sets dw1's per-tensor grid
    assert per_tensor_output_mse(out, 4, only="dw1") < 0.01 * per_tensor_output_mse(state, 4, only="dw1")


# ------------------------------------------------------ high-bias absorption
def mlp_with_high_biases(calib: np.ndarray):
    """Dense-BN-ReLU twice, BN statistics set from the data, betas well above 3 gamma."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((calib.shape[1],))
    x = keras.layers.Dense(12, name="d1")(inp)
    x = keras.layers.BatchNormalization(epsilon=1e-6, name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Dense(10, name="d2")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-6, name="bn2")(x)
    x = keras.layers.ReLU(name="r2")(x)
    x = keras.layers.Dense(3, name="d3")(x)
    model = keras.Model(inp, x)
    rng = np.random.default_rng(2)
    for d, bn in (("d1", "bn1"), ("d2", "bn2")):
        h = keras.Model(inp, model.get_layer(d).output).predict(calib, verbose=0)
        n = h.shape[1]
        gamma, beta = np.exp(rng.uniform(-1.5, 0, n)), rng.uniform(-0.5, 4, n)
        model.get_layer(bn).set_weights([gamma, beta, h.mean(0), h.var(0)])
    return model


def test_high_bias_absorption_moves_bias_and_keeps_outputs():
    calib = np.random.default_rng(0).normal(size=(2000, 6)).astype(np.float32)
    state = fold(PTQState(KerasGraph.from_keras(mlp_with_high_biases(calib)), QuantConfig(), calib))
    plain, hba = cle(state), cle(state, high_bias_absorption=True)
    assert any("bias moved forward in 2 ReLU pairs" in ln for ln in hba.log[-1].lines)
    moved_in, keep = 0.0, np.ones(len(calib), bool)  # what the previous layer absorbed arrives via the kernel
    for name in ("d1", "d2"):
        stats = hba.bn_stats[name]
        c = plain.bn_stats[name]["beta"] - stats["beta"]
        # exact wherever no pre-activation with c > 0 fell below c (now: below 0)
        keep &= np.all((hba.graph.run(calib, [name])[name] >= 0) | (c == 0), axis=1)
        assert np.all(c >= 0) and np.sum(c > 0) >= 3
        np.testing.assert_allclose(hba.graph.bias(name), plain.graph.bias(name) - c + moved_in, atol=1e-4)
        moved_in = c @ hba.graph.kernel({"d1": "d2", "d2": "d3"}[name])
        # what is left above the ReLU's knee is at most 3 standard deviations
        assert np.all(stats["beta"] - 3 * np.abs(stats["gamma"]) <= 1e-5)
        # bn_stats still describe the layer's output: mean beta, std |gamma|
        h = hba.graph.run(calib, [name])[name]
        np.testing.assert_allclose(h.mean(0), stats["beta"], atol=1e-3)
        np.testing.assert_allclose(h.std(0), np.abs(stats["gamma"]), rtol=1e-3)
    assert keep.mean() > 0.95
    ref = state.graph.predict(calib)[keep]
    assert rel_diff(hba.graph.predict(calib)[keep], ref) < 1e-5


# ------------------------------------------------------------ real model
def test_cle_on_mlperf_kws_keeps_outputs_and_balances(mlperf_dir):
    model = keras.models.load_model(mlperf_dir / "kws_dscnn_savedmodel", compile=False)
    state = fold(state_of(model, n=8))
    out = cle(state)
    assert rel_diff(out.graph.predict(state.calib), state.graph.predict(state.calib)) < 1e-4
    pairs = cle_pairs(out.graph)
    assert len(pairs) == 8 and out.log[-1].lines[0].startswith("equalized 8 pairs")
    for p in pairs:
        np.testing.assert_allclose(out_ranges(out.graph, p.first.name), in_ranges(out.graph, p.second.name), rtol=1e-3)
    assert channel_weight_error(out.graph, 4) < channel_weight_error(state.graph, 4)

