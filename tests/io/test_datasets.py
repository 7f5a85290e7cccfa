"""Tests for adcm.io.datasets (dataset readers, padding, prepared form) and adcm.io.files (atomic writes)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adcm.io import datasets as data_module
from adcm.io.datasets import (
    FASHION_MNIST_CLASSES,
    DatasetError,
    ImageDataset,
    ImageStream,
    background_value,
    load_prepared,
    pad_images,
    read_cifar10,
    read_fashion_mnist,
    read_image_folder,
    write_prepared,
)
from adcm.io.files import atomic_path, atomic_write_bytes, save_torch, sha256_file

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# --------------------------------------------------------------------------------------------------
# IDX helpers
# --------------------------------------------------------------------------------------------------


def _idx_images(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _known_images(n: int = 3) -> np.ndarray:
    """n 28x28 images whose pixels are all distinct per position and image (mod 256)."""
    base = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28)
    return ((base * 7 + 3) % 256).astype(np.uint8)


def _write_fmnist(directory: Path, prefix: str, images: bytes, labels: bytes, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, payload in (("images-idx3", images), ("labels-idx1", labels)):
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST / IDX
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize(("split", "prefix"), [("train", "train"), ("test", "t10k")])
def test_fashion_mnist_round_trip(tmp_path: Path, gz: bool, split: str, prefix: str) -> None:
    images = _known_images(3)
    labels = np.array([9, 0, 4], dtype=np.uint8)
    _write_fmnist(tmp_path, prefix, _idx_images(images), _idx_labels(labels), gz=gz)
    ds = read_fashion_mnist(tmp_path, split)  # type: ignore[arg-type]
    assert ds.images.dtype == np.uint8 and ds.images.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(ds.images[:, 0], images)
    assert ds.images[1, 0, 2, 5] == images[1, 2, 5]
    assert ds.labels is not None and ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, [9, 0, 4])
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.num_classes == 10
    assert ds.name == "fashion-mnist"
    assert ds.images.flags.writeable


def test_fashion_mnist_other_split_missing(tmp_path: Path) -> None:
    _write_fmnist(tmp_path, "train", _idx_images(_known_images(1)), _idx_labels(np.array([1])))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz.*not found"):
        read_fashion_mnist(tmp_path, "test")


def test_fashion_mnist_missing_file_names_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        read_fashion_mnist(tmp_path, "train")
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(info.value)
    # Images present, labels missing: the labels path is named.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(_known_images(1))))
    with pytest.raises(DatasetError) as info:
        read_fashion_mnist(tmp_path, "train")
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(info.value)


def test_idx_truncated(tmp_path: Path) -> None:
    payload = _idx_images(_known_images(2))
    _write_fmnist(tmp_path, "train", payload[:-10], _idx_labels(np.array([1, 2])))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: truncated.*expected 1568 bytes"):
        read_fashion_mnist(tmp_path, "train")


def test_idx_truncated_header(tmp_path: Path) -> None:
    _write_fmnist(tmp_path, "train", _idx_images(_known_images(1))[:10], _idx_labels(np.array([1])))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: truncated IDX header"):
        read_fashion_mnist(tmp_path, "train")


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    _write_fmnist(tmp_path, "train", _idx_images(_known_images(1)) + b"\0", _idx_labels(np.array([1])))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: IDX data longer"):
        read_fashion_mnist(tmp_path, "train")


def test_idx_wrong_magic(tmp_path: Path) -> None:
    images = _known_images(1)
    # Labels magic in the images file.
    _write_fmnist(tmp_path, "train", _idx_images(images, magic=0x801), _idx_labels(np.array([1])))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: bad IDX magic number 0x00000801"):
        read_fashion_mnist(tmp_path, "train")
    _write_fmnist(tmp_path, "train", _idx_images(images), _idx_labels(np.array([1]), magic=0x12345678))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: bad IDX magic.*expected 0x00000801"):
        read_fashion_mnist(tmp_path, "train")


def test_idx_count_mismatch(tmp_path: Path) -> None:
    _write_fmnist(tmp_path, "train", _idx_images(_known_images(3)), _idx_labels(np.array([1, 2])))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: 2 labels but .* has 3 images"):
        read_fashion_mnist(tmp_path, "train")


def test_idx_wrong_dims_and_labels(tmp_path: Path) -> None:
    small = np.zeros((2, 27, 28), dtype=np.uint8)
    _write_fmnist(tmp_path, "train", _idx_images(small), _idx_labels(np.array([1, 2])))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: .*must be 28x28, got 27x28"):
        read_fashion_mnist(tmp_path, "train")
    _write_fmnist(tmp_path, "train", _idx_images(_known_images(2)), _idx_labels(np.array([1, 10])))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz: label 10 out of range"):
        read_fashion_mnist(tmp_path, "train")


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_idx_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    _write_fmnist(tmp_path, "train", _idx_images(_known_images(2)), _idx_labels(np.array([1, 2])))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(b"this is not gzip data" if damage == "garbage" else blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        read_fashion_mnist(tmp_path, "train")


def test_real_fashion_mnist_train() -> None:
    if not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not found in {REAL_FASHION_MNIST}")
    ds = read_fashion_mnist(REAL_FASHION_MNIST, "train")
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels is not None and len(ds.labels) == 60000
    assert sorted(np.unique(ds.labels).tolist()) == list(range(10))
    assert ds.num_classes == 10
    assert background_value(ds.images) == 0


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler writing str/bytes as Python 2 ``str`` (BINSTRING), like cPickle did."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: str | bytes) -> None:
        raw = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _official_style_pickle(obj: object) -> bytes:
    """A pickle shaped like the official CIFAR-10 batches (Python 2 cPickle, numpy.core globals)."""
    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    blob = buffer.getvalue()
    blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"_codecs" not in blob and b"numpy._core" not in blob
    return blob


_PICKLERS = {
    "official": _official_style_pickle,
    "protocol2": lambda obj: pickle.dumps(obj, protocol=2),
    "protocol4": lambda obj: pickle.dumps(obj, protocol=4),
    "protocol5": lambda obj: pickle.dumps(obj, protocol=5),
}

_CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_batches(per_batch: int = 2) -> dict[str, dict[bytes, object]]:
    rng = np.random.default_rng(0)
    batches: dict[str, dict[bytes, object]] = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batches[name] = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
    return batches


def _write_cifar_archive(
    path: Path, members: dict[str, bytes], top: str = "cifar-10-batches-py", prefix: str = ""
) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{prefix}{top}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _cifar_members(dumps, batches: dict[str, dict[bytes, object]]) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    members = {name: dumps(batch) for name, batch in batches.items()}
    if dumps is _official_style_pickle:
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in members["test_batch"]
    members["batches.meta"] = dumps(
        {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in _CIFAR_NAMES], b"num_vis": 3072}
    )
    members["readme.html"] = b"<html></html>"
    return members


@pytest.mark.parametrize("style", list(_PICKLERS))
def test_cifar10_round_trip(tmp_path: Path, style: str) -> None:
    batches = _cifar_batches()
    archive = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar_archive(
        archive, _cifar_members(_PICKLERS[style], batches), prefix="./" if style == "protocol4" else ""
    )

    train = read_cifar10(archive, "train")
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == np.uint8
    data = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])  # type: ignore[misc]
    labels = [y for k in range(1, 6) for y in batches[f"data_batch_{k}"][b"labels"]]  # type: ignore[attr-defined]
    for i, c, y, x in [(0, 0, 0, 0), (3, 1, 5, 7), (9, 2, 31, 30), (6, 2, 17, 0)]:
        assert train.images[i, c, y, x] == data[i, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(train.images.reshape(10, 3072), data)
    assert train.labels is not None and train.labels.dtype == np.int64
    assert train.labels.tolist() == labels
    assert train.class_names == _CIFAR_NAMES and train.name == "cifar10"

    test = read_cifar10(archive, "test")
    np.testing.assert_array_equal(test.images.reshape(2, 3072), batches["test_batch"][b"data"])
    assert test.labels is not None and test.labels.tolist() == batches["test_batch"][b"labels"]


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch pwned-by-pickle",))


def test_prepare_cifar10_streams_and_maps(tmp_path: Path) -> None:
    """prepare_dataset → write_prepared → load_prepared for CIFAR-10: the same pixels, now memory-mapped."""
    from adcm.config import PrepareConfig

    batches = _cifar_batches(per_batch=3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar_archive(archive, _cifar_members(_PICKLERS["protocol2"], batches))
    cfg = PrepareConfig(
        dataset="cifar10", source=str(archive), split="train", resolution=32, labels=True, max_images=None
    )
    stream = data_module.prepare_dataset(cfg)
    assert stream.count == 15 and stream.shape == (3, 32, 32) and stream.class_names == _CIFAR_NAMES
    meta = write_prepared(stream, tmp_path / "d.npz", tmp_path / "d.json")
    assert (meta["count"], meta["channels"], meta["num_classes"]) == (15, 3, 10)
    loaded = load_prepared(tmp_path / "d.npz")
    assert isinstance(loaded.images, np.memmap)
    expected = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])  # type: ignore[misc]
    np.testing.assert_array_equal(loaded.images.reshape(15, 3072), expected)


def test_cifar10_malicious_member_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    batches = _cifar_batches()
    members = _cifar_members(_PICKLERS["protocol2"], batches)
    members["data_batch_3"] = pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar_archive(archive, members)
    with pytest.raises(DatasetError, match=r"data_batch_3: refusing to unpickle global (posix|os)\.system"):
        read_cifar10(archive, "train")
    assert not (tmp_path / "pwned-by-pickle").exists()
    # Other non-numpy globals are refused as well, e.g. builtins.eval.
    members["data_batch_3"] = pickle.dumps({b"data": eval, b"labels": [0]}, protocol=4)
    _write_cifar_archive(archive, members)
    with pytest.raises(DatasetError, match=r"refusing to unpickle global builtins\.eval"):
        read_cifar10(archive, "train")


def test_cifar10_missing_archive_and_member(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: CIFAR-10 archive not found"):
        read_cifar10(archive, "test")
    members = _cifar_members(_PICKLERS["protocol4"], _cifar_batches())
    del members["data_batch_4"]
    _write_cifar_archive(archive, members)
    with pytest.raises(
        DatasetError, match=r"cifar-10-python\.tar\.gz: missing member cifar-10-batches-py/data_batch_4"
    ):
        read_cifar10(archive, "train")
    read_cifar10(archive, "test")  # the test split does not need data_batch_4
    del members["batches.meta"]
    _write_cifar_archive(archive, members)
    with pytest.raises(DatasetError, match=r"missing member cifar-10-batches-py/batches\.meta"):
        read_cifar10(archive, "test")


def test_cifar10_wrong_shapes_and_corrupt(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = _cifar_batches()
    batches["test_batch"][b"data"] = np.zeros((2, 3071), dtype=np.uint8)
    _write_cifar_archive(archive, _cifar_members(_PICKLERS["protocol4"], batches))
    with pytest.raises(DatasetError, match=r"test_batch: b'data' must be a uint8 array \(n, 3072\)"):
        read_cifar10(archive, "test")

    batches = _cifar_batches()
    batches["test_batch"][b"labels"] = [1, 2, 3]
    _write_cifar_archive(archive, _cifar_members(_PICKLERS["protocol4"], batches))
    with pytest.raises(DatasetError, match=r"test_batch: b'labels' must be 2 integers"):
        read_cifar10(archive, "test")

    members = _cifar_members(_PICKLERS["protocol4"], _cifar_batches())
    members["test_batch"] = b"\x80\x04not a pickle"
    _write_cifar_archive(archive, members)
    with pytest.raises(DatasetError, match=r"test_batch: cannot unpickle"):
        read_cifar10(archive, "test")

    archive.write_bytes(b"definitely not a tarball")
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: corrupt or unreadable tar archive"):
        read_cifar10(archive, "test")


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_labels_and_order(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    red = np.zeros((4, 6, 3), dtype=np.uint8)
    red[..., 0] = 200
    red[1, 2] = (1, 2, 3)  # row 1, column 2
    gray = np.full((4, 6), 77, dtype=np.uint8)
    _save(root / "zebra" / "b.PNG", red, "RGB")
    _save(root / "zebra" / "a.jpeg", np.full((4, 6, 3), 128, dtype=np.uint8), "RGB")
    _save(root / "ant" / "nested" / "x.png", gray, "L")
    _save(root / "ant" / "c.JPG", np.full((4, 6, 3), 30, dtype=np.uint8), "RGB")
    (root / "ant" / "notes.txt").write_text("ignored")
    _save(root / ".hidden" / "skip.png", np.zeros((9, 9), dtype=np.uint8), "L")

    ds = read_image_folder(root, labels=True)
    # Sorted relative paths: ant/c.JPG, ant/nested/x.png, zebra/a.jpeg, zebra/b.PNG
    assert ds.class_names == ["ant", "zebra"] and ds.name == "tiny"
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 3, 4, 6) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[1], np.broadcast_to(gray, (3, 4, 6)))  # gray expanded to RGB
    np.testing.assert_array_equal(ds.images[3], red.transpose(2, 0, 1))  # PNG is lossless: exact CHW
    assert tuple(ds.images[3, :, 1, 2]) == (1, 2, 3)
    assert abs(int(ds.images[2].astype(int).mean()) - 128) <= 2  # JPEG: approximately

    unlabelled = read_image_folder(root, labels=False)
    assert unlabelled.labels is None and unlabelled.class_names is None and unlabelled.num_classes == 0
    np.testing.assert_array_equal(unlabelled.images, ds.images)


def test_image_folder_grayscale_becomes_rgb(tmp_path: Path) -> None:
    a = np.arange(20, dtype=np.uint8).reshape(4, 5)
    _save(tmp_path / "a.png", a, "L")
    _save(tmp_path / "b.png", 255 - a, "L")
    ds = read_image_folder(tmp_path, labels=False)
    assert ds.images.shape == (2, 3, 4, 5)  # RGB always, like ADM/EDM2's ImageNet preparation
    np.testing.assert_array_equal(ds.images, np.repeat(np.stack([a, 255 - a])[:, None], 3, axis=1))


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found or not a directory"):
        read_image_folder(tmp_path / "absent", labels=False)
    with pytest.raises(DatasetError, match="no image files found"):
        read_image_folder(tmp_path, labels=False)

    _save(tmp_path / "cls" / "a.png", np.zeros((4, 4, 3), dtype=np.uint8), "RGB")
    _save(tmp_path / "cls" / "b.png", np.zeros((4, 5, 3), dtype=np.uint8), "RGB")
    with pytest.raises(DatasetError, match=r"cls/b\.png: image size 5x4 differs from 4x4; all images must have"):
        read_image_folder(tmp_path, labels=False)
    assert read_image_folder(tmp_path, labels=False, resolution=4).images.shape == (2, 3, 4, 4)  # cropped

    (tmp_path / "cls" / "b.png").unlink()
    _save(tmp_path / "loose.png", np.zeros((4, 4, 3), dtype=np.uint8), "RGB")
    with pytest.raises(DatasetError, match=r"loose\.png: image is not inside a class subdirectory"):
        read_image_folder(tmp_path, labels=True)
    assert read_image_folder(tmp_path, labels=False).images.shape == (2, 3, 4, 4)

    (tmp_path / "cls" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"broken\.png: not a readable PNG/JPEG image"):
        read_image_folder(tmp_path, labels=False)


# --------------------------------------------------------------------------------------------------
# Padding and background
# --------------------------------------------------------------------------------------------------


def test_pad_images_centres_with_value() -> None:
    images = np.arange(2 * 1 * 28 * 28, dtype=np.int64).reshape(2, 1, 28, 28).astype(np.uint8)
    padded = pad_images(images, 32, 7)
    assert padded.shape == (2, 1, 32, 32) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:, :, 2:30, 2:30], images)
    mask = np.ones((32, 32), dtype=bool)
    mask[2:30, 2:30] = False
    assert (padded[:, :, mask] == 7).all()

    odd = pad_images(np.full((1, 3, 2, 3), 9, dtype=np.uint8), 6, 0)  # 4 rows and 3 columns of padding
    assert odd.shape == (1, 3, 6, 6)
    assert (odd[:, :, 2:4, 1:4] == 9).all() and odd.sum() == 9 * 3 * 2 * 3
    np.testing.assert_array_equal(pad_images(images, 28, 0), images)

    with pytest.raises(DatasetError, match="larger than the target resolution 16"):
        pad_images(images, 16, 0)
    with pytest.raises(DatasetError, match="does not fit dtype uint8"):
        pad_images(images, 32, 256)


def test_background_value() -> None:
    images = np.full((3, 2, 8, 8), 200, dtype=np.uint8)
    images[:, :, 1:-1, 1:-1] = 5  # interior dominates overall but not on the border
    assert background_value(images) == 200
    images[0, 0, 0, :] = 3
    assert background_value(images) == 200
    assert background_value(np.zeros((1, 1, 28, 28), dtype=np.uint8)) == 0
    with pytest.raises(DatasetError):
        background_value(np.zeros((0, 1, 4, 4), dtype=np.uint8))


# --------------------------------------------------------------------------------------------------
# Prepared form
# --------------------------------------------------------------------------------------------------


def _tiny_dataset(labelled: bool = True) -> ImageDataset:
    rng = np.random.default_rng(1)
    return ImageDataset(
        images=rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8),
        labels=np.array([0, 2, 1, 2, 0], dtype=np.int64) if labelled else None,
        name="tiny",
        class_names=["a", "b", "c"] if labelled else None,
    )


def test_write_load_prepared_round_trip(tmp_path: Path) -> None:
    ds = _tiny_dataset()
    array_path, meta_path = tmp_path / "out" / "data.npz", tmp_path / "out" / "meta.json"
    meta = write_prepared(ds, array_path, meta_path)
    assert meta == json.loads(meta_path.read_text())
    assert meta == {
        "name": "tiny",
        "resolution": 8,
        "channels": 3,
        "count": 5,
        "has_labels": True,
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "sha256": sha256_file(array_path),
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.npz", "meta.json"]
    loaded = load_prepared(array_path)
    np.testing.assert_array_equal(loaded.images, ds.images)
    assert isinstance(loaded.images, np.memmap) and not loaded.images.flags.writeable  # mapped, not read
    assert loaded.labels is not None and loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.labels, ds.labels)
    assert loaded.class_names == ["a", "b", "c"] and loaded.name == "tiny"


def test_write_load_prepared_unlabelled(tmp_path: Path) -> None:
    ds = _tiny_dataset(labelled=False)
    meta = write_prepared(ds, tmp_path / "d.npz", tmp_path / "d.json")
    assert meta["num_classes"] == 0 and meta["class_names"] is None and meta["has_labels"] is False
    with np.load(tmp_path / "d.npz") as raw:
        assert raw["labels"].dtype == np.int64 and raw["labels"].shape == (0,)
        assert not bool(raw["has_labels"])
    loaded = load_prepared(tmp_path / "d.npz")
    assert loaded.labels is None and loaded.class_names is None
    np.testing.assert_array_equal(loaded.images, ds.images)


def test_write_prepared_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(OSError, match="simulated"):
        write_prepared(_tiny_dataset(), tmp_path / "data.npz", tmp_path / "meta.json")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # A stream that fails half-way (an undecodable image, say) leaves nothing either.
    ds = _tiny_dataset()

    def failing_blocks() -> Iterator[np.ndarray]:
        yield ds.images[:2]
        raise DatasetError("image 3 is broken (simulated)")

    stream = ImageStream(5, (3, 8, 8), ds.labels, "tiny", ds.class_names, failing_blocks)
    with pytest.raises(DatasetError, match="simulated"):
        write_prepared(stream, tmp_path / "data.npz", tmp_path / "meta.json")
    assert list(tmp_path.iterdir()) == []
    short = ImageStream(5, (3, 8, 8), ds.labels, "tiny", ds.class_names, lambda: iter([ds.images[:4]]))
    with pytest.raises(DatasetError, match="yielded 4"):
        write_prepared(short, tmp_path / "data.npz", tmp_path / "meta.json")
    wrong = ImageStream(5, (3, 8, 8), ds.labels, "tiny", ds.class_names, lambda: iter([ds.images[:, :1]]))
    with pytest.raises(DatasetError, match="expected uint8"):
        write_prepared(wrong, tmp_path / "data.npz", tmp_path / "meta.json")
    assert list(tmp_path.iterdir()) == []

    # Failing after the .npz is complete (while hashing) leaves nothing either, and does not
    # disturb files from an earlier successful run.
    monkeypatch.undo()
    write_prepared(_tiny_dataset(), tmp_path / "data.npz", tmp_path / "meta.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(data_module, "sha256_file", boom)
    with pytest.raises(OSError, match="simulated"):
        write_prepared(_tiny_dataset(labelled=False), tmp_path / "data.npz", tmp_path / "meta.json")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_prepared_rejects_non_square(tmp_path: Path) -> None:
    ds = ImageDataset(np.zeros((1, 1, 4, 5), dtype=np.uint8), None, "rect", None)
    with pytest.raises(DatasetError, match="must be square"):
        write_prepared(ds, tmp_path / "a.npz", tmp_path / "a.json")
    assert list(tmp_path.iterdir()) == []


def test_load_prepared_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.npz: prepared dataset not found"):
        load_prepared(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DatasetError, match=r"bad\.npz: corrupt prepared dataset"):
        load_prepared(bad)
    np.savez(tmp_path / "other.npz", images=np.zeros((1, 1, 2, 2), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"other\.npz: not a prepared dataset, missing arrays"):
        load_prepared(tmp_path / "other.npz")
    write_prepared(_tiny_dataset(), tmp_path / "ok.npz", tmp_path / "ok.json")
    with np.load(tmp_path / "ok.npz") as raw:
        arrays = dict(raw)
    np.savez(tmp_path / "float.npz", **{**arrays, "images": arrays["images"].astype(np.float32)})
    with pytest.raises(DatasetError, match=r"float\.npz: images must be uint8"):
        load_prepared(tmp_path / "float.npz")
    np.savez(tmp_path / "short.npz", **{**arrays, "labels": arrays["labels"][:2]})
    with pytest.raises(DatasetError, match=r"short\.npz: 2 labels for 5 images"):
        load_prepared(tmp_path / "short.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "ok.npz").read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"truncated\.npz: corrupt prepared dataset"):
        load_prepared(truncated)


def test_image_dataset_validates() -> None:
    with pytest.raises(DatasetError, match="uint8 array of shape"):
        ImageDataset(np.zeros((1, 4, 4), dtype=np.uint8), None, "x", None)
    with pytest.raises(DatasetError, match="int64 array"):
        ImageDataset(np.zeros((1, 1, 4, 4), dtype=np.uint8), np.zeros(1, dtype=np.int32), "x", None)
    with pytest.raises(DatasetError, match="2 labels for 1 images"):
        ImageDataset(np.zeros((1, 1, 4, 4), dtype=np.uint8), np.zeros(2, dtype=np.int64), "x", None)


# --------------------------------------------------------------------------------------------------
# adcm.io.files
# --------------------------------------------------------------------------------------------------


def test_atomic_path_commits_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "ckpt.pt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and tmp.exists()
        assert tmp.name.startswith(".") and tmp.suffix == ".pt"
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["ckpt.pt"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_atomic_path_discards_on_error(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="halfway"), atomic_path(target) as tmp:
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise RuntimeError("halfway")
    assert target.read_bytes() == b"old"
    assert not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_write_bytes(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_save_torch_is_byte_identical_for_identical_content(tmp_path: Path) -> None:
    """Teacher files and checkpoints are identified by SHA-256 (study records, DVC): the same content written twice,
    under two names, is the same bytes (``torch.save`` to a path would embed the random temporary name)."""
    import torch

    obj = {"format": "x", "w": torch.arange(6.0).reshape(2, 3), "meta": {"n": 1}}
    save_torch(tmp_path / "a.pt", obj)
    save_torch(tmp_path / "sub" / "b.pt", obj)
    assert sha256_file(tmp_path / "a.pt") == sha256_file(tmp_path / "sub" / "b.pt")
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], obj["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "sub"]  # no temporary file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
