"""Loading model files into a ModelGraph, with one-line errors for bad files.

A Keras file's layer classes are checked as data before Keras deserializes it
(see keras_files: Lambda and custom layers would run code while loading);
every model's weights are checked for NaN/Inf when it is read, and an ONNX
model is run once in onnxruntime, so that a broken model is blamed as such
and not, later, on the calibration data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
    from tinyptq.graph.keras_files import check_model_file

    check_model_file(path)  # before Keras builds (runs) anything from the file
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
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
    """A ModelGraph from a path (.h5 / .keras / SavedModel / .onnx), a tf_keras model or an onnx.ModelProto.

    ModelError when the weights hold NaN/Inf, or an ONNX model fails in onnxruntime.
    """
    if isinstance(model, (str, Path)):
        label = str(model)
        if Path(model).suffix.lower() == ONNX_SUFFIX:
            return _onnx_graph(load_onnx_model(model), label, Path(model).stem)
        model = load_keras_model(model)
    elif type(model).__name__ == "ModelProto":
        return _onnx_graph(model, f"'{model.graph.name or 'model'}'", None)
    else:
        label = f"'{getattr(model, 'name', 'model')}'"
    from tinyptq.graph.keras_graph import KerasGraph

    check_keras_weights(model, label)
    return KerasGraph.from_keras(model)


def _onnx_graph(model: Any, label: str, name: str | None) -> ModelGraph:
    from tinyptq.graph.onnx_graph import OnnxGraph

    check_onnx_weights(model, label)
    graph = OnnxGraph.from_onnx(model, name=name)
    check_onnx_runs(graph, label)
    return graph


def _nan_error(label: str, where: str) -> ModelError:
    return ModelError(f"model {label} has NaN/Inf in the weights of {where}")


def check_keras_weights(model: Any, label: str) -> None:
    """ModelError naming the first layer of a tf_keras model with a NaN/Inf weight."""
    for layer in getattr(model, "layers", []):
        for weight in layer.get_weights():
            w = np.asarray(weight)
            if w.dtype.kind in "fc" and not np.all(np.isfinite(w)):
                raise _nan_error(label, f"layer '{layer.name}'")


def check_onnx_weights(model: Any, label: str) -> None:
    """ModelError naming the node that reads the first NaN/Inf float initializer of an ONNX model."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        try:
            w = numpy_helper.to_array(init)
        except Exception:  # noqa: S112  (undecodable tensors are onnxruntime's to reject)
            continue
        if w.dtype.kind in "fc" and not np.all(np.isfinite(w)):
            reader = next((n for n in model.graph.node if init.name in n.input), None)
            where = f"node '{reader.name or reader.output[0]}' ({init.name})" if reader else f"'{init.name}'"
            raise _nan_error(label, where)


def check_onnx_runs(graph: ModelGraph, label: str) -> None:
    """Run one all-zero sample through onnxruntime: a model that passes onnx.checker can still fail there.

    Skipped when the input has free dimensions besides the batch (no sample
    shape is known to be valid); such a model still fails in one line later.
    """
    dims = graph.input_shape[1:]
    if any(d is None for d in dims):
        return
    try:
        graph.predict(np.zeros((1, *dims), np.float32))
    except ModelError as exc:
        reason = str(exc).removeprefix("onnxruntime cannot run the model: ")
        raise ModelError(f"model {label} fails in onnxruntime: {reason}") from None
