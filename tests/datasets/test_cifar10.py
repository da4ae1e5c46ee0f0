"""CIFAR-10 batches are read with a restricted unpickler: data in, code refused."""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest

from tinyptq.datasets.cifar10 import class_names, load_cifar10, read_batch
from tinyptq.errors import DataError


def _batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


class _Planted:
    """Unpickling this touches a marker file: what a planted batch could do with os.system."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_batches_load_with_every_protocol(tmp_path, protocol):
    batch = _batch()
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    split = read_batch(path)
    assert split.x.shape == (4, 32, 32, 3) and split.x.dtype == np.uint8
    np.testing.assert_array_equal(split.x, batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert split.y.tolist() == batch[b"labels"]


def test_a_batch_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({**_batch(), b"extra": _Planted(marker)}, protocol=2))
    with pytest.raises(DataError) as info:
        read_batch(path)
    message = str(info.value)
    assert str(path) in message and "getattr" in message and "could run code" in message
    assert not marker.exists()


def test_object_arrays_and_other_classes_are_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({**_batch(), b"data": np.array([object()] * 3, dtype=object)}, protocol=4))
    with pytest.raises(DataError, match="refers to an array of object"):
        read_batch(path)
    path.write_bytes(pickle.dumps({**_batch(), b"data": np.ma.masked_array([1, 2])}, protocol=4))
    with pytest.raises(DataError, match="not a plain data pickle"):
        read_batch(path)


def test_batches_meta_is_read_the_same_way(tmp_path):
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    assert class_names(tmp_path) == ["a", "b"]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": _Planted(tmp_path / "ran")}))
    with pytest.raises(DataError, match="batches.meta is not a plain data pickle"):
        class_names(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_the_shared_batches_still_load(data_dir):
    splits = load_cifar10(data_dir / "cifar-10-batches-py")
    assert splits["test"].x.shape[1:] == (32, 32, 3) and len(splits["train"].x) > len(splits["test"].x)
