"""CIFAR-10 from the official python pickle batches (cifar-10-batches-py/).

The batches are pickles, and a pickle can name any Python callable to run
while it is read. They are read with a restricted unpickler: plain containers,
bytes, strings and numbers, and numpy arrays rebuilt through numpy's own array
reconstruction functions; a file naming anything else is refused unread.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tinyptq.datasets.base import ArraySplit
from tinyptq.errors import DataError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


_PLAIN_KINDS = "biufSU"  # numbers and fixed-size strings: no object pointers


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle naming a callable outside the allowed set."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _RefusedGlobal(f"array subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    dtype = _dtype(dtype)
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
    if isinstance(spec, bytes):  # Python 2 pickles read with encoding="bytes"
        spec = spec.decode("ascii", "replace")
    if not isinstance(spec, (str, np.dtype)):
        raise _RefusedGlobal(f"dtype {spec!r}")
    # always a copy: the pickle's BUILD step then sets the state of our copy, never numpy's singleton
    dt = np.dtype(spec, bool(align), True)
    if dt.hasobject or dt.kind not in _PLAIN_KINDS:
        raise _RefusedGlobal(f"an array of {dt}")
    return dt


def _latin1(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # how Python 3 writes bytes in protocol 2: _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding != "latin1":
        raise _RefusedGlobal(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1", errors)


_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
}


class _DataUnpickler(pickle.Unpickler):
    """Plain containers, bytes/str/numbers and numpy arrays; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _check_plain(obj: Any) -> None:
    """Refuse arrays whose dtype was turned into anything but plain numbers or strings while loading."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:  # a pickle may hold cycles
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, np.ndarray) and (item.dtype.hasobject or item.dtype.kind not in _PLAIN_KINDS):
            raise _RefusedGlobal(f"an array of {item.dtype}")
        elif isinstance(item, np.dtype):
            raise _RefusedGlobal("a bare dtype")


def safe_unpickle(fh: BinaryIO, path: Path) -> Any:
    """The object in a data pickle, read without running code; DataError naming ``path`` otherwise."""
    try:
        obj = _DataUnpickler(fh, encoding="bytes").load()
        _check_plain(obj)
        return obj
    except _RefusedGlobal as exc:
        raise DataError(
            f"{path} is not a plain data pickle: it refers to {exc}, which tinyptq does not load "
            "(unpickling it could run code)"
        ) from None


def read_batch(path: Path) -> ArraySplit:
    """One pickle batch as NHWC uint8 images and int labels."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch missing: {path}")
    try:
        with open(path, "rb") as f:
            d = safe_unpickle(f, path)
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
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
        try:
            with open(meta, "rb") as f:
                return [n.decode() for n in safe_unpickle(f, meta)[b"label_names"]]
        except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"CIFAR-10 {meta} is corrupt ({type(exc).__name__})") from None
    return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
