"""Sample filters (personalized calibration): parse_filter, UseCase.check_filter, kws by speaker."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from tinyptq import api
from tinyptq.cli import main
from tinyptq.datasets.fsdd import OFFICIAL_TEST_TAKES, load_fsdd, scan, split_speakers
from tinyptq.errors import ConfigError
from tinyptq.frontends import kws_clip, kws_mfcc, read_wav
from tinyptq.models.usecases import get_use_case, parse_filter, seeded_sample

SPEAKER = "jackson"
JACKSON = {"speaker": SPEAKER}


@pytest.fixture(scope="module")
def recordings(data_dir: Path) -> Path:
    return data_dir / "fsdd" / "recordings"


@pytest.fixture(scope="module")
def kws(data_dir: Path):
    return get_use_case("kws", data_dir)


@pytest.fixture(scope="module")
def train_x(kws) -> np.ndarray:
    """The cached FSDD training MFCCs (all speakers, file order)."""
    return kws._fsdd()["train"][0]


def _rows(x: np.ndarray) -> set[bytes]:
    return {np.ascontiguousarray(r).tobytes() for r in x}


def _all_of(uc, where, what="train") -> np.ndarray:
    """Every matching clip (training: through calibration_data with a large n, warning silenced)."""
    if what == "test":
        return uc.eval_set(where=where).x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return uc.calibration_data(100_000, 0, where=where)


# ------------------------------------------------------------------ parse_filter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("speaker=jackson", {"speaker": "jackson"}),
        (" speaker = jackson ", {"speaker": "jackson"}),
        ("speaker=jackson,take=3", {"speaker": "jackson", "take": "3"}),
    ],
)
def test_parse_filter(text: str, expected: dict[str, str]) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("speaker", "malformed at 'speaker'"),
        ("speaker=", "malformed"),
        ("=jackson", "malformed"),
        ("speaker=a=b", "malformed"),
        ("1speaker=a", "malformed"),
        ("speaker=jackson,", "empty pair"),
        ("", "empty pair"),
        ("speaker=a,speaker=b", "gives 'speaker' twice"),
    ],
)
def test_parse_filter_rejects_malformed_text_in_one_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_filter(text, "--calib-filter")
    message = str(err.value)
    assert needle in message and message.startswith("--calib-filter") and "\n" not in message


# ------------------------------------------------------------------ filter errors


def test_ic_has_no_filter_keys(data_dir: Path) -> None:
    uc = get_use_case("ic", data_dir)
    assert uc.filter_keys() == ()
    with pytest.raises(
        ConfigError, match=r"use case 'ic' cannot filter by 'speaker': it has no filter keys"
    ):
        uc.calibration_data(8, 0, where=JACKSON)
    with pytest.raises(ConfigError, match=r"use case 'ic' cannot filter by 'speaker'"):
        uc.eval_set(where="speaker=jackson")


@pytest.mark.parametrize("name", ["vww", "ad"])
def test_use_cases_written_before_filters_accept_where_and_refuse_filters(
    data_dir: Path, name: str
) -> None:
    uc = get_use_case(name, data_dir)
    assert "where" in inspect.signature(uc.calibration_data).parameters
    assert "where" in inspect.signature(uc.eval_set).parameters
    with pytest.raises(ConfigError, match=rf"use case '{name}' cannot filter by 'speaker'"):
        uc.calibration_data(8, 0, where=JACKSON)
    with pytest.raises(ConfigError, match=rf"use case '{name}' cannot filter by 'speaker'"):
        uc.eval_set(where=JACKSON)


def test_kws_rejects_unknown_speakers_and_keys(kws, recordings: Path) -> None:
    speakers = sorted({r.speaker for r in scan(recordings)})
    assert kws.filter_keys() == ("speaker",) and kws.filter_values("speaker") == speakers
    with pytest.raises(ConfigError) as err:
        kws.calibration_data(8, 0, where={"speaker": "bob"})
    assert f"unknown speaker 'bob' for use case 'kws' (valid: {', '.join(speakers)})" in str(
        err.value
    )
    with pytest.raises(
        ConfigError, match=r"unknown key 'gender' for use case 'kws' \(valid: speaker\)"
    ):
        kws.eval_set(where={"gender": "male"})
    with pytest.raises(ConfigError, match="malformed"):
        kws.eval_set(where="speaker:jackson")


def test_kws_takes_no_filter_on_speech_commands(tmp_path: Path) -> None:
    (tmp_path / "speech_commands_v0.02").mkdir()  # its presence switches kws to Speech Commands
    uc = get_use_case("kws", tmp_path)
    assert uc.filter_keys() == ()
    with pytest.raises(ConfigError, match=r"cannot filter by 'speaker': speaker filters need FSDD"):
        uc.calibration_data(8, 0, where=JACKSON)


def test_quantize_refuses_a_calibration_filter_with_given_calibration_data(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot apply to given calib_data"):
        api.quantize(
            "kws", "minmax", data_dir, calib_data=np.zeros((4, 49, 10, 1)), calib_filter=JACKSON
        )


# ------------------------------------------------------------------ kws by speaker


def test_split_sizes_per_speaker(kws, recordings: Path) -> None:
    files = load_fsdd(recordings)
    speakers = split_speakers(recordings)
    for split in ("train", "test"):
        assert len(speakers[split]) == len(files[split])
    for speaker in kws.filter_values("speaker"):
        n_train = int(np.sum(speakers["train"] == speaker))
        n_test = int(np.sum(speakers["test"] == speaker))
        assert (n_train, n_test) == (450, 50)  # 50 takes per digit: 0-4 test, 5-49 train
        assert len(_all_of(kws, {"speaker": speaker})) == n_train
        data = kws.eval_set(where={"speaker": speaker})
        assert len(data.x) == n_test and np.all(data.extra["speaker"] == speaker)
        assert np.bincount(data.y, minlength=10).tolist() == [OFFICIAL_TEST_TAKES] * 10


def test_filtered_calibration_holds_only_that_speakers_training_clips(
    kws, recordings: Path
) -> None:
    calib = _all_of(kws, JACKSON)
    assert calib.shape == (450, 49, 10, 1) and calib.dtype == np.float32
    # features computed here, from the files, independent of the cache and its order
    recs = [r for r in scan(recordings) if r.index >= OFFICIAL_TEST_TAKES]
    mine = [r.path for r in recs if r.speaker == SPEAKER][::45]
    others = [r.path for r in recs if r.speaker != SPEAKER][::225]
    feats = kws_mfcc(np.stack([kws_clip(*read_wav(p)) for p in mine + others]))
    flat = calib.reshape(len(calib), -1)
    dist = [float(np.min(np.abs(flat - f.reshape(1, -1)).max(axis=1))) for f in feats]
    assert max(dist[: len(mine)]) < 1e-3, dist  # each of jackson's clips is there
    assert min(dist[len(mine) :]) > 1e-1, dist  # no one else's
    assert not _rows(calib) & _rows(kws.eval_set().x)  # and no test clip


def test_filtered_eval_set_is_that_speakers_test_rows(kws) -> None:
    full = kws.eval_set()
    assert len(full.x) == 300 and len(full.extra["speaker"]) == 300
    assert sorted(np.unique(full.extra["speaker"], return_counts=True)[1]) == [50] * 6
    mine = kws.eval_set(where=JACKSON)
    keep = full.extra["speaker"] == SPEAKER
    np.testing.assert_array_equal(mine.x, full.x[keep])
    np.testing.assert_array_equal(mine.y, full.y[keep])
    assert "speaker=jackson" in mine.source and mine.extra["classes"] == 10


def test_filtered_calibration_is_deterministic_and_a_subset(kws) -> None:
    everyone = _all_of(kws, JACKSON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n below the speaker's clips: no warning
        a = kws.calibration_data(64, 1, where=JACKSON)
        b = kws.calibration_data(64, 1, where="speaker=jackson")
        c = kws.calibration_data(64, 2, where=JACKSON)
    assert a.shape == (64, 49, 10, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert _rows(a) <= _rows(everyone) and _rows(c) <= _rows(everyone)


def test_more_samples_than_the_speaker_has_warns_once(kws) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calib = kws.calibration_data(1000, 0, where=JACKSON)
    assert len(calib) == 450
    assert len(caught) == 1 and "only 450 match; using all 450" in str(caught[0].message)


def test_unfiltered_calibration_is_unchanged(kws, train_x: np.ndarray) -> None:
    expected = seeded_sample(train_x, 64, 3, "x")
    np.testing.assert_array_equal(kws.calibration_data(64, 3), expected)
    np.testing.assert_array_equal(kws.calibration_data(64, 3, where=None), expected)
    np.testing.assert_array_equal(kws.calibration_data(64, 3, where={}), expected)


def test_filtering_reads_the_cached_features(kws, monkeypatch: pytest.MonkeyPatch) -> None:
    from tinyptq.models import training

    kws.eval_set()  # the cache is filled (by now it already is)

    def recompute(*args, **kwargs):
        raise AssertionError("FSDD features recomputed")

    monkeypatch.setattr(training, "fsdd_waveforms", recompute)
    monkeypatch.setattr(training, "kws_mfcc", recompute)
    assert len(kws.calibration_data(16, 0, where=JACKSON)) == 16
    assert len(kws.eval_set(where=JACKSON).x) == 50


def test_kws_mlperf_filters_fsdd_audio_too(data_dir: Path, kws) -> None:
    uc = get_use_case("kws-mlperf", data_dir)
    data = uc.eval_set(where={"speaker": "theo"})
    assert data.y is None and len(data.x) == 50 and set(data.extra["speaker"]) == {"theo"}
    np.testing.assert_array_equal(
        uc.calibration_data(32, 5, where={"speaker": "theo"}),
        kws.calibration_data(32, 5, where={"speaker": "theo"}),
    )


# ------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_quantize_with_speaker_filters(capsys, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["quantize", "--use-case", "kws", "--data-dir", data_dir, "--out", out]
    args += [
        "--calib-filter",
        "speaker=jackson",
        "--eval-filter",
        "speaker=jackson",
        "--calib-samples",
        100,
    ]
    code = main([str(a) for a in args])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"] == {"samples": 100, "seed": 0, "filter": JACKSON}
    assert summary["eval_samples"] == 50 and "speaker=jackson" in summary["eval_source"]
    assert "100 calibration samples" in stdout

    code = main(
        [
            str(a)
            for a in [
                "quantize",
                "--use-case",
                "kws",
                "--data-dir",
                data_dir,
                "--out",
                out,
                "--calib-filter",
                "speaker=bob",
            ]
        ]
    )
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "unknown speaker 'bob'" in lines[0], err
