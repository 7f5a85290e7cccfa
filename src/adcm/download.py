"""Verified downloads: progress bar, temporary file, SHA-256 check, atomic rename."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from adcm.io import atomic_path, sha256_file

__all__ = ["DownloadError", "download"]


class DownloadError(RuntimeError):
    """The download failed or the file's checksum did not match; nothing was left behind."""


def download(url: str, dest: Path, sha256: str, show_progress: bool = True, timeout_s: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` unless ``dest`` already exists with the expected SHA-256.

    The bytes go to a temporary file next to ``dest`` and are renamed onto it only once their
    SHA-256 equals ``sha256``; on any failure no file is left.
    """
    dest = Path(dest)
    expected = sha256.lower()
    if dest.is_file() and sha256_file(dest) == expected:
        return dest
    digest = hashlib.sha256()
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with Progress("[bold]download", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                              console=Console(stderr=True), disable=not show_progress) as progress:
                    task = progress.add_task("download", total=total)
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        progress.advance(task, len(chunk))
            if digest.hexdigest() != expected:
                raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {expected}; "
                                    "the file was discarded")
    except DownloadError:
        raise
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{url}: download failed ({exc})") from None
    return dest

