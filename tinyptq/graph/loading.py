"""Loading model files into a ModelGraph, with one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyptq.errors import ModelError
from tinyptq.graph.base import ModelGraph

KERAS_SUFFIXES = {".h5", ".hdf5", ".keras"}


def load_keras_model(path: str | Path) -> Any:
    """A tf_keras model from .h5 / .keras / SavedModel; ModelError when missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    is_savedmodel = path.is_dir() and (path / "saved_model.pb").is_file()
    if not (is_savedmodel or path.suffix.lower() in KERAS_SUFFIXES):
        raise ModelError(f"unsupported model format: {path} (use .h5, .keras or a SavedModel folder)")
    from tinyptq._tf import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # h5py, protobuf and Keras raise many unrelated types
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {path}: {reason}") from None


def load_graph(model: str | Path | Any) -> ModelGraph:
    """A ModelGraph from a path or an in-memory tf_keras model."""
    from tinyptq.graph.keras_graph import KerasGraph

    if isinstance(model, (str, Path)):
        model = load_keras_model(model)
    return KerasGraph.from_keras(model)
