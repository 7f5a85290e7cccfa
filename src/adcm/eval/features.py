"""The Inception features of one image set, extracted once and stored, so that scoring is arithmetic.

FID and KID (:mod:`adcm.eval.metrics`) need only the 2048-d pool features of a set; extracting them is
the expensive part (a 299×299 Inception forward per image), computing the metrics takes seconds. The
pipeline therefore extracts each sample set's features in its own stage (``adcm features``) and
``adcm score`` combines them: a set whose images did not change (the teacher's, when only λ changes) is
not extracted again, and a change to the metrics' own params (KID subsets, bootstrap resamples) only
re-runs the arithmetic.

A feature file (:func:`write_features`) is an ``.npz`` holding ``features`` (N, D) — float32 when that
is exact, as it is for the Inception network's float32 output, else float64 — and ``meta``, a JSON
string naming the extractor (FID mode and the weights' SHA-1), the number of images and the SHA-256 of
the images themselves (:func:`images_sha256`, a record of which images they describe: DVC's dependencies are what
tie a feature file to its set). :func:`load_features` refuses a file made with other Inception weights or in
another FID mode than the scoring run's, and parses it as untrusted input: uncompressed records only, sizes
checked before reading, no pickles, JSON of bounded length and depth, finite values only.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adcm.errors import DatasetError, FIDError
from adcm.eval.fid import identity_mode
from adcm.io.datasets import map_npz_array
from adcm.io.files import atomic_path

__all__ = ["FeatureSet", "images_sha256", "load_features", "read_meta", "write_features"]

_MAX_META_CHARS = 4096
_MAX_NPY_HEADER = 65536  # a .npy header is at most 64 KiB in format 2 and 3
_CHUNK_ROWS = 256


@dataclass(frozen=True)
class FeatureSet:
    """The features of an image set and what they were extracted from.

    ``features`` is (N, D) float64; ``extractor_id`` names the Inception weights and FID mode
    (:func:`~adcm.eval.fid.weights_identity`); ``images_sha256`` is :func:`images_sha256` of the images.
    """

    features: np.ndarray
    extractor_id: str
    images_sha256: str


def images_sha256(images: np.ndarray) -> str:
    """SHA-256 of an image array's shape, dtype and bytes (row-major), read a few rows at a time so that a
    memory-mapped set is never loaded whole: the same images give the same digest whatever file holds them."""
    digest = hashlib.sha256(f"{images.dtype.str}{tuple(images.shape)}".encode())
    for start in range(0, len(images), _CHUNK_ROWS):
        digest.update(np.ascontiguousarray(images[start : start + _CHUNK_ROWS]).tobytes())
    return digest.hexdigest()


def write_features(path: Path, features: np.ndarray, extractor_id: str, images_digest: str) -> None:
    """Write ``features`` (N, D) of the images whose :func:`images_sha256` is ``images_digest``, extracted by
    ``extractor_id``, to ``path`` (uncompressed ``.npz``, atomically). Stored as float32 when that loses
    nothing, else as float64.

    Raises:
        FIDError: ``features`` is not a finite 2-d array of at least two rows.
    """
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2 or not np.isfinite(features).all():
        raise FIDError(f"{path}: features must be a finite (N ≥ 2, D) array, got shape {features.shape}")
    single = features.astype(np.float32)
    stored = single if np.array_equal(single.astype(features.dtype), features) else features.astype(np.float64)
    meta = {
        "extractor": extractor_id,
        "fid_mode": identity_mode(extractor_id),
        "count": len(features),
        "images_sha256": images_digest,
    }
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, features=stored, meta=np.array(json.dumps(meta, sort_keys=True)))


def read_meta(
    path: Path, key: str = "meta", max_chars: int = _MAX_META_CHARS, *, stored_only: bool = False
) -> dict[str, Any]:
    """The JSON object an untrusted ``.npz`` stores as the 0-d string array ``key`` (how feature files and
    precomputed references record what they were made from), read in bounded memory and time: a record larger
    than ``max_chars`` characters is refused from its zip header before it is read, and deeply nested JSON is
    refused rather than overflowing the parser's recursion. With ``stored_only`` any compressed record of the
    file is refused in the same pass over the zip directory (a stored record is memory-mapped after its declared
    size is checked, so nothing is inflated before it is checked).

    Raises:
        FIDError: not a JSON object of at most ``max_chars`` characters, or a compressed record with
            ``stored_only`` (one line naming the file).
        DatasetError: a missing or corrupt file, or no array ``key`` (:func:`~adcm.io.datasets.map_npz_array`).
    """
    bad = FIDError(f"{path}: {key!r} is not a JSON string of at most {max_chars} characters")
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt .npz file ({type(exc).__name__}: {exc})") from exc
    packed = [i.filename for i in records if i.compress_type != zipfile.ZIP_STORED] if stored_only else []
    if packed:
        raise FIDError(f"{path}: compressed record {packed[0]!r}; `adcm features` writes feature files uncompressed")
    if any(i.filename == f"{key}.npy" and i.file_size > 4 * max_chars + _MAX_NPY_HEADER for i in records):
        raise bad
    text = map_npz_array(path, key)
    if text.shape != () or text.dtype.kind != "U" or text.dtype.itemsize > 4 * max_chars:
        raise bad
    try:
        meta = json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise FIDError(f"{path}: {key!r} is not JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise FIDError(f"{path}: {key!r} is nested too deeply") from exc
    if not isinstance(meta, dict):
        raise FIDError(f"{path}: {key!r} is not a JSON object")
    return meta


def load_features(path: Path, extractor_id: str) -> FeatureSet:
    """The features stored at ``path`` by :func:`write_features`, as float64, if they were extracted by
    ``extractor_id`` (the same FID mode and Inception weights).

    The images' SHA-256 is returned, not checked: it records which images the features describe, while DVC's
    dependencies tie each file to its set in the pipeline.

    Raises:
        FIDError: the file is missing, corrupt, compressed or malformed, or was made with another FID mode or
            other weights (one line naming the file and saying how to extract them again).
    """
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"{path}: features not found; extract them with `adcm features`")
    try:
        meta = read_meta(path, stored_only=True)
        made_with = meta.get("extractor")
        if made_with != extractor_id:
            made_mode, wanted_mode = meta.get("fid_mode"), identity_mode(extractor_id)
            what = (
                f"in FID mode {made_mode!r}, not {wanted_mode!r}" if made_mode != wanted_mode else "with other weights"
            )
            again = "extract them again with `adcm features`"
            raise FIDError(f"{path}: features extracted {what} ({made_with!r}); {again}")
        features = map_npz_array(path, "features")
    except DatasetError as exc:
        raise FIDError(str(exc)) from exc
    count, digest = meta.get("count"), meta.get("images_sha256")
    dtype_ok = features.dtype in (np.float32, np.float64)
    if not dtype_ok or features.ndim != 2 or len(features) < 2 or features.shape[1] < 1:
        got = f"{features.dtype} {features.shape}"
        raise FIDError(f"{path}: 'features' must be float32 or float64 (N ≥ 2, D ≥ 1), got {got}")
    if type(count) is not int or count != len(features):
        raise FIDError(f"{path}: declares {count!r} images but holds {len(features)} feature rows")
    if not isinstance(digest, str):
        raise FIDError(f"{path}: 'meta' has no images_sha256")
    result = np.array(features, dtype=np.float64)
    if not np.isfinite(result).all():
        raise FIDError(f"{path}: 'features' contains NaN or inf")
    return FeatureSet(result, extractor_id, digest)
