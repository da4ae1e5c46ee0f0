"""Where datasets and pretrained models live, and how a missing one is fetched.

The data directory is chosen by, in order: an explicit argument (the CLI's
``--data-dir``), the ``TINYPTQ_DATA_DIR`` environment variable, or a per-user
cache directory. Its layout mirrors the official distributions::

    cifar-10-batches-py/       CIFAR-10, python pickle batches
    fsdd/recordings/           Free Spoken Digit Dataset wav files
    speech_commands_v0.02/     Google Speech Commands v2
    vww/                       Visual Wake Words: person/ and non_person/
    toyadmos/<machine>/        DCASE 2020 Task 2 dev data: train/ and test/
    mlperf-tiny/               MLPerf Tiny reference models

On a machine with internet a missing asset is downloaded from its official
source into the data directory; when that is impossible the error names the
folder to create and where its content comes from.
"""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tinyptq.errors import DataError

ENV_VAR = "TINYPTQ_DATA_DIR"
OFFLINE_VAR = "TINYPTQ_OFFLINE"
_NETWORK_PROBE_SECONDS = 3.0
_DOWNLOAD_TIMEOUT_SECONDS = 30.0

_MLPERF = "https://raw.githubusercontent.com/mlcommons/tiny/master/benchmark/training"


@dataclass(frozen=True)
class Asset:
    """A dataset or model expected at ``relpath`` inside the data directory."""

    name: str
    relpath: str
    what: str
    # (url, where to put it relative to the data dir, how: "file" | "tar" | "zip")
    sources: tuple[tuple[str, str, str], ...] = field(default=())
    # inside an archive, the folder that becomes ``relpath`` (None: archive root)
    archive_root: str | None = None


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "cifar10",
            "cifar-10-batches-py",
            "CIFAR-10 python batches (data_batch_1..5, test_batch)",
            (("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py", "tar"),),
            archive_root="cifar-10-batches-py",
        ),
        Asset(
            "fsdd",
            "fsdd/recordings",
            "Free Spoken Digit Dataset wav files ({digit}_{speaker}_{index}.wav)",
            (
                (
                    "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/master.zip",
                    "fsdd",
                    "zip",
                ),
            ),
            archive_root="free-spoken-digit-dataset-master",
        ),
        Asset(
            "speech_commands",
            "speech_commands_v0.02",
            "Google Speech Commands v2 (word folders, validation_list.txt, testing_list.txt)",
            (
                (
                    "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
                    "speech_commands_v0.02",
                    "tar",
                ),
            ),
        ),
        Asset(
            "vww",
            "vww",
            "Visual Wake Words 96x96 images in person/ and non_person/",
            (
                (
                    "https://www.silabs.com/public/files/github/machine_learning/benchmarks/datasets/vw_coco2014_96.tar.gz",
                    "vww",
                    "tar",
                ),
            ),
            archive_root="vw_coco2014_96",
        ),
        Asset(
            "toyadmos",
            "toyadmos/ToyCar",
            "DCASE 2020 Task 2 ToyCar dev data (train/normal_*.wav, test/{normal,anomaly}_*.wav)",
            (("https://zenodo.org/record/3678171/files/dev_data_ToyCar.zip", "toyadmos", "zip"),),
        ),
        Asset(
            "ic_resnet8",
            "mlperf-tiny/ic_resnet8.h5",
            "MLPerf Tiny ResNet-8 (image classification)",
            (
                (
                    f"{_MLPERF}/image_classification/trained_models/pretrainedResnet.h5",
                    "mlperf-tiny/ic_resnet8.h5",
                    "file",
                ),
            ),
        ),
        Asset(
            "vww_mobilenetv1",
            "mlperf-tiny/vww_mobilenetv1_96.h5",
            "MLPerf Tiny MobileNetV1 0.25x 96x96 (visual wake words)",
            (
                (
                    f"{_MLPERF}/visual_wake_words/trained_models/vww_96.h5",
                    "mlperf-tiny/vww_mobilenetv1_96.h5",
                    "file",
                ),
            ),
        ),
        Asset(
            "ad_autoencoder",
            "mlperf-tiny/ad_autoencoder.h5",
            "MLPerf Tiny FC autoencoder (anomaly detection, ToyCar)",
            (
                (
                    f"{_MLPERF}/anomaly_detection/trained_models/model_ToyCar.hdf5",
                    "mlperf-tiny/ad_autoencoder.h5",
                    "file",
                ),
            ),
        ),
        Asset(
            "kws_dscnn",
            "mlperf-tiny/kws_dscnn_savedmodel",
            "MLPerf Tiny DS-CNN SavedModel (keyword spotting)",
            tuple(
                (
                    f"{_MLPERF}/keyword_spotting/trained_models/kws_ref_model/{p}",
                    f"mlperf-tiny/kws_dscnn_savedmodel/{p}",
                    "file",
                )
                for p in (
                    "saved_model.pb",
                    "keras_metadata.pb",
                    "variables/variables.index",
                    "variables/variables.data-00000-of-00001",
                )
            ),
        ),
    ]
}


def default_data_dir() -> Path:
    """The per-user cache directory used when nothing else is configured."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tinyptq")) / "data"


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: ``explicit``, else ``$TINYPTQ_DATA_DIR``, else the user cache."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return default_data_dir()


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The asset's path if it is present in the data directory, else None (no download)."""
    asset = _asset(name)
    path = resolve_data_dir(data_dir) / asset.relpath
    return path if path.exists() else None


def require(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The asset's path; downloads it when missing and possible, else raises DataError."""
    asset = _asset(name)
    root = resolve_data_dir(data_dir)
    path = root / asset.relpath
    if path.exists():
        return path
    reason = "downloads are disabled"
    if download and asset.sources and not os.environ.get(OFFLINE_VAR):
        try:
            _download(asset, root)
            if path.exists():
                return path
            reason = "the download did not contain it"
        except OSError as exc:  # network down, host unreachable, disk full ...
            reason = f"download failed ({type(exc).__name__})"
    src = asset.sources[0][0] if asset.sources else "its official source"
    raise DataError(
        f"{asset.what} not found at {path} ({reason}); put it there (from {src}) "
        f"or point --data-dir / {ENV_VAR} at a directory that has {asset.relpath}"
    )


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise DataError(f"unknown asset '{name}'; known: {', '.join(sorted(ASSETS))}") from None


def _network_reachable(url: str) -> bool:
    """A quick TCP connect so that a machine without network never waits long."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=_NETWORK_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _download(asset: Asset, root: Path) -> None:
    if not _network_reachable(asset.sources[0][0]):
        raise ConnectionError("no network")
    root.mkdir(parents=True, exist_ok=True)
    for url, dest, how in asset.sources:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            blob = Path(tmp) / "download"
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_SECONDS) as resp:
                with open(blob, "wb") as out:
                    shutil.copyfileobj(resp, out)
            target = root / dest
            if how == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(blob, target)
                continue
            unpacked = Path(tmp) / "unpacked"
            if how == "tar":
                with tarfile.open(blob) as tf_:
                    tf_.extractall(unpacked, filter="data")
            else:
                with zipfile.ZipFile(blob) as zf:
                    zf.extractall(unpacked)
            src = unpacked / asset.archive_root if asset.archive_root else unpacked
            target.mkdir(parents=True, exist_ok=True)
            for item in src.iterdir():
                shutil.move(str(item), target / item.name)
