"""Speech Commands v2 loader on a generated word-folder tree."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from tinyptq.datasets.speech_commands import (
    BACKGROUND_DIR,
    CLASS_NAMES,
    SILENCE_REGIONS,
    load_speech_commands,
)
from tinyptq.errors import DataError

RATE = 16000
KEYWORD_DIRS = ["yes", "no", "up"]
OTHER_DIRS = ["cat", "marvin", "zero"]
PER_WORD = 20  # speakers 0-3 validation, 4-7 test, 8-19 train
NOISE_SECONDS = {"pink_noise.wav": 20, "running_tap.wav": 15}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "speech_commands_v0.02"
    val, test = [], []
    for word in KEYWORD_DIRS + OTHER_DIRS:
        (root / word).mkdir(parents=True)
        for spk in range(PER_WORD):
            rel = f"{word}/{spk:08x}_nohash_0.wav"
            wavfile.write(root / rel, RATE, rng.integers(-2000, 2000, size=160, dtype=np.int16))
            (val if spk < 4 else test if spk < 8 else []).append(rel)
    (root / BACKGROUND_DIR).mkdir()
    for name, seconds in NOISE_SECONDS.items():
        noise = rng.integers(-500, 500, size=seconds * RATE, dtype=np.int16)
        wavfile.write(root / BACKGROUND_DIR / name, RATE, noise)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "LICENSE").write_text("CC BY 4.0")
    return root


def _load(root: Path, seed: int = 0):
    return load_speech_commands(root, seed=seed, silence_fraction=0.2, unknown_fraction=0.2)


def test_class_order_is_the_mlperf_tfds_order(root: Path) -> None:
    assert CLASS_NAMES == [
        "down",
        "go",
        "left",
        "no",
        "off",
        "on",
        "right",
        "stop",
        "up",
        "yes",
        "silence",
        "unknown",
    ]
    for split in _load(root).values():
        assert split.class_names == CLASS_NAMES


def test_files_land_in_their_listed_split(root: Path) -> None:
    splits = _load(root)
    val = set((root / "validation_list.txt").read_text().split())
    test = set((root / "testing_list.txt").read_text().split())
    for name, split in splits.items():
        for path in np.array(split.paths, dtype=object)[~split.is_silence()]:
            rel = path.relative_to(root).as_posix()
            expected = "test" if rel in test else "validation" if rel in val else "train"
            assert expected == name, rel


def test_labels_map_words_unknowns_and_silence(root: Path) -> None:
    unknown, silence = CLASS_NAMES.index("unknown"), CLASS_NAMES.index("silence")
    for split in _load(root).values():
        for path, label, offset in zip(split.paths, split.labels, split.offsets, strict=True):
            folder = path.parent.name
            if folder == BACKGROUND_DIR:
                assert label == silence and offset >= 0
            elif folder in KEYWORD_DIRS:
                assert CLASS_NAMES[label] == folder and offset == -1
            else:
                assert folder in OTHER_DIRS and label == unknown and offset == -1


def test_counts_follow_the_fractions(root: Path) -> None:
    splits = _load(root)
    per_split_keywords = {"train": 12, "validation": 4, "test": 4}
    for name, split in splits.items():
        n_known = per_split_keywords[name] * len(KEYWORD_DIRS)
        counts = np.bincount(split.labels, minlength=len(CLASS_NAMES))
        assert counts[: len(CLASS_NAMES) - 2].sum() == n_known
        total = n_known / 0.6
        assert counts[CLASS_NAMES.index("silence")] == round(0.2 * total) > 0
        assert counts[CLASS_NAMES.index("unknown")] == round(0.2 * total) > 0


def test_silence_slices_fit_their_split_region(root: Path) -> None:
    for name, split in _load(root).items():
        lo, hi = SILENCE_REGIONS[name]
        for path, offset in zip(split.paths, split.offsets, strict=True):
            if offset < 0:
                continue
            n = NOISE_SECONDS[path.name] * RATE
            assert lo * n <= offset and offset + RATE <= hi * n


def test_same_seed_same_result_other_seed_differs(root: Path) -> None:
    a, b, c = _load(root, seed=1), _load(root, seed=1), _load(root, seed=2)
    for name in a:
        assert a[name].paths == b[name].paths
        np.testing.assert_array_equal(a[name].labels, b[name].labels)
        np.testing.assert_array_equal(a[name].offsets, b[name].offsets)
    assert a["train"].paths != c["train"].paths or not np.array_equal(
        a["train"].offsets, c["train"].offsets
    )


def test_subset_keeps_offsets(root: Path) -> None:
    train = _load(root)["train"]
    sub = train.subset(np.flatnonzero(train.is_silence()))
    assert len(sub) > 0 and np.all(sub.offsets >= 0)
    assert all(p.parent.name == BACKGROUND_DIR for p in sub.paths)


@pytest.mark.parametrize("name", ["validation_list.txt", "testing_list.txt"])
def test_missing_list_raises(root: Path, name: str) -> None:
    (root / name).unlink()
    with pytest.raises(DataError, match=re.escape(str(root / name))):
        load_speech_commands(root)


def test_listed_file_missing_on_disk_raises(root: Path) -> None:
    (root / "yes" / f"{0:08x}_nohash_0.wav").unlink()
    with pytest.raises(DataError, match="validation_list.txt"):
        load_speech_commands(root)


def test_missing_background_folder_raises(root: Path) -> None:
    for f in (root / BACKGROUND_DIR).iterdir():
        f.unlink()
    (root / BACKGROUND_DIR).rmdir()
    with pytest.raises(DataError, match=BACKGROUND_DIR):
        load_speech_commands(root)
    assert len(load_speech_commands(root, silence_fraction=0.0)["train"]) > 0


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "speech_commands_v0.02"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_speech_commands(missing)
