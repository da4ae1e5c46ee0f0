"""Label-free sensitivity: a deliberately fragile layer ranks first, errors fall with bits, the cache, ONNX twin.

The fragile model (also used by tests/components/test_mixed_precision.py):
conv c1 (8 channels) -> conv c2 (4) -> conv c3 (16) -> global average pooling
-> dense fc (4), where c1's first output channel is dead (zero kernel, negative
bias: always 0 after its ReLU) and c2 has one huge weight (50 standard
deviations) reading that dead channel. The outlier changes nothing in float,
but with per-tensor weight encodings it stretches c2's grid so that at 2 to 4
bits every other c2 weight rounds to zero: c2's output loses its signal, the
other layers only get noisy. c2 is the second smallest layer, so that mixed
precision can afford 8 bits for it at the size of uniform 4-bit weights.

Measurements are few and shared (module caches; the sqnr table of the full
per-tensor W8A8 config through ``SHARED`` with the mixed-precision tests).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from tinyptq import sensitivity
from tinyptq._tf import keras
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.onnx_graph import OnnxGraph
from tinyptq.pipeline import MemoryCache, PTQState
from tinyptq.sensitivity import METHODS, Sensitivity, measure

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (4, 6, 8)
SAMPLES = 32
FRAGILE = "c2"
LAYERS = ("c1", "c2", "c3", "fc")
PER_TENSOR = QuantConfig(weight_bits=8, act_bits=8, weight_per_channel=False)
# every activation point in float but the output (its pattern would float fc's kernel too): for
# the Fisher method, whose cost is one traced function per point; kernels are measured the same
WEIGHTS_ONLY = PER_TENSOR.replace(
    overrides=tuple(LayerOverride(pattern=p, quantize=False) for p in ("img", "*_act", "gap"))
)
SHARED = MemoryCache()  # sensitivity tables shared by the tests of this file and test_mixed_precision


def fragile_model(seed: int = 1):
    """The model of the module docstring, He-initialized from ``seed``.

    Seed 1: every method ranks c2 first at every candidate, and every error
    falls with bits. That is a property of the model, not of the measurement:
    with seeds 0 and 2 some output errors grow from one bit-width to the next
    (seed 0, c2 at 4 bits: the wider grid lets two small weights round to
    +-1.2 instead of 0, which the output suffers more from than from zeros;
    the numbers match fake-quantizing the Keras kernel directly).
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(4, name="fc")(x))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            kernel, bias = weights
            fan_in = int(np.prod(kernel.shape[:-1]))
            layer.set_weights([rng.normal(0, np.sqrt(2 / fan_in), kernel.shape), rng.normal(0, 0.1, bias.shape)])
    kernel, bias = model.get_layer("c1").get_weights()
    kernel[..., 0], bias[0] = 0.0, -1.0  # c1's channel 0: always 0 after the ReLU
    model.get_layer("c1").set_weights([kernel, bias])
    kernel, bias = model.get_layer("c2").get_weights()
    kernel[1, 1, 0, 0] = 50 * kernel.std()  # the outlier reads the dead channel
    model.get_layer("c2").set_weights([kernel, bias])
    return model


@functools.cache
def fragile_graph() -> KerasGraph:
    """The fragile model as a KerasGraph (built once per session; copy it before changing it)."""
    return KerasGraph.from_keras(fragile_model())


def calibration(n: int = SAMPLES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


def fragile_state(config: QuantConfig = PER_TENSOR, graph=None, cache=SHARED) -> PTQState:
    return PTQState(graph or fragile_graph(), config, calibration(), cache=cache)


_RESULTS: dict[tuple, Sensitivity] = {}


def table(method: str, config: QuantConfig = PER_TENSOR) -> Sensitivity:
    """The fragile model's sensitivity by ``method`` (computed once)."""
    key = (method, config)
    if key not in _RESULTS:
        _RESULTS[key] = measure(fragile_state(config), WEIGHT_BITS, ACT_BITS, method, SAMPLES, progress=False)
    return _RESULTS[key]


def ranked(method: str) -> Sensitivity:
    """Fisher on weights (and the output point) only; the others on the full config."""
    return table(method, WEIGHTS_ONLY if method == "fisher" else PER_TENSOR)


# --------------------------------------------------------------- ranking
def test_the_fragile_layer_really_is_fragile():
    """Float: the outlier changes nothing (it reads a dead channel); quantized, c2's grid is far too coarse."""
    graph = fragile_graph()
    x = calibration()
    c1 = graph.run(x, ["c1_act"])["c1_act"]
    assert np.all(c1[..., 0] == 0) and np.all(c1[..., 1:].std(axis=(0, 1, 2)) > 0)
    kernel = graph.kernel("c2")
    rest = np.delete(kernel.ravel(), np.argmax(np.abs(kernel)))
    assert np.abs(kernel).max() > 40 * np.abs(rest).std()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_ranks_the_fragile_layer_first_at_low_bits(method):
    sens = ranked(method)
    assert sens.method == method
    assert set(sens.weight) == set(LAYERS)
    for bits in (2, 3, 4):
        errors = {layer: sens.weight[layer][bits] for layer in LAYERS}
        worst = max(errors, key=errors.get)
        assert worst == FRAGILE, f"{method} at {bits} bits: {errors}"
        # c2's other weights all round to zero from 2 to 4 bits: its error does not move
        assert errors[FRAGILE] == pytest.approx(sens.weight[FRAGILE][2], rel=0.02)
    # the outlier costs c2 even at 8 bits: coarser than every other layer
    assert max(LAYERS, key=lambda layer: sens.weight[layer][8]) == FRAGILE


def test_sqnr_errors_are_output_noise_to_signal_ratios():
    """c2 at 4 bits: the output loses most of its signal (SQNR a few dB); 8-bit activations: above 40 dB."""
    sens = table("sqnr")
    assert 0.3 < sens.weight[FRAGILE][4] < 1.5
    assert sens.sqnr_db(sens.weight[FRAGILE][4]) < 6
    assert all(sens.sqnr_db(d[8]) > 40 for d in sens.act.values())
    assert sens.sqnr_db(0.0) == float("inf")


# ------------------------------------------------------ monotone in bits
@pytest.mark.parametrize("method", METHODS)
def test_errors_do_not_grow_with_bits(method):
    sens = ranked(method)
    tables = {**{f"weights of {k}": v for k, v in sens.weight.items()}, **{f"point {k}": v for k, v in sens.act.items()}}
    assert sorted(sens.act) == (["fc"] if method == "fisher" else ["c1_act", "c2_act", "c3_act", "fc", "gap", "img"])
    for name, errors in tables.items():
        bits = sorted(errors)
        assert bits == list(WEIGHT_BITS if name.startswith("weights") else ACT_BITS)
        assert all(np.isfinite(e) and e >= 0 for e in errors.values()), (name, errors)
        for low, high in zip(bits, bits[1:], strict=False):
            assert errors[high] <= errors[low] * (1 + 1e-6) + 1e-12, f"{method}, {name}: {errors}"
        assert errors[bits[-1]] < errors[bits[0]], f"{method}, {name}: {errors}"  # and do fall overall


# ------------------------------------------------- repeatable and cached
def test_same_state_same_numbers_and_the_cache_computes_once(monkeypatch):
    calls = []
    original = sensitivity._MEASURES["myqasr"]

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setitem(sensitivity._MEASURES, "myqasr", counted)
    graph = fragile_graph()

    def run(state):
        return measure(state, (2, 8), (8,), "myqasr", SAMPLES, progress=False)

    memo = MemoryCache()
    state = fragile_state(cache=memo)
    first = run(state)
    assert run(state) is first and len(calls) == 1
    assert run(state.evolve(copy_graph=True)) is first and len(calls) == 1  # an equal state hits too
    # without a cache every call computes, and gets the same numbers
    fresh = run(fragile_state(cache=None))
    assert len(calls) == 2 and fresh is not first
    assert fresh.weight == first.weight and fresh.act == first.act
    # what the result depends on is in the key: the data, the granularity, the weights
    run(PTQState(graph, PER_TENSOR, calibration(seed=5), cache=memo))
    assert len(calls) == 3
    run(fragile_state(PER_TENSOR.replace(weight_per_channel=True), cache=memo))
    assert len(calls) == 4
    changed = graph.copy()
    changed.set_kernel("c3", changed.kernel("c3") * 0.5)
    assert changed.fingerprint() != graph.fingerprint()
    halved = run(fragile_state(graph=changed, cache=memo))
    assert len(calls) == 5 and halved.weight != first.weight
    assert run(state) is first and len(calls) == 5
    # plain data for JSON and a readable table
    data = json.loads(json.dumps(first.to_dict()))
    assert data["method"] == "myqasr" and data["weight"]["c2"]["2"] == pytest.approx(first.weight["c2"][2])
    text = first.markdown()
    assert "| c2 |" in text and "| weight | 2 bits | 8 bits |" in text and "| activation | 8 bits |" in text


def test_configured_bits_do_not_change_the_table_and_float_tensors_are_left_out():
    """Every layer gets every candidate whatever the configured bits; quantize: false leaves a tensor out."""
    memo = MemoryCache()

    def run(config):
        return measure(fragile_state(config, cache=memo), (2, 8), (8,), "myqasr", SAMPLES, progress=False)

    plain = run(PER_TENSOR)
    assert run(PER_TENSOR.replace(weight_bits=4, act_bits=6, keep_first_last_8bit=True)) is plain
    overridden = run(PER_TENSOR.replace(overrides=(LayerOverride("c3", weight_bits=3, act_bits=4),)))
    assert overridden.weight == plain.weight and overridden.act == plain.act
    fewer = run(PER_TENSOR.replace(overrides=(LayerOverride("c3", quantize=False),)))
    assert set(fewer.weight) == {"c1", "c2", "fc"} and "c3_act" not in fewer.act
    assert fewer.weight["c2"] == plain.weight["c2"]
    # a later override switches a layer back on: it is measured (it was left out, and mixed_precision failed)
    again = run(PER_TENSOR.replace(overrides=(LayerOverride("c*", quantize=False), LayerOverride("c2", weight_bits=4))))
    assert set(again.weight) == {"c2", "fc"} and again.weight["c2"] == plain.weight["c2"]
    assert set(again.act) == {"img", "gap", "fc", "c2_act"}  # c2_act: its owner c2 matches the later override


# ------------------------------------------------------------- ONNX twin
def test_the_onnx_twin_has_the_same_sensitivities():
    keras_table = table("sqnr")
    onnx = OnnxGraph.from_onnx(fragile_graph().to_onnx().model)
    onnx_table = measure(fragile_state(graph=onnx, cache=MemoryCache()), WEIGHT_BITS, ACT_BITS, "sqnr", SAMPLES, False)
    assert set(onnx_table.weight) == set(keras_table.weight)
    for layer, errors in keras_table.weight.items():
        for bits, err in errors.items():
            assert onnx_table.weight[layer][bits] == pytest.approx(err, rel=1e-3, abs=1e-9), (layer, bits)
    renamed = {"gap/pooled": "gap"}  # the ONNX pooling output has its own name
    assert {renamed.get(p, p) for p in onnx_table.act} == set(keras_table.act)
    for point, errors in onnx_table.act.items():
        for bits, err in errors.items():
            assert err == pytest.approx(keras_table.act[renamed.get(point, point)][bits], rel=1e-3, abs=1e-9)
