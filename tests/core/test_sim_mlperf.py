"""All four MLPerf Tiny reference models run through QuantSim at W8A8."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.config import QuantConfig
from tinyptq.graph.loading import load_graph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.sim import QuantSim


@pytest.mark.parametrize(
    "name", ["ic_resnet8.h5", "kws_dscnn_savedmodel", "vww_mobilenetv1_96.h5", "ad_autoencoder.h5"]
)
def test_w8a8_sim_runs_and_stays_close_to_float(mlperf_dir, name):
    graph = load_graph(mlperf_dir / name)
    rng = np.random.default_rng(0)
    shape = graph.input_shape[1:]
    scale = 255.0 if name.startswith("ic") else 1.0
    calib = (rng.uniform(0, 1, size=(32, *shape)) * scale).astype(np.float32)
    state = PTQState(graph, QuantConfig(weight_bits=8, act_bits=8, weight_per_channel=True), calib)
    state = create_stage("range_setting").apply(state)
    x = calib[:8]
    ref, out = graph.predict(x), QuantSim(state).predict(x)
    assert out.shape == ref.shape and np.all(np.isfinite(out))
    assert len(state.weight_encodings) == len(graph.quant_layers())
    # 8-bit simulation on in-distribution data stays close to the float model
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 0.2, rel
