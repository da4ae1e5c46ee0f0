"""CIFAR-10 from the official python pickle batches (cifar-10-batches-py/)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from tinyptq.datasets.base import ArraySplit
from tinyptq.errors import DataError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def read_batch(path: Path) -> ArraySplit:
    """One pickle batch as NHWC uint8 images and int labels."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch missing: {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"CIFAR-10 batch {path} is corrupt ({type(exc).__name__})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"CIFAR-10 batch {path} has data of shape {data.shape}, expected (N, 3072)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> HWC
    return ArraySplit(images, labels)


def load_cifar10(root: Path, train: bool = True, test: bool = True) -> dict[str, ArraySplit]:
    """{"train": data_batch_1..5 concatenated, "test": test_batch}, uint8 NHWC."""
    root = Path(root)
    out = {}
    if train:
        parts = [read_batch(root / name) for name in TRAIN_BATCHES]
        out["train"] = ArraySplit(
            np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
        )
    if test:
        out["test"] = read_batch(root / TEST_BATCH)
    return out


def class_names(root: Path) -> list[str]:
    """Label names from batches.meta (the ten standard names if it is absent)."""
    meta = Path(root) / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            return [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
