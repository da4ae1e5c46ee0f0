"""Use cases: a model, its data, its front end, its metric and its calibration set.

Each use case is registered by name (``ic``, ``kws``, ...). Calibration samples
always come from the training side of a split, drawn with a seed; evaluation
uses the held-out side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tinyptq import datadir
from tinyptq.datasets.base import check_finite
from tinyptq.errors import ConfigError
from tinyptq.graph.base import ModelGraph
from tinyptq.graph.loading import load_graph
from tinyptq.metrics import MetricResult, accuracy, sqnr_db, top1_agreement

_USE_CASES: dict[str, type[UseCase]] = {}
# modules of tinyptq.models that register further use cases when imported
_USE_CASE_MODULES = ("kws", "vww", "ad")


@dataclass
class EvalSet:
    """Evaluation inputs with labels (None when the metric is label-free)."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


class UseCase(ABC):
    """A tinyML task: model + dataset + front end + metric + calibration set."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    model_asset: ClassVar[str] = ""
    calibration_size: ClassVar[int] = 256

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = datadir.resolve_data_dir(data_dir)

    def model_path(self) -> Path:
        """The use case's default model file (fetched into the data directory if missing)."""
        return datadir.require(self.model_asset, self.data_dir)

    def load_graph(self, model: str | Path | None = None) -> ModelGraph:
        """The model (default or given) as a ModelGraph."""
        return load_graph(model or self.model_path())

    @abstractmethod
    def calibration_data(self, n: int, seed: int) -> np.ndarray:
        """``n`` seeded samples from the training side, model-ready."""

    @abstractmethod
    def eval_set(self) -> EvalSet:
        """The evaluation inputs (and labels when available)."""

    def metric(self, data: EvalSet, scores: np.ndarray, reference: np.ndarray) -> MetricResult:
        """Accuracy with labels, else top-1 agreement with the FP32 ``reference`` scores."""
        if data.y is not None:
            return MetricResult("accuracy", accuracy(data.y, scores), len(data.x))
        # agreement alone says little when FP32 is confident on out-of-domain data:
        # the output SQNR shows how far the scores moved
        extras = {} if scores is reference else {"output SQNR vs FP32 (dB)": sqnr_db(reference, scores)}
        return MetricResult(
            "top-1 agreement with FP32", top1_agreement(reference, scores), len(data.x), extras=extras
        )


def register_use_case(cls: type[UseCase]) -> type[UseCase]:
    """Class decorator: make a use case available by name."""
    _USE_CASES[cls.name] = cls
    return cls


def _load_all() -> None:
    import importlib

    for mod in _USE_CASE_MODULES:
        try:
            importlib.import_module(f"tinyptq.models.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tinyptq.models.{mod}":
                raise


def use_case_names() -> list[str]:
    """Registered use-case names."""
    _load_all()
    return sorted(_USE_CASES)


def get_use_case(name: str, data_dir: str | Path | None = None) -> UseCase:
    """The use case called ``name``, bound to a data directory."""
    _load_all()
    try:
        cls = _USE_CASES[name]
    except KeyError:
        raise ConfigError(f"unknown use case '{name}'; valid: {', '.join(use_case_names())}") from None
    return cls(data_dir)


def seeded_index(total: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(n, total)`` items drawn without replacement with ``seed``."""
    if n <= 0:
        raise ConfigError(f"calibration samples must be positive, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n, total), replace=False))


def seeded_sample(x: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """``n`` rows of ``x`` drawn without replacement with ``seed``; checked finite."""
    index = seeded_index(len(x), n, seed)
    return check_finite(np.asarray(x[index], np.float32), what)


@register_use_case
class ImageClassification(UseCase):
    """MLPerf Tiny ResNet-8 on CIFAR-10 (raw 0-255 pixels, NHWC)."""

    name = "ic"
    description = "image classification: MLPerf Tiny ResNet-8 on CIFAR-10"
    model_asset = "ic_resnet8"
    calibration_size = 256

    def _cifar(self, train: bool, test: bool):
        from tinyptq.datasets.cifar10 import load_cifar10

        return load_cifar10(datadir.require("cifar10", self.data_dir), train=train, test=test)

    def calibration_data(self, n: int, seed: int) -> np.ndarray:
        return seeded_sample(self._cifar(True, False)["train"].x, n, seed, "CIFAR-10 calibration images")

    def eval_set(self) -> EvalSet:
        test = self._cifar(False, True)["test"]
        return EvalSet(test.x.astype(np.float32), test.y, "CIFAR-10 test_batch")
