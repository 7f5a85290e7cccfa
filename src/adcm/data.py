"""Dataset preparation: read raw datasets into uint8 ``(N, C, H, W)`` arrays and store them.

Readers
    * :func:`read_fashion_mnist` -- the official IDX files (gzipped or not);
    * :func:`read_cifar10` -- the official ``cifar-10-python.tar.gz``, unpickled with a restricted
      :class:`pickle.Unpickler` that can build numpy arrays and nothing else;
    * :func:`read_image_folder` -- a directory tree of PNG/JPEG files (e.g. a downsampled ImageNet).

Every problem with the user's files raises :class:`DatasetError` with one line naming the file and
what is wrong or expected. The prepared form is one ``.npz`` (see :func:`write_prepared`) plus a JSON
metadata file, both written atomically.

This module never reads configuration or argv and never chooses a path: callers pass them in.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from adcm.io import atomic_path, sha256_file

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGE_SUFFIXES",
    "DatasetError",
    "ImageDataset",
    "background_value",
    "load_prepared",
    "pad_images",
    "read_cifar10",
    "read_fashion_mnist",
    "read_idx",
    "read_image_folder",
    "write_prepared",
]

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
"""Official Fashion-MNIST class names, in label order."""

CIFAR10_CLASSES: list[str] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
"""Official CIFAR-10 class names (the archive's ``batches.meta`` is authoritative when read)."""

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
"""File suffixes (compared lower-cased) picked up by :func:`read_image_folder`."""

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


class DatasetError(ValueError):
    """A problem with a dataset file or array, described in one line naming the file."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory image dataset.

    Attributes:
        images: uint8 array of shape ``(N, C, H, W)``.
        labels: int64 array of shape ``(N,)``, or ``None`` for an unlabelled dataset.
        name: short dataset name (``"fashion-mnist"``, ``"cifar10"``, a folder name, ...).
        class_names: names of the classes in label order, or ``None``.

    ``eq=False``: datasets compare by identity (element-wise array comparison has no single truth
    value); compare the arrays explicitly instead.
    """

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    class_names: list[str] | None

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DatasetError(
                f"dataset {self.name!r}: images must be a uint8 array of shape (N, C, H, W), got "
                f"{_describe_array(images)}"
            )
        if self.labels is not None:
            labels = self.labels
            if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
                raise DatasetError(
                    f"dataset {self.name!r}: labels must be an int64 array of shape (N,), got "
                    f"{_describe_array(labels)}"
                )
            if labels.shape[0] != images.shape[0]:
                raise DatasetError(
                    f"dataset {self.name!r}: {labels.shape[0]} labels for {images.shape[0]} images"
                )
            if labels.size and labels.min() < 0:
                raise DatasetError(f"dataset {self.name!r}: negative label {int(labels.min())}")
            if self.class_names is not None and labels.size and labels.max() >= len(self.class_names):
                raise DatasetError(
                    f"dataset {self.name!r}: label {int(labels.max())} out of range for "
                    f"{len(self.class_names)} class names"
                )

    @property
    def count(self) -> int:
        """Number of images ``N``."""
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(class_names)``, else ``max(label) + 1``, else 0 (unlabelled)."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and self.labels.size:
            return int(self.labels.max()) + 1
        return 0


def _describe_array(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"dtype {value.dtype} shape {value.shape}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def _read_maybe_gzip(path: Path) -> bytes:
    """Read a whole file, decompressing it if its name ends in ``.gz``."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from exc


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one uint8 IDX file (``.gz`` or raw) into an array of the dimensions it declares.

    The header is big-endian: a 4-byte magic (``0x00000803`` for 3-d image files,
    ``0x00000801`` for 1-d label files: two zero bytes, type ``0x08`` = unsigned byte, the number of
    dimensions) followed by one uint32 per dimension, then the data. The payload length must match
    the product of the dimensions exactly.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated IDX file: {len(raw)} bytes, expected at least a 4-byte header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = expected_magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(
            f"{path}: truncated IDX header: {len(raw)} bytes, "
            f"expected {header_len} bytes for {ndim} dimensions"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header_len
    if found < expected:
        raise DatasetError(
            f"{path}: truncated IDX data: expected {expected} bytes for dimensions {dims}, found {found}"
        )
    if found > expected:
        raise DatasetError(
            f"{path}: IDX data longer than declared: expected {expected} bytes for dimensions {dims}, "
            f"found {found}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header_len).reshape(dims).copy()


def _idx_file(directory: Path, stem: str) -> Path:
    gz = directory / f"{stem}.gz"
    if gz.is_file():
        return gz
    plain = directory / stem
    if plain.is_file():
        return plain
    raise DatasetError(f"{gz}: Fashion-MNIST file not found (the un-gzipped {plain.name} is accepted too)")


def read_fashion_mnist(directory: Path, split: Literal["train", "test"]) -> ImageDataset:
    """Read the official Fashion-MNIST IDX files for ``split`` from ``directory``.

    Files: ``<prefix>-images-idx3-ubyte.gz`` and ``<prefix>-labels-idx1-ubyte.gz`` with prefix
    ``train`` or ``t10k`` (test); the un-gzipped names are accepted too (the ``.gz`` wins if both
    exist). Returns images ``(N, 1, 28, 28)`` uint8, labels int64 in ``0..9`` and the class names.
    """
    directory = Path(directory)
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise DatasetError(f"{directory}: unknown Fashion-MNIST split {split!r}, expected 'train' or 'test'")
    prefix = prefixes[split]
    image_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    label_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(image_path, IDX_IMAGES_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{image_path}: Fashion-MNIST images must be 28x28, got {images.shape[1]}x{images.shape[2]}"
        )
    labels = read_idx(label_path, IDX_LABELS_MAGIC).astype(np.int64)
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{label_path}: {labels.shape[0]} labels but {image_path.name} has {images.shape[0]} images"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{label_path}: label {int(labels.max())} out of range, expected 0..9")
    return ImageDataset(
        images=images[:, None, :, :],
        labels=labels,
        name="fashion-mnist",
        class_names=list(FASHION_MNIST_CLASSES),
    )


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------


def _numpy_global(modules: tuple[str, ...], name: str) -> Callable[..., Any]:
    """Import ``name`` from the first of ``modules`` that exists (numpy 2 renamed ``core`` to ``_core``)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {modules} provides {name}")


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python-3 protocol-0/2 pickles use it for bytes, limited to latin-1."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in {"latin1", "latin-1"}:
        raise pickle.UnpicklingError(f"_codecs.encode allowed only for str with latin-1, got {encoding!r}")
    return obj.encode("latin-1", errors)


_RECONSTRUCT_MODULES = ("numpy._core.multiarray", "numpy.core.multiarray")
_FROMBUFFER_MODULES = ("numpy._core.numeric", "numpy.core.numeric")

_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Callable[..., Any]]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global(_RECONSTRUCT_MODULES, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global(_RECONSTRUCT_MODULES, "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global(_FROMBUFFER_MODULES, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global(_FROMBUFFER_MODULES, "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (plus builtin containers, numbers and strings).

    Any other global (``os.system``, ``builtins.eval``, ...) is refused before it is looked up, so
    a malicious pickle cannot run code.
    """

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise DatasetError(
                f"{self._source}: refusing to unpickle global {module}.{name} "
                "(only numpy arrays are allowed in CIFAR-10 batches)"
            )
        return factory()


def _restricted_loads(data: bytes, source: str) -> Any:
    try:
        return _RestrictedUnpickler(data, source).load()
    except DatasetError:
        raise
    except Exception as exc:  # unpickling arbitrary bytes can raise almost anything
        raise DatasetError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


def _dict_get(mapping: dict[Any, Any], key: str) -> Any:
    """Look ``key`` up as bytes (official Python-2 pickles) or as str (Python-3 re-pickles)."""
    if key.encode() in mapping:
        return mapping[key.encode()]
    return mapping.get(key)


_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_SPLITS = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


def _cifar_batch(obj: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    data = _dict_get(obj, "data")
    labels = _dict_get(obj, "labels")
    if data is None or labels is None:
        raise DatasetError(f"{source}: batch dict lacks b'data' or b'labels' (keys: {sorted(map(str, obj))})")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{source}: b'data' must be a uint8 array (n, 3072), got {_describe_array(data)}")
    try:
        label_array = np.asarray(labels)
    except Exception as exc:
        raise DatasetError(f"{source}: b'labels' is not a list of integers ({exc})") from exc
    if label_array.ndim != 1 or label_array.shape[0] != data.shape[0] or label_array.dtype.kind not in "iu":
        raise DatasetError(
            f"{source}: b'labels' must be {data.shape[0]} integers, got {_describe_array(label_array)}"
        )
    label_array = label_array.astype(np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise DatasetError(
            f"{source}: labels must lie in 0..9, found {label_array.min()}..{label_array.max()}"
        )
    return data.reshape(-1, 3, 32, 32), label_array


def _cifar_class_names(obj: Any, source: str) -> list[str]:
    names = _dict_get(obj, "label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list | tuple) or len(names) != 10:
        raise DatasetError(f"{source}: expected a dict with b'label_names', a list of 10 class names")
    result = []
    for item in names:
        if isinstance(item, bytes):
            item = item.decode("utf-8", errors="replace")
        if not isinstance(item, str):
            raise DatasetError(f"{source}: class names must be strings, got {type(item).__name__}")
        result.append(item)
    return result


def read_cifar10(archive: Path, split: Literal["train", "test"]) -> ImageDataset:
    """Read ``split`` from the official ``cifar-10-python.tar.gz``.

    Members ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` (train) or ``test_batch``
    (test) hold pickled dicts with ``b'data'`` (uint8 ``(n, 3072)``, each row the R, G, B planes of a
    32x32 image in row-major order) and ``b'labels'`` (list of ints); ``batches.meta`` holds
    ``b'label_names'``. The archive is read in one sequential pass and the pickles are loaded with
    a restricted unpickler that only allows the numpy globals such batches need. Returns images
    ``(N, 3, 32, 32)`` with ``images[i, c, y, x] == data[i, c * 1024 + y * 32 + x]``.
    """
    archive = Path(archive)
    if split not in _CIFAR_SPLITS:
        raise DatasetError(f"{archive}: unknown CIFAR-10 split {split!r}, expected 'train' or 'test'")
    wanted = [*_CIFAR_SPLITS[split], "batches.meta"]
    wanted_paths = {f"{_CIFAR_DIR}/{member}": member for member in wanted}
    contents: dict[str, bytes] = {}
    if not archive.is_file():
        raise DatasetError(
            f"{archive}: CIFAR-10 archive not found (expected the official cifar-10-python.tar.gz)"
        )
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                member_name = info.name.removeprefix("./")
                if member_name in wanted_paths and info.isfile():
                    handle = tar.extractfile(info)
                    if handle is not None:
                        contents[wanted_paths[member_name]] = handle.read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{archive}: corrupt or unreadable tar archive ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{archive}: cannot read archive ({exc})") from exc
    for member in wanted:
        if member not in contents:
            raise DatasetError(f"{archive}: missing member {_CIFAR_DIR}/{member}")

    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for member in _CIFAR_SPLITS[split]:
        source = f"{archive}:{_CIFAR_DIR}/{member}"
        batch_images, batch_labels = _cifar_batch(_restricted_loads(contents.pop(member), source), source)
        images.append(batch_images)
        labels.append(batch_labels)
    meta_source = f"{archive}:{_CIFAR_DIR}/batches.meta"
    class_names = _cifar_class_names(_restricted_loads(contents["batches.meta"], meta_source), meta_source)
    return ImageDataset(
        images=np.ascontiguousarray(np.concatenate(images)),
        labels=np.concatenate(labels),
        name="cifar10",
        class_names=class_names,
    )


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------

_GRAYSCALE_MODES = frozenset({"1", "L", "LA"})
_RGB_CONVERTIBLE_MODES = frozenset(
    {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"}
)


def _iter_image_files(directory: Path) -> Iterator[Path]:
    """Image files under ``directory``, skipping hidden files and directories (names starting with ``.``)."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file_name in files:
            if not file_name.startswith(".") and Path(file_name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / file_name


def read_image_folder(directory: Path, labels: bool) -> ImageDataset:
    """Read every PNG/JPEG file under ``directory`` (recursively) into one uint8 array.

    Files are taken in sorted order of their path relative to ``directory`` (so the result does not
    depend on the file system); suffixes ``.png``, ``.jpg``, ``.jpeg`` match case-insensitively and
    hidden files/directories are skipped. With ``labels=True`` the first-level subdirectory of each
    file is its class: the sorted names of the subdirectories that contain images become classes
    ``0..K-1`` and a file directly inside ``directory`` is an error.

    Images are converted to ``'L'`` (1 channel) if every image is grayscale (modes ``1``, ``L``,
    ``LA``; alpha dropped), otherwise to ``'RGB'`` (3 channels; alpha dropped, palettes expanded).
    High-bit-depth or float images (modes ``I``, ``I;16``, ``F``) are refused rather than silently
    clipped, and all images must share one size. No EXIF rotation is applied.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: image folder not found or not a directory")
    files = sorted(_iter_image_files(directory), key=lambda p: p.relative_to(directory).as_posix())
    if not files:
        raise DatasetError(
            f"{directory}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)"
        )

    # Pass 1: headers only (size and mode), to validate and allocate once.
    size: tuple[int, int] | None = None
    first = files[0]
    all_gray = True
    for path in files:
        try:
            with Image.open(path) as img:
                img_size, mode = img.size, img.mode
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{path}: not a readable PNG/JPEG image ({exc})") from exc
        if mode not in _GRAYSCALE_MODES and mode not in _RGB_CONVERTIBLE_MODES:
            raise DatasetError(
                f"{path}: unsupported image mode {mode!r}; convert it to 8-bit RGB or grayscale"
            )
        all_gray = all_gray and mode in _GRAYSCALE_MODES
        if size is None:
            size = img_size
        elif img_size != size:
            raise DatasetError(
                f"{path}: image size {img_size[0]}x{img_size[1]} differs from "
                f"{size[0]}x{size[1]} of {first}; "
                "all images must have the same size"
            )
    assert size is not None
    target_mode = "L" if all_gray else "RGB"
    channels = 1 if all_gray else 3
    width, height = size

    label_array: np.ndarray | None = None
    class_names: list[str] | None = None
    if labels:
        class_of: list[str] = []
        for path in files:
            parts = path.relative_to(directory).parts
            if len(parts) < 2:
                raise DatasetError(
                    f"{path}: image is not inside a class subdirectory of {directory} (labels requested)"
                )
            class_of.append(parts[0])
        class_names = sorted(set(class_of))
        index = {name: i for i, name in enumerate(class_names)}
        label_array = np.array([index[name] for name in class_of], dtype=np.int64)

    # Pass 2: decode into a preallocated array.
    images = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert(target_mode), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot decode image ({exc})") from exc
        if pixels.shape[:2] != (height, width):
            raise DatasetError(
                f"{path}: decoded size {pixels.shape[1]}x{pixels.shape[0]}, expected {width}x{height}"
            )
        images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return ImageDataset(images=images, labels=label_array, name=directory.name, class_names=class_names)


# --------------------------------------------------------------------------------------------------
# Array helpers
# --------------------------------------------------------------------------------------------------


def pad_images(images: np.ndarray, resolution: int, value: int) -> np.ndarray:
    """Centre-pad ``(N, C, h, w)`` images to ``(N, C, resolution, resolution)`` with ``value``.

    When the padding is odd the extra row/column goes to the bottom/right. Returns a new array of the
    same dtype (a copy even when no padding is needed). Raises :class:`DatasetError` if an image is
    larger than ``resolution`` or ``value`` does not fit the dtype.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise DatasetError(f"pad_images: expected an (N, C, H, W) array, got {_describe_array(images)}")
    if resolution < 1:
        raise DatasetError(f"pad_images: resolution must be positive, got {resolution}")
    height, width = images.shape[2:]
    if height > resolution or width > resolution:
        raise DatasetError(
            f"pad_images: images of size {height}x{width} are larger than the target resolution {resolution}"
        )
    if np.issubdtype(images.dtype, np.integer):
        info = np.iinfo(images.dtype)
        if not info.min <= value <= info.max:
            raise DatasetError(f"pad_images: pad value {value} does not fit dtype {images.dtype}")
    top = (resolution - height) // 2
    left = (resolution - width) // 2
    pad = ((0, 0), (0, 0), (top, resolution - height - top), (left, resolution - width - left))
    return np.pad(images, pad, mode="constant", constant_values=value)


def background_value(images: np.ndarray) -> int:
    """The most common value on the one-pixel border of ``(N, C, H, W)`` images (all channels).

    Ties go to the smallest value. For Fashion-MNIST this is 0.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.size == 0:
        raise DatasetError(
            f"background_value: expected a non-empty (N, C, H, W) array, got {_describe_array(images)}"
        )
    height, width = images.shape[2:]
    border = np.zeros((height, width), dtype=bool)
    border[0, :] = border[-1, :] = True
    border[:, 0] = border[:, -1] = True
    values = images[:, :, border].ravel()
    if images.dtype == np.uint8:
        return int(np.bincount(values, minlength=256).argmax())
    unique, counts = np.unique(values, return_counts=True)
    return int(unique[counts.argmax()])


# --------------------------------------------------------------------------------------------------
# Prepared form
# --------------------------------------------------------------------------------------------------


def write_prepared(dataset: ImageDataset, array_path: Path, meta_path: Path) -> dict[str, Any]:
    """Store ``dataset`` as one ``.npz`` plus a JSON metadata file; return the metadata.

    The ``.npz`` (uncompressed, loadable without pickle) holds ``images`` (uint8 ``(N, C, R, R)``),
    ``labels`` (int64 ``(N,)``; an empty int64 array when the dataset is unlabelled),
    ``has_labels`` (bool), ``name`` (str) and ``class_names`` (str array, empty if none).
    The JSON holds ``name``, ``resolution``, ``channels``, ``count``, ``has_labels``,
    ``num_classes`` (0 if unlabelled), ``class_names`` (list or null) and ``sha256`` (of the
    ``.npz`` bytes).

    Both files are written to temporaries in their target directories and renamed only after both
    are complete (the ``.npz`` first, then the JSON), so an error never leaves a partial file. The
    images must be square (pad them first with :func:`pad_images`).
    """
    array_path, meta_path = Path(array_path), Path(meta_path)
    if array_path.resolve() == meta_path.resolve():
        raise DatasetError(f"{array_path}: the array and metadata paths must differ")
    images = dataset.images
    count, channels, height, width = images.shape
    if height != width:
        raise DatasetError(
            f"{array_path}: prepared images must be square, dataset {dataset.name!r} has {height}x{width}; "
            "pad them first"
        )
    has_labels = dataset.labels is not None
    labels = dataset.labels if dataset.labels is not None else np.zeros(0, dtype=np.int64)
    class_names = list(dataset.class_names) if has_labels and dataset.class_names is not None else None
    num_classes = dataset.num_classes if has_labels else 0

    with atomic_path(meta_path) as meta_tmp, atomic_path(array_path) as array_tmp:
        with open(array_tmp, "wb") as handle:
            np.savez(
                handle,
                images=np.ascontiguousarray(images),
                labels=np.ascontiguousarray(labels, dtype=np.int64),
                has_labels=np.array(has_labels),
                name=np.array(dataset.name),
                class_names=np.array(class_names if class_names is not None else [], dtype=np.str_),
            )
        meta: dict[str, Any] = {
            "name": dataset.name,
            "resolution": int(height),
            "channels": int(channels),
            "count": int(count),
            "has_labels": has_labels,
            "num_classes": int(num_classes),
            "class_names": class_names,
            "sha256": sha256_file(array_tmp),
        }
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


_PREPARED_KEYS = ("images", "labels", "has_labels", "name", "class_names")


def load_prepared(array_path: Path) -> ImageDataset:
    """Load a ``.npz`` written by :func:`write_prepared`, validating keys, dtypes and shapes."""
    array_path = Path(array_path)
    if not array_path.is_file():
        raise DatasetError(f"{array_path}: prepared dataset not found")
    try:
        with np.load(array_path, allow_pickle=False) as archive:
            missing = [key for key in _PREPARED_KEYS if key not in archive.files]
            if missing:
                raise DatasetError(f"{array_path}: not a prepared dataset, missing arrays {missing}")
            images = archive["images"]
            labels = archive["labels"]
            has_labels = archive["has_labels"]
            name = archive["name"]
            class_names = archive["class_names"]
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, zlib.error) as exc:
        raise DatasetError(f"{array_path}: corrupt prepared dataset ({type(exc).__name__}: {exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(f"{array_path}: images must be uint8 (N, C, H, W), got {_describe_array(images)}")
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise DatasetError(f"{array_path}: labels must be int64 (N,), got {_describe_array(labels)}")
    if has_labels.dtype != np.bool_ or has_labels.shape != ():
        raise DatasetError(
            f"{array_path}: has_labels must be a boolean scalar, got {_describe_array(has_labels)}"
        )
    if name.dtype.kind != "U" or name.shape != ():
        raise DatasetError(f"{array_path}: name must be a string scalar, got {_describe_array(name)}")
    if class_names.dtype.kind != "U" or class_names.ndim != 1:
        raise DatasetError(
            f"{array_path}: class_names must be a string array, got {_describe_array(class_names)}"
        )
    if bool(has_labels):
        if labels.shape[0] != images.shape[0]:
            raise DatasetError(f"{array_path}: {labels.shape[0]} labels for {images.shape[0]} images")
        label_result: np.ndarray | None = labels
        names: list[str] | None = [str(c) for c in class_names] if class_names.size else None
    else:
        if labels.size:
            raise DatasetError(f"{array_path}: has_labels is false but {labels.size} labels are stored")
        label_result, names = None, None
    try:
        return ImageDataset(images=images, labels=label_result, name=str(name), class_names=names)
    except DatasetError as exc:
        raise DatasetError(f"{array_path}: {exc}") from exc
