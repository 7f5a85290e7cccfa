"""Hostile and broken inputs (issue 19): every one is refused with one error line, quickly, leaving no file.

The malicious files are built here at the opcode level: :class:`Writer` is the pure-Python pickler
with two additions, :class:`Ref` (a ``GLOBAL`` opcode naming anything, without importing it) and
:class:`Raw` (opcodes written verbatim), so a test states exactly which globals and states a file
contains. Each refusal is timed (:func:`refused`, printed with ``-s``) and must take well under
:data:`FAST` seconds; the directory the input lives in must hold nothing new afterwards.
"""

from __future__ import annotations

import gzip
import http.client
import io
import math
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from adcm.config import load_params, load_study
from adcm.errors import (
    AdcmError,
    CheckpointError,
    DatasetError,
    DownloadError,
    ParamsError,
    PickleFormatError,
    UnsafePickleError,
)
from adcm.io.datasets import (
    ImageDataset,
    load_prepared,
    read_cifar10,
    read_fashion_mnist,
    read_idx,
    read_image_folder,
    write_prepared,
)
from adcm.io.download import download
from adcm.io.edm_pickle import load_edm_pickle, validate_network
from adcm.io.model_files import TeacherFile, load_teacher, save_teacher
from adcm.nets.songunet import SongUNet

ROOT = Path(__file__).resolve().parents[2]
FAST = 5.0
"""Seconds any refusal may take (generous: the slowest measured is well under one second)."""


# --------------------------------------------------------------------------------------------------
# Writing pickles opcode by opcode.
# --------------------------------------------------------------------------------------------------


class Ref:
    """A global ``module.name``, written as a ``GLOBAL`` opcode; never imported, never called here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # the pickler insists that REDUCE's callable is callable
        raise AssertionError("a Ref is only written, never called")


class Call:
    """``func(*args)`` (``REDUCE``), followed by ``BUILD`` with ``state`` when one is given."""

    _NONE = object()

    def __init__(self, func: Ref, *args: Any, state: Any = _NONE):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is Call._NONE:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


class Raw:
    """Opcodes written verbatim; they must push exactly one object and use no memo slots."""

    def __init__(self, data: bytes):
        self.data = data


class Writer(pickle._Pickler):  # type: ignore[name-defined,misc]
    dispatch: ClassVar[dict[type, Callable[..., None]]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_ref(self, obj: Ref) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def save_raw(self, obj: Raw) -> None:
        self.write(obj.data)

    dispatch[Ref] = save_ref
    dispatch[Raw] = save_raw


def dumps(obj: Any, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    Writer(buffer, protocol).dump(obj)
    return buffer.getvalue()


def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_str(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def op_bytes(data: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def op_dtype(name: str, state: bytes) -> bytes:
    """``numpy.dtype(name, False, True)`` followed by BUILD with ``state`` (opcodes that push a tuple)."""
    return op_global("numpy", "dtype") + op_str(name) + b"\x89\x88\x87R" + state + pickle.BUILD


def op_dtype_state(
    order: str = "|", names: bytes = b"N", fields: bytes = b"N", elsize: int = -1, alignment: int = -1, flags: int = 0
) -> bytes:
    return (
        pickle.MARK
        + op_int(3)
        + op_str(order)
        + b"N"
        + names
        + fields
        + op_int(elsize)
        + op_int(alignment)
        + op_int(flags)
        + pickle.TUPLE
    )


def op_object_field_dtype() -> bytes:
    """A ``V8`` dtype whose state declares one field of dtype ``O`` with flags 0: numpy accepts it, and
    a scalar or array of it reads 8 attacker bytes as a PyObject pointer."""
    obj = op_dtype("O8", op_dtype_state(flags=63))
    fields = b"}" + op_str("a") + obj + op_int(0) + b"\x86" + b"s"
    return op_dtype("V8", op_dtype_state(names=op_str("a") + b"\x85", fields=fields, elsize=8, alignment=1))


def op_scalar(dtype_ops: bytes, data: bytes) -> bytes:
    return op_global("numpy._core.multiarray", "scalar") + dtype_ops + op_bytes(data) + b"\x86R"


def nested_tuple_bomb(levels: int) -> bytes:
    """A tuple holding the previous one twice, ``levels`` deep: 2^levels nodes in a few bytes per level."""
    ops = op_int(1)
    for i in range(levels):
        ops += pickle.LONG_BINPUT + struct.pack("<I", 1000 + i) + pickle.LONG_BINGET + struct.pack("<I", 1000 + i)
        ops += pickle.TUPLE2
    return ops


# --------------------------------------------------------------------------------------------------
# EDM-shaped snapshots of a tiny SongUNet.
# --------------------------------------------------------------------------------------------------

TINY: dict[str, Any] = dict(
    img_resolution=8,
    in_channels=1,
    out_channels=1,
    label_dim=0,
    augment_dim=0,
    model_channels=8,
    channel_mult=[1, 2],
    channel_mult_emb=2,
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
    label_dropout=0.0,
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
)


def persistent(class_name: str, state: dict[str, Any]) -> Call:
    meta = {
        "type": "class",
        "version": 6,
        "module_src": "raise SystemExit('module_src ran')",
        "class_name": class_name,
        "state": state,
    }
    return Call(Ref("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)


class Container:
    """A ``torch.nn.ModuleDict`` as pickled the ordinary way: ``copyreg.__newobj__`` + BUILD."""

    def __init__(self, modules: dict[str, Any]):
        self.modules = modules

    def __reduce__(self) -> tuple[Any, ...]:
        state = {"training": False, "_parameters": {}, "_buffers": {}, "_modules": self.modules}
        return (Ref("copyreg", "__newobj__"), (Ref("torch.nn.modules.container", "ModuleDict"),), state)


def module_state(module: nn.Module) -> dict[str, Any]:
    return {
        "training": False,
        "_parameters": OrderedDict(
            (k, None if v is None else v.detach().clone()) for k, v in module._parameters.items()
        ),
        "_buffers": OrderedDict((k, None if v is None else v.clone()) for k, v in module._buffers.items()),
        "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
        "_modules": OrderedDict((k, record(v)) for k, v in module._modules.items()),
    }


def record(module: nn.Module | None) -> Any:
    if module is None:
        return None
    if isinstance(module, nn.ModuleDict):
        return Container(OrderedDict((k, record(v)) for k, v in module.items()))
    return persistent(type(module).__name__, module_state(module))


def snapshot(
    kwargs: dict[str, Any] | None = None,
    weights_from: dict[str, Any] | None = None,
    precond: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """EDM's snapshot dict: an EDMPrecond around a SongUNet recording ``kwargs`` with the weights of
    ``SongUNet(**weights_from)`` (default: the same settings)."""
    kwargs = dict(TINY if kwargs is None else kwargs)
    torch.manual_seed(0)
    network = SongUNet(**(weights_from or kwargs))
    model_state = {**module_state(network), "_init_args": (), "_init_kwargs": kwargs, **(model or {})}
    precond_state = {
        "training": False,
        "_parameters": {},
        "_buffers": {},
        "_modules": {"model": persistent("SongUNet", model_state)},
        "img_resolution": kwargs["img_resolution"],
        "img_channels": kwargs["in_channels"],
        "label_dim": 0,
        "use_fp16": False,
        "sigma_min": 0.0,
        "sigma_max": math.inf,
        "sigma_data": 0.5,
        "_init_args": (),
        "_init_kwargs": {"img_resolution": kwargs["img_resolution"]},
        **(precond or {}),
    }
    return {"ema": persistent("EDMPrecond", precond_state), "dataset_kwargs": {"path": "cifar10.zip"}}


# --------------------------------------------------------------------------------------------------
# Timing and "nothing written".
# --------------------------------------------------------------------------------------------------


def refused(call: Callable[[], Any], error: type[BaseException], match: str | None = None) -> float:
    """Run ``call``; it must raise ``error`` (a one-line AdcmError message matching ``match``) within FAST s."""
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        call()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, message
    if isinstance(info.value, AdcmError):
        assert info.value.exit_code == 2
    print(f"[refused in {elapsed:.3f} s] {type(info.value).__name__}: {message[:150]}")
    assert elapsed < FAST, f"refusal took {elapsed:.1f} s"
    return elapsed


def files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@pytest.fixture
def pkl(tmp_path: Path) -> Callable[[Any], Path]:
    """Write an object (or raw bytes) as ``net.pkl`` in an otherwise empty directory."""

    def write(obj: Any, protocol: int = 2) -> Path:
        path = tmp_path / "in" / "net.pkl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(obj if isinstance(obj, bytes) else dumps(obj, protocol))
        return path

    return write


def load_and_check_nothing_written(path: Path, error: type[BaseException], match: str | None = None) -> float:
    before = files(path.parent)
    elapsed = refused(lambda: load_edm_pickle(path), error, match)
    assert files(path.parent) == before
    return elapsed


# --------------------------------------------------------------------------------------------------
# The EDM importer: a well-formed file first, so the refusals below mean something.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
def test_opcode_built_snapshot_loads(pkl: Callable[..., Path], protocol: int) -> None:
    edm = load_edm_pickle(pkl(snapshot(), protocol))
    assert edm.network_kwargs == TINY and edm.sigma_data == 0.5
    net = SongUNet(**edm.network_kwargs)
    net.load_state_dict({k.removeprefix("model."): v for k, v in edm.state_dict.items()}, strict=True)
    validate_network(edm.network_kwargs, edm.state_dict, edm.sigma_data)


def test_numpy_scalar_hyperparameter_reads_as_a_python_float(pkl: Callable[..., Path]) -> None:
    scalar = Raw(op_scalar(op_dtype("f8", op_dtype_state(order="<")), struct.pack("<d", 0.25)))
    edm = load_edm_pickle(pkl(snapshot(precond={"sigma_data": scalar})))
    assert edm.sigma_data == 0.25 and type(edm.sigma_data) is float


# --------------------------------------------------------------------------------------------------
# 1. Memory safety: numpy dtypes.
# --------------------------------------------------------------------------------------------------


def test_control_object_field_dtype_crashes_plain_pickle(tmp_path: Path) -> None:
    """Control: the forged dtype is live -- plain pickle + repr dereferences the attacker's bytes."""
    payload = b"\x80\x02" + op_scalar(op_object_field_dtype(), b"\x41" * 8) + pickle.STOP
    script = f"import pickle; print(repr(pickle.loads({payload!r})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    if result.returncode == 0:
        pytest.skip("this numpy refuses the forged dtype state by itself")
    assert result.returncode < 0 or result.returncode > 128  # killed by a signal (segmentation fault)


@pytest.mark.parametrize(
    ("dtype_ops", "match"),
    [
        (op_object_field_dtype(), "refusing numpy dtype 'V8'"),
        (op_dtype("O8", op_dtype_state()), "refusing numpy dtype 'O8'"),
        # an allowed name whose state declares fields, flags or another item size
        (op_dtype("f8", op_dtype_state(order="<", names=op_str("a") + b"\x85")), "refusing numpy dtype state"),
        (op_dtype("u1", op_dtype_state(flags=63)), "refusing numpy dtype state"),
        (op_dtype("f8", op_dtype_state(order="<", elsize=16)), "refusing numpy dtype state"),
    ],
    ids=["V8-with-object-field", "O8", "f8-with-names", "u1-with-flags", "f8-with-elsize-16"],
)
def test_forged_numpy_dtype_is_refused(pkl: Callable[..., Path], dtype_ops: bytes, match: str) -> None:
    scalar = Raw(op_scalar(dtype_ops, b"\x41" * 8))
    path = pkl(snapshot(precond={"sigma_data": scalar}))
    assert len(path.read_bytes()) > 500
    load_and_check_nothing_written(path, UnsafePickleError, match)


def test_the_595_byte_shape_of_the_report(pkl: Callable[..., Path]) -> None:
    """Only allow-listed globals, EDM-shaped, a few hundred bytes: the scalar sits in the top dict."""
    data = b"\x80\x02}" + op_str("ema") + op_scalar(op_object_field_dtype(), b"\x41" * 8) + b"s."
    assert len(data) < 600
    load_and_check_nothing_written(pkl(data), UnsafePickleError, "refusing numpy dtype")


def test_scalar_with_the_wrong_byte_count(pkl: Callable[..., Path]) -> None:
    scalar = Raw(op_scalar(op_dtype("f8", op_dtype_state(order="<")), b"\x00" * 3))
    load_and_check_nothing_written(pkl(snapshot(precond={"sigma_data": scalar})), PickleFormatError, "8 bytes")


def storage_call(numel: int) -> Call:
    """``torch.storage._load_from_bytes`` of a float32 storage of ``numel`` zeros (EDM's legacy payload)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(numel)._typed_storage(), buffer, _use_new_zipfile_serialization=False)
    return Call(Ref("torch.storage", "_load_from_bytes"), buffer.getvalue())


def tensor_call(storage: Call, size: tuple[int, ...], stride: tuple[int, ...], **state: Any) -> Call:
    return Call(
        Ref("torch._utils", "_rebuild_tensor_v2"),
        storage,
        0,
        size,
        stride,
        False,
        Call(Ref("collections", "OrderedDict")),
        **state,
    )


def test_build_on_a_tensor_is_refused(pkl: Callable[..., Path]) -> None:
    """``Tensor.__setstate__`` would ``set_`` a caller-given storage geometry: BUILD on a tensor is refused."""
    evil = tensor_call(storage_call(2), (2,), (1,), state=(storage_call(2), 0, (10**9,), (1,)))
    load_and_check_nothing_written(pkl({"ema": evil}), UnsafePickleError, "refusing BUILD")


def test_zero_stride_view_cannot_inflate_a_storage(pkl: Callable[..., Path]) -> None:
    """A 10^12-element view of a 1-element storage would become 4 TB once made contiguous."""
    view = tensor_call(storage_call(1), (10**6, 10**6), (0, 0))
    load_and_check_nothing_written(pkl({"ema": view}), PickleFormatError, "overlapping view")


# --------------------------------------------------------------------------------------------------
# 2. Bounded work.
# --------------------------------------------------------------------------------------------------


def test_self_referential_container(pkl: Callable[..., Path]) -> None:
    loop = Container({})
    loop.modules["self"] = loop
    data = snapshot(model={"_modules": {"enc": loop}})
    load_and_check_nothing_written(pkl(data), PickleFormatError, "occurs twice.*cycle or a shared reference")


def test_doubling_chain_of_containers(pkl: Callable[..., Path]) -> None:
    chain = Container({})
    for _ in range(30):  # 2^30 paths within the depth bound: the shared reference is what is refused
        chain = Container({"a": chain, "b": chain})
    path = pkl(snapshot(model={"_modules": {"enc": chain}}))
    assert path.stat().st_size < 100_000
    load_and_check_nothing_written(path, PickleFormatError, "cycle or a shared reference")


def test_deep_chain_of_containers(pkl: Callable[..., Path]) -> None:
    chain = Container({})
    for _ in range(60):
        chain = Container({"a": chain})
    load_and_check_nothing_written(
        pkl(snapshot(model={"_modules": {"enc": chain}})), PickleFormatError, "nested more than 32 levels"
    )


def test_doubling_list_in_the_constructor_settings(pkl: Callable[..., Path]) -> None:
    bomb: list[Any] = [1]
    for _ in range(60):
        bomb = [bomb, bomb]
    kwargs = {**TINY, "channel_mult": bomb}
    path = pkl(snapshot(kwargs=kwargs, weights_from=TINY))
    load_and_check_nothing_written(path, PickleFormatError, "channel_mult")


def test_self_referential_list_in_the_settings(pkl: Callable[..., Path]) -> None:
    loop: list[Any] = []
    loop.append(loop)
    path = pkl(snapshot(kwargs={**TINY, "attn_resolutions": loop}, weights_from=TINY))
    load_and_check_nothing_written(path, PickleFormatError, "attn_resolutions")


def test_tuple_hash_bomb(pkl: Callable[..., Path]) -> None:
    """A dict key that nests the previous tuple twice, 64 levels deep: hashing it would take 2^64 steps."""
    data = b"\x80\x02}" + nested_tuple_bomb(64) + op_int(0) + b"s."
    assert len(data) < 1000
    load_and_check_nothing_written(pkl(data), PickleFormatError, "nested items")


@pytest.mark.parametrize("index", [1 << 27, (1 << 32) - 1])
def test_memo_index_does_not_preallocate(pkl: Callable[..., Path], index: int) -> None:
    """CPython's C unpickler zero-fills its memo up to the index named (2 GB for 2^27); not here."""
    data = b"\x80\x02N" + pickle.LONG_BINPUT + struct.pack("<I", index) + b"."
    load_and_check_nothing_written(pkl(data), PickleFormatError, "holds NoneType")


def test_quadratic_calls_run_out_of_budget(pkl: Callable[..., Path]) -> None:
    """``set(big_list)`` once per 8 bytes: quadratic work without the budget."""
    items = 100_000
    ops = bytearray(b"\x80\x02" + op_global("builtins", "set") + pickle.LONG_BINPUT + struct.pack("<I", 1) + b"0")
    ops += b"]" + pickle.LONG_BINPUT + struct.pack("<I", 2) + b"(" + (pickle.BININT1 + b"\x07") * items
    ops += pickle.APPENDS + b"0" + b"]"
    for _ in range(items):
        ops += pickle.LONG_BINGET + struct.pack("<I", 1) + pickle.LONG_BINGET + struct.pack("<I", 2) + b"\x85R" + b"a"
    ops += b"."
    load_and_check_nothing_written(pkl(bytes(ops)), PickleFormatError, "more work than")


def test_huge_integer(pkl: Callable[..., Path]) -> None:
    data = b"\x80\x02" + pickle.LONG4 + struct.pack("<i", 1 << 20) + b"\x01" * (1 << 20) + b"."
    load_and_check_nothing_written(pkl(data), PickleFormatError, "integer of")


def test_embedded_storage_declaring_more_than_it_holds(pkl: Callable[..., Path]) -> None:
    buffer = io.BytesIO()
    torch.save(torch.zeros(4)._typed_storage(), buffer, _use_new_zipfile_serialization=False)
    payload = bytearray(buffer.getvalue())
    offset = payload.rindex(b"a.") + 2  # the element count before the raw data
    payload[offset : offset + 8] = struct.pack("<q", 10**12)
    storage = Call(Ref("torch.storage", "_load_from_bytes"), bytes(payload))
    tensor = Call(Ref("torch._utils", "_rebuild_tensor_v2"), storage, 0, (4,), (1,), False, OrderedDict())
    load_and_check_nothing_written(pkl({"ema": tensor}), PickleFormatError, "declares")


# --------------------------------------------------------------------------------------------------
# 3. The settings are checked against the weights before anything is returned.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"precond": {"sigma_data": float("nan")}}, "sigma_data is nan"),
        ({"precond": {"sigma_data": 0.0}}, "sigma_data is 0.0"),
        ({"precond": {"sigma_data": -0.5}}, "sigma_data is -0.5"),
        ({"precond": {"sigma_max": float("nan")}}, "sigma_max"),
        ({"kwargs": {**TINY, "model_channels": 16}}, "do not fit"),
        ({"kwargs": {**TINY, "num_blocks": 2}}, "do not fit"),
        ({"kwargs": {**TINY, "in_channels": 10**9}}, r"in_channels is 1000000000, not an integer in \[1, 256\]"),
        ({"kwargs": {**TINY, "img_resolution": 10**6}}, "img_resolution"),
        ({"kwargs": {**TINY, "img_resolution": 16}}, "do not fit"),
        ({"kwargs": {**TINY, "model_channels": 2**40}}, "model_channels"),
        ({"kwargs": {**TINY, "channel_mult": [1] * 40}}, "channel_mult"),
        ({"kwargs": {**TINY, "dropout": float("nan")}}, "dropout is nan"),
        ({"kwargs": {**TINY, "dropout": 1.5}}, "dropout is 1.5"),
        ({"kwargs": {**TINY, "resample_filter": [0, 0]}}, "resample_filter"),
        ({"kwargs": {**TINY, "label_dim": "ten"}}, "label_dim"),
        ({"kwargs": {**TINY, "img_resolution": 7}}, "divisible"),
        ({"kwargs": {**TINY, "model_channels": 48}}, "144 channels do not split"),  # fails in GroupNorm at run time
    ],
)
def test_settings_that_do_not_fit_are_refused(pkl: Callable[..., Path], change: dict[str, Any], match: str) -> None:
    data = snapshot(kwargs=change.get("kwargs"), weights_from=TINY, precond=change.get("precond"))
    load_and_check_nothing_written(pkl(data), PickleFormatError, match)


def _tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"model.{k}": v for k, v in SongUNet(**TINY).state_dict().items()}


def test_validate_network_accepts_a_matching_network() -> None:
    validate_network(TINY, _tiny_weights(), 0.5)
    validate_network({**TINY, "adaptive_double_norm": False}, _tiny_weights(), 0.5)


@pytest.mark.parametrize(
    ("kwargs", "edit", "sigma", "match"),
    [
        (TINY, None, float("nan"), "sigma_data"),
        (TINY, None, True, "sigma_data"),
        ({**TINY, "bogus": 1}, None, 0.5, "unknown SongUNet settings"),
        ({k: v for k, v in TINY.items() if k != "img_resolution"}, None, 0.5, "missing SongUNet settings"),
        (TINY, "drop", 0.5, "1 missing"),
        (TINY, "extra", 0.5, "1 unexpected"),
        (TINY, "shape", 0.5, "wrong shape"),
        (TINY, "nan", 0.5, "NaN or infinite"),
        (TINY, "int", 0.5, "not floating-point"),
        (TINY, "alias", 0.5, "repeat or overlap"),
    ],
)
def test_validate_network_refuses(kwargs: dict[str, Any], edit: str | None, sigma: Any, match: str) -> None:
    weights = _tiny_weights()
    name = "model.map_layer0.weight"
    if edit == "drop":
        del weights[name]
    elif edit == "extra":
        weights["model.extra"] = torch.zeros(1)
    elif edit == "shape":
        weights[name] = torch.zeros(3, 3)
    elif edit == "nan":
        weights[name] = weights[name].clone().fill_(float("nan"))
    elif edit == "int":
        weights[name] = weights[name].to(torch.int64)
    elif edit == "alias":  # two weights viewing the same memory: more tensor bytes than storage bytes
        other = "model.map_layer1.weight"
        big = torch.zeros(max(weights[name].numel(), weights[other].numel()))
        weights[name] = big[: weights[name].numel()].view(weights[name].shape)
        weights[other] = big[: weights[other].numel()].view(weights[other].shape)
    refused(lambda: validate_network(kwargs, weights, sigma), PickleFormatError, match)


# --------------------------------------------------------------------------------------------------
# The CIFAR-10 reader's unpickler.
# --------------------------------------------------------------------------------------------------


def _cifar_archive(path: Path, batch: bytes) -> Path:
    meta = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("test_batch", batch), ("batches.meta", meta)):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def op_array(dtype_ops: bytes, shape: tuple[int, ...], raw: bytes) -> bytes:
    """numpy's ndarray pickle: ``_reconstruct(ndarray, (0,), b'b')`` + BUILD (1, shape, dtype, False, raw)."""
    head = (
        op_global("numpy.core.multiarray", "_reconstruct")
        + op_global("numpy", "ndarray")
        + op_int(0)
        + b"\x85"
        + op_bytes(b"b")
        + b"\x87R"
    )
    shape_ops = b"(" + b"".join(op_int(n) for n in shape) + b"t"
    return head + b"(" + op_int(1) + shape_ops + dtype_ops + b"\x89" + op_bytes(raw) + b"tb"


def _batch(data_ops: bytes, labels_ops: bytes = b"]" + op_int(0) + b"a") -> bytes:
    return b"\x80\x02}(" + op_bytes(b"data") + data_ops + op_bytes(b"labels") + labels_ops + b"u."


def test_cifar_opcode_built_batch_reads(tmp_path: Path) -> None:
    ops = op_array(op_dtype("u1", op_dtype_state()), (1, 3072), bytes(range(256)) * 12)
    dataset = read_cifar10(_cifar_archive(tmp_path / "c.tar.gz", _batch(ops)), "test")
    assert dataset.images.shape == (1, 3, 32, 32) and dataset.images[0, 0, 0, 5] == 5


@pytest.mark.parametrize(
    ("data_ops", "match"),
    [
        (op_array(op_object_field_dtype(), (1, 1), b"\x41" * 8), "refusing numpy dtype 'V8'"),
        (op_array(op_dtype("O8", op_dtype_state()), (1, 1), b"\x41" * 8), "refusing numpy dtype 'O8'"),
        (op_array(op_dtype("u1", op_dtype_state(flags=63)), (1, 3072), b"\0" * 3072), "refusing numpy dtype state"),
        (op_array(op_dtype("u1", op_dtype_state()), (10**9, 3072), b"\0" * 3072), "needs 3072000000000 bytes"),
        (op_global("numpy", "ndarray") + b"(" + op_int(10**9) + b"tR", "cannot unpickle"),
    ],
    ids=["V8-with-object-field", "O8", "u1-with-flags", "billion-rows-3072-bytes", "call-ndarray"],
)
def test_cifar_forged_arrays_are_refused(tmp_path: Path, data_ops: bytes, match: str) -> None:
    archive = _cifar_archive(tmp_path / "c.tar.gz", _batch(data_ops))
    before = files(tmp_path)
    refused(lambda: read_cifar10(archive, "test"), DatasetError, match)
    assert files(tmp_path) == before


def test_cifar_doubling_labels_list(tmp_path: Path) -> None:
    """``np.asarray`` of a list holding the previous one twice, 40 levels deep, would build 2^40 items."""
    bomb: list[Any] = [0]
    for _ in range(40):
        bomb = [bomb, bomb]
    labels_ops = pickle.dumps(bomb, protocol=2)[2:-1]
    ops = op_array(op_dtype("u1", op_dtype_state()), (1, 3072), b"\0" * 3072)
    archive = _cifar_archive(tmp_path / "c.tar.gz", _batch(ops, labels_ops))
    refused(lambda: read_cifar10(archive, "test"), DatasetError, "b'labels' must be 1 integers")


@pytest.mark.parametrize("kind", ["tuple_bomb", "memo"])
def test_cifar_unpickler_bounds(tmp_path: Path, kind: str) -> None:
    if kind == "tuple_bomb":
        batch = b"\x80\x02}" + nested_tuple_bomb(64) + op_int(0) + b"s."
        match = "nested items"
    else:
        batch = b"\x80\x02N" + pickle.LONG_BINPUT + struct.pack("<I", 1 << 27) + b"."
        match = "expected a pickled dict"
    refused(lambda: read_cifar10(_cifar_archive(tmp_path / "c.tar.gz", batch), "test"), DatasetError, match)


def test_cifar_empty_split(tmp_path: Path) -> None:
    ops = op_array(op_dtype("u1", op_dtype_state()), (0, 3072), b"")
    archive = _cifar_archive(tmp_path / "c.tar.gz", _batch(ops, b"]"))
    refused(lambda: read_cifar10(archive, "test"), DatasetError, "no images")


def test_cifar_member_declaring_more_than_the_archive_holds(tmp_path: Path) -> None:
    info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
    info.size = 10**12
    archive = tmp_path / "c.tar.gz"
    archive.write_bytes(gzip.compress(info.tobuf() + b"\0" * 512))
    refused(lambda: read_cifar10(archive, "test"), DatasetError, "more data than an archive of its size")


# --------------------------------------------------------------------------------------------------
# IDX files and the prepared .npz: header sizes against file sizes; empty datasets.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("dims", "match"),
    [
        ((10**9, 28, 28), "truncated IDX data|more than a compressed file"),
        ((1 << 22, 1 << 22, 1 << 20), "truncated IDX data|more than a compressed file"),  # 2^64: wraps in int64
    ],
)
def test_idx_header_claiming_more_than_the_file(tmp_path: Path, gz: bool, dims: tuple[int, ...], match: str) -> None:
    payload = struct.pack(">IIII", 0x803, *dims) + b"\0" * 784
    path = tmp_path / ("images.gz" if gz else "images")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    refused(lambda: read_idx(path, 0x803), DatasetError, match)


def test_idx_gzip_bomb_after_the_declared_data(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 1, 28, 28) + b"\0" * (20 << 20)))
    refused(lambda: read_idx(path, 0x803), DatasetError, "longer than declared")


def test_fashion_mnist_without_images(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 0, 28, 28))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 0))
    refused(lambda: read_fashion_mnist(tmp_path, "train"), DatasetError, "no images")


def _rewrite_npz(path: Path, key: str, header_shape: tuple[int, ...], data: bytes) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": header_shape})
    members[f"{key}.npy"] = header.getvalue() + data  # the header writer includes the magic string
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)


@pytest.mark.parametrize("shape", [(10**9, 3, 32, 32), (10**9, 3, 8, 8)])
def test_prepared_header_claiming_a_billion_images(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "dataset.npz"
    images = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    write_prepared(ImageDataset(images, None, "x", None), path, tmp_path / "dataset.json")
    _rewrite_npz(path, "images", shape, images.tobytes())
    before = files(tmp_path)
    refused(lambda: load_prepared(path), DatasetError, "declares shape")
    assert files(tmp_path) == before


def test_prepared_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "dataset.npz"
    write_prepared(ImageDataset(np.zeros((0, 3, 8, 8), dtype=np.uint8), None, "x", None), path, tmp_path / "d.json")
    refused(lambda: load_prepared(path), DatasetError, "no images")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` RGB pixels and holds none of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("size", "match"), [(8000, "declare more pixels"), (100_000, "not a readable")])
def test_image_folder_headers_claiming_huge_images(tmp_path: Path, size: int, match: str) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png_header_only(size, size))
    refused(lambda: read_image_folder(tmp_path, labels=False), DatasetError, match)


# --------------------------------------------------------------------------------------------------
# Params files.
# --------------------------------------------------------------------------------------------------


def _alias_bomb(levels: int, width: int = 10) -> str:
    """A flow list whose last item stands for ``width ** levels`` values, each level ``width`` aliases."""
    items = ["&a0 [" + ", ".join(["1"] * width) + "]"]
    for i in range(1, levels):
        items.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "[" + ", ".join(items) + "]"


def _params_text(**replace: str) -> str:
    lines = (ROOT / "params.yaml").read_text().splitlines()
    for key, value in replace.items():
        lines = [f"{key}: {value}" if line.startswith(f"{key}:") else line for line in lines]
    return "\n".join(lines) + "\n"


def test_params_alias_bomb_inside_a_real_key(tmp_path: Path) -> None:
    """``seed`` standing for 10^9 values: the old loader spent 46 s and 2.8 GB formatting them."""
    path = tmp_path / "params.yaml"
    path.write_text(_params_text(seed=_alias_bomb(levels=9)))
    assert path.stat().st_size < 10_000
    refused(lambda: load_params(path), ParamsError, "expands to more than")
    refused(lambda: load_study(path), ParamsError, "expands to more than")


def test_params_small_alias_tree_in_a_key_prints_a_short_value(tmp_path: Path) -> None:
    """Below the expansion bound (10^4 values), the error names the key and prints a bounded repr."""
    path = tmp_path / "params.yaml"
    path.write_text(_params_text(seed=_alias_bomb(levels=4)))
    message_length = 0

    def load() -> None:
        nonlocal message_length
        try:
            load_params(path)
        except ParamsError as exc:
            message_length = len(str(exc))
            raise

    refused(load, ParamsError, r"seed: expected an integer")
    assert message_length < 300


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: &a [*a]\n", "alias inside its own anchor"),
        ("[" * 500 + "]" * 500 + "\n", "nested more than 64"),
        ("seed: " + "9" * 5000 + "\n", "not valid YAML"),
    ],
)
def test_params_broken_yaml(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    refused(lambda: load_params(path), ParamsError, match)
    refused(lambda: load_study(path), ParamsError, match)


def test_params_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(_params_text().encode("utf-8").replace(b"seed:", b"se\xffed:", 1))
    refused(lambda: load_params(path), ParamsError, r"not UTF-8 text \(byte 0xff at offset")
    refused(lambda: load_study(path), ParamsError, "not UTF-8 text")


def test_params_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(_params_text() + "#" * (2 << 20) + "\n")
    refused(lambda: load_params(path), ParamsError, "larger than")


def test_override_alias_bomb(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(_params_text())
    bomb = "[" + ", ".join(["&b [" + ", ".join(["1"] * 10) + "]"] + ["*b"] * 9) + "]"
    load_params(path, [f"train.batch_size={yaml.safe_dump(7).strip()}"])
    refused(lambda: load_params(path, [f"seed={bomb}"]), ParamsError, r"seed: expected an integer")
    refused(lambda: load_params(path, [f"seed={_alias_bomb(levels=9)}"]), ParamsError, "not valid YAML")


# --------------------------------------------------------------------------------------------------
# Downloads cut short.
# --------------------------------------------------------------------------------------------------


def _serve_once(response: bytes) -> str:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def run() -> None:
        try:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(response)
        finally:
            server.close()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/edm.pkl"


@pytest.mark.parametrize(
    ("response", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n" + b"x" * 10, "IncompleteRead"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10, "received 10 of the 1000 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "download failed"),
    ],
)
def test_download_cut_mid_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, response: bytes, match: str) -> None:
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "*")
    assert issubclass(http.client.IncompleteRead, http.client.HTTPException)
    dest = tmp_path / "out" / "edm.pkl"
    refused(lambda: download(_serve_once(response), dest, "0" * 64, show_progress=False), DownloadError, match)
    assert not dest.exists()
    assert not dest.parent.exists() or not any(dest.parent.iterdir())


# --------------------------------------------------------------------------------------------------
# Teacher files.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def teacher_payload(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "teacher.pt"
    save_teacher(path, TeacherFile(network_kwargs=dict(TINY), sigma_data=0.5, state_dict=_tiny_weights(), meta={}))
    payload: dict[str, Any] = torch.load(path, weights_only=True)
    assert load_teacher(path).sigma_data == 0.5
    return payload


@pytest.mark.parametrize("key", ["network_kwargs", "sigma_data", "state_dict", "meta", "process", "source"])
def test_teacher_file_missing_an_entry(tmp_path: Path, teacher_payload: dict[str, Any], key: str) -> None:
    path = tmp_path / "broken.pt"
    torch.save({k: v for k, v in teacher_payload.items() if k != key}, path)
    refused(lambda: load_teacher(path), CheckpointError, f"without the entry '{key}'")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("sigma_data", float("nan"), "'sigma_data' is nan"),
        ("sigma_data", "half", "'sigma_data' is 'half', not a number"),
        ("network_kwargs", [1, 2], "'network_kwargs' is"),
        ("state_dict", {"w": 3}, "not a named tensor"),
        ("process", "vp", "'process' is 'vp'"),
        ("meta", None, "'meta' is None"),
    ],
)
def test_teacher_file_entry_of_the_wrong_type(
    tmp_path: Path, teacher_payload: dict[str, Any], key: str, value: Any, match: str
) -> None:
    path = tmp_path / "broken.pt"
    torch.save({**teacher_payload, key: value}, path)
    refused(lambda: load_teacher(path), CheckpointError, match)


def test_teacher_file_tuple_hash_bomb(tmp_path: Path, teacher_payload: dict[str, Any]) -> None:
    """``torch.load(weights_only=True)`` allows tuple keys: 64 nested levels would hash for ages."""
    good = tmp_path / "good.pt"
    torch.save({"format": "adcm-teacher/1"}, good)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = b"\x80\x02}" + nested_tuple_bomb(64) + op_int(0) + b"s."
            target.writestr(info.filename, data)
    refused(lambda: load_teacher(path), CheckpointError, "nested items")


def test_teacher_file_in_the_legacy_format(tmp_path: Path, teacher_payload: dict[str, Any]) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(teacher_payload, path, _use_new_zipfile_serialization=False)
    refused(lambda: load_teacher(path), CheckpointError, "not a torch.save zip archive")
