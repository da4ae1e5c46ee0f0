"""Signed pickles (tinyptq.signing): the user's key, files others wrote never unpickled."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import pytest

from tinyptq import signing
from tinyptq.signing import (
    SignatureMismatch,
    SignedFileError,
    SigningKeyError,
    dump_signed,
    load_signed,
)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh cache directory, hence a fresh signing key."""
    root = tmp_path / "home" / "cache"
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(root))
    return root


class _Plant:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_and_a_private_key(own_cache, tmp_path):
    path = dump_signed({"a": [1, 2]}, tmp_path / "x.pkl", "ctx")
    assert load_signed(path, "ctx") == {"a": [1, 2]}
    key = own_cache / signing.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    for d in (own_cache, own_cache.parent):  # created by tinyptq: private
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert path.stat().st_mode & 0o077 == 0


def test_files_not_signed_with_this_key_are_never_unpickled(own_cache, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "planted.pkl"
    planted.write_bytes(pickle.dumps(_Plant(marker)))
    good = dump_signed([1, 2, 3], tmp_path / "good.pkl", "ctx")
    blob = good.read_bytes()
    tampered = tmp_path / "tampered.pkl"
    tampered.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(blob[:20])
    for path in (planted, tampered, truncated):
        with pytest.raises(SignatureMismatch, match="not written by this user's tinyptq"):
            load_signed(path, "ctx")
    with pytest.raises(SignatureMismatch):
        load_signed(good, "another purpose")
    # signed by the planter with their own key: still foreign here
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(tmp_path / "other-user"))
    dump_signed(_Plant(marker), planted, "ctx")
    monkeypatch.setenv("TINYPTQ_CACHE_DIR", str(own_cache))
    with pytest.raises(SignatureMismatch):
        load_signed(planted, "ctx")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_signed(tmp_path / "none.pkl")


def test_a_signed_file_that_no_longer_unpickles_is_a_signed_file_error(own_cache, tmp_path):
    payload = b"cno_such_module\nThing\n."  # a pickle of a class since removed
    blob = signing.MAGIC + signing._mac(signing.signing_key(), "", payload) + payload
    path = tmp_path / "old.pkl"
    path.write_bytes(blob)
    with pytest.raises(SignedFileError, match="cannot read .*old.pkl"):
        load_signed(path)


def test_an_unsafe_key_is_refused(own_cache, tmp_path):
    dump_signed(1, tmp_path / "x.pkl")
    key = own_cache / signing.KEY_FILE
    key.chmod(0o644)
    signing._KEYS.clear()
    with pytest.raises(SigningKeyError, match=r"accessible to other users \(mode 0644\); run 'chmod 600"):
        load_signed(tmp_path / "x.pkl")
    key.chmod(0o600)
    assert load_signed(tmp_path / "x.pkl") == 1


def _key_of(cache: str) -> bytes:
    os.environ["TINYPTQ_CACHE_DIR"] = cache
    return signing.signing_key()


def test_processes_starting_together_share_one_key(tmp_path):
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(_key_of, [cache] * 8)
    assert len(set(keys)) == 1 and keys[0] == (tmp_path / "cache" / signing.KEY_FILE).read_bytes()
