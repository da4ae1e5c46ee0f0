"""adaround and brecq: learned rounding beats nearest, lies on the grid, exports, repeats; QDrop, Fisher, LSQ.

Small models and few iterations keep the file fast; every stage run is
computed once (module cache) and shared by the tests that read it.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.core import memory_usecase as mem
from tinyptq import api
from tinyptq._tf import keras
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.executor import Executor
from tinyptq.export import export_state
from tinyptq.export.qdq_onnx import onnx_predict, onnx_session
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.onnx_graph import OnnxGraph
from tinyptq.pipeline import Pipeline, PTQState, create_stage, order_problem
from tinyptq.quant import Encoding, QuantSpec
from tinyptq.rounding import NEAREST, SoftRounding, annealed_beta, block_units, layer_units
from tinyptq.sim import QuantSim

FAST = {"iterations": 400, "learning_rate": 0.02}  # compiled steps, fewer: a larger rate (defaults 2000, 0.01)


# ------------------------------------------------------------------ models
def _randomize(model, seed: int):
    """He-initialized kernels and small biases from a seeded generator."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        kernel = weights[0]
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        fan_in = int(np.prod(kernel.shape[:2] if depthwise else kernel.shape[:-1]))
        new = [rng.normal(0, np.sqrt(2.0 / fan_in), kernel.shape)] + [rng.normal(0, 0.1, w.shape) for w in weights[1:]]
        layer.set_weights([np.asarray(w, np.float32) for w in new])
    return model


def conv_layer_model(seed: int = 0):
    """One random 3x3 convolution, 4 -> 16 channels."""
    inp = keras.Input((8, 8, 4), name="img")
    return _randomize(keras.Model(inp, keras.layers.Conv2D(16, 3, padding="same", name="conv")(inp)), seed)


def two_block_model(seed: int = 1, head: bool = False):
    """A residual block on the input (conv-ReLU, conv, Add, ReLU), then dw-ReLU + pw.

    The output is pw's feature map: after global average pooling alone the
    output error would be mostly each channel's mean error, which is bias
    correction's business, not rounding's. ``head``: a classifier instead
    (pw-ReLU, global average pooling, dense logits), for the Fisher weights.
    """
    inp = keras.Input((10, 10, 6), name="img")
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="res_a")(inp)
    y = keras.layers.Conv2D(6, 3, padding="same", name="res_b")(y)
    x = keras.layers.ReLU(name="res_relu")(keras.layers.Add(name="res_add")([inp, y]))
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    if not head:
        return _randomize(keras.Model(inp, keras.layers.Conv2D(10, 1, name="pw")(x)), seed)
    x = keras.layers.Conv2D(10, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return _randomize(keras.Model(inp, keras.layers.Dense(5, name="head")(x)), seed)


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Blurred images with mixed channels: correlated inputs, as real ones (for white noise, nearest is optimal)."""
    h, w, c = shape
    z = np.random.default_rng(seed).normal(size=(n, h + 2, w + 2, c))
    z = sum(z[:, i : i + h, j : j + w] for i in range(3) for j in range(3))  # 3x3 box blur
    z = z @ np.random.default_rng(42).normal(size=(c, c))  # the same mixing for every seed
    return (z / z.std() + 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def models():
    """name -> (graph, calibration data, held-out data, float outputs on both)."""
    out = {}
    conv = KerasGraph.from_keras(conv_layer_model())
    two = KerasGraph.from_keras(two_block_model())
    graphs = {
        "conv": conv,
        "keras": two,
        "onnx": OnnxGraph.from_onnx(two.to_onnx().model),
        "classifier": KerasGraph.from_keras(two_block_model(head=True)),
    }
    for name, graph in graphs.items():
        shape = tuple(graph.input_shape[1:])
        calib, held = _images(128, shape, 0), _images(128, shape, 1)
        out[name] = (graph, calib, held, graph.predict(calib), graph.predict(held))
    return out


@pytest.fixture(scope="module")
def run(models):
    """Factory: (model, stage, bits, options) -> (nearest state, reconstructed state), computed once."""
    cache = {}

    def make(model: str, stage: str, bits: int, **options):
        key = (model, stage, bits, tuple(sorted(options.items())))
        if key not in cache:
            graph, calib, *_ = models[model]
            state = PTQState(graph.copy(), QuantConfig(weight_bits=bits, act_bits=8, weight_per_channel=True), calib, seed=3)
            nearest = create_stage("range_setting").apply(state)
            cache[key] = (nearest, create_stage(stage, {**FAST, **options}).apply(nearest))
        return cache[key]

    return make


_SIMS: dict[tuple, QuantSim] = {}


def simulate(state: PTQState, x: np.ndarray) -> np.ndarray:
    """QuantSim(state).predict(x), through one simulation per model and bits changed in place (one trace)."""
    key = (state.graph.fingerprint(), state.config.weight_bits)
    if key not in _SIMS:
        _SIMS[key] = QuantSim(state)
    sim = _SIMS[key]
    for layer, kernel in state.quantized_kernels().items():
        sim.set_kernel(layer, kernel)
    for point, enc in state.act_encodings.items():
        sim.set_encoding(point, enc)
    return sim.predict(x)


def output_mse(state: PTQState, x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((simulate(state, x) - ref) ** 2))


# ------------------------------------------------------------------ pieces
def test_soft_rounding_starts_at_the_fraction_and_rounds_as_the_quantizer():
    graph = KerasGraph.from_keras(conv_layer_model())
    enc = Encoding.from_range(-0.3, 0.3, QuantSpec(bits=4, per_channel=False))
    ex = Executor(graph)
    ex.set_encoding("conv", enc, "weight")
    ex.quantizer("conv", "weight").enable()
    kernel, quantizer = ex.kernels["conv"], ex.quantizer("conv", "weight")
    r = SoftRounding(kernel, quantizer)
    ratio = kernel.numpy() / enc.scale
    np.testing.assert_allclose(r.h().numpy(), ratio - np.floor(ratio), atol=1e-5)
    r.mode.assign(NEAREST)
    np.testing.assert_array_equal(r.transform(kernel, quantizer).numpy(), quantizer(kernel).numpy())
    assert annealed_beta(0, 100, 0.2, 20.0, 2.0) == (20.0, False)
    assert annealed_beta(20, 100, 0.2, 20.0, 2.0) == (20.0, True)
    assert annealed_beta(99, 100, 0.2, 20.0, 2.0)[0] == pytest.approx(2.0 + 18.0 / 80)


@pytest.mark.parametrize("kind", ["keras", "onnx"])
def test_units_are_layers_and_blocks_on_both_adapters(models, kind):
    graph = models[kind][0]
    layers = [u.layers for u in layer_units(graph)]
    assert len(layers) == 4 and all(len(u) == 1 for u in layers)
    assert [len(u.layers) for u in block_units(graph)] == [2, 2]  # residual, dw + pw


# ------------------------------------------------------- beats nearest
@pytest.mark.parametrize("stage", ["adaround", "brecq"])
@pytest.mark.parametrize("bits", [4, 3])
def test_conv_layer_output_error_below_nearest(run, models, stage, bits):
    nearest, done = run("conv", stage, bits)
    _, calib, held, ref_calib, ref_held = models["conv"]
    for x, ref in ((calib, ref_calib), (held, ref_held)):
        assert output_mse(done, x, ref) < 0.8 * output_mse(nearest, x, ref)
    (unit,) = done.log[-1].details["units"]
    assert unit["mse"] < unit["mse_nearest"] and not unit["kept_nearest"]


@pytest.mark.parametrize(
    ("model", "stage", "bits"),
    [(m, s, b) for m in ("keras", "onnx") for s in ("adaround", "brecq") for b in (4, 3)],
)
def test_two_block_network_output_error_below_nearest(run, models, model, stage, bits):
    nearest, done = run(model, stage, bits)
    _, calib, held, ref_calib, ref_held = models[model]
    assert output_mse(done, calib, ref_calib) < 0.9 * output_mse(nearest, calib, ref_calib)
    assert output_mse(done, held, ref_held) < 0.95 * output_mse(nearest, held, ref_held)
    units = done.log[-1].details["units"]
    assert len(units) == (4 if stage == "adaround" else 2)
    assert all(u["mse"] <= u["mse_nearest"] for u in units)
    assert sum(u["mse"] < u["mse_nearest"] for u in units) >= len(units) - 1
    assert len(done.log[-1].lines) == len(units) + 1


def test_stored_integer_kernels_lie_on_the_grid(run):
    for model, stage, bits in [("conv", "adaround", 3), ("keras", "brecq", 4), ("onnx", "adaround", 3)]:
        nearest, done = run(model, stage, bits)
        assert not nearest.fixed_weights  # the input state is untouched
        assert sorted(done.fixed_weights) == sorted(done.weight_encodings)
        for layer, q in done.fixed_weights.items():
            enc = done.weight_encodings[layer]
            assert q.dtype == np.int32 and q.shape == done.graph.kernel(layer).shape
            assert q.min() >= enc.qmin and q.max() <= enc.qmax
            # learned rounding: each integer is the float value rounded down or up
            scale, zero_point = enc.tf_params(q.ndim)
            ratio = done.graph.kernel(layer) / scale + zero_point
            assert np.all((q >= np.floor(ratio) - 1e-6) | (q == enc.qmin))
            assert np.all((q <= np.ceil(ratio) + 1e-6) | (q == enc.qmax))


def test_exported_qdq_onnx_equals_the_simulation(run, models, tmp_path):
    _, done = run("keras", "adaround", 4)
    held = models["keras"][2]
    simulated = simulate(done, held)
    assert np.array_equal(simulated, QuantSim(done).predict(held))  # the helper is the simulation
    got = onnx_predict(onnx_session(export_state(done, tmp_path, "onnx")["onnx"]), held)
    step = float(done.act_encodings[done.graph.output_names[0]].scale)
    assert np.abs(got - simulated).max() <= 1.0001 * step
    assert np.mean(got.argmax(1) == simulated.argmax(1)) >= 0.98


def test_same_seed_same_result(run):
    nearest, done = run("conv", "adaround", 4)
    again = create_stage("adaround", FAST).apply(nearest)
    for layer, q in done.fixed_weights.items():
        np.testing.assert_array_equal(again.fixed_weights[layer], q)


# ------------------------------------------------------------ options
def test_qdrop_keeps_values_in_float_while_learning_and_is_off_afterwards(run, models, monkeypatch):
    calls = []
    original = Executor.set_drop
    monkeypatch.setattr(Executor, "set_drop", lambda self, p, points=None: (calls.append(p), original(self, p, points)))
    nearest, done = run("conv", "adaround", 3, qdrop=0.5)
    assert calls == [0.5, 0.0]  # on while learning, off again after it
    _, plain = run("conv", "adaround", 3)
    assert np.any(done.fixed_weights["conv"] != plain.fixed_weights["conv"])
    _, calib, _, ref, _ = models["conv"]
    assert output_mse(done, calib, ref) < 0.8 * output_mse(nearest, calib, ref)


def test_brecq_with_fisher_weights_and_learned_activation_steps(run, models):
    nearest, done = run("classifier", "brecq", 4, loss="fisher", learn_act_steps=True)
    _, calib, held, ref_calib, ref_held = models["classifier"]
    assert output_mse(done, calib, ref_calib) < 0.3 * output_mse(nearest, calib, ref_calib)
    assert output_mse(done, held, ref_held) < 0.3 * output_mse(nearest, held, ref_held)
    assert [u["unit"] for u in done.log[-1].details["units"]] == ["res_add", "dw+pw", "head"]
    learned = {p: s for u in done.log[-1].details["units"] for p, s in u["learned_steps"].items()}
    assert learned, "no activation step was learned"
    for point, scale in learned.items():
        old, new = nearest.act_encodings[point], done.act_encodings[point]
        assert float(new.scale) == pytest.approx(scale) and float(new.scale) != float(old.scale)
        assert new.bits == old.bits and new.zero_point == old.zero_point and new.signed == old.signed
    untouched = set(nearest.act_encodings) - set(learned)
    assert all(done.act_encodings[p] is nearest.act_encodings[p] for p in untouched)
    assert np.all(np.isfinite(simulate(done, held)))


def test_two_rounding_stages_are_a_one_line_error(monkeypatch):
    assert create_stage("adaround").rounds_weights and create_stage("brecq").rounds_weights
    message = "adaround and brecq both round the weights: use one rounding stage"
    assert order_problem(["range_setting", "adaround", "brecq"]) == message
    assert order_problem(["bn_folding", "range_setting", "adaround", "bias_correction"]) is None
    assert order_problem(["adaround", "range_setting"]) == "adaround needs range_setting before it"

    def boom(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(Pipeline, "run", boom)
    with pytest.raises(ConfigError) as err:
        api.quantize(mem.NAME, {"name": "p", "stages": ["range_setting", "adaround", "brecq"]})
    assert str(err.value) == f"pipeline 'p' cannot run: {message}"


def test_options_are_checked_and_range_setting_is_needed(models):
    with pytest.raises(ConfigError, match="adaround option 'qdrop' must be a number in"):
        create_stage("adaround", {"qdrop": 1.5})
    with pytest.raises(ConfigError, match="brecq option 'beta_end' must be a number in"):
        create_stage("brecq", {"beta_end": 0.0})
    with pytest.raises(ConfigError, match="brecq option 'loss' must be one of 'mse', 'fisher'"):
        create_stage("brecq", {"loss": "kl"})
    graph, calib, *_ = models["conv"]
    with pytest.raises(ConfigError, match="range_setting"):
        create_stage("adaround").apply(PTQState(graph.copy(), QuantConfig(weight_bits=4), calib))
