"""Tests for tinyptq.frontends: wav I/O, resampling, KWS MFCC and AD log-mel front ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.fft import dct
from scipy.io import wavfile

from tinyptq import frontends as fe
from tinyptq._tf import tf
from tinyptq.errors import DataError


def _tone(freq: float, sr: int, n: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


# --- read_wav -------------------------------------------------------------------------


def test_read_wav_round_trips_int16(tmp_path: Path) -> None:
    pcm = (np.random.default_rng(0).uniform(-1, 1, 4000) * 32767).astype(np.int16)
    path = tmp_path / "clip.wav"
    wavfile.write(path, 8000, pcm)
    audio, sr = fe.read_wav(path)
    assert sr == 8000
    assert audio.dtype == np.float32 and audio.shape == (4000,)
    np.testing.assert_array_equal(audio, pcm.astype(np.float32) / 32768.0)
    assert np.abs(audio).max() <= 1.0


def test_read_wav_takes_first_channel_and_scales_8_and_32_bit(tmp_path: Path) -> None:
    stereo = np.stack([np.full(100, 16384, np.int16), np.full(100, -16384, np.int16)], axis=1)
    wavfile.write(tmp_path / "s.wav", 16000, stereo)
    audio, _ = fe.read_wav(tmp_path / "s.wav")
    np.testing.assert_allclose(audio, 0.5)
    wavfile.write(tmp_path / "u8.wav", 16000, np.array([0, 128, 255], np.uint8))
    np.testing.assert_allclose(fe.read_wav(tmp_path / "u8.wav")[0], [-1.0, 0.0, 127 / 128])
    wavfile.write(tmp_path / "i32.wav", 16000, np.array([-(2**31), 2**30], np.int32))
    np.testing.assert_allclose(fe.read_wav(tmp_path / "i32.wav")[0], [-1.0, 0.5])


def test_read_wav_corrupt_or_missing_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(np.random.default_rng(1).bytes(1000))
    with pytest.raises(DataError, match="corrupt.wav"):
        fe.read_wav(bad)
    with pytest.raises(DataError, match="missing.wav"):
        fe.read_wav(tmp_path / "missing.wav")


# --- resample / pad / shift ------------------------------------------------------------


def test_resample_8k_to_16k_keeps_frequency_and_doubles_length() -> None:
    x = _tone(440.0, 8000, 8000)
    y = fe.resample(x, 8000, 16000)
    assert y.shape == (16000,) and y.dtype == np.float32
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * 16000 / y.size
    assert abs(peak_hz - 440.0) <= 1.0
    np.testing.assert_array_equal(fe.resample(x, 8000, 8000), x)


def test_pad_or_crop_and_time_shift() -> None:
    x = np.arange(1, 11, dtype=np.float32)
    np.testing.assert_array_equal(fe.pad_or_crop(x, 4), [1, 2, 3, 4])
    np.testing.assert_array_equal(fe.pad_or_crop(x, 4, offset=8), [9, 10, 0, 0])
    assert fe.pad_or_crop(x, 16000).shape == (16000,)
    np.testing.assert_array_equal(fe.time_shift(x[:4], 1), [0, 1, 2, 3])
    np.testing.assert_array_equal(fe.time_shift(x[:4], -2), [3, 4, 0, 0])
    np.testing.assert_array_equal(fe.time_shift(x[:4], 7), [0, 0, 0, 0])


# --- KWS MFCC --------------------------------------------------------------------------


def _kws_reference(clip: np.ndarray) -> np.ndarray:
    """Independent numpy version of the MLPerf recipe for one clip (49, 10)."""
    clip = clip / clip.max()
    n = 1 + (clip.size - 480) // 320
    frames = np.stack([clip[i * 320 : i * 320 + 480] for i in range(n)])
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(480) / 480)  # periodic Hann
    mag = np.abs(np.fft.rfft(frames * hann, n=512))
    mel_w = tf.signal.linear_to_mel_weight_matrix(40, 257, 16000, 20.0, 4000.0).numpy()
    log_mel = np.log(mag @ mel_w + 1e-6)
    return (dct(log_mel, type=2, axis=-1) / np.sqrt(2 * 40))[:, :10]


def test_kws_mfcc_shape_determinism_and_reference() -> None:
    rng = np.random.default_rng(2)
    silent = np.zeros(16000, np.float32)
    tone = _tone(1000.0, 16000, 16000, amp=0.9)
    noise = rng.uniform(-0.3, 0.3, 16000).astype(np.float32)
    batch = np.stack([silent, tone, noise])
    out = fe.kws_mfcc(batch)
    assert out.shape == (3, 49, 10, 1) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, fe.kws_mfcc(batch))  # deterministic
    np.testing.assert_allclose(out, fe.kws_mfcc(batch, chunk=2), atol=1e-5)  # chunking
    assert not np.allclose(out[0], out[1])
    np.testing.assert_allclose(out[2, :, :, 0], _kws_reference(noise), rtol=1e-3, atol=2e-3)


def test_kws_peak_normalisation_makes_features_scale_invariant() -> None:
    noise = np.random.default_rng(3).uniform(-0.5, 0.5, (1, 16000)).astype(np.float32)
    np.testing.assert_allclose(fe.kws_mfcc(noise), fe.kws_mfcc(0.25 * noise), atol=1e-3)
    raw = fe.kws_mfcc(noise, peak_normalize=False)
    assert not np.allclose(raw, fe.kws_mfcc(0.25 * noise, peak_normalize=False), atol=1e-2)


def test_kws_frame_count_is_49_for_one_second() -> None:
    assert fe.kws_stft_frames(16000) == 49
    stft = tf.signal.stft(
        tf.zeros([1, 16000]), fe.KWS_FRAME_LENGTH, fe.KWS_FRAME_STEP, fe.KWS_FFT_LENGTH
    )
    assert stft.shape == (1, 49, 257)
    with pytest.raises(DataError, match="16000"):
        fe.kws_mfcc(np.zeros((2, 8000), np.float32))


# --- Slaney mel filterbank ----------------------------------------------------------------


def test_slaney_mel_scale_known_points() -> None:
    assert fe.hz_to_mel_slaney(60.0) == pytest.approx(0.9)
    assert fe.hz_to_mel_slaney(1000.0) == pytest.approx(15.0)
    assert fe.mel_to_hz_slaney(3.0) == pytest.approx(200.0)
    f = np.array([0.0, 500.0, 1000.0, 3000.0, 8000.0])
    np.testing.assert_allclose(fe.mel_to_hz_slaney(fe.hz_to_mel_slaney(f)), f, atol=1e-9)


def test_slaney_filters_are_area_normalised_triangles() -> None:
    sr, n_fft, n_mels = 16000, 16384, 128  # fine grid: 0.98 Hz per bin
    fb = fe.slaney_mel_filterbank(sr, n_fft, n_mels).astype(np.float64)
    freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    edges = fe.slaney_mel_edges(n_mels, 0.0, sr / 2)
    assert fb.shape == (n_mels, 1 + n_fft // 2)
    heights = 2.0 / (edges[2:] - edges[:-2])
    for i in range(n_mels):
        lo, centre, hi = edges[i], edges[i + 1], edges[i + 2]
        row = fb[i]
        assert np.all(row[(freqs <= lo) | (freqs >= hi)] == 0)
        assert abs(freqs[np.argmax(row)] - centre) <= sr / n_fft  # peak at the centre
        assert row.max() <= heights[i] * (1 + 1e-6)
        assert row.max() == pytest.approx(heights[i], rel=0.05)
        up, down = row[(freqs > lo) & (freqs <= centre)], row[(freqs >= centre) & (freqs < hi)]
        assert np.all(np.diff(up) > 0) and np.all(np.diff(down) < 0)
    # unit area in Hz: sum of weights * bin spacing == 1 (Slaney normalisation)
    np.testing.assert_allclose(fb.sum(axis=1) * (sr / n_fft), 1.0, rtol=0.03)


def test_pure_tone_peaks_in_nearest_mel_bin() -> None:
    sr = 16000
    centres = fe.slaney_mel_edges(128, 0.0, sr / 2)[1:-1]
    for f in (440.0, 1000.0, 3000.0):
        vectors = fe.ad_logmel_frames(_tone(f, sr, sr), sr, frames=1)
        assert int(np.argmax(vectors.mean(axis=0))) == int(np.argmin(np.abs(centres - f)))


# --- AD log-mel frames ----------------------------------------------------------------------


def test_ad_logmel_frames_shape_and_reference() -> None:
    sr, n = 16000, 16000
    x = np.random.default_rng(4).uniform(-0.5, 0.5, n).astype(np.float32)
    out = fe.ad_logmel_frames(x, sr)
    n_frames = 1 + n // 512  # centred STFT
    assert out.shape == (n_frames - 5 + 1, 640) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # numpy reference of the librosa recipe, stacked frame-major
    padded = np.pad(x, 512, mode="reflect")
    frames = np.stack([padded[i * 512 : i * 512 + 1024] for i in range(n_frames)])
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)
    power = np.abs(np.fft.rfft(frames * hann)) ** 2
    log_mel = 10 * np.log10(power @ fe.slaney_mel_filterbank(sr, 1024, 128).T + 2.2e-16)
    np.testing.assert_allclose(out[0], log_mel[:5].reshape(-1), atol=2e-3)
    np.testing.assert_allclose(out[-1, 128:256], log_mel[-4], atol=2e-3)


def test_ad_logmel_clips_batch_matches_single_and_frame_range() -> None:
    rng = np.random.default_rng(5)
    clips = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (16000, 8000, 16000)]
    outs = fe.ad_logmel_clips(clips, 16000)
    assert [o.shape[0] for o in outs] == [28, 12, 28]
    for clip, got in zip(clips, outs, strict=True):
        np.testing.assert_allclose(got, fe.ad_logmel_frames(clip, 16000), atol=1e-4)
    cut = fe.ad_logmel_frames(clips[0], 16000, frame_range=(10, 20))
    np.testing.assert_allclose(cut, outs[0][10:16], atol=1e-4)
    assert fe.ad_logmel_frames(clips[0][:600], 16000).shape == (0, 640)


# --- real data ------------------------------------------------------------------------------


def test_fsdd_clip_through_kws_front_end(data_dir: Path) -> None:
    wav = data_dir / "fsdd" / "recordings" / "0_jackson_0.wav"
    if not wav.is_file():
        pytest.skip(f"{wav} not present")
    audio, sr = fe.read_wav(wav)
    assert sr == 8000
    clip = fe.pad_or_crop(fe.resample(audio, sr, 16000), 16000)
    feats = fe.kws_mfcc(clip[None, :])
    assert feats.shape == (1, 49, 10, 1)
    assert np.all(np.isfinite(feats))
