"""Reference statistics of the training images, computed once and shared by every FID.

:func:`compute_reference` writes the Inception statistics (mean and covariance of the 2048-d pool
features, clean-fid's ``clean`` mode) of the first ``score.reference_count`` prepared images, with the
extractor's identity (the weights' SHA-1) and the data's SHA-256; :func:`load_reference` refuses a
file made from other data, another count or other weights, saying how to recompute it. The pipeline
computes them in the ``fid_reference`` stage; ``score`` and the study only read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adcm.errors import DatasetError, FIDError
from adcm.eval.fid import Extractor, feature_stats, image_features, load_stats, save_stats
from adcm.io.datasets import load_prepared
from adcm.io.files import sha256_file

__all__ = ["Reference", "compute_reference", "held_out_images", "load_reference"]


@dataclass(frozen=True)
class Reference:
    """Reference statistics, the features they summarise (for KID), and what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor_id: str
    data_sha256: str
    features: np.ndarray


def _identity(data_path: Path, count: int | None, extractor_id: str) -> dict[str, object]:
    if not data_path.is_file():
        raise DatasetError(f"{data_path}: prepared dataset not found")
    return {"extractor": extractor_id, "data_sha256": sha256_file(data_path), "count_requested": count}


def compute_reference(
    out: Path,
    data_path: Path,
    count: int | None,
    extractor: Extractor,
    extractor_id: str,
    *,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> Reference:
    """Compute and write (atomically) the statistics of the first ``count`` images of ``data_path`` (all: None).

    Raises:
        DatasetError: the dataset is missing, or has fewer than ``count`` images.
    """
    wanted = _identity(data_path, count, extractor_id)
    images = load_prepared(data_path).images
    if count is not None:
        if count > len(images):
            raise DatasetError(f"score.reference_count {count} exceeds the {len(images)} images in {data_path}")
        images = images[:count]
    features = image_features(images, extractor, batch_size, device, progress)
    mu, sigma = feature_stats(features)
    save_stats(out, mu, sigma, {**wanted, "count": len(images)}, features=features)
    return Reference(mu, sigma, len(images), extractor_id, str(wanted["data_sha256"]), features)


def load_reference(path: Path, data_path: Path, count: int | None, extractor_id: str) -> Reference:
    """The statistics at ``path`` if they were computed from ``data_path``'s first ``count`` images with
    the extractor ``extractor_id``.

    Raises:
        FIDError: missing, unreadable, or computed from other data, count or weights (one line saying
            to recompute them with ``adcm reference``, the ``fid_reference`` stage).
    """
    wanted = _identity(data_path, count, extractor_id)
    if not path.is_file():
        raise FIDError(
            f"{path}: reference statistics not found; compute them with `adcm reference` (`dvc repro fid_reference`)"
        )
    mu, sigma, meta = load_stats(path, expected_extractor=extractor_id)
    got = {k: meta.get(k) for k in wanted}
    if got != wanted:
        changed = ", ".join(k for k in wanted if got[k] != wanted[k])
        raise FIDError(
            f"{path}: reference statistics made with another {changed}; recompute them with "
            "`adcm reference` (`dvc repro fid_reference`)"
        )
    with np.load(path, allow_pickle=False) as archive:
        if "features" not in archive.files:
            raise FIDError(
                f"{path}: reference statistics without their features (needed for KID); recompute them "
                "with `adcm reference` (`dvc repro fid_reference`)"
            )
        features = archive["features"].astype(np.float64)
    if features.shape != (int(meta["count"]), mu.shape[0]):
        raise FIDError(f"{path}: reference features of shape {features.shape} for {meta['count']} images")
    return Reference(mu, sigma, int(meta["count"]), extractor_id, str(wanted["data_sha256"]), features)


def held_out_images(data_path: Path, reference_count: int | None, count: int) -> np.ndarray:
    """The data floor's images: ``count`` prepared images right after the reference's first ``reference_count``.

    Raises:
        DatasetError: the reference uses every image, or too few are left.
    """
    images = load_prepared(data_path).images
    start = len(images) if reference_count is None else reference_count
    if start + count > len(images):
        raise DatasetError(
            f"{data_path}: score.floor_images {count} held-out images do not fit after the "
            f"{start} reference images ({len(images)} in all); lower score.floor_images or "
            "score.reference_count"
        )
    return images[start : start + count]
