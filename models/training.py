"""Training recipe for the FSDD keyword-spotting DS-CNN (cached features and model).

The Free Spoken Digit Dataset (8 kHz) is resampled to 16 kHz, padded or cropped to
1 s and turned into the MLPerf Tiny KWS MFCCs (49 x 10). The DS-CNN is trained on
the training split with light waveform augmentation (random time shift and low-level
Gaussian noise) drawn from a numpy Generator seeded with ``seed``, so a run is
reproducible. Waveforms, MFCCs and the trained model are cached (see
:mod:`tinyptq.cache`) so only the first command pays for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tinyptq._tf import keras, tf
from tinyptq.cache import cache_dir, cached_arrays, content_hash
from tinyptq.datadir import require
from tinyptq.datasets.fsdd import load_fsdd, scan
from tinyptq.errors import DataError, ModelError
from tinyptq.frontends import (
    KWS_CLIP_SAMPLES,
    KWS_SAMPLE_RATE,
    kws_clip,
    kws_mfcc,
    read_wav,
    time_shift,
)
from tinyptq.models.architectures import dscnn

#: Bump when the waveform / feature recipe changes so old caches are not reused.
RECIPE_VERSION = "fsdd-kws-v1"
#: Bump when the training recipe changes (recorded in the JSON sidecar).
TRAIN_RECIPE_VERSION = "kws-dscnn-fsdd-train-v2"

NUM_CLASSES = 10
SPLITS = ("train", "test")

MAX_SHIFT_SAMPLES = KWS_SAMPLE_RATE // 10  # +-100 ms
NOISE_PROBABILITY = 0.8
NOISE_DB_RANGE = (-60.0, -30.0)  # noise std relative to the clip's peak, in dB
AUG_COPIES = 6  # augmented copies of the training set; epochs draw from them per clip

INITIAL_LR = 3e-3
FINAL_LR_FRACTION = 0.01

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


# ====================================================================================
# Cached waveforms and features
# ====================================================================================


def _recordings_dir(data_dir: str | os.PathLike | None) -> Path:
    """The FSDD recordings folder inside ``data_dir`` (DataError when missing)."""
    return require("fsdd", data_dir)


def _dataset_key(recordings: Path, split: str, seed: int, what: str) -> str:
    """Content hash of the sorted file names and sizes plus the split and recipe."""
    files = [(r.path.name, r.path.stat().st_size) for r in scan(recordings)]
    return content_hash(files, split, int(seed), RECIPE_VERSION, what)


def _cached_splits(kind: str, key: str, compute) -> Splits:
    """Splits through the shared feature cache (stored as ``{split}_x`` / ``{split}_y``)."""

    def flat() -> dict[str, np.ndarray]:
        arrays = {}
        for name, (x, y) in compute().items():
            arrays[f"{name}_x"], arrays[f"{name}_y"] = x, y
        return arrays

    arrays = cached_arrays(kind, key, flat)
    return {name: (arrays[f"{name}_x"], arrays[f"{name}_y"]) for name in SPLITS}


def _read_clip(path: Path) -> np.ndarray:
    """One FSDD file as a 1 s, 16 kHz float32 clip."""
    return kws_clip(*read_wav(path))


def _read_split(paths: list[Path], labels: np.ndarray, desc: str, progress: bool):
    """Read all ``paths`` into an (N, 16000) array paired with int64 labels."""
    x = np.zeros((len(paths), KWS_CLIP_SAMPLES), dtype=np.float32)
    for i, p in enumerate(tqdm(paths, desc=desc, disable=not progress, leave=False)):
        x[i] = _read_clip(p)
    return x, np.asarray(labels, dtype=np.int64)


def fsdd_waveforms(
    data_dir: str | os.PathLike | None,
    split: str = "official",
    seed: int = 0,
    progress: bool = False,
) -> Splits:
    """FSDD {"train", "test"} as ((N, 16000) float32 1 s 16 kHz clips, int64 labels), cached."""
    recordings = _recordings_dir(data_dir)
    key = _dataset_key(recordings, split, seed, "waveforms")

    def compute() -> Splits:
        files = load_fsdd(recordings, split=split, seed=seed)
        return {
            s: _read_split(files[s].paths, files[s].labels, f"FSDD {s} wavs", progress)
            for s in SPLITS
        }

    return _cached_splits("fsdd_waveforms", key, compute)


def fsdd_mfcc(
    data_dir: str | os.PathLike | None,
    split: str = "official",
    seed: int = 0,
    progress: bool = False,
) -> Splits:
    """FSDD {"train", "test"} as ((N, 49, 10, 1) float32 KWS MFCCs, int64 labels), cached."""
    recordings = _recordings_dir(data_dir)
    key = _dataset_key(recordings, split, seed, "kws_mfcc")

    def compute() -> Splits:
        waves = fsdd_waveforms(data_dir, split, seed, progress=progress)
        return {s: (kws_mfcc(x), y) for s, (x, y) in waves.items()}

    return _cached_splits("fsdd_mfcc", key, compute)


# ====================================================================================
# Augmentation
# ====================================================================================


def augment_waveforms(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lightly augmented copy of (N, 16000) clips: random time shift and low noise.

    Every clip is shifted by a uniform integer in [-100 ms, +100 ms] (zero fill); with
    probability ``NOISE_PROBABILITY`` Gaussian noise is added whose standard deviation is
    the clip's peak amplitude times a level drawn uniformly in ``NOISE_DB_RANGE`` dB.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    shifts = rng.integers(-MAX_SHIFT_SAMPLES, MAX_SHIFT_SAMPLES + 1, size=n)
    noisy = rng.random(n) < NOISE_PROBABILITY
    level_db = rng.uniform(*NOISE_DB_RANGE, size=n)
    peak = np.max(np.abs(x), axis=1)
    std = np.where(noisy, peak * 10.0 ** (level_db / 20.0), 0.0).astype(np.float32)
    out = np.empty_like(x)
    for i in range(n):
        out[i] = time_shift(x[i], int(shifts[i]))
        if std[i] > 0:
            out[i] += std[i] * rng.standard_normal(x.shape[1], dtype=np.float32)
    return out


def augmented_features(
    x: np.ndarray, rng: np.random.Generator, copies: int = AUG_COPIES, progress: bool = False
) -> np.ndarray:
    """KWS MFCCs of ``copies`` augmented versions of the clips: (copies, N, 49, 10, 1)."""
    feats = [
        kws_mfcc(augment_waveforms(x, rng))
        for _ in tqdm(range(copies), desc="augmenting", disable=not progress, leave=False)
    ]
    return np.stack(feats)


# ====================================================================================
# Training
# ====================================================================================


def default_model_path(seed: int = 0) -> Path:
    """Where the trained FSDD DS-CNN for ``seed`` is cached."""
    return cache_dir("models") / f"kws_dscnn_fsdd_seed{seed}.h5"


@contextlib.contextmanager
def _deterministic_ops() -> Iterator[None]:
    """On a GPU, enable TF op determinism for the block and restore the setting after it.

    On CPU, seeded training is already bit-reproducible, and op determinism only slows
    ``tf.data`` down and makes TF log spurious ``NodeDef`` errors, so it is left off.
    """
    from tensorflow.python.framework import config as tf_config

    if not tf.config.list_physical_devices("GPU"):
        yield
        return
    was_enabled = bool(getattr(tf_config, "is_op_determinism_enabled", lambda: False)())
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        disable = getattr(tf_config, "disable_op_determinism", None)
        if not was_enabled and disable is not None:
            disable()


def _compile_model(steps_total: int) -> keras.Model:
    """A fresh 10-class DS-CNN compiled with Adam on a cosine-decayed learning rate."""
    model = dscnn(input_shape=(49, 10, 1), num_classes=NUM_CLASSES)
    schedule = keras.optimizers.schedules.CosineDecay(
        INITIAL_LR, decay_steps=max(1, steps_total), alpha=FINAL_LR_FRACTION
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.optimizer.build(model.trainable_variables)  # so fit traces its step only once
    return model


def _fit(
    model: keras.Model,
    feats: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    epochs: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Train one epoch at a time; each clip's features come from a random augmented copy."""
    n = y.shape[0]
    bar = tqdm(range(epochs), desc="training DS-CNN", unit="epoch", disable=not progress)
    for epoch in bar:
        order = rng.permutation(n)
        copy = rng.integers(feats.shape[0], size=n)
        hist = model.fit(
            feats[copy, order],
            y[order],
            batch_size=batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=False,
            verbose=0,
        )
        bar.set_postfix(
            loss=f"{hist.history['loss'][-1]:.4f}", acc=f"{hist.history['accuracy'][-1]:.4f}"
        )


def _save_model(model: keras.Model, path: Path) -> None:
    """Save ``model`` as HDF5 at ``path`` atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 is a legacy format"
        model.save(tmp, include_optimizer=False, save_format="h5")
    os.replace(tmp, path)


def train_kws_fsdd(
    data_dir: str | os.PathLike | None,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Train the 10-class DS-CNN on the FSDD official training split; returns the .h5 path."""
    if epochs < 1 or batch_size < 1:
        raise ModelError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    start = time.perf_counter()
    out = Path(out_path) if out_path is not None else default_model_path(seed)
    x_train, y_train = fsdd_waveforms(data_dir, "official", seed, progress)["train"]
    x_test, y_test = fsdd_mfcc(data_dir, "official", seed, progress)["test"]
    if x_train.shape[0] == 0 or x_test.shape[0] == 0:
        raise DataError(f"FSDD at {_recordings_dir(data_dir)} has an empty train or test split")
    rng = np.random.default_rng(seed)
    feats = augmented_features(x_train, rng, progress=progress)
    feature_seconds = time.perf_counter() - start
    with _deterministic_ops():
        keras.utils.set_random_seed(seed)
        steps = epochs * -(-y_train.shape[0] // batch_size)
        model = _compile_model(steps)
        _fit(model, feats, y_train, rng, epochs, batch_size, progress)
        _, test_acc = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    _save_model(model, out)
    info = {
        "test_accuracy": float(test_acc),
        "epochs": int(epochs),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "train_files": int(y_train.shape[0]),
        "test_files": int(y_test.shape[0]),
        "feature_seconds": round(feature_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "recipe": TRAIN_RECIPE_VERSION,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    if progress:
        print(f"FSDD DS-CNN: test accuracy {test_acc:.4f} in {info['seconds']:.0f} s -> {out}")
    return out


def _is_current(path: Path, epochs: int) -> bool:
    """True when ``path`` exists and its sidecar says this recipe trained it for ``epochs``."""
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        info = json.loads(sidecar.read_text())
        return info.get("recipe") == TRAIN_RECIPE_VERSION and info.get("epochs") == epochs
    except (OSError, ValueError, AttributeError):
        return False


def kws_fsdd_model(
    data_dir: str | os.PathLike | None, seed: int = 0, progress: bool = True, epochs: int = 30
) -> Path:
    """The cached trained FSDD DS-CNN for ``seed``, training it first when it is missing."""
    path = default_model_path(seed)
    if _is_current(path, epochs):
        return path
    return train_kws_fsdd(data_dir, seed=seed, epochs=epochs, progress=progress)
