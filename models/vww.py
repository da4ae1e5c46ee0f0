"""Visual wake words use case ``vww``: the MLPerf Tiny MobileNetV1 (0.25x, 96x96).

With the Visual Wake Words images (``vww/person``, ``vww/non_person``) in the data
directory: top-1 accuracy on the validation split of
:func:`tinyptq.datasets.vww.load_vww` (10 % of each class, seed 0), calibration from
its training split. Images are RGB, bilinear-resized to 96x96 and scaled to [0, 1].

Without them it is measured label-free: top-1 agreement with the FP32 model on the
CIFAR-10 ``test_batch`` (466 images in the shared subset) resized to 96x96 with
``tf.image.resize`` (bilinear) and scaled to [0, 1]; calibration images come from
the CIFAR-10 training batches, never from ``test_batch``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tinyptq import datadir
from tinyptq._tf import tf
from tinyptq.cache import cached_arrays, content_hash, file_key
from tinyptq.datasets.base import ArraySplit, LabeledFiles, check_finite
from tinyptq.datasets.cifar10 import load_cifar10
from tinyptq.datasets.vww import load_images, load_vww
from tinyptq.models.usecases import EvalSet, UseCase, register_use_case, seeded_index, seeded_sample

IMAGE_SIZE = (96, 96)
#: Bump when the image recipe changes so old caches are not reused.
RECIPE = "vww-images-v1"
VAL_FRACTION = 0.1
SPLIT_SEED = 0


def cifar_to_vww(images: np.ndarray) -> np.ndarray:
    """CIFAR-10 uint8 NHWC images -> float32 (N, 96, 96, 3) in [0, 1] (bilinear resize)."""
    x = np.asarray(images, np.float32) / 255.0
    out = [
        tf.image.resize(x[i : i + 256], IMAGE_SIZE, method="bilinear").numpy()
        for i in range(0, len(x), 256)
    ]
    resized = np.concatenate(out) if out else np.empty((0, *IMAGE_SIZE, 3), np.float32)
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


def vww_images(paths: list[Path]) -> np.ndarray:
    """VWW images as float32 (N, 96, 96, 3) in [0, 1], cached as uint8 (exact: pixels are k/255)."""
    key = content_hash(file_key(paths), RECIPE)

    def compute() -> dict[str, np.ndarray]:
        """The images as uint8."""
        x = load_images(paths, IMAGE_SIZE)
        return {"x": np.round(x * 255.0).astype(np.uint8)}

    return cached_arrays("vww_images", key, compute)["x"].astype(np.float32) / np.float32(255.0)


@register_use_case
class VisualWakeWords(UseCase):
    """MLPerf Tiny MobileNetV1: VWW accuracy, else label-free agreement on resized CIFAR-10."""

    name = "vww"
    description = "visual wake words: MLPerf Tiny MobileNetV1 (VWW, else CIFAR-10 label-free)"
    model_asset = "vww_mobilenetv1"
    calibration_size = 256

    def _vww_splits(self) -> dict[str, LabeledFiles] | None:
        """VWW train/validation file lists when the images are present, else None."""
        root = datadir.locate("vww", self.data_dir)
        return None if root is None else load_vww(root, VAL_FRACTION, SPLIT_SEED)

    def _cifar(self, train: bool) -> ArraySplit:
        """The CIFAR-10 training batches (``train``) or the test batch."""
        root = datadir.require("cifar10", self.data_dir)
        return load_cifar10(root, train=train, test=not train)["train" if train else "test"]

    def calibration_data(self, n: int, seed: int) -> np.ndarray:
        """``n`` seeded training images (VWW train split, else CIFAR-10 training batches)."""
        splits = self._vww_splits()
        if splits is None:
            raw = seeded_sample(self._cifar(train=True).x, n, seed, "CIFAR-10 calibration images")
            return cifar_to_vww(raw)
        train = splits["train"]
        index = seeded_index(len(train), n, seed)
        x = vww_images([train.paths[i] for i in index])
        return check_finite(x, "VWW calibration images")

    def eval_set(self) -> EvalSet:
        """VWW validation split (labelled), else CIFAR-10 test_batch resized (label-free)."""
        splits = self._vww_splits()
        if splits is not None:
            val = splits["validation"]
            return EvalSet(vww_images(val.paths), val.labels, "Visual Wake Words validation split")
        test = self._cifar(train=False)
        key = content_hash(test.x.shape, _digest(test.x), RECIPE)
        x = cached_arrays("vww_cifar_test", key, lambda: {"x": cifar_to_vww(test.x)})["x"]
        return EvalSet(x, None, "CIFAR-10 test_batch resized to 96x96 (label-free)")


def _digest(x: np.ndarray) -> str:
    """SHA-256 of an array's bytes (cache key of in-memory data)."""
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
