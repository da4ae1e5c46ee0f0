"""The pipeline contract: registry, YAML validation, stage timing, state isolation."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.api import load_pipeline
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.params import Real
from tinyptq.pipeline import (
    Pipeline,
    PTQState,
    Stage,
    create_stage,
    order_problem,
    register,
    registry,
)
from tinyptq.pipeline_file import PipelineSpec

from .test_graph import tiny_resnet


def _state(bits=8):
    graph = KerasGraph.from_keras(tiny_resnet())
    calib = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    return PTQState(graph, QuantConfig(weight_bits=bits, act_bits=bits), calib)


def test_registry_and_params():
    assert "range_setting" in registry()
    stage = create_stage("range_setting", {"weights": "minmax", "batch_size": 4})
    params = stage.get_params()
    assert params["weights"] == "minmax" and params["activations"] == "minmax"
    assert params["batch_size"] == 4 and set(params) == set(type(stage).param_names())


def test_unknown_stage_and_option_list_valid_names():
    with pytest.raises(ConfigError, match="unknown stage 'adaroundx'.*range_setting"):
        create_stage("adaroundx")
    with pytest.raises(ConfigError, match="unknown option 'bogus'.*weights, activations"):
        create_stage("range_setting", {"bogus": 1})
    with pytest.raises(
        ConfigError, match="range_setting option 'weights' must be one of .*'minmax'.*got 'bad'"
    ):
        create_stage("range_setting", {"weights": "bad"})


def test_yaml_validation(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text(
        "name: t\nquant: {weight_bits: 4}\nstages:\n  - range_setting: {weights: minmax}\n"
    )
    spec = PipelineSpec.from_yaml(good)
    assert spec.stages == [("range_setting", {"weights": "minmax"})]
    assert spec.quant_config().weight_bits == 4
    assert spec.quant_config(weight_bits=6, act_bits=3).act_bits == 3
    cases = {
        "stages: [nope]": "unknown stage 'nope'",
        "stagez: []": "unknown pipeline key 'stagez'",
        "quant: {wbits: 4}\nstages: []": "unknown quantization option 'wbits'",
        "quant: {weight_bits: 1}\nstages: []": r"quant option 'weight_bits' must be an integer in \[2, 16\], got 1",
        "stages:\n  - range_setting: 3": "must be a mapping",
        "calibration: {size: 3}": "unknown calibration option 'size'",
        "stages: [: bad": "not valid YAML",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            PipelineSpec.from_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        PipelineSpec.from_yaml(tmp_path / "missing.yaml")


def test_builtin_pipelines_load():
    assert load_pipeline("minmax").quant_config().weight_per_channel
    assert not load_pipeline("minmax_per_tensor").quant_config().weight_per_channel


@pytest.mark.parametrize("name", ["adaround", "brecq_qdrop", "gptq"])
def test_builtin_rounding_pipelines_build_and_run_in_order(name):
    spec = load_pipeline(name)
    names = [n for n, _ in spec.stages]
    assert order_problem(names) is None and name.split("_")[0] in names
    assert spec.quant_config().weight_bits == 4 and len(spec.build()) == len(names)
    with pytest.raises(ConfigError, match="built-in"):
        load_pipeline("no_such_pipeline")


def test_stage_times_are_logged_and_state_is_not_mutated():
    @register
    class Sleepy(Stage):
        name = "_test_sleepy"
        parameter_constraints = {"seconds": Real(0.0, None)}

        def __init__(self, seconds: float = 0.01) -> None:
            self.seconds = seconds

        def apply(self, state):
            import time

            time.sleep(self.seconds)
            state = state.evolve()
            self.record(state, ["slept"])
            return state

    seen = []
    state = _state()
    pipe = Pipeline(
        [create_stage("_test_sleepy"), create_stage("range_setting"), create_stage("_test_sleepy")]
    )
    out = pipe.run(state, on_stage=lambda s, i, n: seen.append((s.name, i, n)))
    assert [r.stage for r in out.log] == ["_test_sleepy", "range_setting", "_test_sleepy"]
    assert out.log[0].seconds >= 0.01 and out.log[0].lines == ["slept"]
    assert set(out.stage_seconds()) == {"_test_sleepy", "range_setting", "_test_sleepy#2"}
    assert seen[1] == ("range_setting", 1, 3)
    assert state.log == [] and state.act_encodings == {}  # the input state is untouched


def test_calibration_batch_size_is_the_default_of_stages_that_take_one():
    spec = PipelineSpec.from_dict(
        {
            "calibration": {"batch_size": 16},
            "stages": ["bn_folding", "range_setting", {"bias_correction": {"batch_size": 8}}],
        }
    )
    bn, rs, bc = spec.build()
    assert rs.batch_size == 16 and bc.batch_size == 8  # a stage's own option wins
    assert "batch_size" not in bn.get_params()
    assert PipelineSpec.from_dict({"stages": ["range_setting"]}).build()[0].batch_size == 128


def test_calibration_batch_size_leaves_the_reconstruction_minibatch_alone():
    spec = PipelineSpec.from_dict(
        {"calibration": {"batch_size": 256}, "stages": ["range_setting", "adaround", "gptq"]}
    )
    rs, ada, gptq = spec.build()
    assert rs.batch_size == 256 and gptq.batch_size == 256  # streamed calibration batches
    assert ada.batch_size == 16  # adaround's batch_size is its optimization minibatch
