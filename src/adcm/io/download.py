"""Verified downloads: progress bar, temporary file, SHA-256 check, atomic rename.

Every failure -- a connection refused or reset, a response cut mid-stream (``http.client``'s
``IncompleteRead`` on a chunked transfer, or fewer bytes than ``Content-Length`` announced), a
malformed response, a checksum mismatch -- is one :class:`DownloadError` line, and no file is left.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from adcm.errors import DownloadError
from adcm.io.files import atomic_path, sha256_file

__all__ = ["DownloadError", "download"]


def download(url: str, dest: Path, sha256: str | None, show_progress: bool = True, timeout_s: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` unless ``dest`` already exists with the expected SHA-256.

    The bytes go to a temporary file next to ``dest`` and are renamed onto it only once they are
    complete and their SHA-256 equals ``sha256``; on any failure (:class:`DownloadError`, one line)
    no file is left. ``sha256=None`` (a first download whose checksum the caller records, see
    docs/presets.md#teacher-checksums) always fetches and accepts any complete download.
    """
    dest = Path(dest)
    expected = None if sha256 is None else sha256.lower()
    if expected is not None and dest.is_file() and sha256_file(dest) == expected:
        return dest
    digest = hashlib.sha256()
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                announced = int(response.headers.get("Content-Length") or 0)
                total = announced if announced > 0 else None
                received = 0
                with Progress(
                    "[bold]download",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    console=Console(stderr=True),
                    disable=not show_progress,
                ) as progress:
                    task = progress.add_task("download", total=total)
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        progress.advance(task, len(chunk))
            if total is not None and received != total:
                raise DownloadError(
                    f"{url}: download incomplete: received {received} of the {total} bytes "
                    "announced; the file was discarded"
                )
            if expected is not None and digest.hexdigest() != expected:
                raise DownloadError(
                    f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {expected}; "
                    "the file was discarded"
                )
    except DownloadError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise DownloadError(f"{url}: download failed ({type(exc).__name__}: {detail})") from None
    return dest
