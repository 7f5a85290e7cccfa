"""Verified downloads: checksum match, mismatch leaves nothing, failures are clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from adcm.io.download import DownloadError, download


def test_download_verifies_and_renames(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"edm weights" * 1000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "edm.pkl"
    assert download(src.as_uri(), dest, digest, show_progress=False) == dest
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["edm.pkl"]
    # present with the right checksum: nothing is fetched again
    src.unlink()
    assert download(src.as_uri(), dest, digest.upper(), show_progress=False) == dest


def test_checksum_mismatch_leaves_no_file(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"tampered")
    dest = tmp_path / "out" / "edm.pkl"
    with pytest.raises(DownloadError, match="does not match"):
        download(src.as_uri(), dest, "0" * 64, show_progress=False)
    assert not dest.exists()
    assert not any(dest.parent.iterdir()) if dest.parent.exists() else True


def test_failed_download_is_a_clear_error(tmp_path: Path) -> None:
    dest = tmp_path / "edm.pkl"
    with pytest.raises(DownloadError, match="download failed"):
        download((tmp_path / "absent.bin").as_uri(), dest, "0" * 64, show_progress=False)
    assert not dest.exists()
