"""Dataset preparation: read raw datasets into uint8 ``(N, C, H, W)`` images and store them.

Readers
    * :func:`read_fashion_mnist` -- the official IDX files (gzipped or not);
    * :func:`read_cifar10` -- the official ``cifar-10-python.tar.gz``, unpickled with a restricted,
      bounded unpickler (:class:`adcm.io.safe_unpickle.BoundedUnpickler`) that can build plain
      numeric numpy arrays and nothing else (see below);
    * :func:`image_folder_stream` -- a directory tree of PNG/JPEG files in ImageNet's class-per-folder
      layout, decoded one image at a time, converted to RGB and centre-cropped like ADM/EDM2
      (:func:`center_crop_arr`); :func:`read_image_folder` reads a small one into memory.

Every problem with the user's files raises :class:`DatasetError` with one line naming the file and
what is wrong or expected. Hostile files are refused in time and memory proportional to their size:
declared sizes (IDX headers, tar members, image headers, ``.npy`` headers inside the prepared
``.npz``) are checked against the bytes the file can hold before anything is allocated, and an empty
dataset is an error.

The prepared form is one uncompressed ``.npz`` (see :func:`write_prepared`) plus a JSON metadata file,
both written atomically. Its images are written as a stream and :func:`load_prepared` memory-maps
them, so a dataset larger than memory can be prepared and trained on (:class:`ImageReader` reads
rows without growing the resident set; docs/pipeline.md#memory).

The CIFAR-10 unpickler's allow-list, and why each entry is safe:

* ``numpy.(_)core.multiarray._reconstruct``: returns an empty stand-in for ``numpy.ndarray`` (and
  nothing else); ``BUILD`` then gives it its state, from which the array is made as
  ``np.frombuffer`` over raw bytes of exactly ``prod(shape) × itemsize`` -- no object arrays (their
  state is a list, refused), no other dtype than below.
* ``numpy.(_)core.numeric._frombuffer`` (protocol-5 pickles): the same checks.
* ``numpy.ndarray``: an inert marker, only accepted as ``_reconstruct``'s argument.
* ``numpy.dtype``: :class:`adcm.io.safe_unpickle.PlainDType`, a builtin boolean, integer or float
  type with no fields, subarray, flags or metadata. numpy's own ``dtype.__setstate__`` accepts a
  state declaring an object field with flags 0; an array of that dtype built from pickle bytes
  turns those bytes into object pointers (a segmentation fault, or worse).
* ``_codecs.encode`` (how protocols 0-2 write bytes): a str to bytes, latin-1 only.

This module never reads configuration or argv and never chooses a path: callers pass them in.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import math
import mmap
import os
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adcm.config import PrepareConfig
from adcm.errors import DatasetError
from adcm.io.files import atomic_path, sha256_file
from adcm.io.safe_unpickle import BoundedUnpickler, PlainDType, RefusedError, SealedCallable, short_repr

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "ImageReader",
    "ImageStream",
    "background_value",
    "center_crop_arr",
    "image_folder_stream",
    "load_prepared",
    "map_npz_array",
    "pad_images",
    "prepare_dataset",
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


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image dataset: its images as one array, in memory or memory-mapped.

    Attributes:
        images: uint8 array of shape ``(N, C, H, W)``; :func:`load_prepared` returns a read-only
            ``numpy.memmap`` over the prepared file (read rows with :class:`ImageReader`).
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
        _check_labels(self.name, self.labels, int(images.shape[0]), self.class_names)

    @property
    def count(self) -> int:
        """Number of images ``N``."""
        return int(self.images.shape[0])

    def label_probs(self, label_dim: int) -> torch.Tensor | None:
        """The class distribution (float64, ``label_dim`` entries) for sampling a conditional model with
        ``label_dim`` classes; ``None`` for an unconditional one (``label_dim == 0``).

        Raises:
            DatasetError: the model is conditional but the dataset has no labels, or more classes.
        """
        if not label_dim:
            return None
        if self.labels is None or not self.labels.size:
            raise DatasetError(f"dataset {self.name!r}: the model is class-conditional but the data have no labels")
        if self.num_classes > label_dim:
            raise DatasetError(f"dataset {self.name!r}: {self.num_classes} classes, the model knows {label_dim}")
        counts = torch.bincount(torch.from_numpy(self.labels), minlength=label_dim).double()
        return counts / counts.sum()

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


def _check_labels(name: str, labels: np.ndarray | None, count: int, class_names: list[str] | None) -> None:
    """``labels`` must be ``None`` or ``count`` int64 class indices in range of ``class_names``."""
    if labels is None:
        return
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
        raise DatasetError(
            f"dataset {name!r}: labels must be an int64 array of shape (N,), got {_describe_array(labels)}"
        )
    if labels.shape[0] != count:
        raise DatasetError(f"dataset {name!r}: {labels.shape[0]} labels for {count} images")
    if labels.size and labels.min() < 0:
        raise DatasetError(f"dataset {name!r}: negative label {int(labels.min())}")
    if class_names is not None and labels.size and labels.max() >= len(class_names):
        raise DatasetError(
            f"dataset {name!r}: label {int(labels.max())} out of range for {len(class_names)} class names"
        )


@dataclass(frozen=True, eq=False)
class ImageStream:
    """A dataset whose images are produced a few at a time, so that it never has to fit in memory.

    :func:`prepare_dataset` returns one and :func:`write_prepared` stores it, image after image.

    Attributes:
        count: number of images ``N`` that ``blocks()`` yields in all.
        shape: ``(C, H, W)`` of every image.
        labels: int64 array of shape ``(N,)``, or ``None`` for an unlabelled dataset.
        name: short dataset name.
        class_names: names of the classes in label order, or ``None``.
        blocks: called once per pass; yields uint8 arrays of shape ``(k, C, H, W)`` (``k >= 1``), in order.
    """

    count: int
    shape: tuple[int, int, int]
    labels: np.ndarray | None
    name: str
    class_names: list[str] | None
    blocks: Callable[[], Iterator[np.ndarray]]

    def __post_init__(self) -> None:
        if self.count < 0 or len(self.shape) != 3 or min(self.shape) < 0:
            raise DatasetError(f"dataset {self.name!r}: bad stream of {self.count} images of shape {self.shape}")
        _check_labels(self.name, self.labels, self.count, self.class_names)

    @classmethod
    def of(cls, dataset: ImageDataset, block_bytes: int = 16 << 20) -> ImageStream:
        """The images of ``dataset`` in blocks of about ``block_bytes`` (rows read with :class:`ImageReader`)."""
        images = dataset.images
        per_block = max(1, block_bytes // max(1, math.prod(images.shape[1:])))

        def blocks() -> Iterator[np.ndarray]:
            with ImageReader(images) as reader:
                for start in range(0, len(images), per_block):
                    yield reader.block(start, min(start + per_block, len(images)))

        shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
        return cls(len(images), shape, dataset.labels, dataset.name, dataset.class_names, blocks)

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(class_names)``, else ``max(label) + 1``, else 0 (unlabelled)."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and self.labels.size:
            return int(self.labels.max()) + 1
        return 0


class ImageReader:
    """Copies of rows of an ``(N, C, H, W)`` image array, for arrays too large to hold in memory.

    For a memory-mapped array (:func:`load_prepared`'s images, or a contiguous slice of them) the rows
    are read from the file with positioned reads (``os.preadv``, consecutive rows in one call): the
    pages read pass through the page cache but are never mapped into the process, so its resident
    memory does not grow with the number of images read (reading through the mapping itself would
    leave every page touched counted in the resident set until the mapping is dropped). Any other
    array is indexed directly. docs/pipeline.md#memory explains the design, docs/performance.md#memory
    has the measurements.
    """

    _file: BinaryIO | None = None

    def __init__(self, images: np.ndarray) -> None:
        if not isinstance(images, np.ndarray) or images.ndim < 1:
            raise DatasetError(f"ImageReader: expected an array of images, got {_describe_array(images)}")
        self.images = images
        self._row_bytes = int(math.prod(images.shape[1:])) * images.dtype.itemsize
        mapped = _mapped_file(images)
        self._offset = 0
        if mapped is not None:
            self._file = open(mapped[0], "rb", buffering=0)  # noqa: SIM115 -- closed by close() or collection
            self._offset = mapped[1]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def mapped(self) -> bool:
        """Whether rows are read from the file behind a memory-mapped array."""
        return self._file is not None

    def close(self) -> None:
        """Close the file (if any); the reader falls back to indexing the array."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def block(self, start: int, stop: int) -> np.ndarray:
        """A copy of ``images[start:stop]`` (``0 <= start <= stop <= N``)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows {start}:{stop} out of range for {len(self)} images")
        return self.take(np.arange(start, stop, dtype=np.int64))

    def take(self, indices: np.ndarray) -> np.ndarray:
        """A copy of ``images[indices]`` for a 1-d array of row indices (repeats and any order allowed)."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise IndexError(f"row indices must be a 1-d integer array, got {_describe_array(indices)}")
        indices = indices.astype(np.int64, copy=False)
        n = len(self)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"row index out of range for {n} images")
        if self._file is None or indices.size == 0:
            return np.ascontiguousarray(self.images[indices])
        unique, inverse = np.unique(indices, return_inverse=True)
        out = np.empty((len(unique), *self.images.shape[1:]), dtype=self.images.dtype)
        raw = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        runs = np.flatnonzero(np.diff(unique) != 1) + 1
        row = self._row_bytes
        for first, end in zip(np.r_[0, runs], np.r_[runs, len(unique)], strict=True):
            _pread_into(self._file, raw[first * row : end * row], self._offset + int(unique[first]) * row)
        if len(unique) == len(indices) and np.array_equal(unique, indices):
            return out
        return out[inverse.reshape(-1)]


def _mapped_file(images: np.ndarray) -> tuple[str, int] | None:
    """``(file, byte offset of images[0])`` when ``images`` is a C-contiguous part of a ``numpy.memmap``."""
    if not isinstance(images, np.memmap) or not images.flags.c_contiguous or images.size == 0:
        return None
    top: np.ndarray = images
    while isinstance(top.base, np.memmap):
        top = top.base
    if not isinstance(top.base, mmap.mmap) or not isinstance(top, np.memmap) or not top.filename:
        return None
    delta = int(images.__array_interface__["data"][0]) - int(top.__array_interface__["data"][0])
    if delta < 0 or delta + images.nbytes > top.nbytes:
        return None
    return str(top.filename), int(top.offset) + delta


def _pread_into(handle: BinaryIO, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``offset`` (short reads are continued)."""
    done = 0
    while done < len(view):
        got = os.preadv(handle.fileno(), [view[done:]], offset + done)
        if got <= 0:
            raise DatasetError(f"{handle.name}: file ends before byte {offset + len(view)} (truncated?)")
        done += got


def _describe_array(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"dtype {value.dtype} shape {value.shape}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# --------------------------------------------------------------------------------------------------


_MAX_COMPRESSION_RATIO = 1100
"""Decompressed bytes per compressed byte a declared size may claim (deflate reaches about 1032)."""


def _read_idx_stream(
    path: Path, handle: BinaryIO | gzip.GzipFile, expected_magic: int, capacity: int, exact: bool
) -> np.ndarray:
    """Read an IDX stream; the header's sizes are checked against ``capacity`` before the data is read.

    ``exact``: ``capacity`` is the exact data length (an uncompressed file); otherwise an upper bound.
    """
    head = handle.read(4)
    if len(head) < 4:
        raise DatasetError(f"{path}: truncated IDX file: {len(head)} bytes, expected at least a 4-byte header")
    (magic,) = struct.unpack(">I", head)
    if magic != expected_magic:
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = expected_magic & 0xFF
    header_len = 4 + 4 * ndim
    rest = handle.read(4 * ndim)
    if len(rest) < 4 * ndim:
        raise DatasetError(
            f"{path}: truncated IDX header: {4 + len(rest)} bytes, expected {header_len} bytes for {ndim} dimensions"
        )
    dims = struct.unpack(f">{ndim}I", rest)
    expected = math.prod(dims)
    available = capacity - header_len
    if exact and available < expected:
        raise DatasetError(
            f"{path}: truncated IDX data: expected {expected} bytes for dimensions {dims}, found {available}"
        )
    if exact and available > expected:
        raise DatasetError(
            f"{path}: IDX data longer than declared: expected {expected} bytes for dimensions {dims}, found {available}"
        )
    if expected > available:
        raise DatasetError(
            f"{path}: the IDX header declares dimensions {dims} ({expected} bytes), more than a compressed "
            f"file of its size can hold (at most {max(available, 0)})"
        )
    data = handle.read(expected)
    if len(data) < expected:
        raise DatasetError(
            f"{path}: truncated IDX data: expected {expected} bytes for dimensions {dims}, found {len(data)}"
        )
    extra = 0
    while chunk := handle.read(1 << 20):  # counted, not kept; bounded by the compression ratio
        extra += len(chunk)
        if expected + extra > available:
            break
    if extra:
        raise DatasetError(
            f"{path}: IDX data longer than declared: expected {expected} bytes for dimensions {dims}, "
            f"found {expected + extra}{' or more' if expected + extra > available else ''}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims).copy()


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one uint8 IDX file (``.gz`` or raw) into an array of the dimensions it declares.

    The header is big-endian: a 4-byte magic (``0x00000803`` for 3-d image files,
    ``0x00000801`` for 1-d label files: two zero bytes, type ``0x08`` = unsigned byte, the number of
    dimensions) followed by one uint32 per dimension, then the data. The payload length must match
    the product of the dimensions exactly. The declared size is checked against the file's size
    (a gzip file: at most :data:`_MAX_COMPRESSION_RATIO` times it) before the data is read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return _read_idx_stream(path, handle, expected_magic, _MAX_COMPRESSION_RATIO * size, exact=False)
        with open(path, "rb") as handle:
            return _read_idx_stream(path, handle, expected_magic, size, exact=True)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from exc


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
    if images.shape[0] == 0:
        raise DatasetError(f"{image_path}: the IDX file holds no images (an empty dataset)")
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{image_path}: Fashion-MNIST images must be 28x28, got {images.shape[1]}x{images.shape[2]}")
    labels = read_idx(label_path, IDX_LABELS_MAGIC).astype(np.int64)
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{label_path}: {labels.shape[0]} labels but {image_path.name} has {images.shape[0]} images")
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


class _NDArrayClass:
    """Stand-in for the ``numpy.ndarray`` class a pickle passes to ``_reconstruct``: a marker only."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<numpy.ndarray>"


_NDARRAY = _NDArrayClass()


class _ArrayBuilder:
    """What ``_reconstruct(ndarray, (0,), b'b')`` yields here; ``BUILD`` then supplies the array's state."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # numpy's ndarray state: ([version,] shape, dtype, is_fortran, raw bytes or, for objects, a list)
        if not isinstance(state, tuple) or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise RefusedError(f"malformed numpy array state {short_repr(state)}")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _plain_array(raw, dtype, shape, fortran)


def _plain_array(raw: Any, dtype: Any, shape: Any, fortran: Any) -> np.ndarray:
    """A read-only array over ``raw``: a plain numeric dtype, a shape whose size is exactly ``len(raw)``."""
    if not isinstance(dtype, PlainDType):
        raise RefusedError(f"refusing a numpy array of {type(dtype).__name__}: only plain numeric dtypes")
    if not (type(shape) is tuple and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)):
        raise RefusedError(f"malformed numpy array shape {short_repr(shape)}")
    if isinstance(raw, str):  # Python 2 str data read with a text encoding
        raw = raw.encode("latin-1")
    if not isinstance(raw, bytes | bytearray):
        raise RefusedError(f"numpy array data is {type(raw).__name__}, not bytes (object arrays are refused)")
    if fortran not in (0, 1):
        raise RefusedError(f"malformed numpy array order flag {short_repr(fortran)}")
    needed = math.prod(shape) * dtype.dtype.itemsize
    if len(raw) != needed:
        raise RefusedError(
            f"a numpy array of shape {shape} and dtype {dtype.dtype} needs {needed} bytes, the pickle holds {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _reconstruct(subtype: Any, shape: Any = None, dtype_code: Any = None) -> _ArrayBuilder:
    """Replacement for numpy's ``multiarray._reconstruct``: an empty :class:`_ArrayBuilder` for ``ndarray``."""
    if subtype is not _NDARRAY:
        raise RefusedError(f"refusing numpy _reconstruct of {short_repr(subtype)}: only numpy.ndarray")
    return _ArrayBuilder()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Replacement for numpy's ``numeric._frombuffer`` (protocol-5 pickles): checked like ``BUILD``."""
    if isinstance(order, bytes):
        order = order.decode("ascii", errors="replace")
    if order not in ("C", "F"):
        raise RefusedError(f"malformed numpy array order {short_repr(order)}")
    return _plain_array(buf, dtype, shape, order == "F")


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python-3 protocol-0/2 pickles use it for bytes, limited to latin-1."""
    if (
        not isinstance(obj, str)
        or not isinstance(encoding, str)
        or not isinstance(errors, str)
        or encoding.lower().replace("_", "-") not in {"latin1", "latin-1"}
    ):
        raise RefusedError(f"_codecs.encode allowed only for str with latin-1, got {short_repr(encoding)}")
    return obj.encode("latin-1", "strict")


# (module, name) -> factory of what ``find_class`` returns; why each is safe: the module docstring.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: SealedCallable(_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): lambda: SealedCallable(_reconstruct),
    ("numpy.core.numeric", "_frombuffer"): lambda: SealedCallable(_frombuffer),
    ("numpy._core.numeric", "_frombuffer"): lambda: SealedCallable(_frombuffer),
    ("numpy", "ndarray"): lambda: _NDARRAY,
    ("numpy", "dtype"): lambda: PlainDType,
    ("_codecs", "encode"): lambda: SealedCallable(_latin1_encode),
}


class _RestrictedUnpickler(BoundedUnpickler):
    """Unpickler that can only rebuild plain numeric numpy arrays (plus builtin containers, numbers and strings).

    Any other global (``os.system``, ``builtins.eval``, ...) is refused before it is looked up, so
    a malicious pickle cannot run code; :class:`~adcm.io.safe_unpickle.BoundedUnpickler` bounds the
    work and memory by the pickle's size.
    """

    build_classes = (_ArrayBuilder, PlainDType)
    unsafe_error = RefusedError
    format_error = RefusedError

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(data, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            qualified = f"{module}.{name}"
            qualified = qualified if len(qualified) <= 100 else qualified[:97] + "..."
            raise DatasetError(
                f"{self._source}: refusing to unpickle global {qualified} "
                "(only numpy arrays are allowed in CIFAR-10 batches)"
            )
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedError("refusing a persistent-id reference: CIFAR-10 batches contain none")


def _restricted_loads(data: bytes, source: str) -> Any:
    """Unpickle ``data`` with :class:`_RestrictedUnpickler`; the arrays of a top-level dict are resolved."""
    try:
        result = _RestrictedUnpickler(data, source).load()
    except DatasetError:
        raise
    except RefusedError as exc:
        raise DatasetError(f"{source}: {exc}") from None
    except Exception as exc:  # unpickling arbitrary bytes can raise almost anything
        message = short_repr(str(exc).strip().splitlines()[0] if str(exc).strip() else "", 200)
        raise DatasetError(f"{source}: cannot unpickle ({type(exc).__name__}: {message})") from None
    if isinstance(result, dict):
        return {k: v.array if isinstance(v, _ArrayBuilder) and v.array is not None else v for k, v in result.items()}
    return result


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
        keys = ", ".join(short_repr(k, 40) for k in itertools.islice(obj, 10))
        more = ", ..." if len(obj) > 10 else ""
        raise DatasetError(f"{source}: batch dict lacks b'data' or b'labels' (keys: [{keys}{more}])")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{source}: b'data' must be a uint8 array (n, 3072), got {_describe_array(data)}")
    if isinstance(labels, np.ndarray):
        label_array = labels
    elif isinstance(labels, list | tuple) and all(type(v) is int for v in labels):
        # Checked first: np.asarray of nested lists that share references would expand them all.
        if labels and not all(0 <= v <= 9 for v in labels):
            raise DatasetError(f"{source}: labels must lie in 0..9, found {min(labels)}..{max(labels)}")
        label_array = np.array(labels, dtype=np.int64)
    else:
        raise DatasetError(
            f"{source}: b'labels' must be {data.shape[0]} integers, got {type(labels).__name__} {short_repr(labels)}"
        )
    if label_array.ndim != 1 or label_array.shape[0] != data.shape[0] or label_array.dtype.kind not in "iu":
        raise DatasetError(f"{source}: b'labels' must be {data.shape[0]} integers, got {_describe_array(label_array)}")
    label_array = label_array.astype(np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise DatasetError(f"{source}: labels must lie in 0..9, found {label_array.min()}..{label_array.max()}")
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
        raise DatasetError(f"{archive}: CIFAR-10 archive not found (expected the official cifar-10-python.tar.gz)")
    # A compressed archive holds at most this much; members that declare more are refused before
    # they are decompressed (skipping a member of a compressed stream decompresses it too).
    capacity = _MAX_COMPRESSION_RATIO * archive.stat().st_size
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                capacity -= info.size
                if capacity < 0:
                    raise DatasetError(
                        f"{archive}: its members declare more data than an archive of its size can hold "
                        f"(at {short_repr(info.name)}, {info.size} bytes)"
                    )
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
    if sum(len(batch) for batch in images) == 0:
        raise DatasetError(f"{archive}: the {split} batches hold no images (an empty dataset)")
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
_RGB_CONVERTIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"})
_MAX_PIXELS_PER_BYTE = 32 * _MAX_COMPRESSION_RATIO
"""Pixels an image file may declare per byte of its size: a 1-bit PNG holds 8 pixels a byte before
deflate (about 1032:1), ×4 for headroom. A header can claim any size; this is checked before decoding."""


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _iter_image_files(directory: Path) -> Iterator[Path]:
    """Image files under ``directory``, skipping hidden files and directories (names starting with ``.``)."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file_name in files:
            if _is_image_file(file_name):
                yield Path(root) / file_name


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's centre crop and resize (Dhariwal & Nichol 2021), how ADM and EDM2 make ImageNet 64×64.

    While the short side is at least ``2 · resolution`` the image is halved (each side floored) with
    PIL's BOX filter; it is then resized with BICUBIC so that its short side is ``resolution`` (the long
    side becomes ``round(side · resolution / short side)``), and the central ``resolution`` ×
    ``resolution`` square is cut out (offset ``(side − resolution) // 2``). Returns an
    ``(resolution, resolution, bands)`` uint8 array of ``image``'s mode (convert to RGB first).
    An image already ``resolution`` × ``resolution`` is returned unchanged.
    """
    if resolution < 1:
        raise DatasetError(f"center_crop_arr: resolution must be positive, got {resolution}")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return pixels[top : top + resolution, left : left + resolution]


def _folder_files(directory: Path, labels: bool) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """The image files of ``directory`` in sorted order of their relative path; with ``labels`` their
    class indices and the class names (every non-hidden first-level sub-directory, in sorted order)."""
    files = sorted(_iter_image_files(directory), key=lambda p: p.relative_to(directory).as_posix())
    if not files:
        raise DatasetError(
            f"{directory}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)"
        )
    if not labels:
        return files, None, None
    class_names = sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {name: i for i, name in enumerate(class_names)}
    label_list: list[int] = []
    for path in files:
        parts = path.relative_to(directory).parts
        if len(parts) < 2:
            raise DatasetError(f"{path}: image is not inside a class subdirectory of {directory} (labels requested)")
        label_list.append(index[parts[0]])
    return files, np.array(label_list, dtype=np.int64), class_names


def _decode(path: Path, resolution: int | None, size: tuple[int, int] | None) -> np.ndarray:
    """One image file as an RGB ``(3, H, W)`` uint8 array: centre-cropped to ``resolution`` (see
    :func:`center_crop_arr`), or kept at its size, which must be ``size`` (width, height)."""
    try:
        file_size = path.stat().st_size
        with Image.open(path) as img:
            width, height = img.size
            if width * height > _MAX_PIXELS_PER_BYTE * max(file_size, 1):
                raise DatasetError(
                    f"{path}: a {width}x{height} image in {file_size} bytes; files that declare more pixels than "
                    f"PNG/JPEG compression can hold ({_MAX_PIXELS_PER_BYTE} per byte) are refused"
                )
            if img.mode not in _GRAYSCALE_MODES and img.mode not in _RGB_CONVERTIBLE_MODES:
                raise DatasetError(f"{path}: unsupported image mode {img.mode!r}; convert it to 8-bit RGB or grayscale")
            if resolution is None and size is not None and img.size != size:
                raise DatasetError(
                    f"{path}: image size {width}x{height} differs from {size[0]}x{size[1]}; "
                    "all images must have the same size (or set a resolution to centre-crop them)"
                )
            rgb = img.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.uint8) if resolution is None else center_crop_arr(rgb, resolution)
    except DatasetError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable PNG/JPEG image ({exc})") from exc
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def image_folder_stream(
    directory: Path, labels: bool, resolution: int | None, max_images: int | None = None
) -> ImageStream:
    """The PNG/JPEG files under ``directory`` as an :class:`ImageStream`, decoded one at a time.

    Files are taken in sorted order of their path relative to ``directory`` (independent of the file
    system), the first ``max_images`` of them when given; suffixes ``.png``, ``.jpg``, ``.jpeg`` match
    case-insensitively; other files and hidden files/directories (names starting with ``.``) are
    ignored. With ``labels=True`` the tree is ImageNet's class-per-folder layout,
    ``directory/<class>/…/<image>``: the class names are the sorted names of *all* first-level
    sub-directories (an empty one keeps its index, so labels do not depend on which folders hold
    images) and an image directly inside ``directory`` is an error.

    Every image is converted to RGB with PIL (grayscale replicated, alpha dropped, palettes
    expanded; high-bit-depth or float modes ``I``, ``I;16``, ``F`` are refused rather than clipped;
    no EXIF rotation) and, with a ``resolution``, centre-cropped and resized by
    :func:`center_crop_arr`; without one all images must share one size. A file that cannot be
    decoded, or whose header claims more pixels than its size can hold, is refused with its path
    (while the stream is read, before anything is committed).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: image folder not found or not a directory")
    files, label_array, class_names = _folder_files(directory, labels)
    if max_images is not None:
        files = files[:max_images]
        label_array = None if label_array is None else label_array[: len(files)]
    size: tuple[int, int] | None = None
    if resolution is None:
        try:
            with Image.open(files[0]) as first:
                size = first.size
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            raise DatasetError(f"{files[0]}: not a readable PNG/JPEG image ({exc})") from exc
    shape = (3, resolution, resolution) if resolution is not None else (3, size[1], size[0])  # type: ignore[index]

    def blocks() -> Iterator[np.ndarray]:
        for path in files:
            yield _decode(path, resolution, size)[None]

    return ImageStream(len(files), shape, label_array, directory.name, class_names, blocks)


def read_image_folder(directory: Path, labels: bool, resolution: int | None = None) -> ImageDataset:
    """:func:`image_folder_stream` read into memory at once (small folders; ``adcm prepare`` streams)."""
    return _materialise(image_folder_stream(directory, labels, resolution))


def _materialise(stream: ImageStream) -> ImageDataset:
    images = np.empty((stream.count, *stream.shape), dtype=np.uint8)
    done = 0
    for block in stream.blocks():
        images[done : done + len(block)] = block
        done += len(block)
    return ImageDataset(images=images, labels=stream.labels, name=stream.name, class_names=stream.class_names)


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
        raise DatasetError(f"background_value: expected a non-empty (N, C, H, W) array, got {_describe_array(images)}")
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


def write_prepared(dataset: ImageDataset | ImageStream, array_path: Path, meta_path: Path) -> dict[str, Any]:
    """Store ``dataset`` as one ``.npz`` plus a JSON metadata file; return the metadata.

    The ``.npz`` (uncompressed, loadable without pickle) holds ``images`` (uint8 ``(N, C, R, R)``),
    ``labels`` (int64 ``(N,)``; an empty int64 array when the dataset is unlabelled),
    ``has_labels`` (bool), ``name`` (str) and ``class_names`` (str array, empty if none).
    The JSON holds ``name``, ``resolution``, ``channels``, ``count``, ``has_labels``,
    ``num_classes`` (0 if unlabelled), ``class_names`` (list or null) and ``sha256`` (of the
    ``.npz`` bytes).

    The images are streamed into the archive's stored (uncompressed) ``images.npy`` record block by
    block as ``dataset`` yields them (an :class:`ImageStream`, or an :class:`ImageDataset` read in
    blocks), so memory does not grow with the dataset, and :func:`load_prepared` can map the record
    into memory instead of reading it. Both files are written to temporaries in their target
    directories and renamed only after both are complete (the ``.npz`` first, then the JSON), so an
    error (also one raised while the stream is read) never leaves a partial file. The images must be
    square (pad them first with :func:`pad_images`). The archive's members carry a fixed timestamp: the
    same dataset gives the same bytes, so re-running ``prepare`` does not invalidate what depends on it.
    """
    array_path, meta_path = Path(array_path), Path(meta_path)
    if array_path.resolve() == meta_path.resolve():
        raise DatasetError(f"{array_path}: the array and metadata paths must differ")
    stream = dataset if isinstance(dataset, ImageStream) else ImageStream.of(dataset)
    channels, height, width = stream.shape
    if height != width:
        raise DatasetError(
            f"{array_path}: prepared images must be square, dataset {stream.name!r} has {height}x{width}; "
            "pad them first"
        )
    has_labels = stream.labels is not None
    labels = stream.labels if stream.labels is not None else np.zeros(0, dtype=np.int64)
    class_names = list(stream.class_names) if has_labels and stream.class_names is not None else None
    num_classes = stream.num_classes if has_labels else 0

    with atomic_path(meta_path) as meta_tmp, atomic_path(array_path) as array_tmp:
        with open(array_tmp, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
            _write_images_record(archive, stream, array_path)
            small = {
                "labels": np.ascontiguousarray(labels, dtype=np.int64),
                "has_labels": np.array(has_labels),
                "name": np.array(stream.name),
                "class_names": np.array(class_names if class_names is not None else [], dtype=np.str_),
            }
            for key, value in small.items():
                with archive.open(_zip_entry(f"{key}.npy"), "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)
        meta: dict[str, Any] = {
            "name": stream.name,
            "resolution": int(height),
            "channels": int(channels),
            "count": int(stream.count),
            "has_labels": has_labels,
            "num_classes": int(num_classes),
            "class_names": class_names,
            "sha256": sha256_file(array_tmp),
        }
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _write_images_record(archive: zipfile.ZipFile, stream: ImageStream, array_path: Path) -> None:
    """``images.npy`` (a ``.npy`` header, then the rows in C order) written block by block from ``stream``."""
    shape = (stream.count, *stream.shape)
    done = 0
    with archive.open(_zip_entry("images.npy"), "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for block in stream.blocks():
            if not isinstance(block, np.ndarray) or block.dtype != np.uint8 or block.shape[1:] != stream.shape:
                raise DatasetError(
                    f"{array_path}: dataset {stream.name!r} yielded {_describe_array(block)}, "
                    f"expected uint8 (k, {', '.join(map(str, stream.shape))})"
                )
            done += len(block)
            if done > stream.count:
                break
            member.write(np.ascontiguousarray(block).data)
    if done != stream.count:
        raise DatasetError(f"{array_path}: dataset {stream.name!r} yielded {done}+ images, {stream.count} declared")


def _zip_entry(name: str) -> zipfile.ZipInfo:
    """A stored archive member with a fixed timestamp, so that the same images give the same file (and SHA-256)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


_PREPARED_KEYS = ("images", "labels", "has_labels", "name", "class_names")
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header (30 bytes)
_LOCAL_HEADER_MAGIC = 0x04034B50


@dataclass(frozen=True)
class _Member:
    """Where an ``.npy`` record of a prepared archive is, and what its header declares."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype[Any]
    header_len: int


def _check_npz_member(array_path: Path, archive: Any, key: str, file_size: int) -> _Member:
    """The ``.npy`` header of ``key`` must declare exactly the bytes its zip record holds, and the record
    no more than the file can: checked before numpy allocates (or maps) the array the header declares."""
    names = archive.zip.namelist()
    info = archive.zip.getinfo(f"{key}.npy" if f"{key}.npy" in names else key)
    if info.compress_type == zipfile.ZIP_STORED:
        fits = info.file_size <= file_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        fits = info.compress_size <= file_size and info.file_size <= _MAX_COMPRESSION_RATIO * info.compress_size
    else:
        raise DatasetError(f"{array_path}: array {key!r} uses an unsupported zip compression ({info.compress_type})")
    if not fits:
        raise DatasetError(
            f"{array_path}: array {key!r} declares {info.file_size} bytes, more than a file of {file_size} bytes "
            "can hold"
        )
    with archive.zip.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise DatasetError(f"{array_path}: array {key!r} has an unsupported .npy format version {version}")
        header_len = member.tell()
    if dtype.hasobject:
        raise DatasetError(f"{array_path}: array {key!r} holds Python objects")
    needed = math.prod(shape) * dtype.itemsize
    if needed != info.file_size - header_len:
        raise DatasetError(
            f"{array_path}: array {key!r} declares shape {shape} of {dtype} ({needed} bytes) but its record "
            f"holds {info.file_size - header_len} bytes"
        )
    return _Member(info, tuple(shape), bool(fortran), dtype, header_len)


def _map_member(array_path: Path, member: _Member, file_size: int) -> np.memmap:
    """A read-only memory map of a stored (uncompressed) ``.npy`` record, after checking its local header."""
    with open(array_path, "rb") as handle:
        handle.seek(member.info.header_offset)
        raw = handle.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise DatasetError(f"{array_path}: truncated zip local header of {member.info.filename}")
    magic, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if magic != _LOCAL_HEADER_MAGIC or method != zipfile.ZIP_STORED:
        raise DatasetError(f"{array_path}: bad zip local header of {member.info.filename}")
    start = member.info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + member.info.file_size > file_size:
        raise DatasetError(
            f"{array_path}: record {member.info.filename} ends at byte {start + member.info.file_size}, "
            f"after the end of the file ({file_size} bytes)"
        )
    return np.memmap(
        array_path,
        dtype=member.dtype,
        mode="r",
        offset=start + member.header_len,
        shape=member.shape,
        order="F" if member.fortran else "C",
    )


def map_npz_array(path: Path, key: str) -> np.ndarray:
    """The array ``key`` of an ``.npz`` (e.g. an image set of ``adcm sample``): memory-mapped read-only when
    its record is stored uncompressed (as ``np.savez`` writes), else read; its declared size is checked
    against the file first (:func:`_check_npz_member`), and object arrays are refused.

    Raises:
        DatasetError: a missing or corrupt file, or no array ``key``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        file_size = path.stat().st_size
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DatasetError(f"{path}: no array {key!r} (has {', '.join(archive.files[:10])})")
            member = _check_npz_member(path, archive, key, file_size)
            if member.info.compress_type == zipfile.ZIP_STORED and math.prod(member.shape) > 0:
                return _map_member(path, member, file_size)
            return np.asarray(archive[key])
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt .npz file ({type(exc).__name__}: {exc})") from exc


def load_prepared(array_path: Path) -> ImageDataset:
    """Load a ``.npz`` written by :func:`write_prepared`, validating keys, dtypes and shapes.

    Every array's declared size is checked against its record and the file's size before it is read
    (:func:`_check_npz_member`), and a dataset without images is refused. The images are not read:
    their stored record is memory-mapped read-only (``numpy.memmap``), so a dataset of any size loads
    in constant memory; read rows with :class:`ImageReader` to keep them out of the resident set. (The
    zip CRC of the images is then not checked: ``dataset.json``'s SHA-256 covers the file. A
    compressed record, which no writer here makes, is read into memory instead.)
    """
    array_path = Path(array_path)
    if not array_path.is_file():
        raise DatasetError(f"{array_path}: prepared dataset not found")
    try:
        file_size = array_path.stat().st_size
        with np.load(array_path, allow_pickle=False) as archive:
            missing = [key for key in _PREPARED_KEYS if key not in archive.files]
            if missing:
                raise DatasetError(f"{array_path}: not a prepared dataset, missing arrays {missing}")
            members = {key: _check_npz_member(array_path, archive, key, file_size) for key in _PREPARED_KEYS}
            image_member = members["images"]
            if image_member.dtype != np.uint8 or len(image_member.shape) != 4:
                raise DatasetError(
                    f"{array_path}: images must be uint8 (N, C, H, W), got dtype {image_member.dtype} "
                    f"shape {image_member.shape}"
                )
            if image_member.shape[0] == 0:
                raise DatasetError(f"{array_path}: the prepared dataset holds no images (an empty dataset)")
            if 0 in image_member.shape:
                raise DatasetError(f"{array_path}: images of shape {image_member.shape[1:]} hold no pixels")
            if image_member.info.compress_type == zipfile.ZIP_STORED:
                images: np.ndarray = _map_member(array_path, image_member, file_size)
            else:
                images = archive["images"]
            labels = archive["labels"]
            has_labels = archive["has_labels"]
            name = archive["name"]
            class_names = archive["class_names"]
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, zlib.error) as exc:
        raise DatasetError(f"{array_path}: corrupt prepared dataset ({type(exc).__name__}: {exc})") from exc
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise DatasetError(f"{array_path}: labels must be int64 (N,), got {_describe_array(labels)}")
    if has_labels.dtype != np.bool_ or has_labels.shape != ():
        raise DatasetError(f"{array_path}: has_labels must be a boolean scalar, got {_describe_array(has_labels)}")
    if name.dtype.kind != "U" or name.shape != ():
        raise DatasetError(f"{array_path}: name must be a string scalar, got {_describe_array(name)}")
    if class_names.dtype.kind != "U" or class_names.ndim != 1:
        raise DatasetError(f"{array_path}: class_names must be a string array, got {_describe_array(class_names)}")
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


def prepare_dataset(cfg: PrepareConfig) -> ImageStream:
    """The dataset ``cfg`` names, read in its official format, as an :class:`ImageStream` for
    :func:`write_prepared`; labels and the first ``max_images`` images kept as asked.

    Fashion-MNIST and CIFAR-10 are small: they are read into memory and centre-padded to
    ``cfg.resolution`` with their background value (Fashion-MNIST 28 → 32). A ``folder`` (ImageNet's
    class-per-folder layout) is streamed: every image is decoded, converted to RGB and centre-cropped
    to ``cfg.resolution`` × ``cfg.resolution`` as ADM/EDM2 do (:func:`center_crop_arr`) only while it
    is written, so it never has to fit in memory (:func:`image_folder_stream`).

    Raises:
        DatasetError: a missing source, non-square images, or images larger than the resolution
            (fashion-mnist, cifar10).
    """
    source = Path(cfg.source)
    if cfg.dataset == "cifar10" and not source.is_file():
        raise DatasetError(f"{source}: prepare.source must be the path of cifar-10-python.tar.gz (file not found)")
    if cfg.dataset != "cifar10" and not source.is_dir():
        hint = " (install it with `apt-get install dataset-fashion-mnist`)" if cfg.dataset == "fashion-mnist" else ""
        raise DatasetError(f"{source}: prepare.source directory not found{hint}")
    if cfg.dataset == "folder":
        return image_folder_stream(source, cfg.labels, cfg.resolution, cfg.max_images)
    data = read_fashion_mnist(source, cfg.split) if cfg.dataset == "fashion-mnist" else read_cifar10(source, cfg.split)
    if not cfg.labels:
        data = dataclasses.replace(data, labels=None, class_names=None)
    if cfg.max_images is not None:
        keep = min(cfg.max_images, len(data.images))
        labels = None if data.labels is None else data.labels[:keep]
        data = dataclasses.replace(data, images=data.images[:keep], labels=labels)
    height, width = data.images.shape[-2:]
    if height != width:
        raise DatasetError(f"{source}: images are {height}×{width}; only square images are supported")
    if cfg.resolution < height:
        raise DatasetError(
            f"{source}: images are {height}×{width}, larger than prepare.resolution "
            f"{cfg.resolution}; down-scaling is not supported"
        )
    if cfg.resolution > height:
        data = ImageDataset(
            pad_images(data.images, cfg.resolution, background_value(data.images)),
            data.labels,
            data.name,
            data.class_names,
        )
    return ImageStream.of(data)
