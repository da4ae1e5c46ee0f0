"""Keyword-spotting use cases: ``kws`` (DS-CNN trained on FSDD) and ``kws-mlperf``.

Both feed the MLPerf Tiny KWS front end (16 kHz, 1 s, 49 x 10 MFCCs, see
:func:`tinyptq.frontends.kws_mfcc`) to a DS-CNN.

* ``kws``: the 10-class DS-CNN trained on the Free Spoken Digit Dataset
  (:func:`tinyptq.models.training.kws_fsdd_model`, trained once and cached), top-1
  accuracy on the FSDD official test split (300 clips), calibration from the FSDD
  training split. When Google Speech Commands v2 is in the data directory the use
  case measures accuracy on its 12-class test split instead; its default model is
  then the MLPerf Tiny DS-CNN, and any model given must have the 12 MLPerf outputs.
* ``kws-mlperf``: the MLPerf Tiny DS-CNN (12 classes). Accuracy on the Speech
  Commands v2 test split when present (silence entries are a 1 s slice of a
  background-noise file at the loader's offset), calibration from its training
  split. Without Speech Commands it is measured label-free: top-1 agreement with
  the FP32 model on FSDD audio through the same front end (FSDD test split for
  evaluation, FSDD training split for calibration).

Features are cached in the tinyptq cache (``features/``, see :mod:`tinyptq.cache`).

Speaker filter (personalized calibration, both use cases on FSDD): ``where=
{"speaker": name}`` (a name among the FSDD speakers found in the data) keeps that
speaker's clips: calibration draws from their training-split clips (official
split: takes 5-49, 450 per speaker), evaluation uses their test-split clips (takes
0-4, 50 per speaker). The filter selects rows of the cached MFCC arrays through
the speaker of each row (from the file names, in the cached order), so features
are never recomputed for it. FSDD evaluation sets carry each row's speaker in
``EvalSet.extra["speaker"]``. With Speech Commands v2 in the data directory the
use cases take no filter: its test speakers are, by design, absent from its
training split, so one speaker's calibration and evaluation clips cannot both exist.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tinyptq import datadir
from tinyptq.cache import cached_arrays, content_hash, file_key
from tinyptq.datasets.base import check_finite
from tinyptq.datasets.fsdd import split_speakers
from tinyptq.datasets.speech_commands import SpeechCommandsFiles, load_speech_commands
from tinyptq.errors import DataError, ModelError
from tinyptq.frontends import (
    kws_clip,
    kws_mfcc,
    pad_or_crop,
    read_wav,
)
from tinyptq.metrics import MetricResult
from tinyptq.models.usecases import (
    EvalSet,
    Filter,
    UseCase,
    describe_filter,
    filter_rows,
    register_use_case,
    seeded_index,
    seeded_rows_sample,
    seeded_sample,
)

#: Bump when the Speech Commands feature recipe changes so old caches are not reused.
SC_RECIPE = "sc-kws-mfcc-v1"
SC_CLASSES = 12
FSDD_CLASSES = 10
_MFCC_CHUNK = 512  # clips read and transformed at a time (bounds waveform memory)


# ====================================================================================
# Speech Commands v2 through the KWS front end
# ====================================================================================


def _clip(path: Path, offset: int, noise: dict[Path, tuple[np.ndarray, int]]) -> np.ndarray:
    """One entry as a 1 s 16 kHz clip; ``offset >= 0``: 1 s of a noise file from there."""
    if offset >= 0:
        if path not in noise:
            noise[path] = read_wav(path)
        audio, sr = noise[path]
        audio = pad_or_crop(audio, sr, int(offset))
    else:
        audio, sr = read_wav(path)
    return kws_clip(audio, sr)


def speech_commands_mfcc(paths: Sequence[Path], offsets: np.ndarray) -> np.ndarray:
    """KWS MFCCs (N, 49, 10, 1) of Speech Commands entries (silence: noise slice at offset)."""
    key = content_hash(file_key(paths), np.asarray(offsets).tolist(), SC_RECIPE)

    def compute() -> dict[str, np.ndarray]:
        """MFCCs of all entries, a chunk of clips at a time."""
        noise: dict[Path, tuple[np.ndarray, int]] = {}
        parts = []
        for start in range(0, len(paths), _MFCC_CHUNK):
            stop = min(start + _MFCC_CHUNK, len(paths))
            waves = [_clip(Path(paths[i]), int(offsets[i]), noise) for i in range(start, stop)]
            parts.append(kws_mfcc(np.stack(waves)))
        return {"x": np.concatenate(parts) if parts else np.empty((0, 49, 10, 1), np.float32)}

    return cached_arrays("sc_mfcc", key, compute)["x"]


def _speech_commands_split(root: Path, split: str) -> SpeechCommandsFiles:
    """One split of Speech Commands v2 (12 MLPerf classes) found at ``root``."""
    return load_speech_commands(root)[split]


# ====================================================================================
# Use cases
# ====================================================================================


class _KeywordSpotting(UseCase):
    """Shared KWS logic: Speech Commands v2 when present, else FSDD."""

    calibration_size = 256

    def _speech_commands(self) -> Path | None:
        """The Speech Commands v2 folder when it is in the data directory (never downloads)."""
        return datadir.locate("speech_commands", self.data_dir)

    def _fsdd(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """FSDD official split as cached KWS MFCCs with digit labels."""
        from tinyptq.models.training import fsdd_mfcc

        return fsdd_mfcc(self.data_dir)

    def _fsdd_recordings(self) -> Path:
        """The FSDD recordings folder (DataError when missing)."""
        return datadir.require("fsdd", self.data_dir)

    def _fsdd_speakers(
        self, splits: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The speaker of every row of the cached ``splits`` (same file order), checked."""
        recordings = self._fsdd_recordings()
        speakers = split_speakers(recordings)
        for name, (x, _) in splits.items():
            if len(speakers[name]) != len(x):
                raise DataError(
                    f"FSDD features of the {name} split ({len(x)} clips) do not match the "
                    f"{len(speakers[name])} files in {recordings}; clear the tinyptq feature cache"
                )
        return speakers

    def filter_keys(self) -> tuple[str, ...]:
        """``("speaker",)`` on FSDD; none when Speech Commands v2 is used."""
        return () if self._speech_commands() is not None else ("speaker",)

    def filter_values(self, key: str) -> list[str]:
        """The FSDD speakers found in the data."""
        from tinyptq.datasets.fsdd import speakers

        return speakers(self._fsdd_recordings()) if key == "speaker" else []

    def _no_filter_reason(self) -> str:
        if self._speech_commands() is not None:
            return (
                "speaker filters need FSDD, and Speech Commands v2 (in the data directory) "
                "keeps its test speakers out of its training split"
            )
        return ""

    def calibration_data(self, n: int, seed: int, where: Filter | None = None) -> np.ndarray:
        """``n`` seeded MFCC inputs from the Speech Commands or FSDD training split.

        ``where={"speaker": name}`` (FSDD) draws from that speaker's training clips only.
        """
        where = self.check_filter(where, "calibration filter")
        root = self._speech_commands()
        if root is None:
            splits = self._fsdd()
            x = splits["train"][0]
            if not where:
                return seeded_sample(x, n, seed, "FSDD calibration MFCCs")
            speakers = self._fsdd_speakers(splits)["train"]
            rows = filter_rows({"speaker": speakers}, where, "FSDD training clips")
            return seeded_rows_sample(
                x, rows, n, seed, f"FSDD calibration MFCCs ({describe_filter(where)})"
            )
        train = _speech_commands_split(root, "train")
        index = seeded_index(len(train), n, seed)
        x = speech_commands_mfcc([train.paths[i] for i in index], train.offsets[index])
        return check_finite(x.astype(np.float32), "Speech Commands calibration MFCCs")

    def eval_set(self, where: Filter | None = None) -> EvalSet:
        """Speech Commands v2 test split (labelled) when present, else the FSDD test split.

        FSDD: ``extra["speaker"]`` holds each row's speaker; ``where={"speaker": name}``
        keeps that speaker's test clips only.
        """
        where = self.check_filter(where, "evaluation filter")
        root = self._speech_commands()
        if root is None:
            splits = self._fsdd()
            x, y = splits["test"]
            speakers = self._fsdd_speakers(splits)["test"]
            if where:
                rows = filter_rows({"speaker": speakers}, where, "FSDD test clips")
                x, y, speakers = x[rows], y[rows], speakers[rows]
            data = self._fsdd_eval_set(x, y)
            data.extra["speaker"] = speakers
            if where:
                data.source = f"{data.source}, {describe_filter(where)}"
            return data
        test = _speech_commands_split(root, "test")
        x = speech_commands_mfcc(test.paths, test.offsets)
        return EvalSet(x, test.labels, "Speech Commands v2 test split", {"classes": SC_CLASSES})

    @abstractmethod
    def _fsdd_eval_set(self, x: np.ndarray, y: np.ndarray) -> EvalSet:
        """The evaluation set of FSDD test MFCCs ``x`` with digits ``y`` (no Speech Commands)."""

    def metric(self, data: EvalSet, scores: np.ndarray, reference: np.ndarray) -> MetricResult:
        """Accuracy (labels) or top-1 agreement with FP32; checks the model's class count."""
        classes = data.extra.get("classes")
        if data.y is not None and classes and np.shape(scores)[-1] != classes:
            raise ModelError(
                f"{self.name} on {data.source} needs a model with {classes} outputs, "
                f"the model has {np.shape(scores)[-1]}"
            )
        return super().metric(data, scores, reference)


@register_use_case
class KeywordSpottingFSDD(_KeywordSpotting):
    """DS-CNN trained on FSDD digits; Speech Commands v2 accuracy when that is present."""

    name = "kws"
    description = "keyword spotting: DS-CNN trained on FSDD digits (Speech Commands v2 if present)"
    model_asset = "kws_dscnn"

    def model_path(self) -> Path:
        """The cached FSDD-trained DS-CNN (trained on first use); MLPerf's with Speech Commands."""
        if self._speech_commands() is not None:
            return datadir.require(self.model_asset, self.data_dir)
        from tinyptq.models.training import kws_fsdd_model

        return kws_fsdd_model(self.data_dir)

    def _fsdd_eval_set(self, x: np.ndarray, y: np.ndarray) -> EvalSet:
        """FSDD official test split with digit labels."""
        return EvalSet(x, y, "FSDD official test split", {"classes": FSDD_CLASSES})


@register_use_case
class KeywordSpottingMLPerf(_KeywordSpotting):
    """MLPerf Tiny DS-CNN: Speech Commands v2 accuracy, else label-free on FSDD audio."""

    name = "kws-mlperf"
    description = "keyword spotting: MLPerf Tiny DS-CNN (Speech Commands v2, else FSDD label-free)"
    model_asset = "kws_dscnn"

    def _fsdd_eval_set(self, x: np.ndarray, y: np.ndarray) -> EvalSet:
        """FSDD official test split, unlabelled (the model's classes are not digits)."""
        return EvalSet(x, None, "FSDD official test split (label-free)")
