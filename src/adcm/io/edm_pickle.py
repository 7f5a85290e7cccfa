"""Safe importer for the network pickles released with EDM (Karras et al. 2022).

EDM's snapshot files (e.g. ``edm-cifar10-32x32-uncond-vp.pkl``) are plain :func:`pickle.dump`
outputs of a dict with the keys ``ema``, ``loss_fn``, ``augment_pipe`` and ``dataset_kwargs``.
Every network object in them is reduced by EDM's ``torch_utils.persistence`` module as
``(torch_utils.persistence._reconstruct_persistent_obj, (meta,))``, where ``meta`` carries the
class name, the *source code* of the module that defined the class (``module_src``) and the
object's ``__dict__`` (``state``). The original loader executes ``module_src``; opening such a
file with :func:`pickle.load` therefore runs arbitrary code.

This module never does that. :func:`load_edm_pickle` unpickles with a restricted
:class:`pickle.Unpickler` whose ``find_class`` resolves only an explicit allow-list of globals,
each mapped to a harmless stand-in written here:

* the persistence constructor records ``class_name`` and ``state``, and keeps ``module_src`` only
  as inert text (a reference to the string the pickle built): it is never executed, and only EDM2's
  importer (:mod:`adcm.io.edm2_pickle`) looks at it, to check that it defines the recorded class;
* ``ModuleDict`` and ``EasyDict`` become inert data holders;
* tensors are rebuilt from their storages by validated functions, and the storages themselves
  (``torch.storage._load_from_bytes``: bytes written by :func:`torch.save`) are read with
  ``torch.load(..., weights_only=True)``.

Any other global (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafePickleError` before
anything is imported or called. Pickle protocols 0-5 are read; the Python 2 names that protocols 0-2
use (``__builtin__``, ``copy_reg``) are mapped as :mod:`pickle` itself does, and their spelling of
``bytes`` (``_codecs.encode(text, 'latin1')``) is accepted for latin-1 only.

The recorded module tree is then flattened into a state dict
with the names of EDM's ``EDMPrecond.state_dict()`` (``model.enc.32x32_conv.weight``, ...), and
the ``SongUNet`` constructor settings are recovered from the ``_init_args`` / ``_init_kwargs``
that the persistence decorator stores on every object. Before anything is returned,
:func:`validate_network` checks the settings (types, ranges, finiteness) and builds ``SongUNet`` on
the ``meta`` device: its state-dict names and shapes must equal the imported ones exactly.

Hostile files
-------------
The unpickler is :class:`adcm.io.safe_unpickle.BoundedUnpickler`: pure Python over the file's bytes
(no memo or buffer preallocated from a declared size), a work budget proportional to the file size
charged by every call, tuples and integers of bounded size, ``BUILD`` only on the stand-ins below
(never on a tensor, a function or a class), ``SETITEMS`` only on dicts, ``APPENDS`` only on lists,
``NEWOBJ`` only on the container stand-ins. After unpickling, every walk over the result is bounded:
the module tree must be a tree (a module or a module's parameter/buffer/child dict met twice -- a
cycle or a shared reference -- is refused), at most :data:`_MAX_MODULE_DEPTH` deep with at most
:data:`_MAX_ENTRIES` tensors; constructor settings must be plain numbers, short strings or short
flat lists (no nested or shared containers); error messages print bounded reprs. Together, a file
is accepted or refused in time and memory proportional to its size.

Why each allow-listed global is safe (what a pickle can do with it):

* ``torch_utils.persistence._reconstruct_persistent_obj`` → :func:`_reconstruct_persistent_obj`:
  checks ``meta`` is a dict, keeps ``class_name`` (a str), ``state`` (a dict) and ``module_src`` (a str,
  else None) in an inert, sealed record; ``module_src`` is never executed.
* ``torch.nn.modules.container.ModuleDict`` / ``ModuleList`` / ``Sequential`` and
  ``dnnlib.util.EasyDict`` → stand-ins created with no arguments (``NEWOBJ``); their
  ``__setstate__`` only stores a dict (EasyDict: copies its items). Their classes cannot be
  modified (sealed metaclass).
* ``collections.OrderedDict``, ``builtins.set`` / ``frozenset`` / ``dict`` → wrappers that accept
  only a builtin container (dict items as 2-item tuples or lists) and build the builtin; the
  budget is charged its length. ``builtins.object`` is the class itself: calling it makes an empty
  object, and it cannot be instantiated by ``NEWOBJ`` or given state by ``BUILD``.
* ``_codecs.encode`` (protocols 0-2 spelling of bytes): a str, latin-1 only. ``builtins.bytes``:
  ``bytes()`` with no argument only.
* ``copyreg._reconstructor`` / ``copyreg.__newobj__``: create only the stand-ins above.
* ``numpy.dtype`` → :class:`~adcm.io.safe_unpickle.PlainDType`: a builtin boolean, integer or
  float type whose pickled state declares no fields, subarray, flags or metadata (numpy's own
  ``dtype.__setstate__`` would accept an object field, and ``scalar`` would then read attacker
  bytes as a pointer). ``numpy.(_)core.multiarray.scalar`` → :func:`_numpy_scalar`: a
  :class:`PlainDType` and exactly ``itemsize`` bytes, returned as a Python ``bool`` / ``int`` /
  ``float`` -- no numpy scalar or array is ever built from the file.
* ``torch._utils._rebuild_tensor_v2`` → :func:`_rebuild_tensor`: a view of an already-read storage
  with integer geometry of at most 8 dimensions, inside the storage and with no more elements than
  the storage holds; ``requires_grad``, hooks and metadata are dropped (plain detached tensor).
  ``_rebuild_parameter(_with_state)``: ``tensor.detach()`` of a tensor, extra state dropped.
* ``torch.storage._load_from_bytes`` → :func:`_load_from_bytes`: the embedded ``torch.save`` bytes
  are first scanned by a bounded unpickler that allows only storage types and one storage
  reference whose declared size must match the bytes present (legacy format: exactly; zip format:
  every record within the payload), and only then read with ``torch.load(weights_only=True)``.
* ``torch.device``: parses a device string; no side effect (no CUDA initialisation).
"""

from __future__ import annotations

import _compat_pickle
import inspect
import io
import itertools
import math
import os
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch

from adcm.errors import PickleFormatError, UnsafePickleError
from adcm.io.safe_unpickle import BoundedUnpickler, PlainDType, RefusedError, short_repr

__all__ = [
    "EDMNetwork",
    "PickleFormatError",
    "UnsafePickleError",
    "check_weights_fit",
    "edm_network",
    "load_edm_pickle",
    "read_snapshot",
    "snapshot_network",
    "validate_network",
]

_MAX_MODULE_DEPTH = 32
"""Deepest module nesting accepted (EDM's networks are 5 levels deep)."""
_MAX_ENTRIES = 100_000
"""Most state-dict tensors accepted (EDM's CIFAR-10 network has 425)."""
_MAX_TENSOR_DIMS = 8
_MAX_GEOMETRY = 1 << 48
"""Largest tensor size, stride or storage offset accepted (elements)."""
_MAX_SETTING_ITEMS = 64
"""Longest list accepted as a constructor setting (channel_mult, resample_filter, ...)."""
_MAX_SETTING_CHARS = 256
"""Longest string accepted as a constructor setting."""


@dataclass(frozen=True)
class EDMNetwork:
    """A network read from an EDM pickle, as plain data.

    Attributes:
        precond_class: Class name of the preconditioning wrapper (always ``"EDMPrecond"``).
        network_kwargs: ``SongUNet`` constructor settings, every argument present (missing ones
            filled with EDM's defaults), tuples as lists and numpy scalars as Python numbers.
        sigma_data: σ_data of the preconditioning.
        sigma_min: Smallest supported noise level recorded on the wrapper.
        sigma_max: Largest supported noise level recorded on the wrapper (may be ``inf``).
        state_dict: Detached CPU tensors named as in EDM's ``EDMPrecond.state_dict()``
            (``"model.…"``): parameters and persistent buffers.
    """

    precond_class: str
    network_kwargs: dict[str, Any]
    sigma_data: float
    sigma_min: float
    sigma_max: float
    state_dict: dict[str, torch.Tensor]


# EDM's SongUNet signature, in order, with its defaults (None = required).
_SONGUNET_SIGNATURE: tuple[tuple[str, Any], ...] = (
    ("img_resolution", None),
    ("in_channels", None),
    ("out_channels", None),
    ("label_dim", 0),
    ("augment_dim", 0),
    ("model_channels", 128),
    ("channel_mult", [1, 2, 2, 2]),
    ("channel_mult_emb", 4),
    ("num_blocks", 4),
    ("attn_resolutions", [16]),
    ("dropout", 0.10),
    ("label_dropout", 0),
    ("embedding_type", "positional"),
    ("channel_mult_noise", 1),
    ("encoder_type", "standard"),
    ("decoder_type", "standard"),
    ("resample_filter", [1, 1]),
)
_SUPPORTED_VARIANT = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard"}
# EDMPrecond's own arguments, in order; everything else it passes to the backbone (**model_kwargs).
_PRECOND_SIGNATURE = (
    "img_resolution",
    "img_channels",
    "label_dim",
    "use_fp16",
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "model_type",
)
# EDMPrecond's defaults for the noise-level attributes.
_PRECOND_DEFAULTS = {"sigma_min": 0.0, "sigma_max": math.inf, "sigma_data": 0.5}


# --------------------------------------------------------------------------------------------
# Inert stand-ins. Their classes cannot be modified (a pickle's BUILD opcode could otherwise
# setattr on them), and every instance defines __setstate__ so BUILD never falls back to setattr.
# --------------------------------------------------------------------------------------------


class _Sealed(type):
    """Metaclass forbidding attribute assignment on the class object itself."""

    def __setattr__(cls, name: str, value: Any) -> NoReturn:
        raise UnsafePickleError(f"refusing to set attribute {name!r} on {cls.__name__}")

    def __delattr__(cls, name: str) -> NoReturn:
        raise UnsafePickleError(f"refusing to delete attribute {name!r} on {cls.__name__}")


class _ModuleRecord(metaclass=_Sealed):
    """A recorded module: its original class name and its ``__dict__`` (``state``)."""

    __slots__ = ("class_name", "state")
    class_name: str
    state: dict[str, Any]


class _PersistentObject(_ModuleRecord):
    """What the persistence constructor yields: class name, state, and the module source as inert text."""

    __slots__ = ("module_src",)
    module_src: str | None

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str | None = None):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src

    def __setstate__(self, state: Any) -> NoReturn:
        raise PickleFormatError(f"unexpected BUILD on a persistent {self.class_name} object")

    def __repr__(self) -> str:
        return f"<persistent {self.class_name}>"


class _Container(_ModuleRecord):
    """Stand-in for a torch container (``ModuleDict`` ...) pickled the ordinary way."""

    __slots__ = ()
    container_name: ClassVar[str] = "Container"

    def __new__(cls) -> _Container:
        # NEWOBJ calls __new__ alone: the record must be complete without __init__ or BUILD.
        obj = super().__new__(cls)
        obj.class_name = cls.container_name
        obj.state = {}
        return obj

    def __init__(self) -> None:
        self.class_name = type(self).container_name
        self.state = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise PickleFormatError(f"{type(self).container_name} state is {type(state).__name__}, not a dict")
        self.class_name = type(self).container_name
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.class_name}>"


class _ModuleDict(_Container):
    __slots__ = ()
    container_name = "ModuleDict"


class _ModuleList(_Container):
    __slots__ = ()
    container_name = "ModuleList"


class _Sequential(_Container):
    __slots__ = ()
    container_name = "Sequential"


class _EasyDict(dict, metaclass=_Sealed):  # type: ignore[type-arg]
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict subclass): a plain dict."""

    def __setstate__(self, state: Any) -> None:
        # A real EasyDict keeps its attributes as items; an instance __dict__ is always empty.
        if isinstance(state, dict):
            self.update(state)
        elif state is not None:
            raise PickleFormatError(f"EasyDict state is {type(state).__name__}, not a dict")


_STUB_CLASSES: tuple[type, ...] = (_ModuleDict, _ModuleList, _Sequential, _EasyDict)


class _SafeCallable(metaclass=_Sealed):
    """Wraps one of our functions so that pickle opcodes cannot modify it (no ``__dict__``)."""

    __slots__ = ("_fn",)
    _fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise UnsafePickleError(f"refusing to set attribute {name!r} on an allowed function")

    def __setstate__(self, state: Any) -> NoReturn:
        raise UnsafePickleError("refusing BUILD on an allowed function")

    def __repr__(self) -> str:
        return f"<safe {self._fn.__name__}>"


# --------------------------------------------------------------------------------------------
# Safe replacements for the callables an EDM pickle names.
# --------------------------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta: Any) -> _PersistentObject:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``.

    Keeps ``class_name``, ``state`` and a reference to ``module_src`` (a str, else None); the source
    is never executed.
    """
    if not isinstance(meta, dict):
        raise PickleFormatError(f"persistent-object metadata is {type(meta).__name__}, not a dict")
    kind = meta.get("type")
    if not (isinstance(kind, str) and kind == "class"):
        raise PickleFormatError(f"unsupported persistent-object type {short_repr(kind)} (expected 'class')")
    class_name = meta.get("class_name")
    if not isinstance(class_name, str) or not 0 < len(class_name) <= _MAX_SETTING_CHARS:
        raise PickleFormatError(
            f"persistent-object metadata has no class_name, or a malformed one: {short_repr(class_name)}"
        )
    state = meta.get("state")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise PickleFormatError(f"state of persistent {class_name} is {type(state).__name__}, not a dict")
    module_src = meta.get("module_src")
    return _PersistentObject(class_name, state, module_src if type(module_src) is str else None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """Replacement for ``torch._utils._rebuild_tensor_v2``: a bounds-checked view of ``storage``.

    The view must lie inside the storage and hold no more elements than the storage (no zero-stride
    expansion of a few bytes into a huge tensor). ``requires_grad``, hooks and metadata are ignored:
    the result is a plain detached tensor.
    """
    if not isinstance(storage, torch.storage.TypedStorage):
        raise PickleFormatError(f"tensor storage is {type(storage).__name__}, not a torch storage")
    if not (
        _is_int(storage_offset)
        and isinstance(size, tuple | list | torch.Size)
        and isinstance(stride, tuple | list)
        and len(size) == len(stride) <= _MAX_TENSOR_DIMS
        and all(_is_int(v) for v in (*size, *stride))
    ):
        raise PickleFormatError(
            f"malformed tensor geometry: offset={short_repr(storage_offset)} size={short_repr(size)} "
            f"stride={short_repr(stride)}"
        )
    if not all(0 <= v <= _MAX_GEOMETRY for v in (storage_offset, *size, *stride)):
        raise PickleFormatError(
            f"tensor geometry out of range: offset={storage_offset} size={tuple(size)} stride={tuple(stride)}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        available = storage.size()
        if all(s > 0 for s in size):
            extent = storage_offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1
            if extent > available:
                raise PickleFormatError(f"tensor of size {tuple(size)} reaches past its storage ({available} elements)")
            if math.prod(size) > available - storage_offset:
                raise PickleFormatError(
                    f"tensor of size {tuple(size)} has more elements than its storage holds "
                    f"({available - storage_offset} from offset {storage_offset}): overlapping view"
                )
        return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride)).detach()


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    """Replacement for ``torch._utils._rebuild_parameter``: the data as a plain detached tensor."""
    if not isinstance(data, torch.Tensor):
        raise PickleFormatError(f"parameter data is {type(data).__name__}, not a tensor")
    return data.detach()


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> torch.Tensor:
    """Replacement for ``torch._utils._rebuild_parameter_with_state``; extra attributes dropped."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


# torch.<Name>Storage, as torch.save names a storage's type, -> its dtype.
_STORAGE_TYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass(frozen=True)
class _StorageRef:
    """A storage reference (persistent id) in an embedded ``torch.save`` payload."""

    key: str
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _StoragePayloadScan(BoundedUnpickler):
    """Reads the pickles of an embedded ``torch.save`` payload: plain data and storage references only."""

    unsafe_error = UnsafePickleError
    format_error = PickleFormatError

    def __init__(self, data: bytes | io.BytesIO) -> None:
        super().__init__(data)
        self.refs: list[_StorageRef] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise UnsafePickleError(
            f"an embedded torch.save payload names global {short_repr(f'{module}.{name}')}: only a storage "
            "type is allowed there (the payload is then read with torch.load(weights_only=True))"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (
            type(pid) is tuple
            and len(pid) in (5, 6)
            and isinstance(pid[0], str)
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and _is_int(pid[4])
            and 0 <= pid[4] <= _MAX_GEOMETRY
            and (len(pid) == 5 or pid[5] is None)
        ):
            raise PickleFormatError(
                f"an embedded torch.save payload has a malformed storage reference {short_repr(pid)}"
            )
        ref = _StorageRef(pid[2], pid[4], pid[1])
        self.refs.append(ref)
        return ref


def _one_storage(scan: _StoragePayloadScan, obj: Any) -> _StorageRef:
    if not isinstance(obj, _StorageRef) or len(scan.refs) != 1:
        raise PickleFormatError(
            f"an embedded torch.save payload holds {type(obj).__name__} ({len(scan.refs)} storage references), "
            "not one storage"
        )
    return obj


def _scan_legacy_payload(data: bytes) -> _StorageRef:
    """Check a legacy-format ``torch.save(storage)`` payload (EDM's): one storage, its bytes all there."""
    stream = io.BytesIO(data)
    magic = _StoragePayloadScan(stream).load()
    protocol = _StoragePayloadScan(stream).load()
    sys_info = _StoragePayloadScan(stream).load()
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
        raise PickleFormatError("an embedded storage payload is not in torch.save's format")
    if sys_info.get("little_endian") is not True:
        raise PickleFormatError("an embedded storage payload is big-endian; only little-endian ones are read")
    scan = _StoragePayloadScan(stream)
    ref = _one_storage(scan, scan.load())
    keys = _StoragePayloadScan(stream).load()
    if not (isinstance(keys, list) and len(keys) == 1 and isinstance(keys[0], str) and keys[0] == ref.key):
        raise PickleFormatError(f"an embedded storage payload lists the storage keys {short_repr(keys)}")
    offset = stream.tell()
    header = data[offset : offset + 8]
    declared = struct.unpack("<q", header)[0] if len(header) == 8 else -1
    present = len(data) - offset - 8
    if declared != ref.numel or present != ref.nbytes:
        raise PickleFormatError(
            f"an embedded storage payload declares {ref.numel} elements ({ref.nbytes} bytes) but holds "
            f"{max(present, 0)} bytes"
        )
    return ref


def _scan_zip_payload(data: bytes) -> _StorageRef:
    """Check a zip-format ``torch.save(storage)`` payload: stored records inside it, one storage."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
        if len(infos) > 64 or any(i.compress_type != zipfile.ZIP_STORED or i.file_size > len(data) for i in infos):
            raise PickleFormatError("an embedded zip payload has compressed, oversized or too many records")
        pickles = [i for i in infos if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
        if len(pickles) != 1:
            raise PickleFormatError("an embedded zip payload has no single data.pkl")
        prefix = pickles[0].filename[: -len("data.pkl")]
        scan = _StoragePayloadScan(archive.read(pickles[0]))
        ref = _one_storage(scan, scan.load())
        record = archive.getinfo(f"{prefix}data/{ref.key}")
    except (
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        EOFError,
        OverflowError,
        struct.error,
        NotImplementedError,
        pickle.UnpicklingError,
        IndexError,
        TypeError,
    ) as exc:
        if isinstance(exc, PickleFormatError | UnsafePickleError):
            raise
        raise PickleFormatError(f"an embedded zip payload cannot be read: {short_repr(str(exc), 160)}") from None
    if record.file_size != ref.nbytes:
        raise PickleFormatError(
            f"an embedded zip payload declares {ref.nbytes} bytes for its storage but holds {record.file_size}"
        )
    return ref


def _load_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """Replacement for ``torch.storage._load_from_bytes``.

    The payload is scanned first (:func:`_scan_legacy_payload` / :func:`_scan_zip_payload`: one
    storage whose declared size matches the bytes present, nothing but storage types named), then
    read with ``torch.load(weights_only=True)``.
    """
    if not isinstance(data, bytes | bytearray):
        raise PickleFormatError(f"serialized storage is {type(data).__name__}, not bytes")
    data = bytes(data)
    ref = _scan_zip_payload(data) if data[:2] == b"PK" else _scan_legacy_payload(data)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            result = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"an embedded torch.save payload was refused by torch.load(weights_only=True): {exc}"
        ) from exc
    except Exception as exc:  # corrupt payload: torch raises RuntimeError, EOFError, ...
        raise PickleFormatError(f"an embedded torch.save payload could not be read: {exc}") from exc
    if not isinstance(result, torch.storage.TypedStorage):
        raise PickleFormatError(f"an embedded torch.save payload holds {type(result).__name__}, not a storage")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        if result.dtype != ref.dtype or result.size() != ref.numel:
            raise PickleFormatError("an embedded torch.save payload read back differently from its declaration")
    return result


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Replacement for ``_codecs.encode``: how protocols 0-2 spell a ``bytes`` object (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode of {type(text).__name__} with encoding {encoding!r}")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """Replacement for ``builtins.bytes``: protocols 0-2 write ``b""`` as ``bytes()``."""
    if args:
        raise UnsafePickleError(f"refusing bytes() with {len(args)} argument(s)")
    return b""


def _restricted_new(cls: Any, *args: Any) -> Any:
    """Replacement for ``copyreg.__newobj__``: only our inert stand-in classes may be created."""
    if not any(cls is stub for stub in _STUB_CLASSES) or args:
        raise UnsafePickleError(f"refusing to construct {short_repr(cls)} with {len(args)} argument(s)")
    return cls.__new__(cls)


def _restricted_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Replacement for ``copyreg._reconstructor`` (protocol 0/1 objects), limited like ``__newobj__``.

    Containers come as ``(cls, object, None)``; an ``EasyDict`` (a dict subclass) as
    ``(EasyDict, dict, {items})``.
    """
    if cls is _EasyDict and base is _DICT and isinstance(state, dict):
        return _EasyDict(state)
    if base is not object or state is not None:
        raise UnsafePickleError(f"refusing copyreg._reconstructor of {short_repr(cls)} with base {short_repr(base)}")
    return _restricted_new(cls)


def _container_items(items: Any, what: str, pairs: bool) -> Any:
    """``items`` if it is a builtin container (for a mapping: a dict, or 2-item tuples or lists)."""
    if not isinstance(items, list | tuple | set | frozenset | dict):
        raise UnsafePickleError(f"refusing {what}() of {type(items).__name__}: only builtin containers")
    if pairs and not isinstance(items, dict) and not all(type(p) in (tuple, list) and len(p) == 2 for p in items):
        raise PickleFormatError(f"{what}() items are not key-value pairs")
    return items


def _make_set(items: Any = ()) -> set[Any]:
    """Replacement for ``builtins.set``: a set of a builtin container's items."""
    return set(_container_items(items, "set", pairs=False))


def _make_frozenset(items: Any = ()) -> frozenset[Any]:
    """Replacement for ``builtins.frozenset``."""
    return frozenset(_container_items(items, "frozenset", pairs=False))


def _make_dict(items: Any = ()) -> dict[Any, Any]:
    """Replacement for ``builtins.dict``: from a dict or a list of pairs."""
    return dict(_container_items(items, "dict", pairs=True))


def _make_ordered_dict(items: Any = ()) -> OrderedDict[Any, Any]:
    """Replacement for ``collections.OrderedDict``."""
    return OrderedDict(_container_items(items, "OrderedDict", pairs=True))


_DICT = _SafeCallable(_make_dict)


def _numpy_scalar(dtype: Any, data: Any = None) -> bool | int | float:
    """Replacement for numpy's ``multiarray.scalar``: a plain number as a Python ``bool``/``int``/``float``."""
    if not isinstance(dtype, PlainDType):
        raise UnsafePickleError(f"refusing a numpy scalar of {type(dtype).__name__}: only plain numeric dtypes")
    if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise PickleFormatError(
            f"a numpy {dtype.dtype} scalar needs exactly {dtype.dtype.itemsize} bytes, got {short_repr(data)}"
        )
    value: bool | int | float = np.frombuffer(data, dtype=dtype.dtype)[0].item()
    return value


# (module, name) -> factory of the object ``find_class`` returns for it.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    # EDM's persistence constructor: record class_name + state (+ module_src as text), never execute anything.
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): (lambda: _SafeCallable(_reconstruct_persistent_obj)),
    # Containers pickled the ordinary way (NEWOBJ + BUILD): inert holders of their __dict__.
    ("torch.nn.modules.container", "ModuleDict"): lambda: _ModuleDict,
    ("torch.nn.modules.container", "ModuleList"): lambda: _ModuleList,
    ("torch.nn.modules.container", "Sequential"): lambda: _Sequential,
    # dataset_kwargs and friends: a dict subclass with attribute access; a plain dict here.
    ("dnnlib.util", "EasyDict"): lambda: _EasyDict,
    # Data-only builtins (module __dict__ members, non-persistent buffer names).
    ("collections", "OrderedDict"): lambda: _SafeCallable(_make_ordered_dict),
    ("builtins", "set"): lambda: _SafeCallable(_make_set),
    ("builtins", "frozenset"): lambda: _SafeCallable(_make_frozenset),
    ("builtins", "object"): lambda: object,
    ("builtins", "dict"): lambda: _DICT,
    # Protocols 0-2 write bytes as _codecs.encode(text, 'latin1') (empty ones as bytes()).
    ("_codecs", "encode"): lambda: _SafeCallable(_codecs_encode),
    ("builtins", "bytes"): lambda: _SafeCallable(_empty_bytes),
    # Protocol 0/1 object reconstruction, restricted to the stand-ins above.
    ("copyreg", "_reconstructor"): lambda: _SafeCallable(_restricted_reconstructor),
    ("copyreg", "__newobj__"): lambda: _SafeCallable(_restricted_new),
    # numpy scalars (e.g. a float64 hyper-parameter) under both numpy 1.x and 2.x names, read as
    # Python numbers; only plain numeric dtypes.
    ("numpy", "dtype"): lambda: PlainDType,
    ("numpy._core.multiarray", "scalar"): lambda: _SafeCallable(_numpy_scalar),
    ("numpy.core.multiarray", "scalar"): lambda: _SafeCallable(_numpy_scalar),
    # Tensors: validated rebuilds; storages read with torch.load(weights_only=True).
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _SafeCallable(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): lambda: _SafeCallable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _SafeCallable(_rebuild_parameter_with_state),
    ("torch.storage", "_load_from_bytes"): lambda: _SafeCallable(_load_from_bytes),
    ("torch", "device"): lambda: torch.device,
}


class _RestrictedUnpickler(BoundedUnpickler):
    """Unpickler resolving only :data:`_ALLOWED_GLOBALS`; everything else is refused unimported.

    The bounds (work budget, data-only targets) are :class:`BoundedUnpickler`'s.
    """

    new_classes = _STUB_CLASSES
    build_classes = (*_STUB_CLASSES, _PersistentObject, PlainDType)
    mapping_classes = (dict, OrderedDict, _EasyDict)
    unsafe_error = UnsafePickleError
    format_error = PickleFormatError

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell globals with Python 2 names (``__builtin__``, ``copy_reg``);
        # pickle maps them back only in its own find_class, so do the same renaming here.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            qualified = f"{module}.{name}"
            qualified = qualified if len(qualified) <= 100 else qualified[:97] + "..."
            raise UnsafePickleError(f"refusing to load global '{qualified}': it is not on the EDM pickle allow-list")
        return factory()

    def persistent_load(self, pid: Any) -> NoReturn:
        raise UnsafePickleError("refusing a persistent-id reference: EDM pickles contain none")


# --------------------------------------------------------------------------------------------
# Interpreting the recorded objects.
# --------------------------------------------------------------------------------------------


def _plain_scalar(value: Any, what: str) -> Any:
    """``value`` if it is None, a bool, an int, a float or a short str (exact types, no subclasses)."""
    if value is None or type(value) in (bool, int, float):
        return value
    if type(value) is str and len(value) <= _MAX_SETTING_CHARS:
        return value
    raise PickleFormatError(f"{what} is {short_repr(value)}, not a number or a short string")


def _plain(value: Any, what: str) -> Any:
    """A constructor setting as plain data: a scalar (see :func:`_plain_scalar`) or a short flat list.

    Tuples become lists. Nested or long containers are refused: a setting never needs them, and a
    container that holds another one twice, N levels deep, would stand for 2^N items.
    """
    if isinstance(value, tuple | list):
        if len(value) > _MAX_SETTING_ITEMS:
            raise PickleFormatError(f"{what} is a list of {len(value)} items (at most {_MAX_SETTING_ITEMS})")
        return [_plain_scalar(v, f"an item of {what}") for v in value]
    return _plain_scalar(value, what)


def _as_float(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise PickleFormatError(f"{what} is {short_repr(value)}, not a number")
    return float(value)


def _dict_field(record: _ModuleRecord, field: str, where: str) -> dict[str, Any]:
    value = record.state.get(field)
    if not isinstance(value, dict):
        raise PickleFormatError(f"{where} ({record.class_name}) has no {field} dict: not a torch module")
    return value


def _flatten(
    record: _ModuleRecord, prefix: str, out: dict[str, torch.Tensor], seen: set[int] | None = None, depth: int = 0
) -> None:
    """Collect parameters and persistent buffers of ``record`` and its children, like state_dict().

    The modules must form a tree: a module, or a module's parameter, buffer or child dict, met a
    second time (a cycle, or a shared reference that would multiply the work) is refused, as is
    nesting deeper than :data:`_MAX_MODULE_DEPTH` or more than :data:`_MAX_ENTRIES` tensors. Every
    object is visited once, so the walk costs time proportional to the pickle's size.
    """
    seen = set() if seen is None else seen
    where = short_repr(prefix[:-1], 120) if prefix else "the network"
    if depth > _MAX_MODULE_DEPTH:
        raise PickleFormatError(f"{where}: modules nested more than {_MAX_MODULE_DEPTH} levels deep")
    params = _dict_field(record, "_parameters", where)
    buffers = _dict_field(record, "_buffers", where)
    children = _dict_field(record, "_modules", where)
    for obj in (record, params, buffers, children):
        if id(obj) in seen:
            raise PickleFormatError(
                f"{where}: a module (or its parameter, buffer or child dict) occurs twice in the network: "
                "a cycle or a shared reference"
            )
        seen.add(id(obj))
    non_persistent = record.state.get("_non_persistent_buffers_set")
    if non_persistent is None:
        non_persistent = set()
    if not isinstance(non_persistent, set | frozenset):
        raise PickleFormatError(f"{where}: _non_persistent_buffers_set is {type(non_persistent).__name__}")
    entries = [(n, t) for n, t in params.items()]
    entries += [(n, t) for n, t in buffers.items() if n not in non_persistent]
    for name, tensor in entries:
        if tensor is None:
            continue
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise PickleFormatError(f"{where}: entry {short_repr(name)} is {type(tensor).__name__}, not a tensor")
        key = prefix + name
        if key in out:
            raise PickleFormatError(f"duplicate state-dict entry {short_repr(key, 160)}")
        if len(out) >= _MAX_ENTRIES:
            raise PickleFormatError(f"more than {_MAX_ENTRIES} tensors: not an EDM network")
        out[key] = tensor
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(name, str) or not isinstance(child, _ModuleRecord):
            raise PickleFormatError(f"{where}: child {short_repr(name)} is {type(child).__name__}, not a module")
        _flatten(child, f"{prefix}{name}.", out, seen, depth + 1)


def _bind(record: _PersistentObject, signature: tuple[str, ...], open_kwargs: bool) -> dict[str, Any] | None:
    """The recorded ``_init_args`` / ``_init_kwargs`` of ``record`` by argument name (None: not recorded)."""
    args = record.state.get("_init_args")
    kwargs = record.state.get("_init_kwargs")
    if args is None and kwargs is None:  # EDM's decorator can be told not to record them
        return None
    args = () if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(args, tuple | list) or not isinstance(kwargs, dict):
        raise PickleFormatError(f"{record.class_name}'s recorded _init_args / _init_kwargs are malformed")
    if len(args) > len(signature):
        raise PickleFormatError(
            f"{record.class_name} recorded {len(args)} positional arguments; it takes {len(signature)}"
        )
    bound: dict[str, Any] = dict(zip(signature, args, strict=False))
    for name, value in kwargs.items():
        if not isinstance(name, str) or (name not in signature and not open_kwargs):
            raise PickleFormatError(f"{record.class_name} recorded an unknown argument {short_repr(name)}")
        if name in bound:
            raise PickleFormatError(
                f"{record.class_name} argument {short_repr(name)} recorded both positionally and by keyword"
            )
        bound[name] = value
    return bound


def _check_model_type(model: _PersistentObject, precond: _PersistentObject) -> None:
    """The wrapper's recorded ``model_type`` (if any) must name the backbone it holds."""
    bound = _bind(precond, _PRECOND_SIGNATURE, open_kwargs=True)
    model_type = None if bound is None else bound.get("model_type")
    if model_type is not None and not (isinstance(model_type, str) and model_type == model.class_name):
        raise PickleFormatError(
            f"EDMPrecond records model_type={short_repr(model_type)} but holds a {model.class_name} backbone"
        )


def _network_kwargs(model: _PersistentObject, precond: _PersistentObject) -> dict[str, Any]:
    """SongUNet constructor settings.

    Taken from the backbone's recorded ``_init_args`` / ``_init_kwargs``; if it recorded none,
    from the wrapper's: its extra keyword arguments (``**model_kwargs``) plus ``img_resolution``,
    ``img_channels`` (→ ``in_channels`` = ``out_channels``) and ``label_dim``, which is how
    ``EDMPrecond`` constructs the backbone.
    """
    names = tuple(name for name, _ in _SONGUNET_SIGNATURE)
    recorded = _bind(model, names, open_kwargs=False)
    if recorded is None:
        outer = _bind(precond, _PRECOND_SIGNATURE, open_kwargs=True)
        if outer is None:
            raise PickleFormatError("neither SongUNet nor EDMPrecond recorded their constructor arguments")
        recorded = {k: v for k, v in outer.items() if k not in _PRECOND_SIGNATURE}
        for name in recorded:
            if name not in names:
                raise PickleFormatError(f"EDMPrecond passes an unknown SongUNet argument {short_repr(name)}")
        for source, target in (
            ("img_resolution", "img_resolution"),
            ("img_channels", "in_channels"),
            ("img_channels", "out_channels"),
            ("label_dim", "label_dim"),
        ):
            if source in outer:
                recorded[target] = outer[source]
    # The wrapper passes these down; fall back to its attributes if the model did not record them.
    fallback = {
        "img_resolution": precond.state.get("img_resolution"),
        "in_channels": precond.state.get("img_channels"),
        "out_channels": precond.state.get("img_channels"),
        "label_dim": precond.state.get("label_dim"),
    }
    result: dict[str, Any] = {}
    for name, default in _SONGUNET_SIGNATURE:
        if name in recorded:
            value = recorded[name]
        elif fallback.get(name) is not None:
            value = fallback[name]
        elif default is not None:
            value = default
        else:
            raise PickleFormatError(f"SongUNet argument {name!r} is not recorded in the pickle")
        result[name] = _plain(value, f"SongUNet {name}")
    for name, supported in _SUPPORTED_VARIANT.items():
        if result[name] != supported:
            raise PickleFormatError(
                f"unsupported SongUNet {name}={short_repr(result[name])}: only the DDPM++ variant "
                "(embedding_type='positional', encoder_type='standard', decoder_type='standard') "
                "is supported"
            )
    for name in ("dropout", "label_dropout"):
        result[name] = _as_float(result[name], f"SongUNet {name}")
    for name in ("channel_mult", "attn_resolutions", "resample_filter"):
        if not isinstance(result[name], list) or not all(_is_int(v) for v in result[name]):
            raise PickleFormatError(f"SongUNet {name} is {short_repr(result[name])}, not a list of integers")
    return result


def _precond_float(precond: _PersistentObject, name: str) -> float:
    init_kwargs = precond.state.get("_init_kwargs")
    if name in precond.state:
        value = precond.state[name]
    elif isinstance(init_kwargs, dict) and name in init_kwargs:
        value = init_kwargs[name]
    else:
        value = _PRECOND_DEFAULTS[name]
    return _as_float(value, f"EDMPrecond {name}")


# --------------------------------------------------------------------------------------------
# Checking the network before anything is written.
# --------------------------------------------------------------------------------------------

# SongUNet integer settings -> inclusive range. Generous: EDM's largest is model_channels=256.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "img_resolution": (1, 4096),
    "in_channels": (1, 256),
    "out_channels": (1, 256),
    "label_dim": (0, 1 << 20),
    "augment_dim": (0, 1024),
    "model_channels": (1, 8192),
    "channel_mult_emb": (1, 64),
    "num_blocks": (1, 64),
    "channel_mult_noise": (1, 64),
}
# SongUNet list settings -> (most entries, inclusive range of each entry).
_LIST_RANGES: dict[str, tuple[int, tuple[int, int]]] = {
    "channel_mult": (16, (1, 64)),
    "attn_resolutions": (16, (1, 4096)),
    "resample_filter": (16, (0, 1024)),
}
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _songunet_signature() -> tuple[set[str], set[str]]:
    """(every argument name, the required ones) of :class:`adcm.nets.songunet.SongUNet`."""
    from adcm.nets.songunet import SongUNet

    params = list(inspect.signature(SongUNet.__init__).parameters.values())[1:]
    names = {p.name for p in params}
    return names, {p.name for p in params if p.default is inspect.Parameter.empty}


def _check_network_kwargs(network_kwargs: Any) -> dict[str, Any]:
    """The SongUNet settings, checked: names, types, ranges, finiteness, DDPM++ variant, divisibility."""
    if not isinstance(network_kwargs, Mapping):
        raise PickleFormatError(f"network settings are {type(network_kwargs).__name__}, not a mapping")
    names, required = _songunet_signature()
    unknown = sorted(short_repr(k, 40) for k in itertools.islice(network_kwargs, 200) if k not in names)
    if unknown or len(network_kwargs) > len(names):
        raise PickleFormatError(f"unknown SongUNet settings {unknown[:5]} (expected some of {sorted(names)})")
    missing = sorted(required - set(network_kwargs))
    if missing:
        raise PickleFormatError(f"missing SongUNet settings {missing}")
    kwargs = {name: _plain(value, f"SongUNet {name}") for name, value in network_kwargs.items()}
    for name, (lo, hi) in _INT_RANGES.items():
        value = kwargs.get(name, lo)
        if not _is_int(value) or not lo <= value <= hi:
            raise PickleFormatError(f"SongUNet {name} is {short_repr(value)}, not an integer in [{lo}, {hi}]")
    for name, (longest, (lo, hi)) in _LIST_RANGES.items():
        value = kwargs.get(name, [lo])
        if not isinstance(value, list) or len(value) > longest or not all(_is_int(v) and lo <= v <= hi for v in value):
            raise PickleFormatError(
                f"SongUNet {name} is {short_repr(value)}, not a list of at most {longest} integers in [{lo}, {hi}]"
            )
    for name in ("dropout", "label_dropout"):
        value = kwargs.get(name, 0.0)
        if type(value) not in (int, float) or not 0 <= value < 1:  # NaN fails both comparisons
            raise PickleFormatError(f"SongUNet {name} is {short_repr(value)}, not a probability in [0, 1)")
    for name, supported in _SUPPORTED_VARIANT.items():
        if name in kwargs and kwargs[name] != supported:
            raise PickleFormatError(f"unsupported SongUNet {name}={short_repr(kwargs[name])}: only DDPM++")
    if "adaptive_double_norm" in kwargs and type(kwargs["adaptive_double_norm"]) is not bool:
        raise PickleFormatError(
            f"SongUNet adaptive_double_norm is {short_repr(kwargs['adaptive_double_norm'])}, not true or false"
        )
    levels = len(kwargs["channel_mult"])
    if levels == 0 or not kwargs["resample_filter"] or sum(kwargs["resample_filter"]) == 0:
        raise PickleFormatError("SongUNet channel_mult and resample_filter must be non-empty (and the filter non-zero)")
    if kwargs["img_resolution"] % (1 << (levels - 1)):
        raise PickleFormatError(
            f"SongUNet img_resolution {kwargs['img_resolution']} is not divisible by 2^{levels - 1} "
            f"({levels} levels in channel_mult)"
        )
    return kwargs


def _check_weights(state_dict: Any) -> dict[str, torch.Tensor]:
    """Names, types and values of the weights; the tensors may not repeat or overlap their storages."""
    if not isinstance(state_dict, Mapping):
        raise PickleFormatError(f"the weights are {type(state_dict).__name__}, not a mapping")
    if not 0 < len(state_dict) <= _MAX_ENTRIES:
        raise PickleFormatError(f"{len(state_dict)} weight tensors (expected 1 to {_MAX_ENTRIES})")
    storages: dict[int, int] = {}
    total = 0
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise PickleFormatError(f"weight {short_repr(name)} is {type(tensor).__name__}, not a named tensor")
        if tensor.dtype not in _WEIGHT_DTYPES or tensor.device.type == "meta":
            raise PickleFormatError(
                f"weight {short_repr(name, 160)} is {tensor.dtype} on {tensor.device}, not floating-point data"
            )
        # min and max are finite iff every value is (NaN propagates); 5x cheaper than isfinite().all()
        if tensor.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(tensor.detach())):
            raise PickleFormatError(f"weight {short_repr(name, 160)} holds NaN or infinite values")
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        total += tensor.numel() * tensor.element_size()
    if total > sum(storages.values()):
        raise PickleFormatError(
            f"the weights take {total} bytes but their storages hold {sum(storages.values())}: "
            "tensors repeat or overlap"
        )
    return dict(state_dict)


def check_weights_fit(expected: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor]) -> None:
    """Refuse ``weights`` unless their names and shapes are exactly ``expected`` (name → shape).

    Raises:
        PickleFormatError: one line counting the missing, unexpected and wrongly shaped tensors, with an
            example of each.
    """
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    wrong = [name for name in expected if name in weights and tuple(weights[name].shape) != expected[name]]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {short_repr(missing[0], 120)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {short_repr(unexpected[0], 120)})")
        if wrong:
            name = wrong[0]
            problems.append(
                f"{len(wrong)} of the wrong shape (e.g. {short_repr(name, 120)}: "
                f"{tuple(weights[name].shape)}, the settings need {expected[name]})"
            )
        raise PickleFormatError(f"the weights do not fit the network the settings declare: {'; '.join(problems)}")


def validate_network(
    network_kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], sigma_data: float
) -> None:
    """Check a DDPM++ network before it is written: settings, σ_data and weights must fit together.

    * ``sigma_data``: a finite number > 0;
    * ``network_kwargs``: :class:`adcm.nets.songunet.SongUNet`'s arguments (all required ones, no
      others), plain values of the right types in generous ranges (resolution ≤ 4096, ≤ 256 image
      channels, ...), probabilities in [0, 1), the DDPM++ variant, a resolution divisible by
      2^(levels − 1);
    * ``state_dict``: floating-point, finite tensors named ``model.…`` that neither repeat nor
      overlap one another in memory;
    * ``SongUNet(**network_kwargs)``, built on the ``meta`` device (no memory, no weights
      initialised), has exactly these names and shapes (``load_state_dict(strict=True)``'s rule).

    Every argument is checked at run time, whatever its declared type. Cost: one pass over the
    weights plus building the network's modules (bounded by the number of weights); the first call
    in a process also imports ``torch._dynamo`` (about 2 s), which torch needs for some ``meta``
    kernels.

    Raises:
        PickleFormatError: one line naming the first problem.
    """
    from adcm.nets.songunet import SongUNet

    if type(sigma_data) not in (int, float) or not 0 < sigma_data < math.inf:
        raise PickleFormatError(f"sigma_data is {short_repr(sigma_data)}, not a finite number > 0")
    kwargs = _check_network_kwargs(network_kwargs)
    weights = _check_weights(state_dict)
    levels, blocks = len(kwargs["channel_mult"]), kwargs["num_blocks"]
    if levels * (2 * blocks + 1) > len(weights):
        raise PickleFormatError(
            f"the settings declare {levels} levels of {blocks} blocks, more than {len(weights)} weight tensors can hold"
        )
    try:
        with torch.device("meta"):
            network = SongUNet(**kwargs)
    except (ValueError, TypeError, RuntimeError, OverflowError, ZeroDivisionError) as exc:
        raise PickleFormatError(f"SongUNet rejects the settings: {short_repr(str(exc), 200)}") from None
    expected = {f"model.{name}": tuple(t.shape) for name, t in network.state_dict().items()}
    check_weights_fit(expected, weights)


# --------------------------------------------------------------------------------------------
# Reading the file.
# --------------------------------------------------------------------------------------------


def _unpickle(path: Path) -> Any:
    data = path.read_bytes()
    try:
        return _load_stream(data)
    except (UnsafePickleError, PickleFormatError):
        raise
    except RefusedError as exc:
        raise UnsafePickleError(str(exc)) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        RuntimeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        UnicodeDecodeError,
        struct.error,
        RecursionError,
    ) as exc:
        message = short_repr(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 200)
        raise PickleFormatError(f"not a readable pickle (truncated, or another format?): {message}") from None


def _load_stream(data: bytes) -> Any:
    if data[:2] == b"PK":
        raise PickleFormatError("a zip archive (torch.save checkpoint?), not an EDM network pickle")
    if not data:
        raise PickleFormatError("the file is empty")
    return _RestrictedUnpickler(data).load()


def read_snapshot(path: Path | str | os.PathLike[str]) -> dict[Any, Any]:
    """Unpickle an EDM or EDM2 snapshot file with the restricted unpickler: its top-level dict of records.

    Nothing in the file is executed; persistent network objects come back as inert records (class name,
    state, module source as text). Shared by :func:`load_edm_pickle` and
    :func:`adcm.io.edm2_pickle.load_edm2_pickle`.

    Raises:
        UnsafePickleError, PickleFormatError: as :func:`load_edm_pickle` (the message starts with the path).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    try:
        top = _unpickle(path)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from exc
    except PickleFormatError as exc:
        raise PickleFormatError(f"{path}: {exc}") from exc
    if not isinstance(top, dict):
        raise PickleFormatError(f"{path}: the pickle holds {type(top).__name__}, not EDM's snapshot dict")
    return top


def snapshot_network(top: dict[Any, Any], key: str, path: Path) -> _PersistentObject:
    """The persistent network record under ``key`` of a snapshot dict (:func:`read_snapshot`)."""
    if key not in top:
        names = sorted(k for k in top if isinstance(k, str))
        shown = ", ".join(short_repr(k, 40) for k in names[:10])
        more = len(top) - min(len(names), 10)
        raise PickleFormatError(f"{path}: no {key!r} entry (keys: [{shown}{f', ... {more} more' if more else ''}])")
    precond = top[key]
    if not isinstance(precond, _PersistentObject):
        raise PickleFormatError(f"{path}: entry {key!r} is {type(precond).__name__}, not an EDM network")
    return precond


def load_edm_pickle(path: Path | str | os.PathLike[str], key: str = "ema") -> EDMNetwork:
    """Read an EDM network pickle without executing any code from it.

    Args:
        path: An EDM snapshot / released network pickle (``*.pkl``).
        key: Which entry of the pickled dict holds the network (EDM stores the EMA weights under
            ``"ema"``).

    Returns:
        The network's constructor settings, noise-level attributes and flat state dict.

    Raises:
        UnsafePickleError: The pickle references a global outside the allow-list (anything that
            could run code) or embeds a storage payload that ``torch.load(weights_only=True)``
            refuses.
        PickleFormatError: The file is not a (complete) pickle, lacks ``key``, holds something
            other than an ``EDMPrecond``-wrapped DDPM++ ``SongUNet``, asks for more work than its
            size allows, or its settings and weights do not pass :func:`validate_network`.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    return edm_network(snapshot_network(read_snapshot(path), key, path), path, key)


def edm_network(precond: _PersistentObject, path: Path, key: str = "ema") -> EDMNetwork:
    """The DDPM++ network of an EDM snapshot's record ``precond`` (entry ``key`` of ``path``), checked.

    Raises:
        PickleFormatError: as :func:`load_edm_pickle`.
    """
    if precond.class_name != "EDMPrecond":
        hint = " (an EDM2 network? `adcm teacher` imports those too)" if precond.class_name == "Precond" else ""
        raise PickleFormatError(
            f"{path}: entry {key!r} is a {precond.class_name}; only EDMPrecond networks are supported{hint}"
        )
    children = _dict_field(precond, "_modules", "EDMPrecond")
    model = children.get("model")
    if not isinstance(model, _PersistentObject):
        raise PickleFormatError(f"{path}: EDMPrecond has no persistent 'model' child")
    if model.class_name != "SongUNet":
        raise PickleFormatError(f"{path}: the backbone is {model.class_name}; only SongUNet (DDPM++) is supported")
    try:
        _check_model_type(model, precond)
        network_kwargs = _network_kwargs(model, precond)
        state_dict: dict[str, torch.Tensor] = {}
        _flatten(precond, "", state_dict)
        sigmas = {name: _precond_float(precond, name) for name in _PRECOND_DEFAULTS}
        if not 0 <= sigmas["sigma_min"] < sigmas["sigma_max"] or math.isinf(sigmas["sigma_min"]):
            raise PickleFormatError(
                f"EDMPrecond sigma_min={sigmas['sigma_min']}, sigma_max={sigmas['sigma_max']}: expected "
                "0 ≤ sigma_min < sigma_max (sigma_max may be inf)"
            )
        validate_network(network_kwargs, state_dict, sigmas["sigma_data"])
    except PickleFormatError as exc:
        raise PickleFormatError(f"{path}: {exc}") from exc
    return EDMNetwork(
        precond_class=precond.class_name,
        network_kwargs=network_kwargs,
        sigma_data=sigmas["sigma_data"],
        sigma_min=sigmas["sigma_min"],
        sigma_max=sigmas["sigma_max"],
        state_dict=state_dict,
    )
