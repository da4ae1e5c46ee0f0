"""Visual Wake Words loader on generated png/jpg images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyptq.datasets.vww import CLASS_NAMES, load_images, load_vww
from tinyptq.errors import DataError

COUNTS = {"person": 20, "non_person": 10}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "vww"
    for name, n in COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"COCO_{name}_{i:04d}.{suffix}")
    (root / "person" / "notes.txt").write_text("not an image")
    return root


def test_class_order_puts_non_person_first(root: Path) -> None:
    assert CLASS_NAMES == ["non_person", "person"]


def test_labels_follow_the_folders(root: Path) -> None:
    for split in load_vww(root).values():
        assert split.class_names == CLASS_NAMES
        assert [CLASS_NAMES[y] for y in split.labels] == [p.parent.name for p in split.paths]
        assert split.paths == sorted(split.paths, key=str)


def test_split_sizes_are_per_class_and_disjoint(root: Path) -> None:
    splits = load_vww(root, val_fraction=0.2, seed=0)
    train, val = splits["train"], splits["validation"]
    assert len(val) == 4 + 2 and len(train) == 16 + 8
    assert np.bincount(val.labels).tolist() == [2, 4]
    assert set(train.paths).isdisjoint(val.paths)
    assert len(set(train.paths) | set(val.paths)) == sum(COUNTS.values())


def test_split_is_seeded(root: Path) -> None:
    assert load_vww(root, seed=5)["validation"].paths == load_vww(root, seed=5)["validation"].paths
    seeds = {tuple(load_vww(root, val_fraction=0.3, seed=s)["validation"].paths) for s in range(4)}
    assert len(seeds) > 1


def test_load_images_shape_and_range(root: Path) -> None:
    paths = load_vww(root)["train"].paths[:5]
    x = load_images(paths)
    assert x.shape == (5, 96, 96, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert load_images(paths, size=(24, 32)).shape == (5, 24, 32, 3)


def test_load_images_converts_grayscale_and_keeps_values(tmp_path: Path) -> None:
    gray = np.full((96, 96), 51, dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    x = load_images([tmp_path / "g.png"])
    np.testing.assert_allclose(x, 0.2, atol=1e-6)


def test_unreadable_image_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        load_images([bad])


def test_missing_class_folder_raises(root: Path) -> None:
    for f in (root / "non_person").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="non_person"):
        load_vww(root)


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "vww"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_vww(missing)
