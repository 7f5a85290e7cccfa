"""Feature files of `adcm features`: exact round trip, the images' digest, refusals of foreign or malformed files."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from adcm.errors import FIDError
from adcm.eval.features import images_sha256, load_features, read_meta, write_features
from adcm.eval.fid import weights_identity

CLEAN = weights_identity("a" * 40, "clean")
LEGACY = weights_identity("a" * 40, "legacy_tensorflow")
OTHER_WEIGHTS = weights_identity("b" * 40, "clean")


def _features(rows: int = 5, dim: int = 7) -> np.ndarray:
    """float32 values held in float64, as the extractor's output reaches `adcm features`."""
    return np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32).astype(np.float64)


def test_round_trip_is_exact_and_stored_as_float32(tmp_path: Path) -> None:
    feats = _features()
    write_features(tmp_path / "f.npz", feats, CLEAN, "d" * 64)
    loaded = load_features(tmp_path / "f.npz", CLEAN)
    assert loaded.features.dtype == np.float64 and np.array_equal(loaded.features, feats)
    assert loaded.images_sha256 == "d" * 64 and loaded.extractor_id == CLEAN
    with np.load(tmp_path / "f.npz") as archive:
        assert archive["features"].dtype == np.float32
        assert json.loads(str(archive["meta"]))["fid_mode"] == "clean"


def test_values_float32_cannot_hold_are_stored_in_float64(tmp_path: Path) -> None:
    feats = _features() + 1e-12
    write_features(tmp_path / "f.npz", feats, CLEAN, "d" * 64)
    assert np.array_equal(load_features(tmp_path / "f.npz", CLEAN).features, feats)
    with np.load(tmp_path / "f.npz") as archive:
        assert archive["features"].dtype == np.float64


def test_images_digest_depends_on_every_pixel_and_the_shape_not_on_the_file(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (600, 1, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert images_sha256(mapped) == images_sha256(images)  # read in chunks of rows, the same digest
    changed = images.copy()
    changed[599, 0, 3, 3] ^= 1  # the last pixel, in the last chunk
    assert images_sha256(changed) != images_sha256(images)
    assert images_sha256(images.reshape(600, 1, 2, 8)) != images_sha256(images)


@pytest.mark.parametrize(
    ("used", "message"),
    [(LEGACY, "in FID mode 'clean', not 'legacy_tensorflow'"), (OTHER_WEIGHTS, "with other weights")],
)
def test_features_of_another_extractor_are_refused(tmp_path: Path, used: str, message: str) -> None:
    write_features(tmp_path / "f.npz", _features(), CLEAN, "d" * 64)
    with pytest.raises(FIDError, match=message) as info:
        load_features(tmp_path / "f.npz", used)
    assert "adcm features" in str(info.value) and "\n" not in str(info.value)


def _write_raw(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return path


def _meta(**change: object) -> np.ndarray:
    meta = {"extractor": CLEAN, "fid_mode": "clean", "count": 5, "images_sha256": "d" * 64, **change}
    return np.array(json.dumps(meta))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"meta": _meta()}, "no array 'features'"),
        ({"features": _features().astype(np.float32)}, "no array 'meta'"),
        ({"features": _features().astype(np.float32), "meta": np.array("[1, 2]")}, "not a JSON object"),
        ({"features": _features().astype(np.float32), "meta": np.array("{")}, "not JSON"),
        ({"features": _features().astype(np.float32), "meta": np.array("x" * 5000)}, "at most 4096"),
        ({"features": _features().astype(np.float32), "meta": _meta(count=6)}, "declares 6 images"),
        ({"features": _features().astype(np.float32), "meta": _meta(images_sha256=None)}, "no images_sha256"),
        ({"features": _features().astype(np.int32), "meta": _meta()}, "float32 or float64"),
        ({"features": np.zeros(5, np.float32), "meta": _meta()}, "float32 or float64"),
        ({"features": np.full((5, 7), np.nan, np.float32), "meta": _meta()}, "NaN"),
        ({"features": np.zeros((5, 0), np.float32), "meta": _meta()}, "D ≥ 1"),
        ({"features": _features().astype(np.float32), "meta": _meta(count=5.0)}, "declares 5.0 images"),
        (
            {"features": _features().astype(np.float32), "meta": np.array('{"a":' + "[" * 2000 + "]" * 2000 + "}")},
            "nested too deeply",
        ),
    ],
)
def test_malformed_files_are_refused_with_one_line(tmp_path: Path, arrays: dict, message: str) -> None:
    path = _write_raw(tmp_path / "f.npz", **arrays)
    with pytest.raises(FIDError, match=message) as info:
        load_features(path, CLEAN)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pickled_and_oversized_members_are_refused_before_reading(tmp_path: Path) -> None:
    pickled = _write_raw(tmp_path / "p.npz", features=np.array([{"a": 1}], dtype=object), meta=_meta())
    with pytest.raises(FIDError, match="holds Python objects"):
        load_features(pickled, CLEAN)
    # A member that declares more data than the file holds (a zip bomb's shape) is refused from its header.
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 2048)}
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:
        archive.writestr("features.npy", buffer.getvalue() + b"\0" * 64)
        with io.BytesIO() as meta:
            np.save(meta, _meta())
            archive.writestr("meta.npy", meta.getvalue())
    with pytest.raises(FIDError, match="declares shape"):
        load_features(tmp_path / "big.npz", CLEAN)


def test_compressed_records_are_refused_before_anything_is_inflated(tmp_path: Path) -> None:
    with open(tmp_path / "c.npz", "wb") as handle:
        np.savez_compressed(handle, features=_features().astype(np.float32), meta=np.array("x" * 10**6))
    with pytest.raises(FIDError, match="compressed record"):
        load_features(tmp_path / "c.npz", CLEAN)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(FIDError, match="corrupt"):
        load_features(tmp_path / "junk.npz", CLEAN)


def test_an_oversized_meta_is_refused_from_its_zip_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adcm.eval.features as features_module

    with open(tmp_path / "m.npz", "wb") as handle:  # 400 kB of text, a few hundred bytes compressed
        np.savez_compressed(handle, meta=np.array("x" * 100_000))
    monkeypatch.setattr(features_module, "map_npz_array", lambda *_: pytest.fail("the record was read"))
    with pytest.raises(FIDError, match="'meta' is not a JSON string of at most 4096 characters"):
        read_meta(tmp_path / "m.npz")


def test_a_foreign_mode_name_cannot_break_the_one_line_error(tmp_path: Path) -> None:
    path = _write_raw(
        tmp_path / "f.npz", features=_features().astype(np.float32), meta=_meta(extractor="x", fid_mode="a\nb")
    )
    with pytest.raises(FIDError, match="in FID mode") as info:
        load_features(path, CLEAN)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_features_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FIDError, match="not found; extract them with `adcm features`"):
        load_features(tmp_path / "none.npz", CLEAN)
    for bad in (np.zeros((1, 7)), np.full((5, 7), np.inf), np.zeros(5)):
        with pytest.raises(FIDError, match="finite"):
            write_features(tmp_path / "w.npz", bad, CLEAN, "d" * 64)
    assert not (tmp_path / "w.npz").exists()
