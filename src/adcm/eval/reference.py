"""Reference statistics of the training images, computed once and shared by every FID.

:func:`compute_reference` writes the Inception statistics (mean and covariance of the 2048-d pool
features, in clean-fid's ``clean`` or ``legacy_tensorflow`` mode) of the first ``score.reference_count``
prepared images (``null``: all of them, the papers' protocol), with the extractor's identity (mode and
the weights' SHA-1), the mode on its own, and the data's SHA-256; :func:`load_reference` refuses a file
made from other data, another count, another mode or other weights, saying how to recompute it. The
pipeline computes them in the ``fid_reference`` stage; ``score`` and the study only read them.

Memory does not grow with the number of reference images: the images are read batch by batch from the
memory-mapped dataset, the statistics are accumulated batch by batch
(:class:`~adcm.eval.fid.FeatureAccumulator`), and only the features KID needs are kept — all of them up
to :data:`MAX_KEPT_FEATURES`, else that many images drawn at random (seed 0) — so the whole of
ImageNet (1.28 M images) needs the same memory as 50,000.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adcm.errors import DatasetError, FIDError
from adcm.eval.fid import (
    Extractor,
    FeatureAccumulator,
    extractor_mode,
    feature_stats,
    identity_mode,
    iter_image_features,
    load_stats,
    save_stats,
)
from adcm.io.datasets import ImageReader, load_prepared
from adcm.io.files import sha256_file

__all__ = ["MAX_KEPT_FEATURES", "Reference", "compute_reference", "held_out_images", "load_reference"]

MAX_KEPT_FEATURES = 50_000
"""Reference features kept for KID (float32, 8 KiB each): all of them up to this many, else a random subset."""

_RECOMPUTE = "recompute them with `adcm reference` (`dvc repro fid_reference`)"


@dataclass(frozen=True)
class Reference:
    """Reference statistics, the features kept for KID, and what they were computed from.

    ``count`` is the number of images the statistics summarise; ``features`` holds the features of
    ``min(count, MAX_KEPT_FEATURES)`` of them.
    """

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


def _kept_rows(count: int, limit: int) -> np.ndarray:
    """Sorted indices of the images whose features are kept: all when ``count <= limit``, else ``limit`` at random."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).choice(count, size=limit, replace=False))


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
    max_kept_features: int = MAX_KEPT_FEATURES,
) -> Reference:
    """Compute and write (atomically) the statistics of the first ``count`` images of ``data_path`` (all: None).

    The FID mode is the extractor's (:func:`~adcm.eval.fid.extractor_mode`; ``extractor_id`` names it
    too) and is recorded as ``fid_mode``. When every feature is kept the statistics are
    :func:`~adcm.eval.fid.feature_stats` of them; otherwise they are accumulated batch by batch.

    Raises:
        DatasetError: the dataset is missing, or has fewer than ``count`` images.
    """
    wanted = _identity(data_path, count, extractor_id)
    mode = extractor_mode(extractor)
    if identity_mode(extractor_id) not in (None, mode):
        raise FIDError(f"extractor identity {extractor_id!r} names another FID mode than the extractor's ({mode})")
    images = load_prepared(data_path).images
    if count is not None:
        if count > len(images):
            raise DatasetError(f"score.reference_count {count} exceeds the {len(images)} images in {data_path}")
        images = images[:count]
    total = len(images)
    kept_mask = np.zeros(total, dtype=bool)
    kept_mask[_kept_rows(total, max_kept_features)] = True
    accumulator = FeatureAccumulator()
    kept: list[np.ndarray] = []
    done = 0
    for feats in iter_image_features(images, extractor, batch_size, device, progress):
        accumulator.add(feats)
        kept.append(feats[kept_mask[done : done + len(feats)]])
        done += len(feats)
    features = np.concatenate(kept, axis=0)
    mu, sigma = feature_stats(features) if len(features) == total else accumulator.stats()
    meta = {**wanted, "fid_mode": mode, "count": total, "kept_features": len(features)}
    save_stats(out, mu, sigma, meta, features=features)
    return Reference(mu, sigma, total, extractor_id, str(wanted["data_sha256"]), features)


def load_reference(path: Path, data_path: Path, count: int | None, extractor_id: str) -> Reference:
    """The statistics at ``path`` if they were computed from ``data_path``'s first ``count`` images with
    the extractor ``extractor_id`` (its FID mode and weights).

    Raises:
        FIDError: missing, unreadable, or computed from other data, count, mode or weights (one line
            saying to recompute them with ``adcm reference``, the ``fid_reference`` stage).
    """
    wanted = _identity(data_path, count, extractor_id)
    if not path.is_file():
        raise FIDError(
            f"{path}: reference statistics not found; compute them with `adcm reference` (`dvc repro fid_reference`)"
        )
    mu, sigma, meta = load_stats(path, expected_extractor=None)
    made_in = meta.get("fid_mode", identity_mode(str(meta.get("extractor", ""))))
    wanted_mode = identity_mode(extractor_id)  # None for an identity that names no mode: the extractor check decides
    if wanted_mode is not None and made_in != wanted_mode:
        raise FIDError(
            f"{path}: reference statistics made in FID mode {made_in}, but score.fid_mode is {wanted_mode}; "
            f"{_RECOMPUTE}"
        )
    got = {k: meta.get(k) for k in wanted}
    if got != wanted:
        changed = ", ".join(k for k in wanted if got[k] != wanted[k])
        raise FIDError(f"{path}: reference statistics made with another {changed}; {_RECOMPUTE}")
    with np.load(path, allow_pickle=False) as archive:
        if "features" not in archive.files:
            raise FIDError(f"{path}: reference statistics without their features (needed for KID); {_RECOMPUTE}")
        features = archive["features"].astype(np.float64)
    kept = int(meta.get("kept_features", meta["count"]))
    if features.shape != (kept, mu.shape[0]):
        raise FIDError(f"{path}: reference features of shape {features.shape}, expected {kept} of {mu.shape[0]}")
    return Reference(mu, sigma, int(meta["count"]), extractor_id, str(wanted["data_sha256"]), features)


def held_out_images(data_path: Path, reference_count: int | None, count: int) -> np.ndarray:
    """The data floor's images: ``count`` prepared images right after the reference's first ``reference_count``
    (read from the memory-mapped dataset into a new, writable array).

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
    with ImageReader(images) as reader:
        return reader.block(start, start + count)
