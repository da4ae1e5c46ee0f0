"""``tinyptq analyze`` on a model with one deliberately fragile layer: ranked first, fixed by the override.

The model is the fragile one of tests/core/test_sensitivity.py (c2 holds one
weight 50 standard deviations wide that reads a dead channel: harmless in
float, but per-tensor 4-bit weights round every other c2 weight to zero). The
use case ``mem-fragile`` labels its evaluation inputs with the FP32 model's
own classes (FP32 accuracy 100 %), so accuracy measures what quantization
costs. One analysis of the Keras model (with --apply) and one of its ONNX
twin are computed per module and shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.core.test_sensitivity import FRAGILE, fragile_model
from tinyptq import api
from tinyptq.analysis.probe import Probe, units
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.executor import ACTIVATION, WEIGHT
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.loading import load_graph
from tinyptq.models.usecases import EvalSet, UseCase, register_use_case
from tinyptq.pipeline import Pipeline, PTQState

NAME = "mem-fragile"
PIPELINE = {
    "name": "fragile_minmax",
    "quant": {"weight_bits": 4, "act_bits": 8, "weight_per_channel": False},
    "calibration": {"samples": 64, "seed": 0},
    "stages": [{"range_setting": {"weights": "minmax", "activations": "minmax"}}, {"bias_correction": {}}],
}


def inputs(n: int, seed: int) -> np.ndarray:
    """Noise around a per-sample colour: global pooling keeps what tells samples apart."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 8, 3)) + 2 * rng.normal(size=(n, 1, 1, 3))).astype(np.float32)


def balanced_model():
    """The fragile model with its output biases shifted so that every class wins on some random inputs."""
    model = fragile_model()
    x = inputs(512, 7)
    kernel, bias = model.get_layer("fc").get_weights()
    model.get_layer("fc").set_weights([kernel, bias - model.predict(x, verbose=0).mean(axis=0)])
    return model


@register_use_case
class FragileUseCase(UseCase):
    """Random inputs labelled by the FP32 fragile model; the model from --model or the built-in one."""

    name = NAME
    description = "in-memory use case of the analysis tests"
    calibration_size = 64

    def __init__(self, data_dir=None) -> None:
        self.data_dir = data_dir

    def model_path(self) -> Path:
        return Path("<in-memory fragile model>")

    def load_graph(self, model=None):
        return load_graph(model) if model is not None else KerasGraph.from_keras(balanced_model())

    def calibration_data(self, n: int, seed: int) -> np.ndarray:
        return inputs(n, seed)

    def eval_set(self) -> EvalSet:
        x = inputs(200, 99)
        return EvalSet(x, np.argmax(self.load_graph().predict(x), axis=1), "random inputs, FP32 labels")


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    return api.analyze(NAME, PIPELINE, apply=True, progress=False, out=out), out


@pytest.fixture(scope="module")
def onnx_analysis(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "fragile.onnx"
    path.write_bytes(KerasGraph.from_keras(balanced_model()).to_onnx().model.SerializeToString())
    return api.analyze(NAME, PIPELINE, model=path, progress=False)


def by_name(rows, key="name"):
    return {row[key]: row for row in rows}


# ----------------------------------------------------------- the findings
def test_the_loss_is_in_the_weights(analysis):
    split = by_name(analysis[0]["split"], "setting")
    assert split["fp32"]["metric"] == 100.0
    assert split["both"]["metric"] < 80.0, "the fragile layer must cost accuracy"
    # the 4-bit weights carry the loss; 8-bit activations alone are nearly free
    assert split["weights only"]["metric"] < split["activations only"]["metric"]
    assert split["activations only"]["metric"] > 95.0


def test_the_fragile_layer_ranks_first(analysis):
    a = analysis[0]
    units_ = by_name(a["units"])
    both = by_name(a["split"], "setting")["both"]["metric"]
    # all but that layer's weights quantized: the best recovery of every unit
    recovery = {n: u["without_weights"]["metric"] - both for n, u in units_.items() if u["without_weights"]}
    assert max(recovery, key=recovery.get) == FRAGILE
    # only its weights quantized: the worst single layer, by metric and by output SQNR
    alone = {n: u["only_weights"]["sqnr_db"] for n, u in units_.items() if u["only_weights"]}
    assert min(alone, key=alone.get) == FRAGILE
    assert a["fix"]["ranking"][0]["unit"] == FRAGILE
    # its kernel is the one that fits its grid worst
    kernels = by_name(a["tensors"]["kernels"])
    assert min(kernels, key=lambda n: kernels[n]["sqnr_db"]) == FRAGILE


def test_the_suggested_override_recovers_the_metric(analysis):
    fix = analysis[0]["fix"]
    assert fix["selected"][0] == FRAGILE and fix["recovered"] >= fix["share"]
    assert fix["overrides"][0] == {"pattern": FRAGILE, "weight_bits": 8}  # its activations are at 8 already
    applied = fix["applied"]
    assert applied["metric_after"] > applied["metric_before"] + 30
    # the simulation's prediction holds up in the rerun (which corrects the raised layers' biases again)
    assert applied["metric_after"] >= fix["predicted_metric"] - 5
    # c2 at 8 bits costs bytes: the kernel's 8-bit codes against its 4-bit ones
    before, after = fix["cost"]["weight_bytes"]
    kernel = balanced_model().get_layer(FRAGILE).get_weights()[0].size
    assert after - before >= kernel // 2


def test_the_override_block_is_a_pipeline_quant_block(analysis, tmp_path):
    """Pasted into the pipeline, the YAML gives the applied result again."""
    fix = analysis[0]["fix"]
    block = yaml.safe_load(fix["yaml"])
    pipeline = {**PIPELINE, "quant": {**PIPELINE["quant"], **block["quant"]}}
    result = api.quantize(NAME, pipeline)
    assert result.summary["quantized"] == pytest.approx(fix["applied"]["metric_after"])


def test_stage_columns_and_changed_flags(analysis):
    stages = analysis[0]["stages"]
    assert stages["columns"] == ["as loaded", "range_setting", "bias_correction"]
    assert stages["quantized_by"] == ["reference ranges", "pipeline", "pipeline"]
    for row in stages["layers"]:
        # the pipeline's own range setting on the loaded model is exactly the reference quantization
        assert row["sqnr_db"][0] == row["sqnr_db"][1]
        assert row["changed"][:2] == [False, True]
    # bias correction changes biases; the fragile layer's error is what it can correct least
    assert any(row["changed"][2] for row in stages["layers"])


def test_files_are_written(analysis):
    out = analysis[1]
    for name in ("analysis.json", "analysis.md", "analysis.html"):
        assert (out / name).stat().st_size > 0


# ------------------------------------------------------------- mechanics
def test_units_cover_every_quantizer_once():
    graph = KerasGraph.from_keras(balanced_model())
    calib = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    state = Pipeline.from_spec(api.load_pipeline(PIPELINE)).run(
        PTQState(graph, QuantConfig(weight_bits=4, act_bits=8), calib)
    )
    tensors = [t for u in units(state) for t in u.tensors]
    expected = [(WEIGHT, n) for n in state.weight_encodings] + [(ACTIVATION, n) for n in state.act_encodings]
    assert len(tensors) == len(set(tensors)) and set(tensors) == set(expected)
    assert [u.name for u in units(state)][0] == "img"  # the input first: network order


def test_probe_switches_back_to_the_state(analysis):
    """After any setting, ``all_but(())`` with no raised bits is the state's simulation again."""
    from tinyptq.models.usecases import get_use_case
    from tinyptq.sim import QuantSim

    uc = get_use_case(NAME)
    graph = uc.load_graph()
    calib = uc.calibration_data(32, 0)
    state = Pipeline.from_spec(api.load_pipeline(PIPELINE)).run(
        PTQState(graph, api.load_pipeline(PIPELINE).quant_config(), calib)
    )
    data = uc.eval_set()
    probe = Probe(state, uc, data, graph.predict(data.x), calib)
    reference = QuantSim(state).predict(data.x)
    probe.only([(WEIGHT, FRAGILE)])
    enc = state.weight_encodings["c1"]
    probe.raise_bits({(WEIGHT, "c1"): enc})
    probe.raise_bits({})
    probe.all_but(())
    np.testing.assert_array_equal(probe.sim.predict(data.x), reference)


def test_onnx_model_gives_the_same_finding(onnx_analysis, analysis):
    a = onnx_analysis
    assert a["fix"]["ranking"][0]["unit"] == FRAGILE
    assert a["fix"]["selected"][0] == FRAGILE
    keras_units = [u["name"] for u in analysis[0]["units"] if u["kind"] != "point"]
    assert [u["name"] for u in a["units"] if u["kind"] != "point"] == keras_units


def test_next_bit_width_and_metric_selection():
    """--fix-bits next raises c2 to the next candidate (6 bits); choosing by the metric finds it too."""
    a = api.analyze(NAME, PIPELINE, fix_bits="next", select_by="metric", share=0.5, progress=False)
    fix = a["fix"]
    assert fix["select_by"] == "metric" and fix["selected"][0] == FRAGILE
    assert fix["overrides"][0] == {"pattern": FRAGILE, "weight_bits": 6}
    loss = 100.0 - fix["baseline"]["metric"]
    assert fix["steps"][0]["loss"] < loss and fix["recovered"] > 0.3
    # at 6 bits c2 still loses signal and no other unit helps: the fix says it falls short
    assert fix["reached"] == (fix["recovered"] >= 0.5)
    assert fix["reached"] or any("short of the 50%" in n for n in a["notes"])


# ------------------------------------------------------------- the command
def test_cli_writes_the_report_and_says_when_nothing_needs_fixing(capsys, tmp_path, pipeline_file):
    out = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "analyze", "--use-case", NAME, "--pipeline", pipeline_file,
                                "--weight-bits", "8", "--out", out)
    assert code == 0, err
    assert "fix: none (every tensor is at 8 bits or more already)" in stdout
    for name in ("analysis.json", "analysis.md", "analysis.html"):
        assert (out / name).is_file()
    assert json.loads((out / "analysis.json").read_text())["fix"]["selected"] == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--share", "1.5"], "--share"),
        (["--share", "0"], "--share"),
        (["--fix-bits", "9"], "--fix-bits"),
        (["--select-by", "labels"], "--select-by"),
        (["--samples", "0"], "--samples"),
        (["--weight-bits", "1"], "--weight-bits"),
        (["--pipeline", "no_such_pipeline"], "no_such_pipeline"),
    ],
)
def test_cli_bad_options_are_one_line_errors(capsys, tmp_path, pipeline_file, args, needle):
    base = ["analyze", "--use-case", NAME, "--pipeline", pipeline_file, "--out", tmp_path / "x"]
    code, _, err = run_cli(capsys, *base, *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "x" / "analysis.json").exists()


def test_api_bad_options_name_the_option():
    for options, needle in (({"share": 2.0}, "share"), ({"fix_bits": "16"}, "fix_bits"),
                            ({"select_by": "x"}, "select_by")):
        with pytest.raises(ConfigError, match=needle):
            api.analyze(NAME, PIPELINE, progress=False, **options)


@pytest.fixture
def pipeline_file(tmp_path):
    path = tmp_path / "fragile.yaml"
    path.write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    return path


def test_float_rewrites_are_measured_with_the_pipelines_own_ranges():
    """BN folding and CLE snapshots are quantized with the pipeline's range setting: the column after CLE
    equals the range_setting column, BN folding changes only the layer with the batch norm."""
    from tests.core import memory_usecase as mem

    pipeline = {
        "name": "fold_cle",
        "quant": {"weight_bits": 4, "act_bits": 8, "weight_per_channel": False},
        "calibration": {"samples": 32, "seed": 0},
        "stages": ["bn_folding", "cle", {"range_setting": {"weights": "minmax", "activations": "minmax"}}],
    }
    stages = api.analyze(mem.NAME, pipeline, progress=False)["stages"]
    assert stages["columns"] == ["as loaded", "bn_folding", "cle", "range_setting"]
    assert stages["quantized_by"] == ["reference ranges"] * 3 + ["pipeline"]
    rows = by_name(stages["layers"], "layer")
    assert [rows[n]["changed"][1] for n in ("c1", "c2", "fc")] == [True, False, False]
    assert rows["c1"]["changed"][2] and rows["c2"]["changed"][2]  # the equalized pair
    for row in rows.values():
        assert row["sqnr_db"][2] == row["sqnr_db"][3]
    # equalizing the pair helps its per-tensor 4-bit weights
    assert rows["c1"]["sqnr_db"][2] > rows["c1"]["sqnr_db"][1]
