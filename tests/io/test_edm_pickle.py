"""The safe EDM pickle importer, on pickles written in EDM's persistence format without EDM's code.

EDM's ``torch_utils.persistence`` reduces every decorated object to
``(torch_utils.persistence._reconstruct_persistent_obj, (meta,), None)`` with
``meta = {type: 'class', version, module_src, class_name, state: obj.__dict__}``; plain torch
containers (``ModuleDict``) pickle the ordinary way. The tests below install stand-in modules named
``torch_utils.persistence`` and ``dnnlib.util`` only while *writing* such pickles, put source code
with a visible side effect into ``module_src``, and check that loading never runs it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from adcm.io.edm_pickle import EDMNetwork, PickleFormatError, UnsafePickleError, load_edm_pickle
from adcm.io.model_files import TeacherFile
from adcm.nets.precond import VEPrecond, denoiser

DATA = Path(__file__).resolve().parents[1] / "data"
PROTOCOLS = [0, 2, 4, 5]


# --------------------------------------------------------------------------------------------
# Writing pickles in EDM's format.
# --------------------------------------------------------------------------------------------


def _module_src(sentinel: Path) -> str:
    """Stand-in for EDM's networks.py source: executing it leaves ``sentinel`` behind and fails."""
    return (
        "import pathlib\n"
        f"pathlib.Path({str(sentinel)!r}).write_text('module_src was executed')\n"
        "raise RuntimeError('module_src was executed')\n"
    )


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> Any:
    """What EDM's loader does with ``meta``: execute ``module_src``. Used only by the control test."""
    exec(compile(meta["module_src"], "<module_src>", "exec"), {})
    raise AssertionError("module_src should have raised")


@contextlib.contextmanager
def _fake_edm_modules() -> Iterator[types.ModuleType]:
    """Register ``torch_utils.persistence`` and ``dnnlib.util`` in sys.modules for the duration."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    persistence, util = modules["torch_utils.persistence"], modules["dnnlib.util"]
    modules["torch_utils"].persistence = persistence  # type: ignore[attr-defined]
    modules["dnnlib"].util = util  # type: ignore[attr-defined]

    def func(meta: dict[str, Any]) -> Any:
        return _reconstruct_persistent_obj(meta)

    func.__module__, func.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = func  # type: ignore[attr-defined]
    easy = type("EasyDict", (_EasyDict,), {"__module__": "dnnlib.util", "__qualname__": "EasyDict"})
    util.EasyDict = easy  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield persistence
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Persistent:
    """An object that pickles exactly like an EDM ``@persistent_class`` instance."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self) -> tuple[Any, ...]:
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None)


def _init_record(args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What EDM's decorator adds to every instance's __dict__."""
    return {"_init_args": copy.deepcopy(args), "_init_kwargs": copy.deepcopy(kwargs or {})}


def _persist_module(module: nn.Module, src: str, extra: dict[str, Any] | None = None) -> Persistent:
    """``module`` (one of our classes, named like EDM's) as a persistent object, children recursively."""
    state = dict(module.__dict__)
    state["_parameters"] = OrderedDict(
        (k, None if v is None else nn.Parameter(v.detach().clone(), requires_grad=False))
        for k, v in module._parameters.items()
    )
    state["_buffers"] = OrderedDict((k, None if v is None else v.clone()) for k, v in module._buffers.items())
    state["_modules"] = OrderedDict((k, _persist_child(v, src)) for k, v in module._modules.items())
    state["training"] = False
    state.update(_init_record())
    state.update(extra or {})
    return Persistent(type(module).__name__, state, src)


def _persist_child(child: nn.Module | None, src: str) -> Any:
    if child is None:
        return None
    if isinstance(child, nn.ModuleDict):  # plain torch container: pickled the ordinary way
        container = nn.ModuleDict()
        container.__dict__["_modules"] = OrderedDict((k, _persist_child(v, src)) for k, v in child.items())
        container.__dict__["training"] = False
        return container
    return _persist_module(child, src)


def tiny_reference() -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor], Any]:
    """(EDMPrecond kwargs, complete SongUNet kwargs, state dict, npz) of the reference tiny network."""
    ref = np.load(DATA / "edm-songunet-tiny.npz")
    precond = json.loads(str(ref["kwargs"]))
    unet = dict(
        img_resolution=precond["img_resolution"],
        in_channels=precond["img_channels"],
        out_channels=precond["img_channels"],
        label_dim=precond["label_dim"],
        augment_dim=precond["augment_dim"],
        model_channels=precond["model_channels"],
        channel_mult=precond["channel_mult"],
        channel_mult_emb=4,
        num_blocks=precond["num_blocks"],
        attn_resolutions=precond["attn_resolutions"],
        dropout=precond["dropout"],
        label_dropout=0.0,
        embedding_type=precond["embedding_type"],
        channel_mult_noise=precond["channel_mult_noise"],
        encoder_type=precond["encoder_type"],
        decoder_type=precond["decoder_type"],
        resample_filter=precond["resample_filter"],
    )
    state = {k[len("state/") :]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("state/")}
    return precond, unet, state, ref


def edm_snapshot(
    src: str,
    *,
    precond_class: str = "EDMPrecond",
    model_class: str = "SongUNet",
    sigmas: dict[str, Any] | None = None,
    precond_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], VEPrecond]:
    """EDM's snapshot dict for the tiny reference network, and our network with the same weights."""
    precond_kw, unet_kw, state, _ = tiny_reference()
    ours = denoiser(unet_kw, sigma_data=0.5)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    # EDMPrecond passes these to SongUNet; the rest of its kwargs go through as **model_kwargs.
    own = {
        "img_resolution",
        "img_channels",
        "label_dim",
        "use_fp16",
        "sigma_min",
        "sigma_max",
        "sigma_data",
        "model_type",
    }
    recorded = dict(
        img_resolution=unet_kw["img_resolution"],
        in_channels=unet_kw["in_channels"],
        out_channels=unet_kw["out_channels"],
        label_dim=unet_kw["label_dim"],
    )
    recorded.update({k: v for k, v in precond_kw.items() if k not in own})
    model = _persist_module(ours.model, src, _init_record((), recorded))
    model.class_name = model_class
    precond_kwargs = precond_kw if precond_kwargs is None else precond_kwargs
    attrs = dict(
        img_resolution=16,
        img_channels=3,
        label_dim=0,
        use_fp16=False,
        sigma_min=0.0,
        sigma_max=math.inf,
        sigma_data=0.5,
    )
    attrs.update(sigmas or {})
    state_ = dict(nn.Module().__dict__)
    state_.update(
        _parameters=OrderedDict(),
        _buffers=OrderedDict(),
        _modules=OrderedDict(model=model),
        training=False,
        **attrs,
        **_init_record((), precond_kwargs),
    )
    net = Persistent(precond_class, state_, src)
    loss = Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, **_init_record()), src)
    augment = Persistent(
        "AugmentPipe", dict(p=np.float64(0.12), xflip=1e8, yflip=1, scale=1, **_init_record((), dict(p=0.12))), src
    )
    easy = sys.modules["dnnlib.util"].EasyDict
    dataset_kwargs = easy(
        class_name="training.dataset.ImageFolderDataset",
        path="cifar10-32x32.zip",
        use_labels=False,
        xflip=False,
        cache=True,
        resolution=16,
        max_size=50000,
    )
    return {"ema": net, "loss_fn": loss, "augment_pipe": augment, "dataset_kwargs": dataset_kwargs}, ours


def write_pickle(path: Path, obj: Any, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "code from the pickle was executed"


@pytest.fixture
def edm_file(tmp_path: Path, sentinel: Path) -> tuple[Path, VEPrecond]:
    with _fake_edm_modules():
        snapshot, ours = edm_snapshot(_module_src(sentinel))
        return write_pickle(tmp_path / "network-snapshot.pkl", snapshot), ours


def _expected_unet_kwargs() -> dict[str, Any]:
    return tiny_reference()[1]


# --------------------------------------------------------------------------------------------
# Reading a well-formed pickle.
# --------------------------------------------------------------------------------------------


def test_harness_module_src_runs_under_plain_pickle(edm_file: tuple[Path, VEPrecond], sentinel: Path) -> None:
    """Control: the ordinary pickle.load runs module_src, so the sentinel check means something."""
    with _fake_edm_modules(), pytest.raises(RuntimeError, match="module_src was executed"):
        pickle.loads(edm_file[0].read_bytes())
    assert sentinel.exists()
    sentinel.unlink()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reproduces_reference_network(tmp_path: Path, sentinel: Path, protocol: int) -> None:
    with _fake_edm_modules():
        snapshot, ours = edm_snapshot(_module_src(sentinel))
        path = write_pickle(tmp_path / "net.pkl", snapshot, protocol)
    assert "torch_utils.persistence" not in sys.modules  # the loader needs none of EDM's modules
    edm = load_edm_pickle(path)
    assert isinstance(edm, EDMNetwork)
    assert edm.precond_class == "EDMPrecond"
    assert edm.network_kwargs == _expected_unet_kwargs()
    _, _, reference_state, ref = tiny_reference()
    assert set(edm.state_dict) == set(reference_state) == set(ours.state_dict())
    for name, tensor in edm.state_dict.items():
        assert type(tensor) is torch.Tensor and not tensor.requires_grad, name
        assert torch.equal(tensor, reference_state[name]), name
    assert edm.state_dict["model.enc.8x8_down.conv0.resample_filter"].shape == (1, 1, 2, 2)

    net = denoiser(edm.network_kwargs, edm.sigma_data)
    net.load_state_dict(edm.state_dict, strict=True)
    net.eval()
    x, sigma, out = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "out"))
    with torch.no_grad():
        got = net(x, sigma)
        source = ours(x, sigma)
    assert torch.equal(got, source)
    assert (got - out).norm() / out.norm() < 1e-5
    c_skip, c_out, _, _ = (c.reshape(-1, 1, 1, 1) for c in net.coefficients(sigma))
    f_got, f_ref = ((o - c_skip * x) / c_out for o in (got, out))
    assert ((f_got - f_ref)[1:].norm() / f_ref[1:].norm()) < 1e-5


def test_teacher_file_from_import_loads_strict(edm_file: tuple[Path, VEPrecond]) -> None:
    """The checkpoint layer takes the imported names as they are (``model.…``)."""
    edm = load_edm_pickle(edm_file[0])
    teacher = TeacherFile(
        network_kwargs=edm.network_kwargs, sigma_data=edm.sigma_data, state_dict=edm.state_dict, meta={}
    )
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 3.0])
    with torch.no_grad():
        assert torch.equal(teacher.denoiser()(x, sigma), edm_file[1](x, sigma))
    assert teacher.consistency_function(0.002).state_dict().keys() == edm.state_dict.keys()


def test_sigma_attributes(tmp_path: Path, sentinel: Path) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(
            _module_src(sentinel), sigmas=dict(sigma_min=0.002, sigma_max=np.float64(80.0), sigma_data=0.6)
        )
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    edm = load_edm_pickle(path)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.002, 80.0, 0.6)
    assert all(type(v) is float for v in (edm.sigma_min, edm.sigma_max, edm.sigma_data))


def test_sigma_defaults(edm_file: tuple[Path, VEPrecond]) -> None:
    edm = load_edm_pickle(edm_file[0])
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.0, math.inf, 0.5)


def test_other_key(tmp_path: Path, sentinel: Path) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel), sigmas=dict(sigma_data=0.25))
        raw, _ = edm_snapshot(_module_src(sentinel))
        snapshot["net"] = raw["ema"]
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    assert load_edm_pickle(path).sigma_data == 0.25
    assert load_edm_pickle(path, key="net").sigma_data == 0.5


def test_kwargs_from_precond_when_unet_recorded_none(tmp_path: Path, sentinel: Path) -> None:
    """Without the backbone's record, the wrapper's kwargs (model_type + model kwargs) are used."""
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        model = snapshot["ema"].state["_modules"]["model"]
        model.state.update(_init_args=None, _init_kwargs=None)
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    assert load_edm_pickle(path).network_kwargs == _expected_unet_kwargs()


def test_positional_init_args(tmp_path: Path, sentinel: Path) -> None:
    expected = _expected_unet_kwargs()
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        model = snapshot["ema"].state["_modules"]["model"]
        kwargs = dict(model.state["_init_kwargs"])
        args = tuple(kwargs.pop(k) for k in ("img_resolution", "in_channels", "out_channels"))
        model.state.update(_init_args=args, _init_kwargs=kwargs)
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    assert load_edm_pickle(path).network_kwargs == expected


# --------------------------------------------------------------------------------------------
# Refusing code.
# --------------------------------------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func: Any, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _touch(sentinel: Path) -> str:
    return f"touch {sentinel}"


def _payloads(sentinel: Path) -> dict[str, tuple[Any, str]]:
    """name -> (object to embed in the snapshot, expected text in the error)."""
    cmd = _touch(sentinel)
    return {
        "posix.system": (_Reduce(os.system, cmd), "posix.system"),
        "builtins.eval": (_Reduce(eval, f"__import__('os').system({cmd!r})"), "builtins.eval"),
        "builtins.exec": (_Reduce(exec, f"__import__('os').system({cmd!r})"), "builtins.exec"),
        "subprocess.Popen": (_Reduce(subprocess.Popen, ["touch", str(sentinel)]), "subprocess.Popen"),
        "subprocess.call": (_Reduce(subprocess.call, ["touch", str(sentinel)]), "subprocess.call"),
        "torch.load": (_Reduce(torch.load, str(sentinel)), "torch.serialization.load"),
    }


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("where", ["top", "module_state", "parameters"])
@pytest.mark.parametrize(
    "name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "subprocess.call", "torch.load"]
)
def test_refuses_code_in_snapshot(tmp_path: Path, sentinel: Path, protocol: int, where: str, name: str) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        payload, expected = _payloads(sentinel)[name]
        if where == "top":
            snapshot["dataset_kwargs"]["evil"] = payload
        elif where == "module_state":
            snapshot["ema"].state["_modules"]["model"].state["evil"] = payload
        else:
            snapshot["ema"].state["_modules"]["model"].state["_parameters"]["evil"] = payload
        path = write_pickle(tmp_path / "evil.pkl", snapshot, protocol)
    with pytest.raises(UnsafePickleError, match=rf"refusing to load global '{expected}'"):
        load_edm_pickle(path)


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"cos\nsystem\n(S'touch {s}'\ntR.", "os.system"),
        (b"cposix\nsystem\n(S'touch {s}'\ntR.", "posix.system"),
        (b'c__builtin__\neval\n(S\'__import__("os").system("touch {s}")\'\ntR.', "builtins.eval"),
        (b'cbuiltins\nexec\n(S\'__import__("os").system("touch {s}")\'\ntR.', "builtins.exec"),
        (b"csubprocess\nPopen\n((S'touch'\nS'{s}'\nltR.", "subprocess.Popen"),
    ],
)
def test_refuses_handwritten_payloads(tmp_path: Path, sentinel: Path, raw: bytes, name: str) -> None:
    s = str(sentinel).encode()
    data = raw.replace(b"{s}", s)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=rf"'{name}'"):
        load_edm_pickle(path)


def test_handwritten_payload_is_live(tmp_path: Path, sentinel: Path) -> None:
    """Control for the handwritten payloads: plain pickle would run them."""
    s = str(sentinel).encode()
    pickle.loads(b"cos\nsystem\n(S'touch " + s + b"'\ntR.")
    assert sentinel.exists()
    sentinel.unlink()


def _storage_payload(sentinel: Path, zipfile: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(_Reduce(os.system, _touch(sentinel)), buf, _use_new_zipfile_serialization=zipfile)
    return buf.getvalue()


@pytest.mark.parametrize("zipfile", [False, True])
@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_code_inside_storage_bytes(tmp_path: Path, sentinel: Path, zipfile: bool, protocol: int) -> None:
    """torch.storage._load_from_bytes is torch.load(weights_only=False) in PyTorch; here weights_only=True."""
    payload = _Reduce(torch.storage._load_from_bytes, _storage_payload(sentinel, zipfile))
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        snapshot["ema"].state["_modules"]["model"].state["_parameters"]["evil"] = payload
        path = write_pickle(tmp_path / "evil.pkl", snapshot, protocol)
    with pytest.raises(UnsafePickleError, match=r"weights_only=True"):
        load_edm_pickle(path)


def test_storage_payload_is_live(sentinel: Path) -> None:
    """Control: PyTorch's own _load_from_bytes runs the embedded payload."""
    with contextlib.suppress(Exception):
        torch.storage._load_from_bytes(_storage_payload(sentinel, zipfile=False))
    assert sentinel.exists()
    sentinel.unlink()


def test_refuses_build_on_allowed_function(tmp_path: Path, sentinel: Path) -> None:
    """BUILD on an allow-listed function must not be able to replace its attributes (e.g. __code__)."""
    data = b"\x80\x04ctorch._utils\n_rebuild_parameter\n}\x8c\x08__code__\x8c\x04evil\x73b."
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match="refusing"):
        load_edm_pickle(path)


def test_refuses_persistent_id(tmp_path: Path) -> None:
    path = tmp_path / "pid.pkl"
    path.write_bytes(b"\x80\x04\x8c\x03abc\x94Q.")
    with pytest.raises(UnsafePickleError, match="persistent-id"):
        load_edm_pickle(path)


def test_module_src_never_read(tmp_path: Path, sentinel: Path) -> None:
    """Whatever module_src says, it is dropped unread."""
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        snapshot["ema"].module_src = "raise SystemExit('never')"
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    assert load_edm_pickle(path).precond_class == "EDMPrecond"


# --------------------------------------------------------------------------------------------
# Format errors.
# --------------------------------------------------------------------------------------------


def test_missing_ema_key(tmp_path: Path, sentinel: Path) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        del snapshot["ema"]
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    with pytest.raises(PickleFormatError, match=r"no 'ema' entry \(keys: \['augment_pipe', 'dataset_kwargs'"):
        load_edm_pickle(path)


def test_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "notes.pkl"
    path.write_text("this is a text file, not a pickle\n")
    with pytest.raises(PickleFormatError, match=r"notes\.pkl: not a readable pickle"):
        load_edm_pickle(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pkl"
    path.write_bytes(b"")
    with pytest.raises(PickleFormatError, match="empty"):
        load_edm_pickle(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.999])
def test_truncated_file(tmp_path: Path, edm_file: tuple[Path, VEPrecond], fraction: float) -> None:
    data = edm_file[0].read_bytes()
    path = tmp_path / "truncated.pkl"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(PickleFormatError, match=r"truncated\.pkl: not a readable pickle \(truncated"):
        load_edm_pickle(path)


def test_torch_checkpoint_is_not_edm(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": {"w": torch.zeros(2)}}, path)
    with pytest.raises(PickleFormatError, match="zip archive"):
        load_edm_pickle(path)


def test_plain_dict_entry(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "net.pkl", {"ema": {"w": torch.zeros(2)}})
    with pytest.raises(PickleFormatError, match="entry 'ema' is dict, not an EDM network"):
        load_edm_pickle(path)


def test_not_a_dict(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "net.pkl", [1, 2, 3])
    with pytest.raises(PickleFormatError, match="holds list, not EDM's snapshot dict"):
        load_edm_pickle(path)


@pytest.mark.parametrize("precond_class", ["VPPrecond", "VEPrecond", "iDDPMPrecond"])
def test_unknown_precond_class(tmp_path: Path, sentinel: Path, precond_class: str) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel), precond_class=precond_class)
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    with pytest.raises(PickleFormatError, match=rf"is a {precond_class}; only EDMPrecond"):
        load_edm_pickle(path)


def test_unknown_backbone(tmp_path: Path, sentinel: Path) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel), model_class="DhariwalUNet")
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    with pytest.raises(PickleFormatError, match="backbone is DhariwalUNet; only SongUNet"):
        load_edm_pickle(path)


def test_model_type_mismatch(tmp_path: Path, sentinel: Path) -> None:
    with _fake_edm_modules():
        precond_kw = {**tiny_reference()[0], "model_type": "DhariwalUNet"}
        snapshot, _ = edm_snapshot(_module_src(sentinel), precond_kwargs=precond_kw)
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    with pytest.raises(PickleFormatError, match="model_type"):
        load_edm_pickle(path)


def test_unsupported_variant(tmp_path: Path, sentinel: Path) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        snapshot["ema"].state["_modules"]["model"].state["_init_kwargs"]["embedding_type"] = "fourier"
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    with pytest.raises(PickleFormatError, match="unsupported SongUNet embedding_type='fourier'"):
        load_edm_pickle(path)


def test_unknown_argument(tmp_path: Path, sentinel: Path) -> None:
    with _fake_edm_modules():
        snapshot, _ = edm_snapshot(_module_src(sentinel))
        snapshot["ema"].state["_modules"]["model"].state["_init_kwargs"]["bogus"] = 1
        path = write_pickle(tmp_path / "net.pkl", snapshot)
    with pytest.raises(PickleFormatError, match="unknown argument 'bogus'"):
        load_edm_pickle(path)


def test_wrong_persistent_type(tmp_path: Path) -> None:
    class Module(Persistent):
        def __reduce__(self) -> tuple[Any, ...]:
            func, (meta,), state = super().__reduce__()
            return (func, ({**meta, "type": "module"},), state)

    with _fake_edm_modules():
        path = write_pickle(tmp_path / "net.pkl", {"ema": Module("EDMPrecond", {}, "x = 1")})
    with pytest.raises(PickleFormatError, match="unsupported persistent-object type 'module'"):
        load_edm_pickle(path)


def test_tensor_past_its_storage(tmp_path: Path) -> None:
    class Overlong:
        def __reduce__(self) -> tuple[Any, ...]:
            return (
                torch._utils._rebuild_tensor_v2,
                (torch.zeros(4)._typed_storage(), 2, (4,), (1,), False, OrderedDict()),
            )

    path = write_pickle(tmp_path / "net.pkl", {"ema": Overlong()})
    with pytest.raises(PickleFormatError, match="reaches past its storage"):
        load_edm_pickle(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_edm_pickle(tmp_path / "absent.pkl")


def test_names_follow_the_cifar_checkpoint_scheme(edm_file: tuple[Path, VEPrecond]) -> None:
    """Every imported name, with its resolution tag normalised, occurs in EDM's CIFAR-10 checkpoint."""
    names = json.loads((DATA / "edm-ddpmpp-cifar10-uncond.shapes.json").read_text())
    edm = load_edm_pickle(edm_file[0])

    def normalise(name: str) -> str:
        return re.sub(r"block\d+", "blockN", re.sub(r"\b\d+x\d+_", "RES_", name))

    assert {normalise(n) for n in edm.state_dict} <= {normalise(n) for n in names}
    assert all(n.startswith("model.") for n in edm.state_dict)
