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

* the persistence constructor records ``class_name`` and ``state`` and drops ``module_src``
  unread;
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
that the persistence decorator stores on every object.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import math
import os
import pickle
import struct
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, NoReturn

import numpy as np
import torch

__all__ = ["EDMFormatError", "EDMNetwork", "UnsafePickleError", "load_edm_pickle"]


class UnsafePickleError(ValueError):
    """The pickle references a global outside the allow-list, or embeds refused content."""


class EDMFormatError(ValueError):
    """The file is not a readable EDM network pickle, or holds a network this package cannot use."""


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
    "img_resolution", "img_channels", "label_dim", "use_fp16",
    "sigma_min", "sigma_max", "sigma_data", "model_type",
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
    """What the persistence constructor yields: class name and state, no source code."""

    __slots__ = ()

    def __init__(self, class_name: str, state: dict[str, Any]):
        self.class_name = class_name
        self.state = state

    def __setstate__(self, state: Any) -> NoReturn:
        raise EDMFormatError(f"unexpected BUILD on a persistent {self.class_name} object")

    def __repr__(self) -> str:
        return f"<persistent {self.class_name}>"


class _Container(_ModuleRecord):
    """Stand-in for a torch container (``ModuleDict`` ...) pickled the ordinary way."""

    __slots__ = ()
    container_name: ClassVar[str] = "Container"

    def __init__(self) -> None:
        self.class_name = type(self).container_name
        self.state = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise EDMFormatError(f"{type(self).container_name} state is {type(state).__name__}, not a dict")
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
            raise EDMFormatError(f"EasyDict state is {type(state).__name__}, not a dict")


_STUB_CLASSES: tuple[type, ...] = (_ModuleDict, _ModuleList, _Sequential, _EasyDict)


class _SafeCallable(metaclass=_Sealed):
    """Wraps one of our functions so that pickle opcodes cannot modify it (no ``__dict__``)."""

    __slots__ = ("_fn",)

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

    Keeps ``class_name`` and ``state``; ``module_src`` is never read, let alone executed.
    """
    if not isinstance(meta, dict):
        raise EDMFormatError(f"persistent-object metadata is {type(meta).__name__}, not a dict")
    if meta.get("type") != "class":
        raise EDMFormatError(f"unsupported persistent-object type {meta.get('type')!r} (expected 'class')")
    class_name = meta.get("class_name")
    if not isinstance(class_name, str):
        raise EDMFormatError("persistent-object metadata has no class_name")
    state = meta.get("state")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise EDMFormatError(f"state of persistent {class_name} is {type(state).__name__}, not a dict")
    return _PersistentObject(class_name, state)


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

    ``requires_grad``, hooks and metadata are ignored: the result is a plain detached tensor.
    """
    if not isinstance(storage, torch.storage.TypedStorage):
        raise EDMFormatError(f"tensor storage is {type(storage).__name__}, not a torch storage")
    if not (
        _is_int(storage_offset)
        and isinstance(size, tuple | list | torch.Size)
        and isinstance(stride, tuple | list)
        and len(size) == len(stride)
        and all(_is_int(v) for v in (*size, *stride))
    ):
        raise EDMFormatError(
            f"malformed tensor geometry: offset={storage_offset!r} size={size!r} stride={stride!r}"
        )
    if storage_offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise EDMFormatError(f"negative tensor geometry: offset={storage_offset} size={size} stride={stride}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        available = storage.size()
        if all(s > 0 for s in size):
            extent = storage_offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1
            if extent > available:
                raise EDMFormatError(
                    f"tensor of size {tuple(size)} reaches past its storage ({available} elements)"
                )
        return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride)).detach()


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    """Replacement for ``torch._utils._rebuild_parameter``: the data as a plain detached tensor."""
    if not isinstance(data, torch.Tensor):
        raise EDMFormatError(f"parameter data is {type(data).__name__}, not a tensor")
    return data.detach()


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> torch.Tensor:
    """Replacement for ``torch._utils._rebuild_parameter_with_state``; extra attributes dropped."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _load_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """Replacement for ``torch.storage._load_from_bytes``, reading with ``weights_only=True``."""
    if not isinstance(data, bytes | bytearray):
        raise EDMFormatError(f"serialized storage is {type(data).__name__}, not bytes")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            result = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"an embedded torch.save payload was refused by torch.load(weights_only=True): {exc}"
        ) from exc
    except Exception as exc:  # corrupt payload: torch raises RuntimeError, EOFError, ...
        raise EDMFormatError(f"an embedded torch.save payload could not be read: {exc}") from exc
    if not isinstance(result, torch.storage.TypedStorage):
        raise EDMFormatError(f"an embedded torch.save payload holds {type(result).__name__}, not a storage")
    return result


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Replacement for ``_codecs.encode``: how protocols 0-2 spell a ``bytes`` object (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"refusing _codecs.encode of {type(text).__name__} with encoding {encoding!r}"
        )
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """Replacement for ``builtins.bytes``: protocols 0-2 write ``b""`` as ``bytes()``."""
    if args:
        raise UnsafePickleError(f"refusing bytes() with {len(args)} argument(s)")
    return b""


def _restricted_new(cls: Any, *args: Any) -> Any:
    """Replacement for ``copyreg.__newobj__``: only our inert stand-in classes may be created."""
    if not (isinstance(cls, type) and cls in _STUB_CLASSES) or args:
        raise UnsafePickleError(f"refusing to construct {cls!r} with {len(args)} argument(s)")
    return cls.__new__(cls)


def _restricted_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Replacement for ``copyreg._reconstructor`` (protocol 0/1 objects), limited like ``__newobj__``.

    Containers come as ``(cls, object, None)``; an ``EasyDict`` (a dict subclass) as
    ``(EasyDict, dict, {items})``.
    """
    if cls is _EasyDict and base is dict and isinstance(state, dict):
        return _EasyDict(state)
    if base is not object or state is not None:
        raise UnsafePickleError(f"refusing copyreg._reconstructor of {cls!r} with base {base!r}")
    return _restricted_new(cls)


def _numpy_scalar() -> Any:
    """``numpy._core.multiarray.scalar`` (numpy 2) or ``numpy.core.multiarray.scalar`` (numpy 1)."""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(name).scalar
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy provides no multiarray.scalar")  # pragma: no cover


# (module, name) -> factory of the object ``find_class`` returns for it.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    # EDM's persistence constructor: record class_name + state, never touch module_src.
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): (
        lambda: _SafeCallable(_reconstruct_persistent_obj)
    ),
    # Containers pickled the ordinary way (NEWOBJ + BUILD): inert holders of their __dict__.
    ("torch.nn.modules.container", "ModuleDict"): lambda: _ModuleDict,
    ("torch.nn.modules.container", "ModuleList"): lambda: _ModuleList,
    ("torch.nn.modules.container", "Sequential"): lambda: _Sequential,
    # dataset_kwargs and friends: a dict subclass with attribute access; a plain dict here.
    ("dnnlib.util", "EasyDict"): lambda: _EasyDict,
    # Data-only builtins (module __dict__ members, non-persistent buffer names).
    ("collections", "OrderedDict"): lambda: OrderedDict,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("builtins", "object"): lambda: object,
    ("builtins", "dict"): lambda: dict,
    # Protocols 0-2 write bytes as _codecs.encode(text, 'latin1') (empty ones as bytes()).
    ("_codecs", "encode"): lambda: _SafeCallable(_codecs_encode),
    ("builtins", "bytes"): lambda: _SafeCallable(_empty_bytes),
    # Protocol 0/1 object reconstruction, restricted to the stand-ins above.
    ("copyreg", "_reconstructor"): lambda: _SafeCallable(_restricted_reconstructor),
    ("copyreg", "__newobj__"): lambda: _SafeCallable(_restricted_new),
    # numpy scalars (e.g. a float64 hyper-parameter) under both numpy 1.x and 2.x names.
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    # Tensors: validated rebuilds; storages read with torch.load(weights_only=True).
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _SafeCallable(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): lambda: _SafeCallable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _SafeCallable(_rebuild_parameter_with_state),
    ("torch.storage", "_load_from_bytes"): lambda: _SafeCallable(_load_from_bytes),
    ("torch", "device"): lambda: torch.device,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only :data:`_ALLOWED_GLOBALS`; everything else is refused unimported."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell globals with Python 2 names (``__builtin__``, ``copy_reg``);
        # pickle maps them back only in its own find_class, so do the same renaming here.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': it is not on the EDM pickle allow-list"
            )
        return factory()

    def persistent_load(self, pid: Any) -> NoReturn:
        raise UnsafePickleError("refusing a persistent-id reference: EDM pickles contain none")


# --------------------------------------------------------------------------------------------
# Interpreting the recorded objects.
# --------------------------------------------------------------------------------------------


def _to_python(value: Any) -> Any:
    """Tuples → lists and numpy scalars → Python numbers, recursively."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return [_to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


def _as_float(value: Any, what: str) -> float:
    value = _to_python(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EDMFormatError(f"{what} is {value!r}, not a number")
    return float(value)


def _dict_field(record: _ModuleRecord, field: str, where: str) -> dict[str, Any]:
    value = record.state.get(field)
    if not isinstance(value, dict):
        raise EDMFormatError(f"{where} ({record.class_name}) has no {field} dict: not a torch module")
    return value


def _flatten(record: _ModuleRecord, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Collect parameters and persistent buffers of ``record`` and its children, like state_dict()."""
    where = prefix[:-1] or "the network"
    params = _dict_field(record, "_parameters", where)
    buffers = _dict_field(record, "_buffers", where)
    children = _dict_field(record, "_modules", where)
    non_persistent = record.state.get("_non_persistent_buffers_set") or set()
    if not isinstance(non_persistent, set | frozenset):
        raise EDMFormatError(f"{where}: _non_persistent_buffers_set is {type(non_persistent).__name__}")
    entries = [(n, t) for n, t in params.items()]
    entries += [(n, t) for n, t in buffers.items() if n not in non_persistent]
    for name, tensor in entries:
        if tensor is None:
            continue
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise EDMFormatError(f"{where}: entry {name!r} is {type(tensor).__name__}, not a tensor")
        key = prefix + name
        if key in out:
            raise EDMFormatError(f"duplicate state-dict entry {key!r}")
        out[key] = tensor
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(name, str) or not isinstance(child, _ModuleRecord):
            raise EDMFormatError(f"{where}: child {name!r} is {type(child).__name__}, not a module")
        _flatten(child, f"{prefix}{name}.", out)


def _bind(record: _PersistentObject, signature: tuple[str, ...], open_kwargs: bool) -> dict[str, Any] | None:
    """The recorded ``_init_args`` / ``_init_kwargs`` of ``record`` by argument name (None: not recorded)."""
    args = record.state.get("_init_args")
    kwargs = record.state.get("_init_kwargs")
    if args is None and kwargs is None:  # EDM's decorator can be told not to record them
        return None
    args = () if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(args, tuple | list) or not isinstance(kwargs, dict):
        raise EDMFormatError(f"{record.class_name}'s recorded _init_args / _init_kwargs are malformed")
    if len(args) > len(signature):
        raise EDMFormatError(
            f"{record.class_name} recorded {len(args)} positional arguments; it takes {len(signature)}"
        )
    bound: dict[str, Any] = dict(zip(signature, args, strict=False))
    for name, value in kwargs.items():
        if not isinstance(name, str) or (name not in signature and not open_kwargs):
            raise EDMFormatError(f"{record.class_name} recorded an unknown argument {name!r}")
        if name in bound:
            raise EDMFormatError(
                f"{record.class_name} argument {name!r} recorded both positionally and by keyword"
            )
        bound[name] = value
    return bound


def _check_model_type(model: _PersistentObject, precond: _PersistentObject) -> None:
    """The wrapper's recorded ``model_type`` (if any) must name the backbone it holds."""
    bound = _bind(precond, _PRECOND_SIGNATURE, open_kwargs=True)
    model_type = None if bound is None else bound.get("model_type")
    if model_type is not None and model_type != model.class_name:
        raise EDMFormatError(
            f"EDMPrecond records model_type={model_type!r} but holds a {model.class_name} backbone"
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
            raise EDMFormatError("neither SongUNet nor EDMPrecond recorded their constructor arguments")
        recorded = {k: v for k, v in outer.items() if k not in _PRECOND_SIGNATURE}
        for name in recorded:
            if name not in names:
                raise EDMFormatError(f"EDMPrecond passes an unknown SongUNet argument {name!r}")
        for source, target in (("img_resolution", "img_resolution"), ("img_channels", "in_channels"),
                               ("img_channels", "out_channels"), ("label_dim", "label_dim")):
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
            raise EDMFormatError(f"SongUNet argument {name!r} is not recorded in the pickle")
        result[name] = _to_python(value)
    for name, supported in _SUPPORTED_VARIANT.items():
        if result[name] != supported:
            raise EDMFormatError(
                f"unsupported SongUNet {name}={result[name]!r}: only the DDPM++ variant "
                "(embedding_type='positional', encoder_type='standard', decoder_type='standard') "
                "is supported"
            )
    for name in ("dropout", "label_dropout"):
        result[name] = _as_float(result[name], f"SongUNet {name}")
    for name in ("channel_mult", "attn_resolutions", "resample_filter"):
        if not isinstance(result[name], list) or not all(_is_int(v) for v in result[name]):
            raise EDMFormatError(f"SongUNet {name} is {result[name]!r}, not a list of integers")
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


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as handle:
            return _load_stream(handle)
    except (UnsafePickleError, EDMFormatError):
        raise
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
        raise EDMFormatError(f"not a readable pickle (truncated, or another format?): {exc}") from exc


def _load_stream(handle: BinaryIO) -> Any:
    head = handle.read(4)
    if head[:2] == b"PK":
        raise EDMFormatError("a zip archive (torch.save checkpoint?), not an EDM network pickle")
    if not head:
        raise EDMFormatError("the file is empty")
    handle.seek(0)
    return _RestrictedUnpickler(handle).load()


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
        EDMFormatError: The file is not a (complete) pickle, lacks ``key``, or holds something
            other than an ``EDMPrecond``-wrapped DDPM++ ``SongUNet``.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    try:
        top = _unpickle(path)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from exc
    except EDMFormatError as exc:
        raise EDMFormatError(f"{path}: {exc}") from exc
    if not isinstance(top, dict):
        raise EDMFormatError(f"{path}: the pickle holds {type(top).__name__}, not EDM's snapshot dict")
    if key not in top:
        raise EDMFormatError(f"{path}: no {key!r} entry (keys: {sorted(map(str, top))})")
    precond = top[key]
    if not isinstance(precond, _PersistentObject):
        raise EDMFormatError(f"{path}: entry {key!r} is {type(precond).__name__}, not an EDM network")
    if precond.class_name != "EDMPrecond":
        raise EDMFormatError(
            f"{path}: entry {key!r} is a {precond.class_name}; only EDMPrecond networks are supported"
        )
    children = _dict_field(precond, "_modules", "EDMPrecond")
    model = children.get("model")
    if not isinstance(model, _PersistentObject):
        raise EDMFormatError(f"{path}: EDMPrecond has no persistent 'model' child")
    if model.class_name != "SongUNet":
        raise EDMFormatError(
            f"{path}: the backbone is {model.class_name}; only SongUNet (DDPM++) is supported"
        )
    try:
        _check_model_type(model, precond)
        network_kwargs = _network_kwargs(model, precond)
        state_dict: dict[str, torch.Tensor] = {}
        _flatten(precond, "", state_dict)
        sigmas = {name: _precond_float(precond, name) for name in _PRECOND_DEFAULTS}
    except EDMFormatError as exc:
        raise EDMFormatError(f"{path}: {exc}") from exc
    return EDMNetwork(
        precond_class=precond.class_name,
        network_kwargs=network_kwargs,
        sigma_data=sigmas["sigma_data"],
        sigma_min=sigmas["sigma_min"],
        sigma_max=sigmas["sigma_max"],
        state_dict=state_dict,
    )
