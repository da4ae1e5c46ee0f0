"""Loading model files into a ModelGraph, with one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyptq.errors import ModelError, first_line
from tinyptq.graph.base import ModelGraph

KERAS_SUFFIXES = {".h5", ".hdf5", ".keras"}
ONNX_SUFFIX = ".onnx"


def load_keras_model(path: str | Path) -> Any:
    """A tf_keras model from .h5 / .keras / SavedModel; ModelError when missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    is_savedmodel = path.is_dir() and (path / "saved_model.pb").is_file()
    if not (is_savedmodel or path.suffix.lower() in KERAS_SUFFIXES):
        raise ModelError(f"unsupported model format: {path} (use .h5, .keras, .onnx or a SavedModel folder)")
    from tinyptq._tf import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # h5py, protobuf and Keras raise many unrelated types
        raise ModelError(f"cannot load model {path}: {first_line(exc, 160)}") from None


def load_onnx_model(path: str | Path) -> Any:
    """An onnx.ModelProto from a .onnx file, checked; ModelError when missing, corrupt or invalid."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, OSError, external-data errors
        raise ModelError(f"cannot load model {path}: {first_line(exc, 160)}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise ModelError(f"invalid ONNX model {path}: {first_line(exc, 160)}") from None
    return model


def load_graph(model: str | Path | Any) -> ModelGraph:
    """A ModelGraph from a path (.h5 / .keras / SavedModel / .onnx), a tf_keras model or an onnx.ModelProto."""
    if isinstance(model, (str, Path)) and Path(model).suffix.lower() == ONNX_SUFFIX:
        from tinyptq.graph.onnx_graph import OnnxGraph

        return OnnxGraph.from_onnx(load_onnx_model(model), name=Path(model).stem)
    if type(model).__name__ == "ModelProto":
        from tinyptq.graph.onnx_graph import OnnxGraph

        return OnnxGraph.from_onnx(model)
    from tinyptq.graph.keras_graph import KerasGraph

    if isinstance(model, (str, Path)):
        model = load_keras_model(model)
    return KerasGraph.from_keras(model)
