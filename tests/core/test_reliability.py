"""Nothing lost, nothing silently wrong: checks that run before the work, on bad inputs built here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.core import memory_usecase as mem
from tinyptq import api
from tinyptq.ablate.grid import Grid
from tinyptq.errors import ConfigError, DataError, ModelError
from tinyptq.export.runstate import CONTEXT, STATE_FILE, load_state
from tinyptq.graph.loading import load_graph
from tinyptq.metrics import accuracy, check_reconstruction, top1_agreement
from tinyptq.paths import check_out_dir, prepare_out_dir, safe_name
from tinyptq.pipeline import Pipeline, order_problem
from tinyptq.pipeline_file import PipelineSpec
from tinyptq.signing import dump_signed


# ------------------------------------------------------------ class 3 and 5
@pytest.mark.parametrize(
    ("text", "expected"),
    [("kws", "kws"), ("../../etc/x", "etc-x"), ("a/b c", "a-b-c"), (".hidden", "hidden"), ("..", "grid"), ("", "grid")],
)
def test_safe_name_never_leaves_its_directory(text, expected):
    assert safe_name(text, "grid") == expected


def test_a_grid_name_becomes_a_safe_file_name():
    grid = Grid.from_dict(
        {"name": "../../outside/x", "use_cases": [mem.NAME], "bits": ["W8A8"], "pipeline": "minmax"}
    )
    assert grid.name == "outside-x"


def test_out_dir_is_checked_without_leaving_anything_behind(tmp_path, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_out_dir(blocker, "--out")
    with pytest.raises(ConfigError, match=r"--out .*file.txt/sub cannot be created: .*file.txt is not a directory"):
        check_out_dir(blocker / "sub", "--out")
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # checked, not created
    made = prepare_out_dir(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tinyptq.paths.tempfile.NamedTemporaryFile", denied)
    monkeypatch.setattr("tinyptq.paths.tempfile.mkdtemp", denied)
    with pytest.raises(ConfigError, match="--out .*b cannot be written: Permission denied"):
        check_out_dir(made, "--out")
    with pytest.raises(ConfigError, match="--out .*new cannot be written: Permission denied"):
        check_out_dir(made / "new", "--out")


# ---------------------------------------------------------------- class 8
def test_cle_needs_bn_folding_only_on_models_with_batch_norms():
    assert order_problem(["cle", "range_setting"]) == "cle needs bn_folding before it"  # model unknown (grids)
    assert order_problem(["cle", "range_setting"], batch_norms=True) == "cle needs bn_folding before it"
    assert order_problem(["cle", "range_setting"], batch_norms=False) is None
    assert order_problem(["bn_folding", "cle", "range_setting"], batch_norms=True) is None
    assert order_problem(["range_setting", "bn_folding"], batch_norms=False) == "bn_folding must run before range_setting"


def test_the_grid_skips_cle_without_bn_folding():
    grid = Grid.from_dict(
        {
            "use_cases": [mem.NAME],
            "bits": ["W8A8"],
            "pipeline": {"stages": ["bn_folding", "cle", "range_setting"]},
            "toggles": {"bn_folding": ["off", "on"]},
        }
    )
    reasons = {r.toggles["bn_folding"]: r.skip_reason for r in grid.expand()}
    assert reasons == {"off": "cle needs bn_folding before it", "on": None}


@pytest.fixture
def no_stage_runs(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(Pipeline, "run", boom)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (["range_setting", "bn_folding"], "bn_folding must run before range_setting"),
        (["cle", "range_setting"], "cle needs bn_folding before it"),
        (["bn_folding"], "no range_setting stage"),
    ],
)
def test_quantize_checks_the_whole_order_before_any_stage(stages, message, no_stage_runs):
    with pytest.raises(ConfigError, match=message):
        api.quantize(mem.NAME, {"name": "p", "stages": stages})


def test_cle_without_bn_folding_runs_on_a_model_without_batch_norms(tmp_path):
    path = mem.save(mem.plain_model(), tmp_path / "plain.keras")
    result = api.quantize(mem.NAME, {"stages": ["cle", "range_setting"]}, model=path, calib_samples=16)
    assert [r["stage"] for r in result.summary["stage_log"]] == ["cle", "range_setting"]
    assert "equalized 1 pairs" in result.summary["stage_log"][0]["lines"][0]


def test_nan_weights_are_blamed_on_the_model_when_it_is_loaded(tmp_path):
    model = mem.plain_model()
    kernel, bias = model.get_layer("c2").get_weights()
    kernel[0, 0, 0, 0] = np.nan
    model.get_layer("c2").set_weights([kernel, bias])
    path = mem.save(model, tmp_path / "nan.h5")
    with pytest.raises(ModelError, match=r"model .*nan.h5 has NaN/Inf in the weights of layer 'c2'"):
        load_graph(path)
    with pytest.raises(ModelError, match="has NaN/Inf in the weights of layer 'c2'"):
        load_graph(model)


def _onnx(path, weight: np.ndarray, channels: int = 3):
    """x (N, C, 8, 8) -> Conv(weight) -> y, opset 17."""
    w = numpy_helper.from_array(weight.astype(np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[0], 6, 6])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)  # valid as far as onnx.checker can tell
    onnx.save(model, path)
    return path


def test_onnx_nan_weights_and_models_failing_in_onnxruntime(tmp_path):
    w = np.ones((4, 3, 3, 3))
    w[1, 0, 0, 0] = np.inf
    with pytest.raises(ModelError, match=r"has NaN/Inf in the weights of node 'conv' \(W\)"):
        load_graph(_onnx(tmp_path / "inf.onnx", w))
    # kernel for 5 input channels, model input of 3: the checker passes, onnxruntime fails
    bad = _onnx(tmp_path / "bad.onnx", np.ones((4, 5, 3, 3)))
    with pytest.raises(ModelError, match=r"model .*bad.onnx fails in onnxruntime: .*Conv"):
        load_graph(bad)


# ---------------------------------------------------------------- class 7
def test_a_negative_seed_is_a_config_error_before_anything_loads(monkeypatch):
    monkeypatch.setattr("tinyptq.models.usecases.get_use_case", lambda *a: pytest.fail("use case loaded"))
    with pytest.raises(ConfigError, match=r"'seed' must be .*, got -1"):
        api.quantize(mem.NAME, seed=-1)
    with pytest.raises(ConfigError, match=r"'calib_samples' must be .*, got 0"):
        api.quantize(mem.NAME, calib_samples=0)


def test_non_utf8_pipeline_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nstages: [range_setting]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 9: 0xe9\)"):
        PipelineSpec.from_yaml(path)


def test_calibration_data_must_be_one_numeric_npy_array(tmp_path):
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.zeros((4, *mem.SHAPE)), y=np.zeros(4))
    with pytest.raises(DataError, match=r"calib.npz is an .npz archive \(x, y\); save the one input array"):
        api.load_calibration(npz)
    text = tmp_path / "text.npy"
    np.save(text, np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataError, match="holds <U1 values"):
        api.load_calibration(text)


def _state_file(tmp_path, **payload):
    """A run directory whose state.pkl, signed as tinyptq signs it, holds just ``payload``."""
    run = tmp_path / "run"
    run.mkdir()
    dump_signed({"format": "tinyptq-state", "format_version": 1, **payload}, run / STATE_FILE, CONTEXT)
    return run


def test_a_run_state_without_its_fields_is_a_config_error(tmp_path):
    run = _state_file(tmp_path, config={}, weight_encodings={})
    with pytest.raises(ConfigError, match="is incomplete .no graph, act_encodings, fixed_weights, bn_stats"):
        load_state(run)


def test_model_outputs_that_do_not_fit_the_metric(tmp_path):
    labels = np.arange(8) % 4
    with pytest.raises(ModelError, match=r"shape \(8, 6, 6, 4\); accuracy needs class scores of shape \(8, classes\)"):
        accuracy(labels, np.zeros((8, 6, 6, 4)))
    with pytest.raises(ModelError, match="gives 3 class scores per sample but the labels go up to 3"):
        accuracy(labels, np.zeros((8, 3)))
    with pytest.raises(ModelError, match=r"shape \(8, 1\); top-1 agreement"):
        top1_agreement(np.zeros((8, 1)), np.zeros((8, 1)))
    with pytest.raises(ModelError, match="needs a reconstruction of its input"):
        check_reconstruction(np.zeros((8, 640)), np.zeros((8, 10)), "SQNR")
    path = mem.save(mem.feature_map_model(), tmp_path / "features.keras")
    with pytest.raises(ModelError, match=rf"model .*features.keras does not fit use case '{mem.NAME}'"):
        api.evaluate(mem.NAME, model=path)
