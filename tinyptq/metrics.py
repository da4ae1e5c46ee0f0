"""Metrics of use cases and models: accuracy, AUC, agreement, SQNR, rank correlation (costs: tinyptq.cost)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from tinyptq.errors import ModelError


@dataclass(frozen=True)
class MetricResult:
    """A metric value with its name, unit and the number of samples it was computed on."""

    name: str
    value: float
    samples: int
    unit: str = "%"
    extras: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.unit == "%":
            text = f"{self.name} {self.value:.2f} % on {self.samples} samples"
        else:
            text = f"{self.name} {self.value:.4f}{(' ' + self.unit) if self.unit else ''} on {self.samples} samples"
        extra = ", ".join(f"{k} {v:.4f}" for k, v in self.extras.items())
        return f"{text} ({extra})" if extra else text

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)


def check_class_scores(
    scores: np.ndarray, samples: int, metric: str, labels: np.ndarray | None = None
) -> np.ndarray:
    """``scores`` when they are class scores (samples, C >= 2) covering every label; else ModelError.

    A model whose output is anything else (a feature map, one sigmoid, fewer
    classes than the labels name) would give a number, just a meaningless one.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != samples or scores.shape[1] < 2:
        raise ModelError(
            f"the model's output has shape {scores.shape}; {metric} needs class scores "
            f"of shape ({samples}, classes), one row per sample"
        )
    if labels is not None and len(labels) and int(np.max(labels)) >= scores.shape[1]:
        raise ModelError(
            f"the model gives {scores.shape[1]} class scores per sample but the labels go up to "
            f"{int(np.max(labels))}; {metric} needs a score for every class"
        )
    return scores


def check_reconstruction(x: np.ndarray, scores: np.ndarray, metric: str) -> np.ndarray:
    """``scores`` when they have the shape of the inputs ``x`` they reconstruct; else ModelError."""
    scores = np.asarray(scores)
    if scores.shape != np.shape(x):
        raise ModelError(
            f"the model's output has shape {scores.shape}; {metric} needs a reconstruction "
            f"of its input, shape {np.shape(x)}"
        )
    return scores


def accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Top-1 accuracy in percent of class scores (N, C) against integer labels."""
    labels = np.asarray(labels)
    scores = check_class_scores(scores, len(labels), "accuracy", labels)
    return float(np.mean(np.argmax(scores, axis=-1) == labels) * 100.0)


def top1_agreement(reference: np.ndarray, scores: np.ndarray) -> float:
    """Percent of samples whose top-1 class equals the reference model's."""
    reference = check_class_scores(reference, len(reference), "top-1 agreement")
    scores = check_class_scores(scores, len(reference), "top-1 agreement")
    return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(scores, axis=-1)) * 100.0)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn), in [0, 1]."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB."""
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum((reference - np.asarray(test, np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)
