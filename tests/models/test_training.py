"""FSDD KWS training recipe: cached waveforms / MFCCs and a tiny seeded training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from tinyptq._tf import keras
from tinyptq.errors import DataError, ModelError
from tinyptq.models import training
from tinyptq.models.training import (
    augment_waveforms,
    fsdd_mfcc,
    fsdd_waveforms,
    kws_fsdd_model,
    train_kws_fsdd,
)

TAKES = (3, 7)  # take 3 -> official test split, take 7 -> train


def _tone(digit: int, take: int, seconds: float) -> np.ndarray:
    """An 8 kHz int16 tone whose pitch encodes the digit."""
    t = np.arange(int(8000 * seconds)) / 8000.0
    freq = 300.0 + 150.0 * digit + 10.0 * take
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


@pytest.fixture
def fsdd_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir with fsdd/recordings of 10 digits x 2 takes (one 1.5 s clip); a tmp cache."""
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "data" / "fsdd" / "recordings"
    folder.mkdir(parents=True)
    for digit in range(10):
        for take in TAKES:
            seconds = 1.5 if (digit, take) == (0, 7) else 0.4 + 0.03 * digit
            wavfile.write(folder / f"{digit}_alice_{take}.wav", 8000, _tone(digit, take, seconds))
    return tmp_path / "data"


def _npz_files(kind: str) -> list[Path]:
    return sorted(training.cache_dir("features").glob(f"fsdd_{kind}_*.npz"))


def test_waveforms_are_1s_16k_clips_with_official_split(fsdd_root: Path) -> None:
    waves = fsdd_waveforms(fsdd_root)
    assert set(waves) == {"train", "test"}
    for x, y in waves.values():
        assert x.shape == (10, 16000) and x.dtype == np.float32
        assert sorted(y.tolist()) == list(range(10))
    x, y = waves["test"]
    n_samples = int(16000 * (0.4 + 0.03 * int(y[1])))  # a short clip is zero-padded
    assert np.abs(x[1, : n_samples - 10]).max() > 0.1 and not x[1, n_samples + 10 :].any()
    assert np.abs(waves["train"][0][0, -100:]).max() > 0.1  # the 1.5 s clip is cropped


def test_waveforms_second_call_hits_the_cache(
    fsdd_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = fsdd_waveforms(fsdd_root)
    assert len(_npz_files("waveforms")) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("wav files were read again")

    monkeypatch.setattr(training, "read_wav", no_reading)
    second = fsdd_waveforms(fsdd_root)
    for split in ("train", "test"):
        np.testing.assert_array_equal(first[split][0], second[split][0])
        np.testing.assert_array_equal(first[split][1], second[split][1])


def test_cache_key_follows_files_and_split(fsdd_root: Path) -> None:
    fsdd_waveforms(fsdd_root)
    fsdd_waveforms(fsdd_root, split="speaker", seed=0)  # the only speaker is held out
    assert len(_npz_files("waveforms")) == 2
    recordings = fsdd_root / "fsdd" / "recordings"
    wavfile.write(recordings / "5_alice_8.wav", 8000, _tone(5, 8, 0.5))
    waves = fsdd_waveforms(fsdd_root)
    assert len(_npz_files("waveforms")) == 3 and len(waves["train"][1]) == 11


def test_mfcc_features_are_cached(fsdd_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    feats = fsdd_mfcc(fsdd_root)
    for x, y in feats.values():
        assert x.shape == (10, 49, 10, 1) and x.dtype == np.float32 and len(y) == 10
        assert np.all(np.isfinite(x))
    assert len(_npz_files("mfcc")) == 1
    monkeypatch.setattr(training, "kws_mfcc", lambda *a, **k: pytest.fail("recomputed"))
    np.testing.assert_array_equal(fsdd_mfcc(fsdd_root)["train"][0], feats["train"][0])


def test_missing_fsdd_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TINYPTQ_OFFLINE", "1")
    with pytest.raises(DataError, match="fsdd"):
        fsdd_waveforms(tmp_path / "empty")


def test_augmentation_is_seeded_light_and_keeps_shape() -> None:
    x = np.zeros((4, 16000), dtype=np.float32)
    x[:, 4000:8000] = 0.5
    a = augment_waveforms(x, np.random.default_rng(1))
    b = augment_waveforms(x, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.abs(a - x).max() <= 0.5 + 0.1  # a shifted edge plus noise at <= -30 dB
    onsets = [int(np.argmax(np.abs(row) > 0.25)) for row in a]
    assert all(abs(o - 4000) <= 1600 for o in onsets)  # at most +-100 ms


def _train(root: Path, out: Path) -> Path:
    return train_kws_fsdd(root, seed=3, epochs=2, batch_size=5, out_path=out, progress=False)


def test_tiny_training_saves_a_loadable_deterministic_model(
    fsdd_root: Path, tmp_path: Path
) -> None:
    first = _train(fsdd_root, tmp_path / "a.h5")
    second = _train(fsdd_root, tmp_path / "b.h5")
    assert first == tmp_path / "a.h5" and first.is_file()
    info = json.loads(first.with_suffix(".json").read_text())
    assert info["epochs"] == 2 and info["seed"] == 3 and 0.0 <= info["test_accuracy"] <= 1.0
    assert info["seconds"] > 0 and info["train_files"] == 10 and info["test_files"] == 10
    a = keras.models.load_model(first, compile=False)
    b = keras.models.load_model(second, compile=False)
    assert a.output_shape == (None, 10) and a.input_shape == (None, 49, 10, 1)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    probs = a.predict(fsdd_mfcc(fsdd_root)["test"][0], verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_kws_fsdd_model_trains_once_then_reuses_the_cache(
    fsdd_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_train(data_dir, seed=0, epochs=30, progress=True):
        calls.append(seed)
        path = training.default_model_path(seed)
        path.write_bytes(b"model")
        info = {"recipe": training.TRAIN_RECIPE_VERSION, "seed": seed, "epochs": epochs}
        path.with_suffix(".json").write_text(json.dumps(info))
        return path

    monkeypatch.setattr(training, "train_kws_fsdd", fake_train)
    path = kws_fsdd_model(fsdd_root, seed=5, progress=False)
    assert path == training.cache_dir("models") / "kws_dscnn_fsdd_seed5.h5" and path.is_file()
    assert kws_fsdd_model(fsdd_root, seed=5, progress=False) == path
    assert calls == [5]
    kws_fsdd_model(fsdd_root, seed=5, progress=False, epochs=3)
    assert calls == [5, 5]  # a model trained for another number of epochs is retrained
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({"recipe": "an-older-recipe", "epochs": 30}))
    kws_fsdd_model(fsdd_root, seed=5, progress=False)
    assert calls == [5, 5, 5]  # so is a model from another recipe


def test_bad_training_arguments_are_rejected(fsdd_root: Path) -> None:
    with pytest.raises(ModelError, match="epochs"):
        train_kws_fsdd(fsdd_root, epochs=0, progress=False)
