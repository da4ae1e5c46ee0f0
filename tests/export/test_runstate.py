"""state.pkl of a run directory: signed by the user's tinyptq, anything else refused in one line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tinyptq.cli import main
from tinyptq.config import QuantConfig
from tinyptq.export.runstate import CONTEXT, STATE_FILE, load_state, save_state
from tinyptq.pipeline import Pipeline, PTQState
from tinyptq.pipeline_file import PipelineSpec
from tinyptq.signing import SignatureMismatch, dump_signed


@pytest.fixture(scope="module")
def tiny_state():
    """The tiny residual model after bn_folding + range_setting (no data files needed)."""
    from tests.core.test_graph import tiny_resnet
    from tinyptq.graph.keras_graph import KerasGraph

    calib = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    spec = PipelineSpec.from_dict({"stages": ["bn_folding", "range_setting"]})
    start = PTQState(KerasGraph.from_keras(tiny_resnet()), QuantConfig(weight_bits=4), calib)
    return Pipeline.from_spec(spec).run(start)


class _Plant:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _mismatch(run_dir) -> str:
    return f"{STATE_FILE} in {run_dir} was not written by this user's tinyptq (signature mismatch); re-run quantize"


def test_a_saved_state_loads_back(tiny_state, tmp_path):
    path = save_state(tiny_state, tmp_path)
    assert path.stat().st_mode & 0o077 == 0
    back = load_state(tmp_path)
    assert back.graph.fingerprint() == tiny_state.graph.fingerprint()
    assert back.weight_encodings.keys() == tiny_state.weight_encodings.keys()
    for name, q in tiny_state.integer_kernels().items():
        np.testing.assert_array_equal(back.integer_kernels()[name], q)


def test_a_planted_state_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_FILE).write_bytes(pickle.dumps({"format": "tinyptq-state", "graph": _Plant(marker)}))
    with pytest.raises(SignatureMismatch) as err:
        load_state(run)
    assert str(err.value) == _mismatch(run)
    assert main(["export", str(run), "--format", "encodings"]) == 2
    assert capsys.readouterr().err == f"error: {_mismatch(run)}\n"
    assert not marker.exists()


def test_a_state_of_another_user_or_damaged_is_refused(tiny_state, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    save_state(tiny_state, mine)
    blob = (mine / STATE_FILE).read_bytes()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / STATE_FILE).write_bytes(blob[: len(blob) // 2])
    theirs = tmp_path / "theirs"
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(tmp_path / "other-user-cache"))  # another key
    save_state(tiny_state, theirs)
    monkeypatch.undo()
    for run in (truncated, theirs):
        with pytest.raises(SignatureMismatch, match="signature mismatch"):
            load_state(run)
    other_purpose = tmp_path / "other"
    other_purpose.mkdir()
    dump_signed({"format": "tinyptq-state"}, other_purpose / STATE_FILE, "tinyptq-cache/prefix/x")
    with pytest.raises(SignatureMismatch):
        load_state(other_purpose)
    dump_signed({"format": "tinyptq-state"}, other_purpose / STATE_FILE, CONTEXT)
    with pytest.raises(Exception, match="is incomplete"):  # signed, so read, then checked
        load_state(other_purpose)
