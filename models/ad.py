"""Anomaly-detection use case ``ad``: the MLPerf Tiny fully connected autoencoder.

Input vectors are 5 stacked 128-band log-mel frames (640 values) from the DCASE 2020
Task 2 front end (:func:`tinyptq.frontends.ad_logmel_clips`: n_fft 1024, hop 512,
power 2, dB).

* With ToyADMOS ToyCar in the data directory: the anomaly score of a clip is the
  mean squared reconstruction error over its vectors; the metric is the ROC AUC of
  those scores against the normal/anomaly labels of the test split, averaged over
  machine ids (as DCASE and MLPerf Tiny report it). Clips are read at their own
  rate (16 kHz) and, as in MLPerf Tiny, keep spectrogram frames 50-250 only.
  Calibration vectors come from seeded training clips (all normal).
* Without it, the model is measured label-free on FSDD speech: each clip goes
  through the same front end **at its native 8 kHz** (not resampled to 16 kHz: the
  empty 4-8 kHz half of an upsampled clip gives log-mel bands near -150 dB, far
  outside anything the autoencoder has seen and wide enough to distort activation
  ranges). Clips shorter than 5 frames (< 0.256 s) give no vector and are left out,
  as upstream. Evaluation uses the FSDD official test split, calibration the
  training split. The headline metric is the SQNR (dB) of the quantized
  reconstruction against the FP32 reconstruction; the Spearman rank correlation
  of per-clip reconstruction errors (FP32 vs quantized) is carried in the metric's
  name. For FP32 against itself (``tinyptq eval``) the SQNR would be infinite, so
  the FP32 metric is instead the mean squared reconstruction error per vector
  (dB^2) of the FP32 model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyptq import datadir
from tinyptq.cache import cached_arrays, content_hash, file_key
from tinyptq.datasets.base import LabeledFiles
from tinyptq.datasets.fsdd import load_fsdd
from tinyptq.datasets.toyadmos import load_toyadmos, machine_ids
from tinyptq.errors import DataError
from tinyptq.frontends import AD_FRAMES, AD_N_MELS, MLPERF_AD_FRAME_RANGE, ad_logmel_clips, read_wav
from tinyptq.metrics import MetricResult, check_reconstruction, rank_correlation, roc_auc, sqnr_db
from tinyptq.models.usecases import EvalSet, UseCase, register_use_case, seeded_index, seeded_sample

#: Bump when the feature recipe changes so old caches are not reused.
RECIPE = "ad-logmel-v1"
_CHUNK = 64


# ====================================================================================
# Cached log-mel vectors
# ====================================================================================


def _spectrograms(paths: Sequence[Path], frame_range: tuple[int, int] | None) -> list[np.ndarray]:
    """Per clip, the (T, 128) log-mel frames the AD vectors are stacked from (T may be 0)."""
    out: list[np.ndarray] = []
    for start in range(0, len(paths), _CHUNK):
        audio = [read_wav(p) for p in paths[start : start + _CHUNK]]
        specs: list[np.ndarray] = [np.empty((0, AD_N_MELS), np.float32)] * len(audio)
        for sr in sorted({s for _, s in audio}):
            idx = [i for i, (_, s) in enumerate(audio) if s == sr]
            vecs = ad_logmel_clips([audio[i][0] for i in idx], sr, frame_range=frame_range)
            for i, v in zip(idx, vecs, strict=True):
                specs[i] = _unstack(v)
        out.extend(specs)
    return out


def _unstack(vectors: np.ndarray) -> np.ndarray:
    """(V, 5 * 128) stacked vectors -> the (V + 4, 128) frames they came from ((0, 128) if V = 0)."""
    if len(vectors) == 0:
        return np.empty((0, AD_N_MELS), np.float32)
    tail = vectors[-1, AD_N_MELS:].reshape(AD_FRAMES - 1, AD_N_MELS)
    return np.concatenate([vectors[:, :AD_N_MELS], tail]).astype(np.float32)


def _stack(frames: np.ndarray) -> np.ndarray:
    """(T, 128) frames -> (T - 4, 640) vectors, frame-major (the front end's layout)."""
    if len(frames) < AD_FRAMES:
        return np.empty((0, AD_FRAMES * AD_N_MELS), np.float32)
    win = np.lib.stride_tricks.sliding_window_view(frames, AD_FRAMES, axis=0)
    return np.ascontiguousarray(win.transpose(0, 2, 1)).reshape(-1, AD_FRAMES * AD_N_MELS)


def logmel_vectors(
    paths: Sequence[Path], frame_range: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """AD input vectors (V, 640) of the clips and each vector's clip index (V,), cached.

    The cache holds each clip's log-mel frames (5x smaller than the stacked vectors).
    """
    key = content_hash(file_key(paths), frame_range, RECIPE)

    def compute() -> dict[str, np.ndarray]:
        """Each clip's log-mel frames, concatenated, and their counts."""
        specs = _spectrograms(paths, frame_range)
        lengths = np.array([len(s) for s in specs], np.int64)
        frames = np.concatenate(specs) if specs else np.empty((0, AD_N_MELS), np.float32)
        return {"frames": frames, "lengths": lengths}

    cached = cached_arrays("ad_logmel", key, compute)
    bounds = np.concatenate([[0], np.cumsum(cached["lengths"])])
    vectors, clips = [], []
    for i in range(len(cached["lengths"])):
        v = _stack(cached["frames"][bounds[i] : bounds[i + 1]])
        vectors.append(v)
        clips.append(np.full(len(v), i, np.int64))
    if not vectors or not sum(len(v) for v in vectors):
        raise DataError(
            f"no clip among {len(paths)} is long enough for one {AD_FRAMES}-frame vector"
        )
    return np.concatenate(vectors), np.concatenate(clips)


def clip_errors(x: np.ndarray, reconstruction: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Per clip (in order of clip index), the mean squared reconstruction error of its vectors."""
    per_vector = np.mean((np.asarray(x, np.float64) - reconstruction) ** 2, axis=1)
    _, inverse = np.unique(clip, return_inverse=True)
    return np.bincount(inverse, weights=per_vector) / np.bincount(inverse)


def mean_machine_auc(labels: np.ndarray, scores: np.ndarray, machine: np.ndarray) -> float:
    """ROC AUC per machine id (ids having both normal and anomalous clips), averaged."""
    aucs = [
        roc_auc(labels[machine == m], scores[machine == m])
        for m in np.unique(machine)
        if len(np.unique(labels[machine == m])) == 2
    ]
    if not aucs:
        raise DataError(
            "the ToyADMOS test split needs normal and anomalous clips of one machine id"
        )
    return float(np.mean(aucs))


# ====================================================================================
# Use case
# ====================================================================================


@register_use_case
class AnomalyDetection(UseCase):
    """MLPerf Tiny FC autoencoder: ToyADMOS ROC AUC, else label-free SQNR on FSDD log-mels."""

    name = "ad"
    description = "anomaly detection: MLPerf Tiny FC autoencoder (ToyADMOS, else FSDD label-free)"
    model_asset = "ad_autoencoder"
    calibration_size = 256

    def _toyadmos(self) -> dict[str, LabeledFiles] | None:
        """ToyADMOS ToyCar train/test file lists when present (never downloads), else None."""
        root = datadir.locate("toyadmos", self.data_dir)
        return None if root is None else load_toyadmos(root)

    def _fsdd_vectors(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Log-mel vectors (native 8 kHz) of an FSDD official split and their clip indices."""
        files = load_fsdd(datadir.require("fsdd", self.data_dir))[split]
        return logmel_vectors(files.paths)

    def calibration_data(self, n: int, seed: int) -> np.ndarray:
        """``n`` seeded vectors from training clips (ToyADMOS normal clips, else FSDD train)."""
        splits = self._toyadmos()
        if splits is None:
            return seeded_sample(
                self._fsdd_vectors("train")[0], n, seed, "FSDD calibration vectors"
            )
        train = splits["train"]
        index = seeded_index(len(train), n, seed)
        x, _ = logmel_vectors([train.paths[i] for i in index], MLPERF_AD_FRAME_RANGE)
        return seeded_sample(x, n, seed, "ToyADMOS calibration vectors")

    def eval_set(self) -> EvalSet:
        """ToyADMOS test vectors labelled by clip, else FSDD test vectors (label-free)."""
        splits = self._toyadmos()
        if splits is None:
            x, clip = self._fsdd_vectors("test")
            source = "FSDD official test split, 8 kHz log-mel vectors (label-free)"
            return EvalSet(x, None, source, {"clip": clip})
        test = splits["test"]
        x, clip = logmel_vectors(test.paths, MLPERF_AD_FRAME_RANGE)
        extra = {"clip": clip, "machine_id": machine_ids(test)[clip]}
        return EvalSet(x, test.labels[clip], "ToyADMOS ToyCar test split", extra)

    def metric(self, data: EvalSet, scores: np.ndarray, reference: np.ndarray) -> MetricResult:
        """ROC AUC with clip labels; else SQNR vs FP32 (FP32 alone: its reconstruction MSE)."""
        clip = data.extra["clip"]
        check_reconstruction(data.x, scores, "the anomaly score (reconstruction error)")
        if data.y is not None:
            _, first = np.unique(clip, return_index=True)
            errors = clip_errors(data.x, scores, clip)
            auc = mean_machine_auc(data.y[first], errors, data.extra["machine_id"][first])
            return MetricResult("ROC AUC (mean over machine ids)", auc, len(first), unit="")
        if scores is reference:
            mse = float(np.mean((np.asarray(data.x, np.float64) - scores) ** 2))
            return MetricResult("FP32 mean squared reconstruction error", mse, len(data.x), "dB^2")
        rho = rank_correlation(
            clip_errors(data.x, reference, clip), clip_errors(data.x, scores, clip)
        )
        return MetricResult(
            "reconstruction SQNR vs FP32",
            sqnr_db(reference, scores),
            len(data.x),
            "dB",
            extras={"per-clip error rank correlation": rho},
        )
