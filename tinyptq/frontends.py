"""Audio front ends: wav reading, resampling, and the MLPerf Tiny KWS / AD features.

Two feature recipes are reproduced here without librosa:

* ``kws_mfcc``: the MLPerf Tiny keyword-spotting MFCCs (49 x 10 per 1 s clip at
  16 kHz), computed with ``tf.signal`` exactly as the reference training script does.
* ``ad_logmel_frames``: the DCASE 2020 Task 2 baseline / MLPerf Tiny anomaly
  detection log-mel vectors (128 mels x 5 frames = 640), with a librosa-compatible
  centred STFT in TF and a Slaney mel filterbank written in numpy.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

from tinyptq._tf import tf
from tinyptq.errors import DataError

# --- MLPerf Tiny KWS constants (kws_util.py defaults) -------------------------------
KWS_SAMPLE_RATE = 16000
KWS_CLIP_SAMPLES = 16000  # clip_duration_ms = 1000
KWS_FRAME_LENGTH = 480  # window_size_ms = 30
KWS_FRAME_STEP = 320  # window_stride_ms = 20
KWS_FFT_LENGTH = 512  # tf.signal.stft(fft_length=None) -> next power of two >= 480
KWS_NUM_MEL_BINS = 40
KWS_LOWER_HZ = 20.0
KWS_UPPER_HZ = 4000.0
KWS_NUM_MFCC = 10  # dct_coefficient_count
KWS_LOG_OFFSET = 1e-6
KWS_CHUNK = 512

# --- DCASE 2020 Task 2 / MLPerf Tiny AD constants ------------------------------------
AD_N_MELS = 128
AD_FRAMES = 5
AD_N_FFT = 1024
AD_HOP_LENGTH = 512
AD_POWER = 2.0
# MLPerf Tiny's copy of common.py keeps only spectrogram columns 50:250 ("take central
# part only"); the original DCASE baseline keeps every frame.
MLPERF_AD_FRAME_RANGE = (50, 250)
AD_CHUNK = 64


# ====================================================================================
# Reading and basic waveform helpers
# ====================================================================================


def _pcm_to_float(data: np.ndarray, path: Path) -> np.ndarray:
    """Scale integer PCM to float32 in [-1, 1] the way soundfile/librosa do."""
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    if data.dtype == np.int32:  # 32-bit, and 24-bit (scipy left-aligns it into int32)
        return (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32)
    raise DataError(f"{path}: unsupported wav sample type {data.dtype}")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM wav file as mono float32 in [-1, 1] (first channel) and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"wav file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            sr, data = wavfile.read(path)
    except (OSError, ValueError, EOFError, struct.error, IndexError) as e:
        raise DataError(f"cannot read wav file {path}: {e}") from None
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[:, 0]
    if data.ndim != 1 or data.size == 0:
        raise DataError(f"wav file has no samples: {path}")
    return _pcm_to_float(data, path), int(sr)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase-resample a 1-D signal from ``orig_sr`` to ``target_sr`` (float32)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise DataError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio.copy()
    g = math.gcd(int(orig_sr), int(target_sr))
    out = resample_poly(audio, int(target_sr) // g, int(orig_sr) // g, axis=-1)
    return out.astype(np.float32)


def pad_or_crop(audio: np.ndarray, length: int, offset: int = 0) -> np.ndarray:
    """Take ``length`` samples starting at ``offset``, zero-padding at the end if short."""
    if length < 0 or offset < 0:
        raise DataError(f"pad_or_crop needs length >= 0 and offset >= 0, got {length}, {offset}")
    audio = np.asarray(audio, dtype=np.float32)
    piece = audio[offset : offset + length]
    out = np.zeros(length, dtype=np.float32)
    out[: piece.size] = piece
    return out



def kws_clip(audio: np.ndarray, sr: int) -> np.ndarray:
    """Audio at any rate as the KWS front end's input: 16 kHz, exactly 1 s."""
    return pad_or_crop(resample(audio, sr, KWS_SAMPLE_RATE), KWS_CLIP_SAMPLES)


def time_shift(audio: np.ndarray, shift: int) -> np.ndarray:
    """Shift a 1-D signal by ``shift`` samples (positive = later), filling with zeros."""
    audio = np.asarray(audio, dtype=np.float32)
    out = np.zeros_like(audio)
    n = audio.size
    if abs(shift) >= n:
        return out
    if shift >= 0:
        out[shift:] = audio[: n - shift]
    else:
        out[:shift] = audio[-shift:]
    return out


# ====================================================================================
# MLPerf Tiny keyword-spotting MFCC
# ====================================================================================


def kws_stft_frames(n_samples: int = KWS_CLIP_SAMPLES) -> int:
    """Number of STFT frames the KWS front end yields for ``n_samples`` (49 for 1 s)."""
    if n_samples < KWS_FRAME_LENGTH:
        return 0
    return 1 + (n_samples - KWS_FRAME_LENGTH) // KWS_FRAME_STEP


@functools.cache
def _kws_graph(peak_normalize: bool):
    """Build (once per flag) the batched tf.function computing KWS MFCCs."""
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        KWS_NUM_MEL_BINS, KWS_FFT_LENGTH // 2 + 1, KWS_SAMPLE_RATE, KWS_LOWER_HZ, KWS_UPPER_HZ
    )

    @tf.function(input_signature=[tf.TensorSpec([None, KWS_CLIP_SAMPLES], tf.float32)])
    def features(x):
        if peak_normalize:
            peak = tf.reduce_max(x, axis=1, keepdims=True)
            x = x / tf.where(peak > 0.0, peak, tf.ones_like(peak))
        stfts = tf.signal.stft(
            x,
            frame_length=KWS_FRAME_LENGTH,
            frame_step=KWS_FRAME_STEP,
            fft_length=KWS_FFT_LENGTH,
            window_fn=tf.signal.hann_window,
        )
        mel = tf.tensordot(tf.abs(stfts), mel_matrix, 1)
        log_mel = tf.math.log(mel + KWS_LOG_OFFSET)
        mfccs = tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :KWS_NUM_MFCC]
        return mfccs[..., tf.newaxis]

    return features


def kws_mfcc(
    audio_batch: np.ndarray, peak_normalize: bool = True, chunk: int = KWS_CHUNK
) -> np.ndarray:
    """MLPerf Tiny KWS MFCCs (N, 49, 10, 1) float32 for 1 s 16 kHz clips (N, 16000).

    Matches ``get_dataset.py`` (feature_type='mfcc') of mlcommons/tiny:

    * optional per-clip peak normalisation ``x / max(x)`` (the reference divides by the
      clip's largest *signed* sample, not max-abs; clips whose max is <= 0 are left
      unscaled here instead of producing Inf/NaN);
    * ``tf.signal.stft(frame_length=480, frame_step=320, fft_length=None -> 512,
      window_fn=hann_window (periodic), pad_end=False)`` -> 49 frames x 257 bins;
    * magnitude ``|STFT|`` (not power);
    * ``linear_to_mel_weight_matrix(40, 257, 16000, 20, 4000)`` (HTK mel, unnormalised);
    * ``log(mel + 1e-6)``; ``mfccs_from_log_mel_spectrograms``; first 10 coefficients.

    The reference's fixed time shift (pad 2, slice from 2) is the identity and is omitted.
    """
    x = np.asarray(audio_batch, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != KWS_CLIP_SAMPLES:
        raise DataError(f"kws_mfcc expects audio of shape (N, {KWS_CLIP_SAMPLES}), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError("kws_mfcc input audio contains NaN/Inf values")
    out = np.empty((x.shape[0], kws_stft_frames(), KWS_NUM_MFCC, 1), dtype=np.float32)
    fn = _kws_graph(bool(peak_normalize))
    for start in range(0, x.shape[0], max(1, chunk)):
        stop = start + max(1, chunk)
        out[start:stop] = fn(tf.constant(x[start:stop])).numpy()
    return out


# ====================================================================================
# Slaney mel filterbank (librosa.filters.mel defaults: htk=False, norm='slaney')
# ====================================================================================

_F_SP = 200.0 / 3.0  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mel
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel_slaney(hz: np.ndarray | float) -> np.ndarray:
    """Slaney (Auditory Toolbox) mel: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, mel)


def mel_to_hz_slaney(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of ``hz_to_mel_slaney``."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, hz)


def slaney_mel_edges(n_mels: int, fmin: float = 0.0, fmax: float = 8000.0) -> np.ndarray:
    """The ``n_mels + 2`` band edges in Hz (filter i spans edges[i]..edges[i+2], peak edges[i+1])."""
    mels = np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    return mel_to_hz_slaney(mels)


def slaney_mel_filterbank(
    sr: int, n_fft: int, n_mels: int = AD_N_MELS, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Mel weights (n_mels, 1 + n_fft // 2) float32 like ``librosa.filters.mel`` defaults.

    Filter i is a triangle over the FFT bin frequencies ``k * sr / n_fft`` rising from
    ``edges[i]`` to 1 at ``edges[i+1]`` and falling to 0 at ``edges[i+2]``, then scaled by
    ``2 / (edges[i+2] - edges[i])`` (Slaney area normalisation: unit area in Hz).
    """
    fmax = sr / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sr / 2.0:
        raise DataError(f"mel filterbank needs 0 <= fmin < fmax <= sr/2, got {fmin}, {fmax}, {sr}")
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    edges = slaney_mel_edges(n_mels, fmin, fmax)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


# ====================================================================================
# DCASE 2020 Task 2 / MLPerf Tiny anomaly-detection log-mel frames
# ====================================================================================


def _check_ad_args(n_mels: int, frames: int, n_fft: int, hop_length: int, power: float) -> None:
    """Reject non-positive front-end parameters."""
    if min(n_mels, frames, n_fft, hop_length) < 1 or power <= 0:
        raise DataError(
            f"bad AD front-end parameters n_mels={n_mels} frames={frames} "
            f"n_fft={n_fft} hop_length={hop_length} power={power}"
        )


def _centre_pad(audio: np.ndarray, n_fft: int) -> np.ndarray:
    """librosa ``center=True``: reflect-pad n_fft // 2 samples on each side."""
    return np.pad(audio, (n_fft // 2, n_fft // 2), mode="reflect")


def _log_mel_batch(
    padded: np.ndarray, fbank: np.ndarray, n_fft: int, hop_length: int, power: float
) -> np.ndarray:
    """(N, L) centre-padded clips -> (N, T, n_mels) float32 of 20/power*log10(mel + eps)."""
    stft = tf.signal.stft(
        tf.constant(padded, tf.float32),
        frame_length=n_fft,
        frame_step=hop_length,
        fft_length=n_fft,
        window_fn=tf.signal.hann_window,
        pad_end=False,
    )
    spec = tf.abs(stft)
    spec = tf.square(spec) if power == 2.0 else tf.pow(spec, power)
    mel = tf.tensordot(spec, tf.constant(fbank.T), 1).numpy()
    eps = np.float32(sys.float_info.epsilon)
    return (np.float32(20.0 / power) * np.log10(mel + eps)).astype(np.float32)


def _stack_frames(log_mel: np.ndarray, frames: int) -> np.ndarray:
    """(T, n_mels) -> (T - frames + 1, frames * n_mels), frame-major like the baseline."""
    n_frames, n_mels = log_mel.shape
    if n_frames < frames:
        return np.empty((0, frames * n_mels), dtype=np.float32)
    win = np.lib.stride_tricks.sliding_window_view(log_mel, frames, axis=0)  # (T', n_mels, f)
    return np.ascontiguousarray(win.transpose(0, 2, 1)).reshape(-1, frames * n_mels)


def ad_logmel_clips(
    clips: Sequence[np.ndarray],
    sr: int,
    n_mels: int = AD_N_MELS,
    frames: int = AD_FRAMES,
    n_fft: int = AD_N_FFT,
    hop_length: int = AD_HOP_LENGTH,
    power: float = AD_POWER,
    frame_range: tuple[int, int] | None = None,
    chunk: int = AD_CHUNK,
) -> list[np.ndarray]:
    """``ad_logmel_frames`` for many clips; equal-length clips share one batched STFT."""
    _check_ad_args(n_mels, frames, n_fft, hop_length, power)
    fbank = slaney_mel_filterbank(sr, n_fft, n_mels)
    arrays = [np.asarray(c, dtype=np.float32) for c in clips]
    for i, a in enumerate(arrays):
        if a.ndim != 1 or a.size < 2:
            raise DataError(f"clip {i}: expected 1-D audio with >= 2 samples, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise DataError(f"clip {i}: audio contains NaN/Inf values")
    by_length: dict[int, list[int]] = {}
    for i, a in enumerate(arrays):
        by_length.setdefault(a.size, []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(arrays)
    for idx in by_length.values():
        for start in range(0, len(idx), max(1, chunk)):
            part = idx[start : start + max(1, chunk)]
            padded = np.stack([_centre_pad(arrays[i], n_fft) for i in part])
            log_mel = _log_mel_batch(padded, fbank, n_fft, hop_length, power)
            for i, lm in zip(part, log_mel, strict=True):
                if frame_range is not None:
                    lm = lm[frame_range[0] : frame_range[1]]
                out[i] = _stack_frames(lm, frames)
    return out


def ad_logmel_frames(
    audio: np.ndarray,
    sr: int,
    n_mels: int = AD_N_MELS,
    frames: int = AD_FRAMES,
    n_fft: int = AD_N_FFT,
    hop_length: int = AD_HOP_LENGTH,
    power: float = AD_POWER,
    frame_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """DCASE 2020 Task 2 log-mel vectors (T - frames + 1, n_mels * frames) float32.

    Reproduces ``file_to_vector_array`` (librosa 0.6/0.7 era) without librosa:

    1. ``S = |STFT(y)| ** power`` with ``n_fft`` window = FFT length, ``hop_length``,
       periodic Hann window, ``center=True`` (reflect-pad ``n_fft // 2`` both ends), so
       ``T = 1 + len(y) // hop_length`` frames;
    2. ``mel = M @ S`` with ``M = slaney_mel_filterbank(sr, n_fft, n_mels)`` (fmin=0,
       fmax=sr/2, Slaney mel scale, Slaney area normalisation);
    3. ``L = 20 / power * log10(mel + sys.float_info.epsilon)`` (dB for power=2);
    4. optionally ``L = L[frame_range[0]:frame_range[1]]`` (MLPerf Tiny uses (50, 250));
    5. row t = concat(L[t], L[t+1], ..., L[t+frames-1]) -> ``n_mels * frames`` values.

    Clips too short for one vector give an empty (0, n_mels * frames) array, as upstream.
    """
    return ad_logmel_clips(
        [audio], sr, n_mels, frames, n_fft, hop_length, power, frame_range=frame_range
    )[0]
