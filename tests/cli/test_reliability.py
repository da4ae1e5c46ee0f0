"""The CLI on bad inputs built here: one stderr line, exit 2, checked before the work, nothing run from files."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import yaml

from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.core import memory_usecase as mem
from tests.core.test_reliability import _onnx
from tinyptq import api
from tinyptq.export.runstate import CONTEXT, STATE_FILE
from tinyptq.metrics import MetricResult
from tinyptq.signing import dump_signed

QUANTIZE = ["quantize", "--use-case", mem.NAME]


def _fail(*args, **kwargs):
    raise AssertionError("the work started before the output location was checked")


# ---------------------------------------------------------------- class 3
def test_quantize_out_is_checked_before_the_pipeline(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "quantize", _fail)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, *QUANTIZE, "--out", blocker / "run")
    assert code == 2
    assert_one_line_error(code, err, "--out", "a_file/run", "cannot be created", "a_file is not a directory")
    code, _, err = run_cli(capsys, *QUANTIZE, "--out", blocker)  # click's own check
    assert code == 2
    assert_one_line_error(code, err, "--out", "is a file")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 'quantize --out' run of the in-memory use case."""
    from tinyptq.cli import main

    out = tmp_path_factory.mktemp("quantized") / "run"
    assert main([*QUANTIZE, "--calib-samples", "16", "--out", str(out)]) == 0
    assert (out / "state.pkl").is_file()
    return out


def test_export_out_is_checked_and_incomplete_states_are_one_line(capsys, tmp_path, run_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "export", run_dir, "--format", "encodings", "--out", blocker / "sub")
    assert_one_line_error(code, err, "--out", "cannot be created")
    code, out, _ = run_cli(capsys, "export", run_dir, "--format", "encodings", "--out", tmp_path / "exported")
    assert code == 0 and (tmp_path / "exported" / "encodings.json").is_file()

    broken = tmp_path / "broken"
    broken.mkdir()
    dump_signed({"format": "tinyptq-state", "format_version": 1, "config": {}}, broken / STATE_FILE, CONTEXT)
    code, _, err = run_cli(capsys, "export", broken, "--format", "encodings")
    assert code == 2
    assert_one_line_error(code, err, "state.pkl is incomplete (no graph, weight_encodings")


def _grid_file(tmp_path, name: str = "rel") -> str:
    path = tmp_path / "grid.yaml"
    grid = {
        "name": name,
        "use_cases": [mem.NAME],
        "bits": ["W8A8"],
        "pipeline": {"stages": ["range_setting"]},
        "calibration": {"samples": [16]},
    }
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def test_ablate_out_is_checked_before_the_grid_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tinyptq.ablate.runner.run_grid", _fail)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "ablate", "--grid", _grid_file(tmp_path), "--out", blocker / "out")
    assert code == 2
    assert_one_line_error(code, err, "--out", "cannot be created")


# ------------------------------------------------------------ class 3 and 5
def test_a_grid_name_stays_inside_runs_and_report_checks_its_directory(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    grid = _grid_file(tmp_path, name="/../../../escaped")
    code, out, err = run_cli(capsys, "ablate", "--grid", grid, "--workers", 1, "--no-report")
    assert code == 0, err
    results = work / "runs" / "ablate-escaped"
    assert (results / "results.sqlite").is_file()
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tinyptq.paths.tempfile.NamedTemporaryFile", denied)
    monkeypatch.setattr("tinyptq.ablate.report.write_report", _fail)
    code, _, err = run_cli(capsys, "report", results)
    assert code == 2
    assert_one_line_error(code, err, "report directory", "Permission denied")


# -------------------------------------------------------------- class 7, 8, 9
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\nstages: [range_setting]\n".encode("latin-1"))
    (root / "order.yaml").write_text("stages: [range_setting, bn_folding]\n")
    (root / "cle.yaml").write_text("stages: [cle, range_setting]\n")
    np.savez(root / "calib.npz", x=np.zeros((4, *mem.SHAPE), np.float32))
    mem.save(mem.feature_map_model(), root / "features.h5")
    model = mem.plain_model()
    kernel, bias = model.get_layer("c2").get_weights()
    kernel[1, 1, 0, 0] = np.inf
    model.get_layer("c2").set_weights([kernel, bias])
    mem.save(model, root / "inf.h5")
    _onnx(root / "bad.onnx", np.ones((4, 5, 3, 3)))  # a kernel for 5 channels on a 3-channel input
    return root


def test_user_errors_are_one_line(capsys, tmp_path, bad_inputs, monkeypatch):
    root = bad_inputs
    base = [*QUANTIZE, "--out", tmp_path / "o"]
    cases = [
        (base + ["--seed", -1], ["seed", "-1"]),
        (base + ["--pipeline", root / "latin1.yaml"], ["latin1.yaml", "is not UTF-8 text"]),
        (base + ["--calib-data", root / "calib.npz"], ["calib.npz is an .npz archive (x)", "numpy.save"]),
        (base + ["--model", root / "features.h5"], ["features.h5 does not fit use case", "(32, 6, 6, 4)"]),
        (base + ["--model", root / "inf.h5"], ["inf.h5 has NaN/Inf in the weights of layer 'c2'"]),
        (base + ["--pipeline", root / "order.yaml"], ["bn_folding must run before range_setting"]),
        (base + ["--pipeline", root / "cle.yaml"], ["cle needs bn_folding before it"]),
    ]
    monkeypatch.setattr("tinyptq.pipeline.Pipeline.run", _fail)  # every one is found before a stage runs
    for args, needles in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert_one_line_error(code, err, *needles)


def test_an_onnx_model_failing_in_onnxruntime_is_one_line(capfd, tmp_path, bad_inputs):
    from tinyptq.cli import main

    code = main([*QUANTIZE, "--model", str(bad_inputs / "bad.onnx"), "--out", str(tmp_path / "o")])
    _, err = capfd.readouterr()  # file descriptor 2: onnxruntime's own logger writes there
    assert code == 2
    assert_one_line_error(code, err, "bad.onnx fails in onnxruntime", "Conv")


def test_lambda_model_is_refused_unrun_on_the_command_line(capsys, tmp_path):
    from tests.core.test_keras_files import _lambda_model

    marker = tmp_path / "ran"
    path = mem.save(_lambda_model(marker), tmp_path / "lambda.h5")
    marker.unlink()
    code, _, err = run_cli(capsys, "eval", "--use-case", mem.NAME, "--model", path)
    assert code == 2
    assert_one_line_error(code, err, "unsupported layer 'planted' (Lambda)", "not loaded")
    assert not marker.exists()


def test_a_planted_cifar_batch_is_refused_on_the_command_line(capsys, tmp_path, data_dir):
    from tests.datasets.test_cifar10 import _batch, _Planted

    planted = tmp_path / "data"
    batches = planted / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (planted / "mlperf-tiny").symlink_to(data_dir / "mlperf-tiny")
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (batches / name).write_bytes(pickle.dumps(_batch(), protocol=2))
    marker = tmp_path / "ran"
    (batches / "test_batch").write_bytes(pickle.dumps({**_batch(), b"x": _Planted(marker)}, protocol=2))
    code, _, err = run_cli(capsys, "eval", "--use-case", "ic", "--data-dir", planted)
    assert code == 2
    assert_one_line_error(code, err, "test_batch is not a plain data pickle", "could run code")
    assert not marker.exists()


# ---------------------------------------------------------------- class 8
def test_warnings_never_precede_the_error_line(capsys, monkeypatch):
    # a process of its own: under pytest, warnings go to pytest's log, not to stderr
    script = (
        "import sys, warnings\n"
        "from tinyptq import api\n"
        "from tinyptq.cli import main\n"
        "from tinyptq.errors import ConfigError\n"
        "def warn_then_fail(*args, **kwargs):\n"
        "    warnings.warn('something library-ish happened', UserWarning, stacklevel=1)\n"
        "    raise ConfigError('the real problem')\n"
        "api.evaluate = warn_then_fail\n"
        "sys.exit(main(['eval', '--use-case', 'ic']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: the real problem"]

    def warn_then_succeed(*args, **kwargs):
        warnings.warn("something library-ish happened", UserWarning, stacklevel=1)
        return MetricResult("accuracy", 50.0, 32)

    monkeypatch.setattr(api, "evaluate", warn_then_succeed)
    code, out, err = run_cli(capsys, "eval", "--use-case", mem.NAME)
    assert code == 0 and "accuracy 50.00 %" in out
    assert err.strip().splitlines() == ["warning: something library-ish happened (UserWarning)"]
