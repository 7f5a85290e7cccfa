"""Reference statistics of the training images, computed once and shared by every FID.

:func:`compute_reference` writes the Inception statistics (mean and covariance of the 2048-d pool
features, in clean-fid's ``clean`` or ``legacy_tensorflow`` mode) of the first ``score.reference_count``
prepared images (``null``: all of them, the papers' protocol), with the extractor's identity (mode and
the weights' SHA-1), the mode on its own, and the data's SHA-256; :func:`load_reference` refuses a file
made from other data, another count, another mode or other weights, saying how to recompute it. The
pipeline computes them in the ``fid_reference`` stage; ``score`` and the study only read them.

The same file holds the features of the data floor's held-out images (``score.floor_images`` images right
after the reference ones, :func:`held_out_images`): they depend on the data alone, so they are extracted
once here rather than in every ``score``. Statistics are those of the stored (float32) features, so a
reference rebuilt from its features is the same to the bit.

**Precomputed references.** Like EDM's published ``fid-refs``, a reference can be shipped:
:func:`write_precomputed` stores the features, the floor's features and the identity (no mean or
covariance: they follow from the features), compressed; :func:`obtain_reference` uses such a file
when its identity is exactly what would be computed — the same data (SHA-256), count, floor, FID mode
and Inception weights (SHA-1) — and computes otherwise, saying why.

Memory does not grow with the number of reference images: the images are read batch by batch from the
memory-mapped dataset, the statistics are accumulated batch by batch
(:class:`~adcm.eval.fid.FeatureAccumulator`), and only the features KID needs are kept — all of them up
to :data:`MAX_KEPT_FEATURES`, else that many images drawn at random (seed 0) — so the whole of
ImageNet (1.28 M images) needs the same memory as 50,000.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adcm.errors import DatasetError, FIDError
from adcm.eval.features import read_meta
from adcm.eval.fid import (
    Extractor,
    FeatureAccumulator,
    extractor_mode,
    feature_stats,
    identity_mode,
    image_features,
    iter_image_features,
    load_stats,
    save_stats,
)
from adcm.io.datasets import ImageReader, load_prepared, map_npz_array
from adcm.io.files import atomic_path, sha256_file

__all__ = [
    "MAX_KEPT_FEATURES",
    "Reference",
    "compute_reference",
    "held_out_images",
    "load_precomputed",
    "load_reference",
    "obtain_reference",
    "write_precomputed",
]

MAX_KEPT_FEATURES = 50_000
"""Reference features kept for KID (float32, 8 KiB each): all of them up to this many, else a random subset."""

_RECOMPUTE = "recompute them with `adcm reference` (`dvc repro fid_reference`)"


@dataclass(frozen=True)
class Reference:
    """Reference statistics, the features kept for KID, and what they were computed from.

    ``count`` is the number of images the statistics summarise; ``features`` holds the features of
    ``min(count, MAX_KEPT_FEATURES)`` of them; ``floor_features`` those of the data floor's held-out
    images (None when the reference was made without a floor); ``meta`` the identity it was made with.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor_id: str
    data_sha256: str
    features: np.ndarray
    floor_features: np.ndarray | None = None
    meta: dict[str, object] = field(default_factory=dict)


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
    floor_count: int = 0,
    progress: Callable[[int, int], None] | None = None,
    max_kept_features: int = MAX_KEPT_FEATURES,
) -> Reference:
    """Compute and write (atomically) the statistics of the first ``count`` images of ``data_path`` (all: None),
    and the features of the ``floor_count`` held-out images after them (:func:`held_out_images`).

    The FID mode is the extractor's (:func:`~adcm.eval.fid.extractor_mode`; ``extractor_id`` names it
    too) and is recorded as ``fid_mode``. When every feature is kept the statistics are
    :func:`~adcm.eval.fid.feature_stats` of the stored float32 features; otherwise they are accumulated
    batch by batch. ``progress(done, total)`` counts reference and floor images together.

    Raises:
        DatasetError: the dataset is missing, has fewer than ``count`` images, or no room for the floor
            after them (checked before any feature is extracted).
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
    floor_images = held_out_images(data_path, count, floor_count) if floor_count else None
    total = len(images)
    grand_total = total + floor_count

    def advance(offset: int) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, _total: progress(offset + done, grand_total)

    kept_mask = np.zeros(total, dtype=bool)
    kept_mask[_kept_rows(total, max_kept_features)] = True
    accumulator = FeatureAccumulator()
    kept: list[np.ndarray] = []
    done = 0
    for feats in iter_image_features(images, extractor, batch_size, device, advance(0)):
        accumulator.add(feats)
        kept.append(feats[kept_mask[done : done + len(feats)]].astype(np.float32))
        done += len(feats)
    features = np.concatenate(kept, axis=0)
    mu, sigma = feature_stats(features) if len(features) == total else accumulator.stats()
    floor = None
    if floor_images is not None:
        floor = image_features(floor_images, extractor, batch_size, device, advance(total)).astype(np.float32)
    meta: dict[str, object] = {
        **wanted,
        "fid_mode": mode,
        "count": total,
        "kept_features": len(features),
        "floor_count": floor_count,
    }
    save_stats(out, mu, sigma, meta, features=features, floor_features=floor)
    return Reference(mu, sigma, total, extractor_id, str(wanted["data_sha256"]), features, floor, meta)


def _check_identity(path: Path, meta: dict[str, object], wanted: dict[str, object], extractor_id: str) -> str | None:
    """Why the file made with ``meta`` is not the reference ``wanted`` asks for (None: it is)."""
    made_in = meta.get("fid_mode", identity_mode(str(meta.get("extractor", ""))))
    wanted_mode = identity_mode(extractor_id)  # None for an identity that names no mode: the extractor check decides
    if wanted_mode is not None and made_in != wanted_mode:
        return f"{path}: reference statistics made in FID mode {made_in}, but score.fid_mode is {wanted_mode}"
    got = {k: meta.get(k) for k in wanted}
    if got != wanted:
        changed = ", ".join(k for k in wanted if got[k] != wanted[k])
        return f"{path}: reference statistics made with another {changed}"
    return None


def _floor_of(path: Path, archive: np.lib.npyio.NpzFile, meta: dict[str, object], dim: int) -> np.ndarray | None:
    floor_count = int(meta.get("floor_count", 0))  # type: ignore[call-overload]
    if not floor_count:
        return None
    if "floor_features" not in archive.files:
        raise FIDError(f"{path}: reference statistics without the floor's features; {_RECOMPUTE}")
    floor = archive["floor_features"].astype(np.float64)
    if floor.shape != (floor_count, dim):
        raise FIDError(f"{path}: floor features of shape {floor.shape}, expected {floor_count} of {dim}")
    return floor


def load_reference(
    path: Path, data_path: Path, count: int | None, extractor_id: str, floor_count: int = 0
) -> Reference:
    """The statistics at ``path`` if they were computed from ``data_path``'s first ``count`` images with
    the extractor ``extractor_id`` (its FID mode and weights), with the features of ``floor_count``
    held-out images when ``floor_count`` > 0.

    Raises:
        FIDError: missing, unreadable, or computed from other data, count, floor, mode or weights (one
            line saying to recompute them with ``adcm reference``, the ``fid_reference`` stage).
    """
    wanted = _identity(data_path, count, extractor_id)
    if not path.is_file():
        raise FIDError(
            f"{path}: reference statistics not found; compute them with `adcm reference` (`dvc repro fid_reference`)"
        )
    mu, sigma, meta = load_stats(path, expected_extractor=None)
    mismatch = _check_identity(path, meta, wanted, extractor_id)
    if mismatch is None and floor_count and meta.get("floor_count", 0) != floor_count:
        made = meta.get("floor_count", 0)
        mismatch = f"{path}: reference made with {made} floor images, not score.floor_images {floor_count}"
    if mismatch is not None:
        raise FIDError(f"{mismatch}; {_RECOMPUTE}")
    with np.load(path, allow_pickle=False) as archive:
        if "features" not in archive.files:
            raise FIDError(f"{path}: reference statistics without their features (needed for KID); {_RECOMPUTE}")
        features = archive["features"].astype(np.float64)
        floor = _floor_of(path, archive, meta, mu.shape[0]) if floor_count else None
    kept = int(meta.get("kept_features", meta["count"]))
    if features.shape != (kept, mu.shape[0]):
        raise FIDError(f"{path}: reference features of shape {features.shape}, expected {kept} of {mu.shape[0]}")
    return Reference(mu, sigma, int(meta["count"]), extractor_id, str(wanted["data_sha256"]), features, floor, meta)


def write_precomputed(path: Path, reference: Reference) -> None:
    """Write ``reference``'s features, its floor's features and its identity to ``path`` (compressed ``.npz``,
    atomically): what :func:`load_precomputed` turns back into the same reference. The mean and
    covariance are left out — they follow from the features — so only a reference that kept every
    feature (at most :data:`MAX_KEPT_FEATURES` images) can be written.

    Raises:
        FIDError: the reference keeps only a subset of its features.
    """
    if len(reference.features) != reference.count:
        raise FIDError(
            f"{path}: a precomputed reference needs every feature; this one keeps {len(reference.features)} "
            f"of {reference.count}"
        )
    arrays: dict[str, np.ndarray] = {
        "features": np.asarray(reference.features, dtype=np.float32),
        "meta": np.array(json.dumps(reference.meta, sort_keys=True)),
    }
    if reference.floor_features is not None:
        arrays["floor_features"] = np.asarray(reference.floor_features, dtype=np.float32)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


def load_precomputed(
    path: Path, data_path: Path, count: int | None, extractor_id: str, floor_count: int
) -> Reference | str:
    """The reference stored at ``path`` by :func:`write_precomputed` if it is exactly the one
    :func:`compute_reference` would make here (same data SHA-256, count, floor count, FID mode and
    weights), else the reason it is not, one line.

    The file is untrusted: every array's declared size is checked against its record before it is read
    (:func:`~adcm.io.datasets.map_npz_array`), the identity is JSON of bounded size, and the features
    must be finite float32 of the identity's shape.

    Raises:
        FIDError: the file is missing, corrupt or malformed.
    """
    if not path.is_file():
        raise FIDError(f"score.reference_file: {path} not found; set it to null to compute the reference")
    wanted = _identity(data_path, count, extractor_id)
    try:
        meta = read_meta(path)
        mismatch = _check_identity(path, meta, {**wanted, "floor_count": floor_count}, extractor_id)
        if mismatch is not None:
            return mismatch
        rows = count if count is not None else len(load_prepared(data_path).images)
        if meta.get("count") != rows or meta.get("kept_features") != rows:
            raise FIDError(f"{path}: declares {meta.get('count')!r} images, but the reference has {rows}")
        features = _precomputed_array(path, "features", rows)
        floor = _precomputed_array(path, "floor_features", floor_count) if floor_count else None
    except DatasetError as exc:
        raise FIDError(str(exc)) from exc
    if floor is not None and floor.shape[1] != features.shape[1]:
        raise FIDError(f"{path}: floor features of width {floor.shape[1]}, reference features of {features.shape[1]}")
    mu, sigma = feature_stats(features)
    return Reference(mu, sigma, len(features), extractor_id, str(wanted["data_sha256"]), features, floor, meta)


def _precomputed_array(path: Path, key: str, rows: int) -> np.ndarray:
    array = map_npz_array(path, key)
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != rows or rows < 2:
        raise FIDError(f"{path}: {key!r} must be float32 of {rows} rows, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise FIDError(f"{path}: {key!r} contains NaN or inf")
    return np.array(array, dtype=np.float32)


def obtain_reference(
    out: Path,
    data_path: Path,
    count: int | None,
    make_extractor: Callable[[], Extractor],
    extractor_id: str,
    *,
    batch_size: int,
    device: torch.device,
    floor_count: int = 0,
    precomputed: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Reference, str]:
    """The reference statistics at ``out``: the ``precomputed`` file's when it is the one that would be
    computed (:func:`load_precomputed`), else :func:`compute_reference`'s. Returns the reference and one
    line saying which (and, when the precomputed file does not fit, why).

    Raises:
        FIDError: ``precomputed`` is missing or malformed (before any work).
    """
    reason = "computed"
    if precomputed is not None:
        found = load_precomputed(precomputed, data_path, count, extractor_id, floor_count)
        if isinstance(found, Reference):
            floor = found.floor_features
            save_stats(out, found.mu, found.sigma, found.meta, features=found.features, floor_features=floor)
            return found, f"the precomputed {precomputed} (same data, count, floor, FID mode and Inception weights)"
        reason = f"computed ({found})"
    ref = compute_reference(
        out,
        data_path,
        count,
        make_extractor(),
        extractor_id,
        batch_size=batch_size,
        device=device,
        floor_count=floor_count,
        progress=progress,
    )
    return ref, reason


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
