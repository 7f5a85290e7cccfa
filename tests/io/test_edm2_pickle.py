"""The safe EDM2 pickle importer, on snapshots written in EDM2's persistence format without EDM2's code.

EDM2 pickles its networks with EDM's ``torch_utils.persistence``: every ``training.networks_edm2`` object
(``Precond``, ``UNet``, ``Block``, ``MPConv``, ``MPFourier``) is reduced to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type: 'class', version: 6,
module_src, class_name, state: obj.__dict__}``; ``unet.enc`` / ``unet.dec`` are plain ``ModuleDict``s; the
top level is a ``dnnlib.util.EasyDict`` with ``encoder``, ``dataset_kwargs``, ``loss_fn`` and ``ema`` (the
network cast to float16). The tests install stand-in ``torch_utils.persistence`` and ``dnnlib.util``
modules only while *writing* such pickles from this project's EDM2 network, put source code with a visible
side effect into ``module_src``, and check that importing never runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_params, write_params
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from adcm.config import TeacherConfig, load_params
from adcm.errors import AdcmError, PickleFormatError, UnsafePickleError
from adcm.io.edm2_pickle import load_edm2_pickle
from adcm.io.edm_pickle import load_edm_pickle
from adcm.io.model_files import load_teacher, save_teacher
from adcm.io.teacher_import import import_teacher, teacher_from_pickle
from adcm.nets.edm2 import EDM2Precond
from adcm.stages.cli import app

DATA = Path(__file__).resolve().parents[1] / "data"

TINY: dict[str, Any] = {
    "img_resolution": 8,
    "img_channels": 3,
    "label_dim": 5,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
    "channels_per_head": 8,
    "logvar_channels": 8,
    "dropout": 0.0,
    "use_fp16": True,
}
"""A tiny EDM2 network (EDM2Precond kwargs as EDM2's persistence would record them); 2 heads at 4×4."""


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Writing pickles in EDM2's format.
# --------------------------------------------------------------------------------------------


def module_source(sentinel: Path) -> str:
    """Stand-in for networks_edm2.py: defines the classes, but executing it leaves ``sentinel`` and fails."""
    return (
        "import pathlib\n"
        f"pathlib.Path({str(sentinel)!r}).write_text('module_src was executed')\n"
        "raise RuntimeError('module_src was executed')\n"
        "class MPFourier(torch.nn.Module):\n    pass\n"
        "class MPConv(torch.nn.Module):\n    pass\n"
        "class Block(torch.nn.Module):\n    pass\n"
        "class UNet(torch.nn.Module):\n    pass\n"
        "class Precond(torch.nn.Module):\n    pass\n"
    )


class _EasyDict(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _executing_reconstruct(meta: dict[str, Any]) -> Any:
    """What EDM2's loader does with ``meta``: execute ``module_src`` (the control test only)."""
    exec(compile(meta["module_src"], "<module_src>", "exec"), {})
    raise AssertionError("module_src should have raised")


@contextlib.contextmanager
def fake_modules() -> Iterator[None]:
    """``torch_utils.persistence`` and ``dnnlib.util`` in sys.modules for the duration (for pickling)."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    persistence, util = modules["torch_utils.persistence"], modules["dnnlib.util"]
    modules["torch_utils"].persistence = persistence  # type: ignore[attr-defined]
    modules["dnnlib"].util = util  # type: ignore[attr-defined]

    def func(meta: dict[str, Any]) -> Any:
        return _executing_reconstruct(meta)

    func.__module__, func.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = func  # type: ignore[attr-defined]
    util.EasyDict = type("EasyDict", (_EasyDict,), {"__module__": "dnnlib.util", "__qualname__": "EasyDict"})  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Persistent:
    """Pickles exactly like an instance of an EDM/EDM2 ``@persistence.persistent_class``."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self) -> tuple[Any, ...]:
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None)


_OFFICIAL_NAMES = {"EDM2Precond": "Precond", "EDM2UNet": "UNet"}


def persist(module: nn.Module, src: str, dtype: torch.dtype, init_kwargs: dict[str, Any] | None = None) -> Any:
    """``module`` (our EDM2 classes) as EDM2's pickle records it, children recursively, tensors in ``dtype``."""
    if isinstance(module, nn.ModuleDict):  # a plain torch container, pickled the ordinary way
        container = nn.ModuleDict()
        container.__dict__["_modules"] = OrderedDict((k, persist(v, src, dtype)) for k, v in module.items())
        container.__dict__["training"] = False
        return container
    state = {k: v for k, v in module.__dict__.items() if k != "force_normalization"}  # ours, not EDM2's
    state["_parameters"] = OrderedDict(
        (k, nn.Parameter(v.detach().to(dtype).clone(), requires_grad=False)) for k, v in module._parameters.items()
    )
    state["_buffers"] = OrderedDict((k, v.to(dtype).clone()) for k, v in module._buffers.items())
    state["_modules"] = OrderedDict((k, persist(v, src, dtype)) for k, v in module._modules.items())
    state["training"] = False
    state["_init_args"], state["_init_kwargs"] = (), dict(init_kwargs or {})
    name = type(module).__name__
    return Persistent(_OFFICIAL_NAMES.get(name, name), state, src)


def edm2_snapshot(
    src: str, config: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None, dtype: Any = None
) -> tuple[dict[str, Any], EDM2Precond]:
    """EDM2's snapshot dict for a network of ``config`` (weights ``state`` or random), and that network with
    the weights as stored (rounded to ``dtype``, float16 by default, then float32)."""
    config = dict(TINY if config is None else config)
    dtype = torch.float16 if dtype is None else dtype
    torch.manual_seed(0)
    net = EDM2Precond(**config)
    if state is not None:
        net.load_state_dict(state, strict=True)
    else:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape))
    ema = persist(net, src, dtype, init_kwargs=config)
    easy = sys.modules["dnnlib.util"].EasyDict
    snapshot = easy(
        encoder=Persistent("StandardRGBEncoder", {"_init_args": (), "_init_kwargs": {}}, src),
        dataset_kwargs=easy(class_name="training.dataset.ImageFolderDataset", path="img64.zip", use_labels=True),
        loss_fn=Persistent("EDM2Loss", {"P_mean": -0.8, "P_std": 1.6, "sigma_data": 0.5}, src),
        ema=ema,
    )
    ours = EDM2Precond(**config)
    ours.load_state_dict({k: v.to(dtype).float() for k, v in net.state_dict().items()}, strict=True)
    return snapshot, ours.eval()


def write(path: Path, obj: Any, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "code from the pickle was executed"


def make(tmp_path: Path, sentinel: Path, edit: Callable[[dict[str, Any]], None] | None = None, **kw: Any) -> Path:
    """Write a (possibly edited) tiny EDM2 snapshot and return its path."""
    with fake_modules():
        snapshot, _ = edm2_snapshot(module_source(sentinel), **kw)
        if edit is not None:
            edit(snapshot)
        return write(tmp_path / "edm2-snapshot.pkl", snapshot)


def refused(call: Callable[[], Any], error: type[BaseException], match: str) -> str:
    """``call`` raises ``error`` with a one-line message matching ``match``, within 5 s."""
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, message
    assert isinstance(info.value, AdcmError) and info.value.exit_code == 2
    assert time.perf_counter() - start < 5
    return message


def unet(snapshot: dict[str, Any]) -> Persistent:
    return snapshot["ema"].state["_modules"]["unet"]


def block(snapshot: dict[str, Any], name: str = "enc.4x4_block0") -> Persistent:
    where, key = name.split(".")
    return unet(snapshot).state["_modules"][where]._modules[key]


def inputs(config: dict[str, Any], n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    res, ch, k = config["img_resolution"], config["img_channels"], config["label_dim"]
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0][:n])
    x = torch.randn(n, ch, res, res, generator=gen) * sigma.reshape(-1, 1, 1, 1)
    labels = nn.functional.one_hot(torch.arange(n) % max(k, 1), max(k, 1)).float()
    return x, sigma, labels


# --------------------------------------------------------------------------------------------
# Reading well-formed snapshots.
# --------------------------------------------------------------------------------------------


def test_harness_module_src_runs_under_plain_pickle(tmp_path: Path, sentinel: Path) -> None:
    """Control: EDM2's own loading (pickle.load) executes module_src, so the sentinel check means something."""
    path = make(tmp_path, sentinel)
    with fake_modules(), pytest.raises(RuntimeError, match="module_src was executed"):
        pickle.loads(path.read_bytes())
    assert sentinel.exists()
    sentinel.unlink()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_float16_snapshot_matches_the_network_output_for_output(tmp_path: Path, sentinel: Path, protocol: int) -> None:
    with fake_modules():
        snapshot, ours = edm2_snapshot(module_source(sentinel))
        path = write(tmp_path / "edm2.pkl", snapshot, protocol)
    assert "torch_utils.persistence" not in sys.modules  # the importer needs none of EDM2's modules
    edm2 = load_edm2_pickle(path)
    assert edm2.precond_class == "Precond" and edm2.stored_dtype == "float16" and edm2.sigma_data == 0.5
    assert edm2.network_kwargs["model_channels"] == 8 and edm2.network_kwargs["channel_mult"] == [1, 2]
    assert "sigma_data" not in edm2.network_kwargs and edm2.network_kwargs["clip_act"] == 256
    assert list(edm2.state_dict) == list(ours.state_dict())  # EDM2's names, in its order
    for name, tensor in edm2.state_dict.items():
        assert tensor.dtype == torch.float32 and not tensor.requires_grad, name
        assert torch.equal(tensor, ours.state_dict()[name]), name
    # The teacher file: EDM2Backbone in the VE wrapper (ε = 0) is EDM2's denoiser D(x, σ).
    teacher = teacher_from_pickle(path)
    assert teacher.network == "edm2" and teacher.process == "ve" and teacher.label_dim == 5
    assert teacher.image_shape == (3, 8, 8)
    assert all(name.startswith("model.") for name in teacher.state_dict)
    assert teacher.meta["stored_dtype"] == "float16" and len(teacher.meta["module_src_sha256"]) == 64
    x, sigma, labels = inputs(TINY)
    with torch.no_grad():
        got = teacher.denoiser()(x, sigma, labels)
        want = ours(x, sigma, labels)
    assert (got - want).abs().max().item() < 1e-5  # measured 0; other labels move it by 8e-3


def test_reference_network_through_a_float32_snapshot(tmp_path: Path, sentinel: Path) -> None:
    """EDM2's own tiny reference network (tests/data/edm2-tiny.npz) survives the snapshot and the import."""
    ref = np.load(DATA / "edm2-tiny.npz")
    config = json.loads(str(ref["config_json"]))
    state = {k[len("state/") :]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("state/")}
    path = make(tmp_path, sentinel, config=config, state=state, dtype=torch.float32)
    teacher = teacher_from_pickle(path)
    assert teacher.meta["stored_dtype"] == "float32"
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "class_labels"))
    with torch.no_grad():
        got = teacher.denoiser()(x, sigma, labels)
    assert (got - torch.from_numpy(ref["D_x"])).abs().max().item() < 1e-5  # EDM2's own output


def test_import_teacher_writes_a_loadable_edm2_teacher(tmp_path: Path, sentinel: Path) -> None:
    path = make(tmp_path, sentinel)
    cfg = dataclasses.replace(_repo_teacher_config(), source="file", file=str(path), sha256=None)
    teacher = import_teacher(cfg, show_progress=False)
    save_teacher(tmp_path / "teacher.pt", teacher)
    loaded = load_teacher(tmp_path / "teacher.pt")
    assert loaded.network == "edm2" and loaded.network_kwargs == teacher.network_kwargs
    assert loaded.meta["pickle"] == path.name and loaded.meta["precond_class"] == "training.networks_edm2.Precond"
    x, sigma, labels = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(loaded.denoiser()(x, sigma, labels), teacher.denoiser()(x, sigma, labels))


def test_teacher_stage_imports_an_edm2_snapshot(tmp_path: Path, sentinel: Path) -> None:
    path = make(tmp_path, sentinel)
    data = tiny_params({"teacher.source": "file", "teacher.file": str(path), "teacher.sha256": None})
    params = write_params(tmp_path / "params.yaml", data)
    out = tmp_path / "teacher.pt"
    args = ["teacher", "--params", str(params), "--out", str(out), "--grid", str(tmp_path / "grid.png")]
    args += [
        "--metrics",
        str(tmp_path / "t.json"),
        "--checkpoint-dir",
        str(tmp_path / "c"),
        "--log-dir",
        str(tmp_path / "l"),
    ]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert load_teacher(out).network == "edm2"
    assert json.loads((tmp_path / "t.json").read_text())["network"] == "edm2"
    assert Image.open(tmp_path / "grid.png").size == (16, 16)  # 2 × 2 images of 8 × 8: rows of class 0 and 1


def _repo_teacher_config() -> TeacherConfig:
    return load_params(Path(__file__).resolve().parents[2] / "params.yaml", ()).teacher


def test_unconditional_snapshot(tmp_path: Path, sentinel: Path) -> None:
    path = make(tmp_path, sentinel, config={**TINY, "label_dim": 0})
    teacher = teacher_from_pickle(path)
    assert teacher.label_dim == 0 and not any("emb_label" in name for name in teacher.state_dict)


def test_module_src_is_only_recognised(tmp_path: Path, sentinel: Path) -> None:
    """The source is text: it must define the recorded class, and nothing in it ever runs."""

    def drop_block_class(snapshot: dict[str, Any]) -> None:
        block(snapshot).module_src = module_source(sentinel).replace("class Block", "class Other")

    path = make(tmp_path, sentinel, edit=drop_block_class)
    refused(lambda: load_edm2_pickle(path), PickleFormatError, r"enc\.4x4_block0: the recorded module source does not")


def test_the_edm_importer_points_edm2_snapshots_to_the_teacher_import(tmp_path: Path, sentinel: Path) -> None:
    path = make(tmp_path, sentinel)
    refused(lambda: load_edm_pickle(path), PickleFormatError, r"is a Precond; only EDMPrecond .*EDM2 network")


# --------------------------------------------------------------------------------------------
# Refusing code.
# --------------------------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func: Any, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


@pytest.mark.parametrize("where", ["top", "block_state", "parameters"])
@pytest.mark.parametrize(
    ("payload", "name"),
    [
        (lambda s: _Reduce(os.system, f"touch {s}"), "posix.system"),
        (lambda s: _Reduce(eval, f"__import__('os').system('touch {s}')"), "builtins.eval"),
        (lambda s: _Reduce(subprocess.Popen, ["touch", str(s)]), "subprocess.Popen"),
    ],
)
def test_refuses_code(tmp_path: Path, sentinel: Path, where: str, payload: Any, name: str) -> None:
    def inject(snapshot: dict[str, Any]) -> None:
        evil = payload(sentinel)
        if where == "top":
            snapshot["dataset_kwargs"]["evil"] = evil
        elif where == "block_state":
            block(snapshot).state["evil"] = evil
        else:
            block(snapshot).state["_parameters"]["evil"] = evil

    path = make(tmp_path, sentinel, edit=inject)
    refused(lambda: teacher_from_pickle(path), UnsafePickleError, rf"refusing to load global '{name}'")


def test_refuses_code_inside_storage_bytes(tmp_path: Path, sentinel: Path) -> None:
    buf = io.BytesIO()
    torch.save(_Reduce(os.system, f"touch {sentinel}"), buf, _use_new_zipfile_serialization=False)

    def inject(snapshot: dict[str, Any]) -> None:
        block(snapshot).state["_parameters"]["evil"] = _Reduce(torch.storage._load_from_bytes, buf.getvalue())

    path = make(tmp_path, sentinel, edit=inject)
    refused(lambda: load_edm2_pickle(path), UnsafePickleError, "weights_only=True")


# --------------------------------------------------------------------------------------------
# Refusing what is not EDM2's network, or asks for too much.
# --------------------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting ``value`` at ``path``: ``precond.<attr>``, ``init.<kwarg>``, ``block.<attr>``, ``unet``."""

    def edit(snapshot: dict[str, Any]) -> None:
        kind, _, key = path.partition(".")
        if kind == "precond":
            snapshot["ema"].state[key] = value
        elif kind == "init":
            snapshot["ema"].state["_init_kwargs"][key] = value
        elif kind == "block":
            block(snapshot).state[key] = value
        elif kind == "class":
            target = {"precond": snapshot["ema"], "unet": unet(snapshot), "block": block(snapshot)}[key]
            target.class_name = value
        elif kind == "encoder":
            snapshot["encoder"].class_name = value
        elif kind == "drop":
            del snapshot[key]

    return edit


def _both(*edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(snapshot: dict[str, Any]) -> None:
        for e in edits:
            e(snapshot)

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (_set("class.precond", "EDMPrecond"), PickleFormatError, "EDMPrecond has no persistent 'model' child"),
        (_set("class.precond", "VPPrecond"), PickleFormatError, "is a VPPrecond; only EDMPrecond"),
        (_set("class.unet", "SongUNet"), PickleFormatError, "'unet' is 'SongUNet', not EDM2's UNet"),
        (_set("class.block", "Attention"), PickleFormatError, "enc.4x4_block0 is a 'Attention', where EDM2's"),
        (_set("block.num_heads", 1), PickleFormatError, r"num_heads is 1 in the pickle, but its settings build 2"),
        (_set("block.clip_act", 8), PickleFormatError, r"clip_act is 8 in the pickle"),
        (_both(_set("init.sigma_data", 0.5), _set("precond.sigma_data", 0.6)), PickleFormatError, "sigma_data=0.6"),
        (_set("init.bogus", 1), PickleFormatError, r"unknown EDM2 settings 'bogus' \(expected some of img_"),
        (_set("init.img_resolution", 1 << 40), PickleFormatError, r"img_resolution is 1099511627776, not an integer"),
        (_set("init.model_channels", 4096), PickleFormatError, "the weights do not fit the network"),
        (_set("init.channels_per_head", 4), PickleFormatError, r"num_heads is 2 in the pickle, but .* build 4"),
        (_set("init.channel_mult", [1] * 16), PickleFormatError, "not divisible by 2"),
        (_set("init.num_blocks", 64), PickleFormatError, "more than .* weight tensors can hold"),
        (_set("init.dropout", float("nan")), PickleFormatError, "dropout is nan, not a probability"),
        (_set("init.channel_mult", [[1]] * 2), PickleFormatError, "not a number or a short string"),
        (_set("encoder.x", "StabilityVAEEncoder"), PickleFormatError, "latent-space model"),
        (_set("drop.ema", None), PickleFormatError, r"no 'ema' entry \(keys: \['dataset_kwargs', 'encoder'"),
    ],
)
def test_refuses_what_is_not_edm2s_network(
    tmp_path: Path, sentinel: Path, edit: Callable[[dict[str, Any]], None], error: type[BaseException], match: str
) -> None:
    path = make(tmp_path, sentinel, edit=edit)
    refused(lambda: teacher_from_pickle(path), error, match)


def test_oversized_tensor_view_is_refused(tmp_path: Path, sentinel: Path) -> None:
    class Overlong:
        def __reduce__(self) -> tuple[Any, ...]:
            return (
                torch._utils._rebuild_tensor_v2,
                (torch.zeros(4, dtype=torch.float16)._typed_storage(), 0, (1 << 20, 1 << 20), (0, 0), False, {}),
            )

    def inject(snapshot: dict[str, Any]) -> None:
        block(snapshot).state["_parameters"]["emb_gain"] = Overlong()

    path = make(tmp_path, sentinel, edit=inject)
    refused(lambda: load_edm2_pickle(path), PickleFormatError, "more elements than its storage holds")


def test_storage_declaring_more_than_it_holds_is_refused(tmp_path: Path, sentinel: Path) -> None:
    buf = io.BytesIO()
    torch.save(torch.zeros(3, dtype=torch.float16)._typed_storage(), buf, _use_new_zipfile_serialization=False)
    payload = buf.getvalue()
    # Declare 2^40 elements in the payload's size header (the 8 bytes before the 6 data bytes).
    forged = payload[:-14] + (1 << 40).to_bytes(8, "little") + payload[-6:]

    def inject(snapshot: dict[str, Any]) -> None:
        block(snapshot).state["_parameters"]["evil"] = _Reduce(torch.storage._load_from_bytes, forged)

    path = make(tmp_path, sentinel, edit=inject)
    refused(lambda: load_edm2_pickle(path), PickleFormatError, "declares")


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.999])
def test_truncated_file(tmp_path: Path, sentinel: Path, fraction: float) -> None:
    data = make(tmp_path, sentinel).read_bytes()
    path = tmp_path / "truncated.pkl"
    path.write_bytes(data[: int(len(data) * fraction)])
    refused(lambda: teacher_from_pickle(path), PickleFormatError, r"truncated\.pkl: not a readable pickle \(truncated")


def test_handwritten_os_system(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(sentinel).encode() + b"'\ntR.")
    refused(lambda: teacher_from_pickle(path), UnsafePickleError, "refusing to load global 'os.system'")
