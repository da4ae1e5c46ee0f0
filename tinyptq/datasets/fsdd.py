"""Free Spoken Digit Dataset: ``{digit}_{speaker}_{index}.wav`` files in one folder.

Labels are the spoken digit (0-9, class names ``"0"``..``"9"``). Two splits are
offered: the dataset's official one (takes 0-4 of every digit and speaker are
test, the rest train) and a speaker-independent one that holds out whole speakers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinyptq.datasets.base import LabeledFiles
from tinyptq.errors import ConfigError, DataError

CLASS_NAMES = [str(d) for d in range(10)]
OFFICIAL_TEST_TAKES = 5  # takes 0..4 are the official test set
_EXPECTED = "{digit}_{speaker}_{index}.wav files (Free Spoken Digit Dataset recordings)"


class Recording(NamedTuple):
    """One parsed FSDD file name."""

    path: Path
    digit: int
    speaker: str
    index: int


def scan(recordings_dir: Path) -> list[Recording]:
    """All recordings in ``recordings_dir``, sorted by file name; DataError on a bad layout."""
    recordings_dir = Path(recordings_dir)
    if not recordings_dir.is_dir():
        raise DataError(f"FSDD folder {recordings_dir} does not exist; expected {_EXPECTED} there")
    wavs = sorted(p for p in recordings_dir.iterdir() if p.suffix.lower() == ".wav")
    if not wavs:
        raise DataError(f"FSDD folder {recordings_dir} has no .wav files; expected {_EXPECTED}")
    return [_parse(p) for p in wavs]


def _parse(path: Path) -> Recording:
    parts = path.stem.split("_")
    if len(parts) < 3 or not (parts[0].isdigit() and len(parts[0]) == 1 and parts[-1].isdigit()):
        raise DataError(f"FSDD file {path} is not named {{digit}}_{{speaker}}_{{index}}.wav")
    speaker = "_".join(parts[1:-1])
    if not speaker:
        raise DataError(f"FSDD file {path} has an empty speaker name")
    return Recording(path, int(parts[0]), speaker, int(parts[-1]))


def speakers(recordings_dir: Path) -> list[str]:
    """The sorted speaker names found in ``recordings_dir``."""
    return sorted({r.speaker for r in scan(recordings_dir)})


def load_fsdd(
    recordings_dir: Path,
    split: str = "official",
    test_speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, LabeledFiles]:
    """FSDD as {"train", "test"} file lists; ``split`` is "official" or "speaker".

    "official": takes 0-4 of each (digit, speaker) are test, the others train.
    "speaker": the recordings of ``test_speakers`` are test, everyone else's train;
    with ``test_speakers=None`` one speaker is drawn with ``seed``.
    """
    recs = scan(recordings_dir)
    if split == "official":
        is_test = [r.index < OFFICIAL_TEST_TAKES for r in recs]
    elif split == "speaker":
        held_out = _choose_test_speakers(recs, recordings_dir, test_speakers, seed)
        is_test = [r.speaker in held_out for r in recs]
    else:
        raise ConfigError(f"unknown FSDD split '{split}'; use 'official' or 'speaker'")
    return {
        "train": _files([r for r, t in zip(recs, is_test, strict=True) if not t]),
        "test": _files([r for r, t in zip(recs, is_test, strict=True) if t]),
    }


def split_speakers(
    recordings_dir: Path,
    split: str = "official",
    test_speakers: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The speaker of every file of :func:`load_fsdd`'s splits, in the same order (str arrays)."""
    files = load_fsdd(recordings_dir, split, test_speakers, seed)
    return {
        name: np.array([_parse(Path(p)).speaker for p in f.paths], dtype=str)
        for name, f in files.items()
    }


def _choose_test_speakers(
    recs: list[Recording], recordings_dir: Path, test_speakers: Sequence[str] | None, seed: int
) -> set[str]:
    known = sorted({r.speaker for r in recs})
    if test_speakers is None:
        rng = np.random.default_rng(seed)
        return {known[int(rng.integers(len(known)))]}
    if isinstance(test_speakers, str):
        test_speakers = [test_speakers]
    unknown = sorted(set(test_speakers) - set(known))
    if unknown:
        raise DataError(
            f"FSDD speakers {', '.join(unknown)} not found in {recordings_dir}; "
            f"speakers there: {', '.join(known)}"
        )
    held_out = set(test_speakers)
    if not held_out or held_out == set(known):
        raise ConfigError(
            f"test_speakers must hold out some but not all of the speakers ({', '.join(known)})"
        )
    return held_out


def _files(recs: list[Recording]) -> LabeledFiles:
    labels = np.array([r.digit for r in recs], dtype=np.int64)
    return LabeledFiles([r.path for r in recs], labels, list(CLASS_NAMES))
