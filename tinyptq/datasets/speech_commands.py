"""Google Speech Commands v2 as the 12-class keyword-spotting task of MLPerf Tiny.

Layout of ``root`` (the unpacked ``speech_commands_v0.02.tar.gz``)::

    <word>/<speaker>_nohash_<n>.wav     one folder per spoken word
    _background_noise_/*.wav            long noise recordings
    validation_list.txt, testing_list.txt   relative paths such as yes/0a7c2a8d_nohash_0.wav

Class order is the one the MLPerf Tiny DS-CNN reference model was trained with.
Its ``get_dataset.py`` loads TFDS ``speech_commands``, whose label feature is
``ClassLabel(names=WORDS + [SILENCE, UNKNOWN])`` with ``WORDS`` sorted
alphabetically, so output ``i`` of the pretrained model is ``CLASS_NAMES[i]``::

    down go left no off on right stop up yes silence unknown

Silence entries: the v2 archive has no 1 s silence clips, so each silence entry's
path is a file in ``_background_noise_/`` and the split's ``offsets`` array (a
:class:`SpeechCommandsFiles` field) gives the first sample of the 1 s slice to
use, at that file's own sample rate; ordinary clips have offset -1. The offsets
are drawn with ``seed`` from disjoint stretches of every noise file (first 80% of
each file for train, the next 10% for validation, the last 10% for test), so no
noise audio is shared between splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import wavfile

from tinyptq.datasets.base import LabeledFiles
from tinyptq.errors import ConfigError, DataError

KEYWORDS = ["down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes"]
SILENCE = "silence"
UNKNOWN = "unknown"
CLASS_NAMES = [*KEYWORDS, SILENCE, UNKNOWN]
BACKGROUND_DIR = "_background_noise_"
LIST_FILES = {"validation": "validation_list.txt", "test": "testing_list.txt"}
SPLITS = ("train", "validation", "test")
# stretch (start, end) of every background-noise file, as fractions, that each split draws from
SILENCE_REGIONS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


@dataclass
class SpeechCommandsFiles(LabeledFiles):
    """A Speech Commands split; ``offsets[i]`` is the 1 s silence slice start, or -1."""

    offsets: np.ndarray

    def subset(self, index: np.ndarray) -> SpeechCommandsFiles:
        """The files at ``index`` (an integer array), with their offsets."""
        base = super().subset(index)
        return SpeechCommandsFiles(base.paths, base.labels, base.class_names, self.offsets[index])

    def is_silence(self) -> np.ndarray:
        """Boolean mask of the entries that are a 1 s slice of a background-noise file."""
        return self.offsets >= 0


def load_speech_commands(
    root: Path, seed: int = 0, silence_fraction: float = 0.1, unknown_fraction: float = 0.1
) -> dict[str, SpeechCommandsFiles]:
    """Splits "train", "validation", "test" of Speech Commands v2 with 12 classes.

    Each split keeps all of its keyword clips; "unknown" (every other word, drawn
    with ``seed``) and "silence" entries are added so that they make up about
    ``unknown_fraction`` and ``silence_fraction`` of the split.
    """
    root = Path(root)
    if min(silence_fraction, unknown_fraction) < 0 or silence_fraction + unknown_fraction >= 1:
        raise ConfigError("silence_fraction and unknown_fraction must be >= 0 and sum to below 1")
    clips = _split_clips(root)
    noise = _background_files(root) if silence_fraction > 0 else []
    out = {}
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, i])
        known = [(p, CLASS_NAMES.index(w)) for p, w in clips[split] if w in KEYWORDS]
        others = [p for p, w in clips[split] if w not in KEYWORDS]
        total = len(known) / (1.0 - silence_fraction - unknown_fraction)
        n_unknown = min(len(others), round(unknown_fraction * total))
        picked = sorted(rng.choice(len(others), size=n_unknown, replace=False).tolist())
        entries = [(p, y, -1) for p, y in known]
        entries += [(others[j], CLASS_NAMES.index(UNKNOWN), -1) for j in picked]
        n_silence = round(silence_fraction * total)
        if n_silence and not noise:
            raise DataError(
                f"no .wav files in {root / BACKGROUND_DIR}; silence clips are cut from them"
            )
        entries += _silence_entries(noise, n_silence, SILENCE_REGIONS[split], rng)
        entries.sort(key=lambda e: (str(e[0]), e[2]))
        out[split] = SpeechCommandsFiles(
            [e[0] for e in entries],
            np.array([e[1] for e in entries], dtype=np.int64),
            list(CLASS_NAMES),
            np.array([e[2] for e in entries], dtype=np.int64),
        )
    return out


def _split_clips(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """Every word clip as (path, word), by split, following the two list files."""
    if not root.is_dir():
        raise DataError(
            f"Speech Commands folder {root} does not exist; expected word folders, "
            f"{BACKGROUND_DIR}/, validation_list.txt and testing_list.txt there"
        )
    words = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name[0] not in "_.")
    if not set(words) & set(KEYWORDS):
        raise DataError(
            f"Speech Commands folder {root} has none of the keyword folders {', '.join(KEYWORDS)}"
        )
    by_rel = {f"{w}/{f.name}": w for w in words for f in sorted((root / w).glob("*.wav"))}
    listed = {split: _read_list(root / name) for split, name in LIST_FILES.items()}
    clips: dict[str, list[tuple[Path, str]]] = {s: [] for s in SPLITS}
    for split, rels in listed.items():
        missing = sorted(rels - by_rel.keys())
        if missing:
            raise DataError(
                f"{len(missing)} files in {root / LIST_FILES[split]} are missing under {root}, "
                f"e.g. {missing[0]}"
            )
    for rel in sorted(by_rel):
        split = next((s for s in ("test", "validation") if rel in listed[s]), "train")
        clips[split].append((root / rel, by_rel[rel]))
    return clips


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise DataError(
            f"Speech Commands split list {path} is missing; expected one relative wav path a line"
        )
    lines = path.read_text().splitlines()
    return {ln.strip().replace("\\", "/") for ln in lines if ln.strip()}


def _background_files(root: Path) -> list[tuple[Path, int, int]]:
    """(path, sample rate, number of samples) of every background-noise file."""
    folder = root / BACKGROUND_DIR
    if not folder.is_dir():
        raise DataError(
            f"Speech Commands noise folder {folder} is missing; silence clips are cut from it"
        )
    out = []
    for p in sorted(folder.glob("*.wav")):
        try:
            rate, data = wavfile.read(p, mmap=True)
        except (ValueError, OSError) as exc:
            raise DataError(
                f"background noise file {p} is not a readable wav file ({exc})"
            ) from None
        out.append((p, int(rate), int(data.shape[0])))
    return out


def _silence_entries(
    noise: list[tuple[Path, int, int]],
    count: int,
    region: tuple[float, float],
    rng: np.random.Generator,
) -> list[tuple[Path, int, int]]:
    """``count`` entries (noise path, silence label, slice start) drawn within ``region``."""
    if count == 0:
        return []
    label = CLASS_NAMES.index(SILENCE)
    entries = []
    for k in rng.integers(len(noise), size=count):
        path, rate, n = noise[int(k)]
        lo = int(region[0] * n)
        hi = max(lo, min(int(region[1] * n), n) - rate)  # last start that fits a 1 s slice
        hi = min(hi, max(n - rate, 0))  # a short file: allow the slice to run past the region
        lo = min(lo, hi)
        entries.append((path, label, int(rng.integers(lo, hi + 1))))
    return entries
