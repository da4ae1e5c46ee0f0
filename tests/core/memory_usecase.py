"""A use case held in memory (8x8x3 inputs, 4 classes) and tiny models for reliability tests.

``--use-case mem-reliability`` runs in-process in a second, with ``--model``
pointing at a file a test wrote, or the built-in conv-BN-ReLU model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyptq._tf import keras
from tinyptq.graph.loading import load_graph
from tinyptq.models.usecases import EvalSet, UseCase, register_use_case

SHAPE = (8, 8, 3)
CLASSES = 4
NAME = "mem-reliability"


def bn_model(seed: int = 0):
    """conv -> BN -> ReLU -> conv -> ReLU -> GAP -> dense (4 classes)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="r1")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="fc")(x))


def plain_model(seed: int = 0):
    """The same without the batch norm: CLE has a pair to equalize without bn_folding."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="fc")(x))


def feature_map_model():
    """Outputs (N, 6, 6, 4): not class scores."""
    inp = keras.Input(SHAPE, name="img")
    return keras.Model(inp, keras.layers.Conv2D(4, 3, name="c1")(inp))


def save(model, path: Path) -> Path:
    """Save ``model`` to ``path`` (format from the suffix; a folder is a SavedModel)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-HDF5 notice
        model.save(path)
    return path


@register_use_case
class MemoryUseCase(UseCase):
    """Random inputs, labels 0..3; the model from --model or ``bn_model``."""

    name = NAME
    description = "in-memory use case of the reliability tests"

    def __init__(self, data_dir=None) -> None:
        self.data_dir = data_dir

    def model_path(self) -> Path:
        return Path("<in-memory bn_model>")

    def load_graph(self, model=None):
        return load_graph(model if model is not None else bn_model())

    def calibration_data(self, n: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)

    def eval_set(self) -> EvalSet:
        rng = np.random.default_rng(99)
        x = rng.normal(size=(32, *SHAPE)).astype(np.float32)
        return EvalSet(x, np.arange(32) % CLASSES, "random inputs")
