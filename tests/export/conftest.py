"""Shared fixtures of the export tests: the MLPerf ic model, a little CIFAR-10, cached states."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.config import QuantConfig
from tinyptq.pipeline import Pipeline, PTQState
from tinyptq.pipeline_file import PipelineSpec

DEFAULT_STAGES = ("bn_folding", "range_setting")


@pytest.fixture(scope="session")
def ic_setup(data_dir):
    """(graph, 64 calibration images, 64 test images) of the MLPerf ic ResNet-8."""
    from tinyptq.models.usecases import get_use_case

    uc = get_use_case("ic", data_dir)
    return uc.load_graph(), uc.calibration_data(64, 0), uc.eval_set().x[:64]


def run_pipeline(graph, calib, weight_bits=8, act_bits=8, per_channel=True, stages=DEFAULT_STAGES, **quant):
    """A state of ``graph`` after ``stages`` (a fresh graph copy each time)."""
    spec = PipelineSpec.from_dict({"stages": list(stages)})
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_per_channel=per_channel, **quant)
    return Pipeline.from_spec(spec).run(PTQState(graph.copy(), config, np.asarray(calib, np.float32)))


@pytest.fixture(scope="session")
def ic_state(ic_setup):
    """Factory of ic states, each configuration computed once per session."""
    graph, calib, _ = ic_setup
    cache: dict = {}

    def make(weight_bits=8, act_bits=8, per_channel=True, stages=DEFAULT_STAGES):
        key = (weight_bits, act_bits, per_channel, tuple(map(repr, stages)))
        if key not in cache:
            cache[key] = run_pipeline(graph, calib, weight_bits, act_bits, per_channel, stages)
        return cache[key]

    return make
