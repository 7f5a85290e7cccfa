"""A teacher from EDM's or EDM2's released checkpoints: downloaded (``teacher.source: url``) or local (``file``).

The pickle is read once by the non-executing unpickler (:func:`adcm.io.edm_pickle.read_snapshot`); the
class of its ``ema`` record says whose it is: ``EDMPrecond`` → EDM's DDPM++ (:mod:`adcm.io.edm_pickle`),
``Precond`` → EDM2's U-Net (:mod:`adcm.io.edm2_pickle`). Either way the same kind of
:class:`~adcm.io.model_files.TeacherFile` comes out as from a teacher trained here, with the network kind
(``ddpmpp`` / ``edm2``) recorded. Both are VE (EDM-preconditioned) teachers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adcm.config import TeacherConfig
from adcm.errors import CheckpointError, DownloadError
from adcm.io.download import download
from adcm.io.edm2_pickle import edm2_network
from adcm.io.edm_pickle import edm_network, read_snapshot, snapshot_network
from adcm.io.files import atomic_write_text, sha256_file
from adcm.io.model_files import TeacherFile

__all__ = ["import_teacher", "read_sha256_record", "teacher_from_pickle"]

_MAX_RECORD_BYTES = 4096
"""Largest ``teacher.sha256_record`` file read (it holds one line)."""


def import_teacher(cfg: TeacherConfig, *, show_progress: bool = True) -> TeacherFile:
    """The teacher of ``teacher.source`` ``url`` (downloaded to ``teacher.download_path``, SHA-256 checked)
    or ``file`` (SHA-256 checked when ``teacher.sha256`` is set), an EDM or EDM2 snapshot, converted safely
    (:func:`teacher_from_pickle`); the network is rebuilt and its weights loaded strictly before returning.

    Raises:
        CheckpointError: the file is missing, or its weights do not fit the network it declares.
        DownloadError, PickleFormatError, UnsafePickleError: from the download and the importer.
    """
    if cfg.source == "url":
        if cfg.url is None or (cfg.sha256 is None and cfg.sha256_record is None):
            raise CheckpointError(
                "teacher.url and teacher.sha256 (or teacher.sha256_record) are required for teacher.source 'url'"
            )
        if cfg.sha256 is not None:
            path = download(cfg.url, Path(cfg.download_path), cfg.sha256, show_progress=show_progress)
        else:
            path = _download_recorded(cfg.url, Path(cfg.download_path), Path(str(cfg.sha256_record)), show_progress)
    elif cfg.source == "file":
        if cfg.file is None or not Path(cfg.file).is_file():
            raise CheckpointError(f"{cfg.file}: teacher.file not found")
        path = Path(cfg.file)
        if cfg.sha256 is not None and sha256_file(path) != cfg.sha256.lower():
            raise CheckpointError(f"{path}: SHA-256 {sha256_file(path)} does not match teacher.sha256 {cfg.sha256}")
    else:
        raise ValueError(f"import_teacher needs teacher.source url or file, got {cfg.source!r}")
    return teacher_from_pickle(path, {"source": cfg.source})


def read_sha256_record(record: Path) -> str:
    """The SHA-256 (64 lower-case hex digits) that ``record`` holds as its first word (``sha256sum``'s format).

    Raises:
        CheckpointError: the file cannot be read, is larger than 4 KiB, or does not start with a SHA-256.
    """
    try:
        raw = record.read_bytes() if record.stat().st_size <= _MAX_RECORD_BYTES else None
    except OSError as exc:
        raise CheckpointError(f"{record}: cannot read teacher.sha256_record ({exc.strerror or exc})") from None
    words = raw.decode("utf-8", errors="replace").split() if raw is not None else []
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        got = "a file over 4 KiB" if raw is None else repr(words[0][:80]) if words else "an empty file"
        raise CheckpointError(f"{record}: teacher.sha256_record: expected a SHA-256 (64 hex digits) first, got {got}")
    return words[0].lower()


def _download_recorded(url: str, dest: Path, record: Path, show_progress: bool) -> Path:
    """Download ``url`` to ``dest`` against the SHA-256 in ``record``, or, when there is no record yet (first
    use), accept the download and write its SHA-256 to ``record`` atomically (docs/presets.md#teacher-checksums).

    Raises:
        CheckpointError: the record is malformed.
        DownloadError: the download failed, or its SHA-256 differs from the recorded one (nothing is kept).
    """
    if record.exists():
        expected = read_sha256_record(record)
        try:
            return download(url, dest, expected, show_progress=show_progress)
        except DownloadError as exc:
            raise DownloadError(f"{exc} (expected: the SHA-256 recorded in {record} on first use)") from None
    path = download(url, dest, None, show_progress=show_progress)
    atomic_write_text(record, f"{sha256_file(path)}  {dest.name}\n")
    return path


def teacher_from_pickle(path: Path, meta: dict[str, Any] | None = None) -> TeacherFile:
    """The teacher file of an EDM (DDPM++) or EDM2 snapshot at ``path``, read without executing it.

    EDM2's weights get the wrapper's prefix (``unet.…`` → ``model.unet.…``) and the network kind
    ``edm2``; the provenance in ``meta`` (plus ``meta``) names the file, its SHA-256 and the network class
    (EDM: the σ range; EDM2: the stored dtype and the module source's SHA-256).

    Raises:
        CheckpointError: the weights do not fit the network the file declares.
        PickleFormatError, UnsafePickleError: from the importers.
    """
    top = read_snapshot(path)
    record = snapshot_network(top, "ema", path)
    provenance: dict[str, Any] = {**(meta or {}), "pickle": path.name, "pickle_sha256": sha256_file(path)}
    if record.class_name == "Precond":
        edm2 = edm2_network(top, record, path)
        teacher = TeacherFile(
            network_kwargs=edm2.network_kwargs,
            sigma_data=edm2.sigma_data,
            state_dict={f"model.{name}": t for name, t in edm2.state_dict.items()},
            meta={
                **provenance,
                "precond_class": "training.networks_edm2.Precond",
                "stored_dtype": edm2.stored_dtype,
                "module_src_sha256": edm2.module_src_sha256,
            },
            process="ve",
            network="edm2",
        )
    else:
        edm = edm_network(record, path)
        teacher = TeacherFile(
            network_kwargs=edm.network_kwargs,
            sigma_data=edm.sigma_data,
            state_dict=edm.state_dict,
            meta={
                **provenance,
                "precond_class": edm.precond_class,
                "sigma_min": edm.sigma_min,
                "sigma_max": edm.sigma_max,
            },
            process="ve",
        )
    try:
        teacher.denoiser()  # rebuild the network and load the weights strictly: nothing is written before
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: the network it declares does not fit its weights ({first})") from None
    return teacher
