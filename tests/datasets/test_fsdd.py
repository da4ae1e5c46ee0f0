"""FSDD loader on generated recordings and on the real folder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from tinyptq.datasets.fsdd import CLASS_NAMES, load_fsdd, speakers
from tinyptq.errors import DataError

SPEAKERS = ["alice", "bob", "carol"]


def _write_wav(path: Path, rng: np.random.Generator) -> None:
    wavfile.write(path, 8000, rng.integers(-3000, 3000, size=400, dtype=np.int16))


@pytest.fixture
def recordings(tmp_path: Path) -> Path:
    """3 speakers x 10 digits x 8 takes of short int16 noise."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "recordings"
    folder.mkdir()
    for spk in SPEAKERS:
        for digit in range(10):
            for take in range(8):
                _write_wav(folder / f"{digit}_{spk}_{take}.wav", rng)
    (folder / "README.txt").write_text("not a recording")
    return folder


def _parts(path: Path) -> tuple[int, str, int]:
    digit, spk, take = path.stem.split("_")
    return int(digit), spk, int(take)


def test_official_split_puts_takes_0_to_4_in_test(recordings: Path) -> None:
    splits = load_fsdd(recordings)
    assert len(splits["train"]) == 3 * 10 * 3 and len(splits["test"]) == 3 * 10 * 5
    assert all(_parts(p)[2] < 5 for p in splits["test"].paths)
    assert all(_parts(p)[2] >= 5 for p in splits["train"].paths)
    for split in splits.values():
        assert split.class_names == CLASS_NAMES
        assert split.labels.tolist() == [_parts(p)[0] for p in split.paths]
        assert split.paths == sorted(split.paths)


def test_speaker_split_holds_out_exactly_the_chosen_speakers(recordings: Path) -> None:
    splits = load_fsdd(recordings, split="speaker", test_speakers=["bob"])
    assert {_parts(p)[1] for p in splits["test"].paths} == {"bob"}
    assert {_parts(p)[1] for p in splits["train"].paths} == {"alice", "carol"}
    assert len(splits["test"]) == 80 and len(splits["train"]) == 160


def test_speaker_split_default_is_one_seeded_speaker(recordings: Path) -> None:
    a = load_fsdd(recordings, split="speaker", seed=3)
    b = load_fsdd(recordings, split="speaker", seed=3)
    held_out = {_parts(p)[1] for p in a["test"].paths}
    assert len(held_out) == 1 and held_out <= set(SPEAKERS)
    assert a["test"].paths == b["test"].paths
    assert held_out.isdisjoint({_parts(p)[1] for p in a["train"].paths})


def test_speakers_lists_sorted_names(recordings: Path) -> None:
    assert speakers(recordings) == SPEAKERS


def test_unknown_test_speaker_names_the_folder(recordings: Path) -> None:
    with pytest.raises(DataError, match="zed"):
        load_fsdd(recordings, split="speaker", test_speakers=["zed"])


def test_malformed_file_name_raises(recordings: Path) -> None:
    _write_wav(recordings / "hello.wav", np.random.default_rng(1))
    with pytest.raises(DataError, match="hello.wav"):
        load_fsdd(recordings)


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "recordings"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_fsdd(missing)


def test_real_fsdd_official_split(data_dir: Path) -> None:
    folder = data_dir / "fsdd" / "recordings"
    splits = load_fsdd(folder)
    assert len(splits["train"]) == 2700 and len(splits["test"]) == 300
    assert len(speakers(folder)) == 6
    for split in splits.values():
        assert sorted(set(split.labels.tolist())) == list(range(10))
        assert np.bincount(split.labels).min() == np.bincount(split.labels).max()
