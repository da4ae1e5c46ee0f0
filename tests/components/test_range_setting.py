"""range_setting: encodings cover (minmax) or clip (percentile, mse, kl) the observed ranges."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.ranges import RANGE_METHODS
from tinyptq.sim import QuantSim

from ..core.test_graph import tiny_resnet


def _run(config: QuantConfig, **options):
    graph = KerasGraph.from_keras(tiny_resnet())
    calib = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype(np.float32)
    state = PTQState(graph, config, calib)
    return create_stage("range_setting", {"batch_size": 8, **options}).apply(state)


def test_minmax_weight_encodings_cover_kernels_per_tensor_and_per_channel():
    for per_channel in (False, True):
        state = _run(QuantConfig(weight_bits=4, weight_per_channel=per_channel))
        for ql in state.graph.quant_layers():
            enc, w = state.weight_encodings[ql.name], state.graph.kernel(ql.name)
            assert enc.per_channel == (per_channel and ql.channel_axis is not None)
            # symmetric min-max: the largest magnitude lands exactly on the grid edge
            err = np.abs(enc.fake_quant(w) - w)
            step = enc._broadcast(enc.scale, w.ndim)
            assert np.all(err <= step / 2 + 1e-6)
            assert np.isclose(np.abs(w).max(), np.max(enc.scale) * enc.qmax, rtol=1e-5)


def test_activation_encodings_match_calibration_extremes():
    state = _run(QuantConfig(act_bits=8))
    names = [p.name for p in state.graph.act_points()]
    assert set(state.act_encodings) == set(names)
    acts = state.graph.run(state.calib, names)
    for name in names:
        enc, a = state.act_encodings[name], acts[name]
        # the zero point is rounded, so the grid may shift by up to half a step
        half = enc.scale / 2 + 1e-5
        assert enc.min <= min(a.min(), 0) + half and enc.max >= a.max() - half
        assert np.max(np.abs(enc.fake_quant(a) - a)) <= enc.scale + 1e-5


def test_overrides_and_first_last_reach_encodings():
    cfg = QuantConfig(weight_bits=3, act_bits=4, keep_first_last_8bit=True).with_override(
        LayerOverride("sep*", weight_bits=6)
    )
    state = _run(cfg)
    bits = {n: e.bits for n, e in state.weight_encodings.items()}
    assert bits == {"c1": 8, "c2": 3, "sep_dw": 6, "sep": 6, "dw": 3, "fc": 8}
    assert state.act_encodings["img"].bits == 8 and state.act_encodings["r2"].bits == 4


def test_sim_equals_manual_fake_quant_chain():
    """The simulation is exactly: quantized kernels, float ops, fake-quant at every point."""
    state = _run(QuantConfig(weight_bits=5, act_bits=6, weight_per_channel=True))
    x = state.calib[:4]
    sim_out = QuantSim(state).predict(x)
    sim = QuantSim(state)
    points = [p.name for p in state.graph.act_points()]
    quantized = sim.run(x, outputs=points)
    # every point is exactly the shared core's fake quantization of its raw value
    for point in points:
        raw = sim.run(x, outputs=[point], raw=[point])[point]
        np.testing.assert_array_equal(quantized[point], state.act_encodings[point].fake_quant(raw), err_msg=point)
    # and each raw value is the float node on quantized kernels and quantized inputs
    graph = state.graph.copy()
    for name, kernel in state.quantized_kernels().items():
        graph.set_kernel(name, kernel)
    first = graph.quant_layers()[0]
    q_in = state.act_encodings[first.input_point].fake_quant(x)
    ref = graph.run(q_in, [first.output_point])[first.output_point]
    raw = sim.run(x, outputs=[first.output_point], raw=[first.output_point])[first.output_point]
    np.testing.assert_allclose(raw, ref, rtol=1e-5, atol=1e-5)
    # and the output really is quantized: every value sits on the output grid
    out_enc = state.act_encodings[graph.output_names[0]]
    np.testing.assert_array_equal(out_enc.fake_quant(sim_out), sim_out)
    # fewer bits -> larger deviation from float
    lo = _run(QuantConfig(weight_bits=3, act_bits=3))
    ref = state.graph.predict(x)
    assert np.abs(QuantSim(lo).predict(x) - ref).mean() > np.abs(sim_out - ref).mean()


# ------------------------------------------------------ clipping range methods

@pytest.mark.parametrize("method", sorted(RANGE_METHODS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_method_encodes_every_tensor(method, per_channel):
    cfg = QuantConfig(weight_bits=4, act_bits=6, weight_per_channel=per_channel)
    state = _run(cfg, weights=method, activations=method, num_bins=256)
    graph = state.graph
    assert set(state.weight_encodings) == {ql.name for ql in graph.quant_layers()}
    assert set(state.act_encodings) == {p.name for p in graph.act_points()}
    for ql in graph.quant_layers():
        enc = state.weight_encodings[ql.name]
        assert enc.bits == 4 and enc.per_channel == (per_channel and ql.channel_axis is not None)
        # clipping only ever narrows the min-max range (up to the grid's rounding)
        amax = np.abs(graph.kernel(ql.name)).max()
        assert np.max(enc.scale) * enc.qmax <= amax * (1 + 1e-5)
    record = state.log[-1]
    assert method in record.lines[0] and method in record.lines[-1]
    assert "min-max on average" in record.lines[0]
    ratios = {**record.details["weight_range_ratio"], **record.details["act_range_ratio"]}
    assert all(0 < r <= 1 + 1e-6 for r in ratios.values())
    if method == "minmax":
        assert all(r == pytest.approx(1.0) for r in ratios.values())


def test_options_reach_the_observers_and_the_summary():
    cfg = QuantConfig(weight_bits=3, act_bits=4)
    wide = _run(cfg, weights="percentile", activations="percentile", percentile=100.0)
    minmax = _run(cfg)
    for name, enc in minmax.weight_encodings.items():  # the 100th percentile is the maximum
        np.testing.assert_allclose(wide.weight_encodings[name].scale, enc.scale, rtol=1e-6)
    narrow = _run(cfg, weights="percentile", activations="mse", percentile=90.0, mse_p=2.4)
    assert all(
        narrow.weight_encodings[n].scale < minmax.weight_encodings[n].scale for n in minmax.weight_encodings
    )
    lines = narrow.log[-1].lines
    assert "percentile (percentile=90.0" in lines[0] and "mse (p=2.4" in lines[-1]
    stage = create_stage("range_setting", {"weights": "kl", "num_quant_bins": 64})
    assert stage.get_params()["num_quant_bins"] == 64 and stage.get_params()["weights"] == "kl"


@pytest.mark.parametrize(
    "options, culprit",
    [
        ({"weights": "entropy"}, "option 'weights' must be one of .*got 'entropy'"),
        ({"activations": "max"}, "option 'activations' must be one of .*got 'max'"),
        ({"percentile": 10.0}, r"option 'percentile' must be a number in \(50, 100\], got 10.0"),
        ({"percentile": "high"}, "option 'percentile' must be a number .*got 'high'"),
        ({"mse_p": 0}, "option 'mse_p' .*got 0"),
        ({"num_candidates": 0}, "option 'num_candidates' .*got 0"),
        ({"num_bins": 4}, "option 'num_bins' .*got 4"),
        ({"num_quant_bins": 4096}, r"option 'num_quant_bins' must be an integer in \[2, 2048\], got 4096"),
        ({"batch_size": 0}, "option 'batch_size' .*got 0"),
        ({"batch_size": 2.0}, "option 'batch_size' .*got 2.0"),
        ({"mse_norm": 2}, "unknown option 'mse_norm'"),
    ],
)
def test_bad_options_raise_config_errors_naming_them(options, culprit):
    with pytest.raises(ConfigError, match=culprit):
        create_stage("range_setting", options)
