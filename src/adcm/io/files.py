"""Small file-system helpers: atomic writes and content hashing.

Every output of the pipeline (prepared datasets, metadata, checkpoints) is written through
:func:`atomic_path` / :func:`atomic_write_bytes`: the data go to a temporary file in the *same
directory* as the target and are moved onto it with :func:`os.replace` only once they are complete,
so a crash or an exception never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "save_torch", "sha256_file", "write_json"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (best effort; not every file system supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file already exists (empty) when the block starts; the block may overwrite it or
    replace it by any means (``open(tmp, "wb")``, ``torch.save(obj, tmp)``, ...). Its name is hidden
    (starts with ``.``) and ends with the same suffix as ``path``, so tools that choose a format or
    append an extension from the suffix (``np.savez``, ``PIL.Image.save``) behave as for ``path``.

    If the block raises (any exception, including ``KeyboardInterrupt``) the temporary file is
    deleted, ``path`` is left untouched and the exception propagates. The parent directory of
    ``path`` is created if needed. The final file gets the usual permissions (``0o666 & ~umask``),
    not the private ``0o600`` of :func:`tempfile.mkstemp`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the temporary file for {path} was removed before it was committed")
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_current_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + ``os.replace``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode(encoding))


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path | str, data: dict[str, Any]) -> None:
    """Write ``data`` as pretty, key-sorted JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_torch(path: Path | str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, byte-identical for identical ``obj``.

    ``torch.save`` to a *path* names the zip archive's inner folder after the file, so saving through
    :func:`atomic_path`'s random temporary name would make every write of the same content differ (and its
    SHA-256 with it). Written through an open file, the folder is always ``archive``.
    """
    import torch  # local: the rest of this module is used by stages that never load torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
