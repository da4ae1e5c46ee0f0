"""Visual Wake Words (96x96 COCO 2014 crops): ``person/`` and ``non_person/`` image folders.

Class order follows the MLPerf Tiny reference training, which reads the folders
with Keras ``flow_from_directory``; that sorts class folders alphabetically, so
``non_person`` is 0 and ``person`` is 1, matching the pretrained model's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tinyptq.datasets.base import LabeledFiles
from tinyptq.errors import ConfigError, DataError

CLASS_NAMES = ["non_person", "person"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def load_vww(root: Path, val_fraction: float = 0.1, seed: int = 0) -> dict[str, LabeledFiles]:
    """{"train", "validation"} file lists; each class is split separately, drawn with ``seed``."""
    root = Path(root)
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not root.is_dir():
        raise DataError(
            f"Visual Wake Words folder {root} does not exist; expected person/ and non_person/ "
            "image folders there"
        )
    rng = np.random.default_rng(seed)
    train: list[tuple[Path, int]] = []
    val: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASS_NAMES):
        images = _images(root / name)
        n_val = round(val_fraction * len(images))
        in_val = set(rng.permutation(len(images))[:n_val].tolist())
        for i, path in enumerate(images):
            (val if i in in_val else train).append((path, label))
    return {"train": _files(train), "validation": _files(val)}


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(
            f"Visual Wake Words class folder {folder} is missing; expected jpg/png images there"
        )
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"Visual Wake Words class folder {folder} has no jpg/png images")
    return images


def _files(items: list[tuple[Path, int]]) -> LabeledFiles:
    items = sorted(items, key=lambda it: str(it[0]))
    labels = np.array([y for _, y in items], dtype=np.int64)
    return LabeledFiles([p for p, _ in items], labels, list(CLASS_NAMES))


def load_images(paths: Sequence[Path], size: tuple[int, int] = (96, 96)) -> np.ndarray:
    """Images as float32 (N, height, width, 3) in [0, 1]; RGB, bilinear resize to ``size`` (h, w)."""
    height, width = size
    out = np.empty((len(paths), height, width, 3), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as exc:  # includes PIL's UnidentifiedImageError
            raise DataError(f"image {path} cannot be read ({type(exc).__name__})") from None
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        out[i] = np.asarray(rgb, dtype=np.float32) / 255.0
    return out
