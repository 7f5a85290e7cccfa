"""Writing a VE teacher as an EDM network snapshot, so it is distributed and imported exactly like EDM's.

EDM's snapshots (``network-snapshot-*.pkl``) are :func:`pickle.dump` outputs of a dict whose ``ema``
entry is the preconditioned network, each network object reduced by EDM's persistence mechanism as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta`` = (class name, the
object's ``__dict__`` as ``state``, the defining module's source as ``module_src``) — see
docs/teachers.md#edm-checkpoints. :func:`save_edm_snapshot` writes that format for a
:class:`~adcm.io.model_files.TeacherFile` of the VE process: ``EDMPrecond`` around ``SongUNet`` with the
teacher's constructor settings (``_init_kwargs``) and EMA weights, and a ``module_src`` that is a
comment only (this project's importer never reads it; EDM's own loader, which executes it, cannot
rebuild these objects). :func:`adcm.io.edm_pickle.load_edm_pickle` reads the file back to the same
weights, which is how the embedded default's pretrained teacher is shipped and checked.

The file is a function of the weights and settings alone: PyTorch names each storage inside the pickle
by its memory address, which this writer replaces by the storage's index (:class:`_SnapshotPickler`),
and the settings' strings are interned (pickle writes a string once per object), so the same teacher
gives the same bytes whether it was built in memory or read from a file, and a teacher trained again
can be compared with a shipped one by the SHA-256 that ``adcm export`` prints (for one PyTorch version:
the storage payloads are PyTorch's serialisation).

Writing needs the names ``torch_utils.persistence`` and ``dnnlib.util`` to resolve while pickling:
they are registered as empty stand-in modules for the duration of the dump and removed afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import pickle
import struct
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adcm.errors import CheckpointError
from adcm.io.files import atomic_write_bytes
from adcm.io.model_files import TeacherFile

__all__ = ["save_edm_snapshot"]

MODULE_SRC = "# Written by adcm (adcm.io.edm_export): a data-only EDM network snapshot; this text is not code.\n"

_STAND_INS = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


def _no_construction(meta: Any) -> Any:
    """Stand-in for EDM's persistence constructor while pickling; never called."""
    raise RuntimeError("a stand-in: the snapshot is read by adcm.io.edm_pickle, never by executing it")


@contextlib.contextmanager
def _edm_names() -> Iterator[types.FunctionType]:
    """Register ``torch_utils.persistence._reconstruct_persistent_obj`` and ``dnnlib.util.EasyDict`` stand-ins."""
    saved = {name: sys.modules.get(name) for name in _STAND_INS}
    modules = {name: types.ModuleType(name) for name in _STAND_INS}
    persistence = modules["torch_utils.persistence"]
    constructor = types.FunctionType(_no_construction.__code__, {}, "_reconstruct_persistent_obj")
    constructor.__module__, constructor.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = constructor  # type: ignore[attr-defined]
    modules["torch_utils"].persistence = persistence  # type: ignore[attr-defined]
    modules["dnnlib"].util = modules["dnnlib.util"]  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield constructor
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _Persistent:
    """An object that pickles like an instance of an EDM ``@persistent_class``."""

    def __init__(self, constructor: Any, class_name: str, state: dict[str, Any]):
        self.constructor, self.class_name, self.state = constructor, class_name, state

    def __reduce__(self) -> tuple[Any, ...]:
        meta = {
            "type": "class",
            "version": 6,
            "module_src": MODULE_SRC,
            "class_name": self.class_name,
            "state": self.state,
        }
        return (self.constructor, (meta,), None)


class _SnapshotPickler(pickle.Pickler):
    """A pickler whose output depends on the weights alone: the same teacher gives the same bytes.

    PyTorch pickles each storage as ``torch.storage._load_from_bytes(payload)``, the payload a legacy-format
    ``torch.save`` of the storage, which names the storage by its memory address (``str(storage._cdata)``,
    twice: in the storage's persistent id and in the list of keys). Two exports of the same weights then
    differ, and a teacher trained again bit-identically could not be recognised by its file's SHA-256. This
    pickler writes the same payloads with the address replaced by the storage's index in the file ("0",
    "1", …): the format is unchanged (the key only pairs the persistent id with its bytes inside one
    payload; PyTorch and :mod:`adcm.io.edm_pickle` read it as before).
    """

    def __init__(self, file: io.BytesIO, protocol: int):
        super().__init__(file, protocol=protocol)
        self._storages = 0

    def reducer_override(self, obj: Any) -> Any:
        """Storages: a legacy payload keyed by their index; everything else: the usual reduction."""
        if not isinstance(obj, torch.storage.TypedStorage):
            return NotImplemented
        function, (payload,) = obj.__reduce__()
        key = str(self._storages).encode()
        self._storages += 1
        storage = obj._untyped_storage
        return function, (_rekeyed_payload(payload, storage.nbytes(), str(storage._cdata).encode(), key),)


def _rekeyed_payload(payload: bytes, nbytes: int, old: bytes, new: bytes) -> bytes:
    """``payload`` (legacy ``torch.save`` of one storage of ``nbytes`` bytes) with storage key ``old`` renamed ``new``.

    The payload is pickles (protocol 2) followed by the storage: an 8-byte element count, then its
    ``nbytes`` bytes. The key is a BINUNICODE string (``X``, 4-byte little-endian length, UTF-8) that
    occurs twice in the pickles — the storage's persistent id and the list of keys — and is renamed
    there only; protocol 2 has no frame lengths, so a string of another length is a valid replacement.

    Raises:
        CheckpointError: the key does not occur exactly twice (a ``torch.save`` layout this code does not know).
    """
    split = len(payload) - nbytes - 8
    head, storage = payload[:split], payload[split:]

    def binunicode(text: bytes) -> bytes:
        return b"X" + struct.pack("<I", len(text)) + text

    if split < 0 or head.count(binunicode(old)) != 2:
        raise CheckpointError("torch.save wrote a storage payload of a layout this writer does not know")
    return head.replace(binunicode(old), binunicode(new)) + storage


def _interned(value: Any) -> Any:
    """``value`` with every string in it (dict keys, list and tuple items, recursively) replaced by its interned one."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return type(value)((_interned(k), _interned(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_interned(v) for v in value)
    return value


def _record(args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"_init_args": args, "_init_kwargs": dict(kwargs or {})}


def _persist(module: nn.Module, constructor: Any, extra: dict[str, Any] | None = None) -> _Persistent:
    """``module`` (one of the backbone's classes, named like EDM's) as a persistent object, children recursively."""
    state: dict[str, Any] = {
        "training": False,
        "_parameters": OrderedDict(
            (k, None if v is None else nn.Parameter(v.detach().cpu().clone(), requires_grad=False))
            for k, v in module._parameters.items()
        ),
        "_buffers": OrderedDict(
            (k, None if v is None else v.detach().cpu().clone()) for k, v in module._buffers.items()
        ),
        "_modules": OrderedDict((k, _child(v, constructor)) for k, v in module._modules.items()),
    }
    for key, value in module.__dict__.items():
        if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str, tuple)):
            state[key] = value
    state.update(_record())
    state.update(extra or {})
    return _Persistent(constructor, type(module).__name__, state)


def _child(child: nn.Module | None, constructor: Any) -> Any:
    if child is None:
        return None
    if isinstance(child, nn.ModuleDict):  # a plain torch container in EDM's networks
        container = nn.ModuleDict()
        container.__dict__["_modules"] = OrderedDict((k, _child(v, constructor)) for k, v in child.items())
        container.__dict__["training"] = False
        return container
    return _persist(child, constructor)


def save_edm_snapshot(teacher: TeacherFile, path: Path) -> None:
    """Write ``teacher`` (a VE diffusion model) as an EDM snapshot pickle at ``path``, atomically.

    Raises:
        CheckpointError: the teacher is not a VE (EDM) model, or not EDM's SongUNet (e.g. an EDM2 network).
    """
    if teacher.network != "ddpmpp":
        raise CheckpointError(
            f"{path}: only a DDPM++ (EDM SongUNet) teacher can be written as an EDM snapshot, "
            f"not a {teacher.network} one"
        )
    if teacher.process != "ve" or teacher.backbone_process != "ve":
        raise CheckpointError(
            f"{path}: only a VE (EDM) teacher can be written as an EDM snapshot, not a {teacher.process} one"
        )
    # Pickle writes a string once per object: intern the settings (and so the network's attributes built from
    # them) so that equal strings are one object whether the teacher was built here or read from a file.
    teacher = dataclasses.replace(teacher, network_kwargs=_interned(dict(teacher.network_kwargs)))
    net = teacher.denoiser()
    kwargs = dict(teacher.network_kwargs)
    if kwargs.pop("adaptive_double_norm", False):
        raise CheckpointError(f"{path}: a network with sCM's adaptive double normalisation is not EDM's SongUNet")
    buffer = io.BytesIO()
    with _edm_names() as constructor:
        model = _persist(net.model, constructor, _record((), kwargs))
        model.class_name = "SongUNet"
        precond_kwargs = {
            "img_resolution": kwargs["img_resolution"],
            "img_channels": kwargs["in_channels"],
            "label_dim": kwargs["label_dim"],
            "use_fp16": False,
            "sigma_min": 0.0,
            "sigma_max": math.inf,
            "sigma_data": teacher.sigma_data,
            "model_type": "SongUNet",
            **{
                k: v
                for k, v in kwargs.items()
                if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")
            },
        }
        state: dict[str, Any] = {
            "training": False,
            "_parameters": OrderedDict(),
            "_buffers": OrderedDict(),
            "_modules": OrderedDict(model=model),
            "img_resolution": kwargs["img_resolution"],
            "img_channels": kwargs["in_channels"],
            "label_dim": kwargs["label_dim"],
            "use_fp16": False,
            "sigma_min": 0.0,
            "sigma_max": math.inf,
            "sigma_data": float(teacher.sigma_data),
            **_record((), precond_kwargs),
        }
        snapshot = {
            "ema": _Persistent(constructor, "EDMPrecond", state),
            "loss_fn": None,
            "augment_pipe": None,
            "dataset_kwargs": None,
        }
        with torch.no_grad():
            _SnapshotPickler(buffer, protocol=4).dump(snapshot)
    atomic_write_bytes(path, buffer.getvalue())
