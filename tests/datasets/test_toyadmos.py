"""ToyADMOS (DCASE 2020 Task 2) loader on a generated machine folder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from tinyptq.datasets.toyadmos import CLASS_NAMES, load_toyadmos, machine_ids
from tinyptq.errors import DataError

IDS = [1, 3]


def _tone(path: Path, freq: float) -> None:
    t = np.arange(800) / 16000
    wavfile.write(path, 16000, (3000 * np.sin(2 * np.pi * freq * t)).astype(np.int16))


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    root = tmp_path / "ToyCar"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for mid in IDS:
        for i in range(6):
            _tone(root / "train" / f"normal_id_{mid:02d}_{i:08d}.wav", 440)
        for i in range(3):
            _tone(root / "test" / f"normal_id_{mid:02d}_{i:08d}.wav", 440)
        for i in range(2):
            _tone(root / "test" / f"anomaly_id_{mid:02d}_{i:08d}.wav", 1200)
    return root


def test_counts_and_labels(machine: Path) -> None:
    splits = load_toyadmos(machine)
    train, test = splits["train"], splits["test"]
    assert train.class_names == test.class_names == CLASS_NAMES == ["normal", "anomaly"]
    assert len(train) == 12 and not train.labels.any()
    assert len(test) == 10 and np.bincount(test.labels).tolist() == [6, 4]
    for path, label in zip(test.paths, test.labels, strict=True):
        assert path.name.startswith(CLASS_NAMES[label])
    assert test.paths == sorted(test.paths)


def test_machine_ids(machine: Path) -> None:
    splits = load_toyadmos(machine)
    assert sorted(set(machine_ids(splits["train"]).tolist())) == IDS
    test_ids = machine_ids(splits["test"].paths)
    assert np.bincount(test_ids).tolist() == [0, 5, 0, 5]
    with pytest.raises(DataError, match="section_00"):
        machine_ids([Path("section_00_0001.wav")])


def test_missing_train_folder_raises(machine: Path) -> None:
    for f in (machine / "train").iterdir():
        f.unlink()
    (machine / "train").rmdir()
    with pytest.raises(DataError, match=re.escape(str(machine / "train"))):
        load_toyadmos(machine)


def test_anomaly_in_train_or_bad_name_raises(machine: Path) -> None:
    _tone(machine / "test" / "id_01_00000009.wav", 440)
    with pytest.raises(DataError, match="id_01_00000009.wav"):
        load_toyadmos(machine)
    (machine / "test" / "id_01_00000009.wav").unlink()
    _tone(machine / "train" / "anomaly_id_01_00000000.wav", 440)
    with pytest.raises(DataError, match="only normal"):
        load_toyadmos(machine)


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "toyadmos" / "ToyCar"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_toyadmos(missing)
