"""A teacher from EDM's released checkpoints: downloaded (``teacher.source: url``) or local (``file``).

The pickle is read by the non-executing importer (:mod:`adcm.io.edm_pickle`), and the same kind of
:class:`~adcm.io.model_files.TeacherFile` comes out as from a teacher trained here. EDM's pickles are
VE (EDM) teachers.
"""

from __future__ import annotations

from pathlib import Path

from adcm.config import TeacherConfig
from adcm.errors import CheckpointError
from adcm.io.download import download
from adcm.io.edm_pickle import load_edm_pickle
from adcm.io.files import sha256_file
from adcm.io.model_files import TeacherFile

__all__ = ["import_teacher"]


def import_teacher(cfg: TeacherConfig, *, show_progress: bool = True) -> TeacherFile:
    """The teacher of ``teacher.source`` ``url`` (downloaded to ``teacher.download_path``, SHA-256 checked)
    or ``file`` (SHA-256 checked when ``teacher.sha256`` is set), converted safely; the network is rebuilt
    and its weights loaded strictly before returning.

    Raises:
        CheckpointError: the file is missing, or its weights do not fit the network it declares.
        DownloadError, PickleFormatError, UnsafePickleError: from the download and the importer.
    """
    if cfg.source == "url":
        if cfg.url is None or cfg.sha256 is None:
            raise CheckpointError("teacher.url and teacher.sha256 are required for teacher.source 'url'")
        path = download(cfg.url, Path(cfg.download_path), cfg.sha256, show_progress=show_progress)
    elif cfg.source == "file":
        if cfg.file is None or not Path(cfg.file).is_file():
            raise CheckpointError(f"{cfg.file}: teacher.file not found")
        path = Path(cfg.file)
        if cfg.sha256 is not None and sha256_file(path) != cfg.sha256.lower():
            raise CheckpointError(f"{path}: SHA-256 {sha256_file(path)} does not match teacher.sha256 {cfg.sha256}")
    else:
        raise ValueError(f"import_teacher needs teacher.source url or file, got {cfg.source!r}")
    edm = load_edm_pickle(path)
    teacher = TeacherFile(
        network_kwargs=edm.network_kwargs,
        sigma_data=edm.sigma_data,
        state_dict=edm.state_dict,
        meta={
            "source": cfg.source,
            "pickle": path.name,
            "pickle_sha256": sha256_file(path),
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
