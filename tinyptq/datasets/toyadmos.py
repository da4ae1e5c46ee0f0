"""ToyADMOS / MIMII machine sounds as laid out by DCASE 2020 Task 2 development data.

Layout of one machine folder (e.g. ``toyadmos/ToyCar``)::

    train/normal_id_01_00000000.wav          normal operation only
    test/normal_id_01_00000000.wav           normal  -> label 0
    test/anomaly_id_01_00000000.wav          anomaly -> label 1
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyptq.datasets.base import LabeledFiles
from tinyptq.errors import DataError

CLASS_NAMES = ["normal", "anomaly"]
_NAME = re.compile(r"^(normal|anomaly)_id_(\d+)_(\d+)\.wav$", re.IGNORECASE)
_ID = re.compile(r"(?:^|_)id_(\d+)(?:_|$)", re.IGNORECASE)


def load_toyadmos(machine_dir: Path) -> dict[str, LabeledFiles]:
    """{"train": normal clips (label 0), "test": normal (0) and anomalous (1) clips}."""
    machine_dir = Path(machine_dir)
    if not machine_dir.is_dir():
        raise DataError(
            f"ToyADMOS machine folder {machine_dir} does not exist; expected train/ and test/ "
            "with {normal,anomaly}_id_XX_########.wav files there"
        )
    train = _scan(machine_dir / "train")
    bad = [p for p, y in train if y != 0]
    if bad:
        raise DataError(
            f"{machine_dir / 'train'} must hold only normal_*.wav files, found {bad[0].name}"
        )
    return {"train": _files(train), "test": _files(_scan(machine_dir / "test"))}


def _scan(folder: Path) -> list[tuple[Path, int]]:
    """(path, label) of every wav in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise DataError(
            f"ToyADMOS folder {folder} is missing; expected {{normal,anomaly}}_id_XX_########.wav files there"
        )
    wavs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav")
    if not wavs:
        raise DataError(f"ToyADMOS folder {folder} has no .wav files")
    out = []
    for p in wavs:
        m = _NAME.match(p.name)
        if m is None:
            raise DataError(f"ToyADMOS file {p} is not named {{normal,anomaly}}_id_XX_########.wav")
        out.append((p, CLASS_NAMES.index(m.group(1).lower())))
    return out


def _files(items: list[tuple[Path, int]]) -> LabeledFiles:
    labels = np.array([y for _, y in items], dtype=np.int64)
    return LabeledFiles([p for p, _ in items], labels, list(CLASS_NAMES))


def machine_ids(files: LabeledFiles | Sequence[Path]) -> np.ndarray:
    """The machine id (the XX of ``id_XX`` in each file name) as an int array."""
    paths = files.paths if isinstance(files, LabeledFiles) else files
    ids = []
    for p in paths:
        m = _ID.search(Path(p).stem)
        if m is None:
            raise DataError(f"file name {Path(p).name} has no id_XX machine id")
        ids.append(int(m.group(1)))
    return np.array(ids, dtype=np.int64)
