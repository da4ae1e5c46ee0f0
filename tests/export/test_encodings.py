"""encodings.json: every grid written out and read back unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinyptq import __version__
from tinyptq.errors import ConfigError
from tinyptq.export.encodings import FORMAT, load_encodings, write_encodings


def _same(a, b):
    return (
        a.bits == b.bits and a.signed == b.signed and a.symmetric == b.symmetric
        and a.narrow_range == b.narrow_range and a.axis == b.axis
        and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)
        and a.scale.dtype == b.scale.dtype
    )


@pytest.mark.parametrize(("wb", "ab", "per_channel"), [(8, 8, True), (3, 4, False)])
def test_round_trip(ic_state, tmp_path, wb, ab, per_channel):
    state = ic_state(wb, ab, per_channel)
    view = state.graph.to_onnx()
    path = write_encodings(state, tmp_path / "encodings.json", view)
    loaded = load_encodings(path)
    assert loaded.tinyptq_version == __version__ and loaded.quant_config == state.config
    assert set(loaded.weights) == set(state.weight_encodings)
    assert set(loaded.activations) == set(state.act_encodings)
    assert all(_same(loaded.weights[k], e) for k, e in state.weight_encodings.items())
    assert all(_same(loaded.activations[k], e) for k, e in state.act_encodings.items())
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT
    conv = data["weights"]["conv2d"]
    assert conv["dtype"] == f"int{wb}" and conv["kind"] == "conv"
    assert conv["onnx"] == {"initializer": "conv2d/kernel", "axis": 0 if per_channel else None}
    act = data["activations"]["activation"]
    assert act["dtype"] == f"uint{ab}" and act["onnx_tensor"] == "activation"
    assert act["qmax"] == 2**ab - 1 and act["min"] == pytest.approx(-act["zero_point"] * act["scale"])


def test_bad_files_raise_config_errors(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read encodings file"):
        load_encodings(bad)
    bad.write_text(json.dumps({"weights": {}}))
    with pytest.raises(ConfigError, match="not a tinyptq encodings file"):
        load_encodings(bad)
    bad.write_text(json.dumps({"format": FORMAT, "format_version": 1, "weights": {"a": {"bits": 8}}}))
    with pytest.raises(ConfigError, match="malformed"):
        load_encodings(bad)
