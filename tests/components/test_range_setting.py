"""range_setting (minmax): encodings cover the observed ranges; sim uses them exactly."""

from __future__ import annotations

import numpy as np

from tinyptq.config import LayerOverride, QuantConfig
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.sim import QuantSim

from ..core.test_graph import tiny_resnet


def _run(config: QuantConfig):
    graph = KerasGraph.from_keras(tiny_resnet())
    calib = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype(np.float32)
    state = PTQState(graph, config, calib)
    return create_stage("range_setting", {"batch_size": 8}).apply(state)


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
    graph = state.graph.copy()
    for name, kernel in state.quantized_kernels().items():
        graph.set_kernel(name, kernel)
    # re-run layer by layer with numpy fake quant at each activation point
    points = [p.name for p in graph.act_points()]
    model = graph.float_model(points)
    assert len(model.outputs) == len(points)
    from tinyptq.graph.keras_build import build_keras_model

    manual = build_keras_model(graph.nodes, graph.output_names, act_encodings=state.act_encodings)
    np.testing.assert_array_equal(sim_out, manual.predict(x, verbose=0))
    # and the output really is quantized: every value sits on the output grid
    out_enc = state.act_encodings[graph.output_names[0]]
    np.testing.assert_array_equal(out_enc.fake_quant(sim_out), sim_out)
    # fewer bits -> larger deviation from float
    lo = _run(QuantConfig(weight_bits=3, act_bits=3))
    ref = state.graph.predict(x)
    assert np.abs(QuantSim(lo).predict(x) - ref).mean() > np.abs(sim_out - ref).mean()
