"""output_range_search: activation ranges chosen on the model-output error beat a tensor's own MSE."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.sim import QuantSim

from ..core.test_graph import tiny_resnet

FEATURES = 16
PADDED = 6  # the last features: the padding


def padded_features(n: int, seed: int) -> np.ndarray:
    """Features in [-1, 1] whose last PADDED ones are "silence" at -40 (as MFCC padding)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, FEATURES)).astype(np.float32)
    x[:, -PADDED:] = -40.0
    return x


def silence_blind_model() -> keras.Model:
    """A dense net that reads only the informative features (zero weights on the padded ones)."""
    rng = np.random.default_rng(3)
    inp = keras.Input((FEATURES,), name="feat")
    hidden = keras.layers.Dense(12, activation="relu", name="d1")
    out = keras.layers.Dense(4, name="d2")
    model = keras.Model(inp, out(hidden(inp)))
    kernel = rng.normal(size=(FEATURES, 12)).astype(np.float32)
    kernel[-PADDED:] = 0.0
    hidden.set_weights([kernel, rng.normal(size=12).astype(np.float32) * 0.1])
    out.set_weights([rng.normal(size=(12, 4)).astype(np.float32), np.zeros(4, np.float32)])
    return model


def _ranged(config: QuantConfig, calib: np.ndarray, model: keras.Model | None = None) -> PTQState:
    graph = KerasGraph.from_keras(model if model is not None else silence_blind_model())
    state = PTQState(graph, config, calib)
    return create_stage("range_setting", {"weights": "mse", "activations": "mse"}).apply(state)


def output_mse(state: PTQState, x: np.ndarray) -> float:
    """Mean squared error of the simulated output against the float model on ``x``."""
    return float(np.mean((QuantSim(state).predict(x) - state.graph.predict(x)) ** 2))


def test_input_range_clips_the_padding_and_lowers_output_error_on_unseen_data():
    config = QuantConfig(weight_bits=8, act_bits=4)
    state = _ranged(config, padded_features(256, seed=0))
    searched = create_stage("output_range_search", {"samples": 128}).apply(state)
    start, found = state.act_encodings["feat"], searched.act_encodings["feat"]
    # the MSE range keeps -40 on the grid; the search gives the grid to [-1, 1]
    assert start.min < -30 and found.min > -5
    unseen = padded_features(512, seed=1)
    assert output_mse(searched, unseen) < 0.25 * output_mse(state, unseen)
    # only the input was searched; the rest is untouched
    assert {k: v for k, v in searched.act_encodings.items() if k != "feat"} == {
        k: v for k, v in state.act_encodings.items() if k != "feat"
    }
    assert searched.weight_encodings == state.weight_encodings


def test_never_worse_than_the_start_on_the_search_samples_and_all_points_are_searched():
    # as many samples as the search uses: no held-out check, so every result is kept
    calib = np.random.default_rng(0).normal(size=(24, 8, 8, 3)).astype(np.float32)
    for symmetric in (False, True):
        config = QuantConfig(weight_bits=4, act_bits=3, act_symmetric=symmetric)
        state = _ranged(config, calib, tiny_resnet())
        options = {"points": "all", "num_candidates": 6, "samples": 24, "batch_size": 8}
        searched = create_stage("output_range_search", options).apply(state)
        record = searched.log[-1]
        points = [p.name for p in state.graph.act_points()]
        assert list(record.details["output_mse"]) == points
        for start, end in record.details["output_mse"].values():
            assert end <= start
        first = record.details["output_mse"][points[0]][0]
        last = record.details["output_mse"][points[-1]][1]
        # each point starts where the one before it ended: the error only goes down
        assert last <= first
        assert output_mse(searched, calib[:24]) == pytest.approx(last, rel=1e-4)
        # grids keep their kind (bits, symmetry, sign)
        for name in points:
            a, b = state.act_encodings[name], searched.act_encodings[name]
            assert (a.bits, a.symmetric, a.signed) == (b.bits, b.symmetric, b.signed)


def test_results_the_held_out_samples_do_not_confirm_are_dropped():
    # the held-out samples' informative features reach 8: the range the search
    # finds on the first samples (about [-1, 1]) clips them, so the start's range is kept
    search = padded_features(64, seed=0)
    held_out = padded_features(64, seed=1)
    held_out[:, :-PADDED] = np.random.default_rng(2).uniform(-1, 8, (64, FEATURES - PADDED))
    only_input = QuantConfig(act_bits=4).with_override(LayerOverride("d*", quantize=False))
    state = _ranged(only_input, np.concatenate([search, held_out]))
    searched = create_stage("output_range_search", {"samples": 64}).apply(state)
    record = searched.log[-1]
    assert record.details["output_mse"]["feat"][1] < 0.5 * record.details["output_mse"]["feat"][0]
    assert record.details["not_confirmed"] == ["feat"]
    assert searched.act_encodings["feat"] is state.act_encodings["feat"]
    # without held-out samples there is no check, and the search's range stays
    alone = _ranged(only_input, search)
    kept = create_stage("output_range_search", {"samples": 64}).apply(alone)
    assert kept.log[-1].details["not_confirmed"] == []
    assert kept.act_encodings["feat"].min > -5


def test_needs_range_setting_and_checks_its_options():
    graph = KerasGraph.from_keras(silence_blind_model())
    state = PTQState(graph, QuantConfig(), padded_features(8, seed=0))
    with pytest.raises(ConfigError, match="range_setting"):
        create_stage("output_range_search").apply(state)
    with pytest.raises(ConfigError, match="points"):
        create_stage("output_range_search", {"points": "some"})
    with pytest.raises(ConfigError, match="num_candidates"):
        create_stage("output_range_search", {"num_candidates": 1})
