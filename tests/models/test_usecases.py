"""The kws, kws-mlperf, vww and ad use cases on real data, and their labelled paths on generated data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from tinyptq import api
from tinyptq.datasets.fsdd import load_fsdd
from tinyptq.errors import ModelError
from tinyptq.frontends import AD_FRAMES, AD_HOP_LENGTH, read_wav
from tinyptq.models.usecases import get_use_case, use_case_names

AGREEMENT = "top-1 agreement with FP32"
AD_FP32 = "FP32 mean squared reconstruction error"


def _rows(x: np.ndarray) -> set[bytes]:
    """Every sample of ``x`` as bytes, for content comparisons."""
    return {np.ascontiguousarray(r).tobytes() for r in x}


def _fsdd_ad_vectors(data_dir: Path, split: str) -> tuple[int, int]:
    """(vectors, clips with a vector) the AD front end yields for an FSDD split at 8 kHz."""
    counts = []
    for path in load_fsdd(data_dir / "fsdd" / "recordings")[split].paths:
        audio, _ = read_wav(path)
        counts.append(max(0, 1 + audio.size // AD_HOP_LENGTH - (AD_FRAMES - 1)))
    return sum(counts), sum(1 for c in counts if c)


@pytest.fixture(scope="module")
def quantized(data_dir: Path):
    """W8A8 min-max quantization of a use case, run at most once per module."""
    done: dict[str, api.QuantizeResult] = {}

    def run(name: str) -> api.QuantizeResult:
        if name not in done:
            done[name] = api.quantize(name, "minmax", data_dir)
        return done[name]

    return run


def test_use_cases_are_registered() -> None:
    assert {"ic", "kws", "kws-mlperf", "vww", "ad"} <= set(use_case_names())


# ------------------------------------------------------------------ FP32 evaluation


@pytest.mark.parametrize(
    ("name", "metric", "samples"),
    [("kws-mlperf", AGREEMENT, 300), ("vww", AGREEMENT, 466)],
)
def test_evaluate_label_free_classifiers(
    data_dir: Path, name: str, metric: str, samples: int
) -> None:
    result = api.evaluate(name, data_dir)
    assert (result.name, result.samples, result.unit) == (metric, samples, "%")
    assert result.value == 100.0  # FP32 agrees with itself


def test_evaluate_ad_reports_fp32_reconstruction_error(data_dir: Path) -> None:
    result = api.evaluate("ad", data_dir)
    vectors, clips = _fsdd_ad_vectors(data_dir, "test")
    assert (result.name, result.samples, result.unit) == (AD_FP32, vectors, "dB^2")
    assert 0 < clips < 300 and vectors > 900  # short clips yield no 5-frame vector
    assert math.isfinite(result.value) and 10.0 < result.value < 1000.0


def test_ad_eval_set_carries_clip_ids(data_dir: Path) -> None:
    data = get_use_case("ad", data_dir).eval_set()
    clip = data.extra["clip"]
    assert data.y is None and data.x.shape == (len(clip), 640)
    assert np.all(np.diff(clip) >= 0)  # vectors of a clip are contiguous, clips in file order


# ------------------------------------------------------------------ W8A8 quantization


@pytest.mark.slow
@pytest.mark.parametrize(("name", "floor"), [("kws-mlperf", 97.0), ("vww", 97.0)])
def test_w8a8_agreement(quantized, name: str, floor: float) -> None:
    summary = quantized(name).summary
    assert summary["metric"] == AGREEMENT and summary["fp32"] == 100.0
    assert floor <= summary["quantized"] <= 100.0
    assert summary["bits"] == {"weights": 8, "activations": 8}
    assert summary["calibration"] == {"samples": 256, "seed": 0}


@pytest.mark.slow
def test_w8a8_ad_sqnr_and_rank_correlation(data_dir: Path, quantized) -> None:
    result = quantized("ad")
    summary = result.summary
    assert summary["fp32_metric"] == AD_FP32 and summary["delta"] is None
    assert summary["metric"] == "reconstruction SQNR vs FP32" and summary["metric_unit"] == "dB"
    assert 28.0 < summary["quantized"] < 60.0  # SQNR in dB (measured 32.5)
    assert 0.99 < summary["metric_extras"]["per-clip error rank correlation"] <= 1.0
    uc = get_use_case("ad", data_dir)
    data = uc.eval_set()
    fp32 = uc.load_graph().predict(data.x)
    metric = uc.metric(data, result.sim.predict(data.x), fp32)
    assert metric.name.startswith("reconstruction SQNR vs FP32") and metric.unit == "dB"
    assert metric.value == pytest.approx(summary["quantized"])
    rho = metric.extras["per-clip error rank correlation"]
    assert 0.99 < rho <= 1.0  # measured 0.9992


@pytest.mark.slow
def test_kws_fsdd_model_accuracy(data_dir: Path, quantized) -> None:
    fp32 = api.evaluate("kws", data_dir)
    assert (fp32.name, fp32.samples) == ("accuracy", 300)
    assert fp32.value >= 95.0
    summary = quantized("kws").summary
    assert summary["fp32"] == pytest.approx(fp32.value)
    assert summary["quantized"] >= fp32.value - 3.0


def test_kws_rejects_a_model_with_the_wrong_class_count(data_dir: Path) -> None:
    with pytest.raises(ModelError, match="10 outputs"):
        api.evaluate("kws", data_dir, model=data_dir / "mlperf-tiny" / "kws_dscnn_savedmodel")


# ------------------------------------------------------------------ calibration


def test_ad_calibration_is_disjoint_from_evaluation(data_dir: Path) -> None:
    uc = get_use_case("ad", data_dir)
    calib = uc.calibration_data(100_000, seed=0)  # every training vector
    assert len(calib) == _fsdd_ad_vectors(data_dir, "train")[0]
    assert not _rows(calib) & _rows(uc.eval_set().x)


def test_kws_mlperf_calibration_is_disjoint_from_evaluation(data_dir: Path) -> None:
    uc = get_use_case("kws-mlperf", data_dir)
    calib = uc.calibration_data(10_000, seed=0)
    assert calib.shape == (2700, 49, 10, 1)
    assert not _rows(calib) & _rows(uc.eval_set().x)


@pytest.mark.parametrize("name", ["kws-mlperf", "vww", "ad"])
def test_calibration_is_deterministic_per_seed(data_dir: Path, name: str) -> None:
    uc = get_use_case(name, data_dir)
    a, b, c = uc.calibration_data(64, 1), uc.calibration_data(64, 1), uc.calibration_data(64, 2)
    assert a.dtype == np.float32 and len(a) == 64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_vww_calibration_comes_from_cifar_training_images(data_dir: Path) -> None:
    uc = get_use_case("vww", data_dir)
    calib, test = uc.calibration_data(512, 0), uc.eval_set().x
    assert calib.shape == (512, 96, 96, 3) and 0.0 <= calib.min() and calib.max() <= 1.0
    assert not _rows(calib) & _rows(test)


# ------------------------------------------------------------------ labelled datasets (generated)


@pytest.fixture
def gen_dir(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory holding the real MLPerf models; features are cached under tmp_path."""
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    root.mkdir()
    (root / "mlperf-tiny").symlink_to(data_dir / "mlperf-tiny")
    return root


def _write_speech_commands(root: Path) -> None:
    """Words yes/no/cat (4 test, 4 validation, 8 train speakers each) and one noise file."""
    rng = np.random.default_rng(0)
    sc = root / "speech_commands_v0.02"
    lists: dict[str, list[str]] = {"validation": [], "test": []}
    for word in ("yes", "no", "cat"):
        (sc / word).mkdir(parents=True)
        for spk in range(16):
            rel = f"{word}/{spk:08x}_nohash_0.wav"
            audio = rng.integers(-3000, 3000, size=12000, dtype=np.int16)
            wavfile.write(sc / rel, 16000, audio)
            if spk < 8:
                lists["validation" if spk < 4 else "test"].append(rel)
    (sc / "_background_noise_").mkdir()
    wavfile.write(
        sc / "_background_noise_" / "white.wav",
        16000,
        rng.integers(-500, 500, 320000, dtype=np.int16),
    )
    (sc / "validation_list.txt").write_text("\n".join(lists["validation"]) + "\n")
    (sc / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n")


@pytest.mark.parametrize("name", ["kws-mlperf", "kws"])
def test_kws_uses_speech_commands_when_present(gen_dir: Path, name: str) -> None:
    _write_speech_commands(gen_dir)
    from tinyptq.datasets.speech_commands import load_speech_commands

    test = load_speech_commands(gen_dir / "speech_commands_v0.02")["test"]
    uc = get_use_case(name, gen_dir)
    assert uc.model_path().name == "kws_dscnn_savedmodel"  # the 12-class MLPerf model
    result = api.evaluate(name, gen_dir)
    assert (result.name, result.samples) == ("accuracy", len(test))
    assert test.is_silence().any() and 0.0 <= result.value <= 100.0
    calib = uc.calibration_data(16, 0)
    assert calib.shape == (16, 49, 10, 1) and not _rows(calib) & _rows(uc.eval_set().x)


def test_vww_uses_the_vww_images_when_present(gen_dir: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("person", "non_person"):
        (gen_dir / "vww" / name).mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(gen_dir / "vww" / name / f"COCO_{i:04d}.png")
    result = api.evaluate("vww", gen_dir)
    assert (result.name, result.samples) == ("accuracy", 4)  # 10 % of each class
    calib = get_use_case("vww", gen_dir).calibration_data(8, 0)
    assert calib.shape == (8, 96, 96, 3) and calib.max() <= 1.0


def test_ad_reports_roc_auc_on_toyadmos(gen_dir: Path) -> None:
    rng = np.random.default_rng(0)
    machine = gen_dir / "toyadmos" / "ToyCar"
    t = np.arange(32000) / 16000  # 2 s: frames 50..62 of the MLPerf range survive
    for folder, kind, n in (("train", "normal", 4), ("test", "normal", 3), ("test", "anomaly", 3)):
        (machine / folder).mkdir(parents=True, exist_ok=True)
        for mid in (1, 2):
            for i in range(n):
                tone = np.sin(2 * np.pi * (300 if kind == "normal" else 2500) * t)
                audio = 0.3 * tone + 0.01 * rng.standard_normal(t.size)
                wavfile.write(
                    machine / folder / f"{kind}_id_{mid:02d}_{i:08d}.wav",
                    16000,
                    (audio * 32767).astype(np.int16),
                )
    result = api.evaluate("ad", gen_dir)
    assert (result.name, result.samples, result.unit) == ("ROC AUC (mean over machine ids)", 12, "")
    assert 0.0 <= result.value <= 1.0
    calib = get_use_case("ad", gen_dir).calibration_data(32, 0)
    assert calib.shape == (32, 640)
    summary = api.quantize("ad", "minmax", gen_dir, calib_samples=32).summary
    assert (
        summary["metric"] == "ROC AUC (mean over machine ids)"
        and 0.0 <= summary["quantized"] <= 1.0
    )
