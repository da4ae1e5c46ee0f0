"""A tiny in-memory use case for runner tests (runs in-process: workers=1)."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.models.usecases import EvalSet, UseCase, register_use_case


class _Tiny(UseCase):
    """The tiny residual model of the graph tests; labels are its own FP32 predictions."""

    name = "tiny-test"
    nan_calibration = False

    def __init__(self, data_dir=None) -> None:
        self.data_dir = data_dir

    def model_path(self):
        from pathlib import Path

        return Path("<in-memory tiny model>")

    def load_graph(self, model=None):
        from tests.core.test_graph import tiny_resnet
        from tinyptq.graph.keras_graph import KerasGraph

        return KerasGraph.from_keras(tiny_resnet())

    def calibration_data(self, n: int, seed: int) -> np.ndarray:
        from tinyptq.datasets.base import check_finite

        x = np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)
        if self.nan_calibration:
            x[0, 0, 0, 0] = np.nan
        return check_finite(x, f"{self.name} calibration data")

    def metric(self, data, scores, reference):
        """Accuracy, with the output SQNR (the random tiny model's top-1 barely moves)."""
        from dataclasses import replace

        from tinyptq.metrics import sqnr_db

        result = super().metric(data, scores, reference)
        if scores is reference:
            return result
        return replace(result, extras={"output SQNR vs FP32 (dB)": sqnr_db(reference, scores)})

    def eval_set(self) -> EvalSet:
        x = np.random.default_rng(99).normal(size=(64, 8, 8, 3)).astype(np.float32)
        return EvalSet(x, np.argmax(self.load_graph().predict(x), axis=-1), "random inputs")


@register_use_case
class TinyUseCase(_Tiny):
    name = "tiny-test"


@register_use_case
class TinyNanUseCase(_Tiny):
    name = "tiny-nan"
    nan_calibration = True


def grid_dict(use_case: str = "tiny-test", granularity: str = "per_tensor", samples: int = 16) -> dict:
    """A 2 bit settings x cle on/off x weights minmax/mse grid (8 runs)."""
    return {
        "name": "tiny" if use_case == "tiny-test" else f"{use_case}-small",
        "use_cases": [use_case],
        "bits": ["W8A8", "W4A8"],
        "granularity": [granularity],
        "pipeline": {
            "stages": [
                "bn_folding",
                "cle",
                {"range_setting": {"weights": "minmax", "activations": "minmax"}},
            ]
        },
        "toggles": {"cle": ["off", "on"], "range_setting.weights": ["minmax", "mse"]},
        "calibration": {"samples": [samples]},
        "seeds": [0],
    }


@pytest.fixture
def tiny_grid() -> dict:
    """The 8-run grid on the tiny use case."""
    return grid_dict()
