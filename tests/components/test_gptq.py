"""gptq: integers on the range_setting grids that reconstruct layer outputs better than nearest rounding."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq._tf import keras, tf
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.executor import run_conv
from tinyptq.export import export_state
from tinyptq.export.qdq_onnx import onnx_predict, onnx_session
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.onnx_graph import OnnxGraph
from tinyptq.graph.spec import LayerSpec
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.rounding.gptq import Grid, gptq_integers, im2col
from tinyptq.sim import QuantSim


def correlated_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Images whose channels are mixed and whose pixels are smoothed: correlated inputs, as real ones."""
    *spatial, c = shape
    mixing = np.random.default_rng(99).normal(size=(c, c))  # the same distribution for every seed
    z = np.random.default_rng(seed).normal(size=(n, *spatial, c)) @ mixing
    for axis in range(1, 1 + len(spatial)):
        z = z + 0.8 * np.roll(z, 1, axis=axis)
    return (z / z.std()).astype(np.float32)


# ------------------------------------------------------------------ im2col
IM2COL_CASES = {
    # kind, canonical kernel, strides, pads, dilations, groups, channels_last, input shape
    "conv-stride2-asym-pads": (
        "conv",
        (6, 4, 3, 3),
        (2, 2),
        ((0, 1), (1, 2)),
        (1, 1),
        1,
        True,
        (2, 9, 10, 4),
    ),
    "conv-groups2-nchw": (
        "conv",
        (6, 2, 3, 2),
        (2, 2),
        ((1, 1), (0, 1)),
        (1, 1),
        2,
        False,
        (2, 4, 9, 10),
    ),
    "conv-dilated": ("conv", (5, 3, 3, 3), (1, 1), ((2, 2), (1, 1)), (2, 1), 1, True, (2, 8, 7, 3)),
    "depthwise-mult2": (
        "depthwise",
        (8, 1, 3, 3),
        (2, 2),
        ((1, 1), (1, 1)),
        (1, 1),
        4,
        True,
        (2, 7, 7, 4),
    ),
    "conv1d-nchw": ("conv", (6, 3, 3), (2,), ((1, 0),), (1,), 1, False, (2, 3, 11)),
}


@pytest.mark.parametrize("case", sorted(IM2COL_CASES))
def test_im2col_rows_times_the_canonical_kernel_are_the_executor_output(case):
    kind, shape, strides, pads, dilations, groups, last, x_shape = IM2COL_CASES[case]
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=shape).astype(np.float32)
    spec = LayerSpec("l", kind, kernel, None, strides, pads, dilations, groups, last)
    x = rng.normal(size=x_shape).astype(np.float32)
    y = run_conv(spec, tf.constant(x), tf.constant(kernel), None).numpy()
    y = y if last else np.moveaxis(y, 1, -1)
    rows = im2col(x, spec)
    assert rows.shape[1] == groups
    w = kernel.reshape(groups, shape[0] // groups, -1)
    mine = np.einsum("ngc,grc->ngr", rows.astype(np.float64), w).reshape(y.shape)
    np.testing.assert_allclose(mine, y, atol=1e-5)


def test_an_infinitely_fine_grid_gives_back_the_float_weights():
    """With a tiny step GPTQ's error feedback vanishes: the integers are the weights over the step."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 3, 20))
    x = rng.normal(size=(2, 200, 20))
    h = 2 * np.matmul(x.transpose(0, 2, 1), x) / 200
    step = 1e-9
    grid = Grid(np.full(w.shape, step), np.zeros(w.shape), -(2**40), 2**40)
    q, _ = gptq_integers(w, h, grid, block_size=7, act_order=True)
    np.testing.assert_allclose(q * step, w, atol=2 * step)


def test_dead_inputs_are_rounded_to_nearest_and_change_nothing_else():
    """A column whose input is zero on all calibration data (H_jj = 0): nearest rounding, finite results."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(1, 4, 12))
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    x[:, [3, 7]] = 0.0
    h = (2 * x.T @ x / len(x))[None]
    grid = Grid(np.full(w.shape, 0.3), np.zeros(w.shape), -8, 7)
    for act_order in (False, True):
        q, _ = gptq_integers(w, h, grid, block_size=5, act_order=act_order)
        assert np.all(np.isfinite(q))
        np.testing.assert_array_equal(q[..., [3, 7]], grid.quantize(w)[..., [3, 7]])
        assert q.min() >= -8 and q.max() <= 7 and np.array_equal(q, np.rint(q))


# ------------------------------------------------------- single layers
def single_layer(kind: str) -> tuple[keras.Model, tuple[int, ...]]:
    """One quantizable layer behind the model input."""
    keras.utils.set_random_seed(3)
    shape = (24,) if kind == "dense" else (10, 10, 8)
    inp = keras.Input(shape, name="img")
    layer = {
        "conv": keras.layers.Conv2D(12, 3, strides=2, padding="same", name="layer"),
        "grouped": keras.layers.Conv2D(12, 3, strides=2, padding="same", groups=2, name="layer"),
        "depthwise": keras.layers.DepthwiseConv2D(3, padding="same", name="layer"),
        "dense": keras.layers.Dense(16, name="layer"),
    }[kind]
    return keras.Model(inp, layer(inp)), shape


def layer_errors(
    nearest: PTQState, integers: np.ndarray, *xs: np.ndarray
) -> list[dict[str, float]]:
    """Per input set: mean squared error of the layer's raw output against the float kernel, same quantized input.

    One simulation (one trace): nearest rounding, then the float kernel, then the GPTQ integers.
    """
    sim = QuantSim(nearest)

    def outputs() -> list[np.ndarray]:
        return [sim.run(x, outputs=["layer"], raw=["layer"])["layer"] for x in xs]

    y_nearest = outputs()
    sim.disable("layer", kind="weight")
    y_float = outputs()
    sim.set_kernel("layer", nearest.weight_encodings["layer"].dequantize(integers))
    sim.enable("layer", kind="weight")
    y_gptq = outputs()
    return [
        {"nearest": float(np.mean((n - f) ** 2)), "gptq": float(np.mean((g - f) ** 2))}
        for n, f, g in zip(y_nearest, y_float, y_gptq, strict=True)
    ]


@pytest.mark.parametrize(
    ("kind", "graph_kind"),
    [
        ("conv", "keras"),
        ("grouped", "onnx"),
        ("grouped", "keras"),
        ("depthwise", "keras"),
        ("dense", "onnx"),
    ],
)
def test_layer_reconstruction_beats_nearest_at_4_and_3_bits(kind, graph_kind):
    model, shape = single_layer(kind)
    graph = KerasGraph.from_keras(model)
    if graph_kind == "onnx":
        graph = OnnxGraph.from_onnx(graph.to_onnx().model)
    calib = correlated_images(48, shape, seed=0)
    for bits in (4, 3):
        config = QuantConfig(weight_bits=bits, act_bits=8, weight_per_channel=True)
        nearest = create_stage("range_setting").apply(PTQState(graph, config, calib))
        done = create_stage("gptq", {"batch_size": 16}).apply(nearest)
        enc = done.weight_encodings["layer"]
        q = done.fixed_weights["layer"]
        assert q.dtype == np.int32 and q.shape == graph.kernel("layer").shape
        assert q.min() >= enc.qmin and q.max() <= enc.qmax
        np.testing.assert_array_equal(enc.quantize(enc.dequantize(q)), q)  # on the grid
        np.testing.assert_array_equal(
            done.graph.kernel("layer"), graph.kernel("layer")
        )  # float kernel kept
        held = correlated_images(len(calib), shape, seed=1)
        errors, held_errors = layer_errors(nearest, q, calib, held)
        assert errors["gptq"] < 0.9 * errors["nearest"], (kind, bits, errors)
        # the logged errors are those of the layer output (from H = 2 X^T X / n)
        logged = done.log[-1].details["layers"]["layer"]
        np.testing.assert_allclose(
            [logged["mse_nearest"], logged["mse_gptq"]],
            [errors["nearest"], errors["gptq"]],
            rtol=1e-3,
        )
        # held-out inputs too
        assert held_errors["gptq"] < held_errors["nearest"], (kind, bits, held_errors)


@pytest.mark.parametrize(
    "options", [{"act_order": True, "block_size": 5}, {"input": "float", "percdamp": 0.1}]
)
def test_options_keep_the_gain(options):
    model, shape = single_layer("conv")
    graph = KerasGraph.from_keras(model)
    calib = correlated_images(32, shape, seed=0)
    config = QuantConfig(weight_bits=3, act_bits=8, weight_per_channel=False)  # per tensor as well
    nearest = create_stage("range_setting").apply(PTQState(graph, config, calib))
    done = create_stage("gptq", options).apply(nearest)
    (errors,) = layer_errors(nearest, done.fixed_weights["layer"], calib)
    assert errors["gptq"] < 0.9 * errors["nearest"], (options, errors)


def test_options_are_validated():
    for bad in (
        {"block_size": 0},
        {"percdamp": 0.0},
        {"act_order": "true"},
        {"input": "fp32"},
        {"batch_size": 2.5},
    ):
        with pytest.raises(ConfigError):
            create_stage("gptq", bad)


# ------------------------------------------------------------ a network
def two_blocks(seed: int = 0) -> keras.Model:
    """conv-BN-ReLU, a residual block (zero padding, stride-2 conv, 1x1 stride-2 shortcut), dw/pw block, dense."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3), name="img")
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    y = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="res_a")(y)
    y = keras.layers.Conv2D(16, 3, padding="same", name="res_b")(y)
    s = keras.layers.Conv2D(16, 1, strides=2, name="shortcut")(x)
    x = keras.layers.ReLU(name="res_relu")(keras.layers.Add(name="add")([y, s]))
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = keras.layers.Conv2D(24, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    bn = model.get_layer("stem_bn")
    bn.set_weights(
        [
            rng.uniform(0.5, 2, 16),
            rng.normal(0, 0.3, 16),
            rng.normal(0, 0.3, 16),
            rng.uniform(0.5, 2, 16),
        ]
    )
    return model


@pytest.fixture(scope="module")
def network():
    """The two-block network as Keras and ONNX graphs, calibration and held-out images."""
    graph = KerasGraph.from_keras(two_blocks())
    graphs = {"keras": graph, "onnx": OnnxGraph.from_onnx(graph.to_onnx().model)}
    return graphs, correlated_images(64, (12, 12, 3), 0), correlated_images(64, (12, 12, 3), 1)


@pytest.mark.parametrize("graph_kind", ["keras", "onnx"])
def test_network_output_error_beats_nearest_deterministic_and_exports(
    network, graph_kind, tmp_path
):
    graphs, calib, held = network
    graph = graphs[graph_kind]
    config = QuantConfig(weight_bits=4, act_bits=8, weight_per_channel=True)
    base = create_stage("bn_folding").apply(PTQState(graph.copy(), config, calib, seed=5))
    nearest = create_stage("range_setting").apply(base)
    stage = create_stage("gptq", {"batch_size": 32})
    done = stage.apply(nearest)
    assert not nearest.fixed_weights  # input state untouched
    assert sorted(done.fixed_weights) == sorted(done.weight_encodings)
    ref = base.graph.predict(held)
    sim = QuantSim(nearest)  # nearest rounding, then the GPTQ integers in place (one trace)
    err = {"nearest": float(np.mean((sim.predict(held) - ref) ** 2))}
    for layer, q in done.fixed_weights.items():
        sim.set_kernel(layer, done.weight_encodings[layer].dequantize(q))
    simulated = sim.predict(held)
    err["gptq"] = float(np.mean((simulated - ref) ** 2))
    assert err["gptq"] < 0.8 * err["nearest"], err
    if graph_kind == "keras":  # same seed, same result (the stage contract test checks both graphs)
        again = stage.apply(nearest)
        for layer, q in done.fixed_weights.items():
            np.testing.assert_array_equal(again.fixed_weights[layer], q)
    # the exported QDQ model holds these integers and computes what the simulation does
    path = export_state(done, tmp_path, "onnx")["onnx"]
    got = onnx_predict(onnx_session(path), held)
    step = float(done.act_encodings[done.graph.output_names[0]].scale)
    assert np.abs(got - simulated).max() <= 1.0001 * step
    assert np.mean(got.argmax(1) == simulated.argmax(1)) >= 0.95


def test_without_range_setting_is_an_error(network):
    graphs, calib, _ = network
    state = PTQState(graphs["keras"].copy(), QuantConfig(weight_bits=4), calib)
    with pytest.raises(ConfigError, match="range_setting"):
        create_stage("gptq").apply(state)
