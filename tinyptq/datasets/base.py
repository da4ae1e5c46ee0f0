"""Common shapes of what dataset loaders return."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyptq.errors import DataError


@dataclass
class LabeledFiles:
    """One split of a file-based dataset: file paths, integer labels, class names."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: np.ndarray) -> LabeledFiles:
        """The files at ``index`` (an integer array), same class names."""
        return LabeledFiles([self.paths[i] for i in index], self.labels[index], self.class_names)


@dataclass
class ArraySplit:
    """One split held in memory: inputs ``x`` (N, ...) and labels ``y`` (N,) or None."""

    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x)


def check_finite(x: np.ndarray, what: str) -> np.ndarray:
    """Raise DataError naming ``what`` when ``x`` has NaN or Inf values."""
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise DataError(f"{what} contains {bad} NaN/Inf values")
    return x
