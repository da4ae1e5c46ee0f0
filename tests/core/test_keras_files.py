"""Keras files are read as data first: Lambda / custom layers and foreign modules are refused unrun."""

from __future__ import annotations

import json
import zipfile

import pytest

from tests.core import memory_usecase as mem
from tinyptq._tf import keras, tf
from tinyptq.errors import ModelError
from tinyptq.graph.keras_files import check_model_file, declared_model
from tinyptq.graph.loading import load_graph


def _lambda_model(marker):
    def evil(x, marker=str(marker)):
        import pathlib

        pathlib.Path(marker).write_text("code from the model file ran")
        return x

    inp = keras.Input(mem.SHAPE, name="img")
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.Lambda(evil, name="planted")(x)
    return keras.Model(inp, keras.layers.Dense(4, name="fc")(keras.layers.Flatten(name="f")(x)))


class Unregistered(keras.layers.Layer):
    """A custom layer nobody registered with Keras."""

    def call(self, x):
        return x * 2.0


def _custom_model():
    inp = keras.Input(mem.SHAPE, name="img")
    x = Unregistered(name="mine")(keras.layers.Conv2D(4, 3, name="c1")(inp))
    return keras.Model(inp, keras.layers.Dense(4, name="fc")(keras.layers.Flatten(name="f")(x)))


@pytest.fixture(scope="module")
def lambda_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lambda")
    marker = root / "ran.txt"
    model = _lambda_model(marker)
    files = [mem.save(model, root / "m.h5"), mem.save(model, root / "m.keras"), mem.save(model, root / "m_savedmodel")]
    marker.unlink()  # building and saving the model ran it; loading must not
    return files, marker


def test_lambda_layers_are_refused_before_keras_runs_them(lambda_files):
    files, marker = lambda_files
    for path in files:
        with pytest.raises(ModelError) as info:
            load_graph(path)
        message = str(info.value)
        assert "unsupported layer 'planted' (Lambda)" in message and str(path) in message
        assert "a Lambda layer runs Python code stored in the file" in message and "\n" not in message
        assert not marker.exists(), f"loading {path.name} ran the Lambda"


def test_custom_layers_are_refused_naming_the_layer(tmp_path):
    model = _custom_model()
    for path in (mem.save(model, tmp_path / "c.h5"), mem.save(model, tmp_path / "c_savedmodel")):
        with pytest.raises(ModelError, match=r"unsupported layer 'mine' \(Unregistered\) .*a custom layer runs code"):
            load_graph(path)


def test_a_module_named_in_a_keras_config_is_not_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "planted_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    clean = mem.save(mem.plain_model(), tmp_path / "clean.keras")
    with zipfile.ZipFile(clean) as z:
        parts = {name: z.read(name) for name in z.namelist()}
    config = json.loads(parts["config.json"])
    # tf_keras imports the model's module when it does not find the class registered
    config.update(module="planted_mod", registered_name="Planted")
    parts["config.json"] = json.dumps(config).encode()
    planted = tmp_path / "planted.keras"
    with zipfile.ZipFile(planted, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)
    with pytest.raises(ModelError, match="names the Python module 'planted_mod'; not loaded"):
        load_graph(planted)
    assert not marker.exists()
    assert load_graph(clean).quant_layers()  # the untouched file loads


def test_a_savedmodel_without_keras_metadata_is_refused(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "plain_tf"))
    with pytest.raises(ModelError, match="a SavedModel without Keras metadata"):
        load_graph(tmp_path / "plain_tf")


def test_weights_only_and_damaged_files(tmp_path):
    model = mem.plain_model()
    weights = tmp_path / "w.h5"
    model.save_weights(weights)
    with pytest.raises(ModelError, match=r"cannot load model .*w.h5: the file holds no model config"):
        load_graph(weights)
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match="cannot load model .*broken.keras"):
        load_graph(broken)


def test_the_mlperf_models_declare_only_supported_layers(mlperf_dir):
    for name in ("ic_resnet8.h5", "vww_mobilenetv1_96.h5", "ad_autoencoder.h5", "kws_dscnn_savedmodel"):
        declared = check_model_file(mlperf_dir / name)
        assert declared.model_class == "Functional" and declared.layers, name
    # the SavedModel's metadata lists every layer (this one has no keras_metadata.pb)
    assert ("dense", "Dense") in declared_model(mlperf_dir / "kws_dscnn_savedmodel").layers
