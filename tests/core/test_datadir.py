"""The data directory: resolution order, clear errors, real download + extraction."""

from __future__ import annotations

import functools
import http.server
import io
import pickle
import tarfile
import threading
import time

import numpy as np
import pytest

from tinyptq import datadir
from tinyptq.datadir import Asset
from tinyptq.datasets.cifar10 import load_cifar10
from tinyptq.errors import DataError


def test_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv(datadir.ENV_VAR, str(tmp_path / "env"))
    assert datadir.resolve_data_dir(tmp_path / "cli") == tmp_path / "cli"
    assert datadir.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv(datadir.ENV_VAR)
    assert datadir.resolve_data_dir() == datadir.default_data_dir()


def test_missing_asset_says_what_to_put_where(monkeypatch, tmp_path):
    monkeypatch.setenv(datadir.OFFLINE_VAR, "1")
    assert datadir.locate("cifar10", tmp_path) is None
    with pytest.raises(DataError) as err:
        datadir.require("cifar10", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "TINYPTQ_DATA_DIR" in msg
    with pytest.raises(DataError, match="unknown asset"):
        datadir.require("imagenet", tmp_path)


def test_unreachable_network_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv(datadir.OFFLINE_VAR, raising=False)
    asset = Asset("t", "t-data", "test data", (("http://127.0.0.1:9/t.tar.gz", "t-data", "tar"),))
    monkeypatch.setitem(datadir.ASSETS, "t", asset)
    start = time.monotonic()
    with pytest.raises(DataError, match="download failed"):
        datadir.require("t", tmp_path)
    assert time.monotonic() - start < 10


def _fake_cifar_tar() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            blob = pickle.dumps(
                {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_download_and_extract_from_a_local_server(monkeypatch, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "cifar.tar.gz").write_bytes(_fake_cifar_tar())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"
        asset = Asset(
            "cifar10", "cifar-10-batches-py", "CIFAR-10", ((url, "cifar-10-batches-py", "tar"),),
            archive_root="cifar-10-batches-py",
        )
        monkeypatch.setitem(datadir.ASSETS, "cifar10", asset)
        monkeypatch.delenv(datadir.OFFLINE_VAR, raising=False)
        path = datadir.require("cifar10", tmp_path / "data")
    finally:
        server.shutdown()
    assert path == tmp_path / "data" / "cifar-10-batches-py"
    splits = load_cifar10(path)
    assert splits["train"].x.shape == (20, 32, 32, 3) and splits["test"].x.shape == (4, 32, 32, 3)
