"""Safe importer for the network pickles released with EDM2 (Karras et al. 2024), e.g. ``edm2-img64-s-…pkl``.

EDM2's snapshots are plain :func:`pickle.dump` outputs of a ``dnnlib.util.EasyDict`` with the keys
``encoder``, ``dataset_kwargs``, ``loss_fn`` and ``ema``; ``ema`` is the ``training.networks_edm2.Precond``
network (the U-Net in ``.unet``), cast to float16. EDM2 uses EDM's ``torch_utils.persistence``: every
network object is a call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the class
name, the defining module's *source code* (``module_src``) and the object's ``__dict__``; EDM2's own loader
executes ``module_src``. So this importer reuses EDM's restricted, bounded unpickler
(:func:`adcm.io.edm_pickle.read_snapshot`: allow-listed globals only, each mapped to an inert stand-in,
storages read with ``torch.load(weights_only=True)``) and never executes anything from the file:

* ``module_src`` is treated as text only: every persistent record's source must define the class the
  record names (a ``class <Name>`` line, as EDM2's loader would look the class up in it), and the
  SHA-256 of the network's source is kept as provenance. It is never compiled or run.
* The network's settings come from the arguments the persistence decorator recorded on ``Precond``
  (``_init_args`` / ``_init_kwargs``: ``img_resolution``, ``img_channels``, ``label_dim``,
  ``model_channels``, ``dropout``, … for the released img64 models); everything not recorded takes
  :class:`~adcm.nets.edm2.EDM2Precond`'s defaults. :func:`validate_edm2_network` checks their names,
  types and bounds, then builds the network on the ``meta`` device (no memory): its state-dict names and
  shapes must equal the file's exactly.
* The recorded module tree must be EDM2's: each record's class (``Precond``, ``UNet``, ``Block``,
  ``MPConv``, ``MPFourier``, ``ModuleDict``) and its recorded plain attributes (``num_heads``,
  ``flavor``, ``resample_mode``, the balances, ``clip_act``, ``out_channels``, σ_d, …) must equal those of
  the network the settings build, so settings that change no shape (the attention heads, a balance)
  cannot silently differ.
* float16 (and bfloat16, float64) weights are converted to float32.
* Only pixel-space models are imported: a snapshot whose ``encoder`` is not EDM2's
  ``StandardRGBEncoder`` (a latent-space model, e.g. img512) is refused.

The weights come back under EDM2's ``Precond`` names (``unet.enc.64x64_conv.weight``, …,
``logvar_fourier.freqs``, ``logvar_linear.weight``); :mod:`adcm.io.teacher_import` puts them into a
teacher file with the network kind ``edm2`` (names ``model.…``, :class:`adcm.nets.edm2.EDM2Backbone`).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adcm.errors import PickleFormatError, UnsafePickleError
from adcm.io.edm_pickle import (
    _bind,
    _check_weights,
    _dict_field,
    _flatten,
    _ModuleRecord,
    _PersistentObject,
    _plain,
    check_weights_fit,
    read_snapshot,
    snapshot_network,
)
from adcm.io.safe_unpickle import short_repr
from adcm.nets.edm2 import Block, EDM2Backbone, EDM2Precond, EDM2UNet, MPConv, MPFourier

__all__ = [
    "EDM2Network",
    "PickleFormatError",
    "UnsafePickleError",
    "edm2_network",
    "load_edm2_pickle",
    "validate_edm2_network",
]

# EDM2's Precond arguments, in order (the rest of its keyword arguments go to the U-Net).
_PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
_REQUIRED = ("img_resolution", "img_channels", "label_dim")

# Integer settings -> inclusive range (generous: EDM2's largest img64 model has model_channels = 256).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "img_resolution": (1, 4096),
    "img_channels": (1, 256),
    "label_dim": (0, 1 << 20),
    "logvar_channels": (1, 1 << 16),
    "model_channels": (1, 8192),
    "num_blocks": (1, 64),
    "channels_per_head": (1, 1 << 16),
}
_OPTIONAL_INTS: dict[str, tuple[int, int]] = {"channel_mult_noise": (1, 64), "channel_mult_emb": (1, 64)}
# List settings -> (most entries, least entries, inclusive range of each entry).
_INT_LISTS: dict[str, tuple[int, int, tuple[int, int]]] = {
    "channel_mult": (16, 1, (1, 64)),
    "attn_resolutions": (16, 0, (1, 4096)),
}
_BALANCES = ("label_balance", "concat_balance", "res_balance", "attn_balance")

# Our module class -> the class name EDM2's pickle records for it.
_CLASS_NAMES: dict[type, str] = {
    EDM2Precond: "Precond",
    EDM2UNet: "UNet",
    Block: "Block",
    MPConv: "MPConv",
    MPFourier: "MPFourier",
    nn.ModuleDict: "ModuleDict",
}
# Plain attributes compared between a record and the module the settings build (where both have them).
_COMPARED_ATTRIBUTES = (
    "img_resolution",
    "img_channels",
    "label_dim",
    "use_fp16",
    "sigma_data",
    "label_balance",
    "concat_balance",
    "out_channels",
    "flavor",
    "resample_mode",
    "resample_filter",
    "num_heads",
    "dropout",
    "res_balance",
    "attn_balance",
    "clip_act",
)
_CLASS_LINE = re.compile(r"^class[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*[(:]", re.MULTILINE)
_PIXEL_ENCODER = "StandardRGBEncoder"


@dataclass(frozen=True)
class EDM2Network:
    """A network read from an EDM2 pickle, as plain data.

    Attributes:
        precond_class: Class name of the network (``"Precond"``).
        network_kwargs: :class:`~adcm.nets.edm2.EDM2Backbone` settings, every argument present (EDM2's
            ``Precond`` arguments except ``sigma_data``; defaults filled in), tuples as lists.
        sigma_data: σ_d of the preconditioning.
        state_dict: float32 CPU tensors under EDM2's ``Precond.state_dict()`` names (``unet.…``,
            ``logvar_fourier.…``, ``logvar_linear.weight``): parameters and persistent buffers.
        stored_dtype: the dtype the weights had in the file (``float16`` for EDM2's releases).
        module_src_sha256: SHA-256 of the network's recorded module source (provenance; never executed).
    """

    precond_class: str
    network_kwargs: dict[str, Any]
    sigma_data: float
    state_dict: dict[str, torch.Tensor]
    stored_dtype: str
    module_src_sha256: str


def _defaults() -> dict[str, Any]:
    """Every :class:`EDM2Backbone` argument (with the U-Net's) -> its default (``inspect.Parameter.empty``
    when required), tuples as lists."""
    out: dict[str, Any] = {}
    for cls in (EDM2Backbone, EDM2UNet):
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL) or p.name in out:
                continue
            out[p.name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _check_kwargs(network_kwargs: Any) -> dict[str, Any]:
    """The settings, checked: names, types, bounds, and a resolution that every level can halve."""
    if not isinstance(network_kwargs, Mapping):
        raise PickleFormatError(f"network settings are {type(network_kwargs).__name__}, not a mapping")
    defaults = _defaults()
    unknown = sorted(short_repr(k, 40) for k in itertools.islice(network_kwargs, 200) if k not in defaults)
    if unknown or len(network_kwargs) > len(defaults):
        raise PickleFormatError(
            f"unknown EDM2 settings {', '.join(unknown[:5]) or '(too many)'} (expected some of {', '.join(defaults)})"
        )
    missing = [name for name in _REQUIRED if name not in network_kwargs]
    if missing:
        raise PickleFormatError(f"missing EDM2 settings {missing}")
    kwargs = {name: _plain(value, f"EDM2 {name}") for name, value in network_kwargs.items()}
    full = {name: kwargs.get(name, default) for name, default in defaults.items()}
    for name, (lo, hi) in _INT_RANGES.items():
        value = full[name]
        if not _is_int(value) or not lo <= value <= hi:
            raise PickleFormatError(f"EDM2 {name} is {short_repr(value)}, not an integer in [{lo}, {hi}]")
    for name, (lo, hi) in _OPTIONAL_INTS.items():
        value = full[name]
        if value is not None and (not _is_int(value) or not lo <= value <= hi):
            raise PickleFormatError(f"EDM2 {name} is {short_repr(value)}, not null or an integer in [{lo}, {hi}]")
    for name, (longest, shortest, (lo, hi)) in _INT_LISTS.items():
        value = full[name]
        if (
            not isinstance(value, list)
            or not shortest <= len(value) <= longest
            or not all(_is_int(v) and lo <= v <= hi for v in value)
        ):
            raise PickleFormatError(
                f"EDM2 {name} is {short_repr(value)}, not a list of {shortest} to {longest} integers in [{lo}, {hi}]"
            )
    f = full["resample_filter"]
    if not isinstance(f, list) or not 1 <= len(f) <= 16 or not all(_is_number(v) and 0 <= v <= 1024 for v in f):
        raise PickleFormatError(f"EDM2 resample_filter is {short_repr(f)}, not 1 to 16 numbers in [0, 1024]")
    if sum(f) == 0:
        raise PickleFormatError("EDM2 resample_filter sums to zero")
    for name in _BALANCES:
        if not _is_number(full[name]) or not 0 <= full[name] <= 1:
            raise PickleFormatError(f"EDM2 {name} is {short_repr(full[name])}, not a number in [0, 1]")
    if not _is_number(full["dropout"]) or not 0 <= full["dropout"] < 1:
        raise PickleFormatError(f"EDM2 dropout is {short_repr(full['dropout'])}, not a probability in [0, 1)")
    clip = full["clip_act"]
    if clip is not None and (not _is_number(clip) or clip <= 0):
        raise PickleFormatError(f"EDM2 clip_act is {short_repr(clip)}, not null or a number > 0")
    if type(full["use_fp16"]) is not bool:
        raise PickleFormatError(f"EDM2 use_fp16 is {short_repr(full['use_fp16'])}, not true or false")
    levels = len(full["channel_mult"])
    if full["img_resolution"] % (1 << (levels - 1)):
        raise PickleFormatError(
            f"EDM2 img_resolution {full['img_resolution']} is not divisible by 2^{levels - 1} "
            f"({levels} levels in channel_mult)"
        )
    return full


def validate_edm2_network(
    network_kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], sigma_data: float
) -> EDM2Precond:
    """Check an EDM2 network before it is written: settings, σ_d and weights must fit together.

    * ``sigma_data``: a finite number > 0;
    * ``network_kwargs``: :class:`~adcm.nets.edm2.EDM2Backbone`'s arguments (the required ones, no
      unknown ones), plain values in generous bounds (resolution ≤ 4096, ≤ 256 channels, ≤ 16 levels of
      ≤ 64 blocks, balances in [0, 1], dropout in [0, 1), …), a resolution divisible by 2^(levels − 1);
    * ``state_dict``: floating-point, finite tensors that neither repeat nor overlap in memory, at least
      as many as the blocks the settings declare need (so the settings cannot make building the network
      cost more than the file's size);
    * ``EDM2Precond(**network_kwargs, sigma_data=…)`` built on the ``meta`` device has exactly these
      names and shapes (``load_state_dict(strict=True)``'s rule).

    Returns:
        The network built on the ``meta`` device (for comparing the recorded module tree).

    Raises:
        PickleFormatError: one line naming the first problem.
    """
    if type(sigma_data) not in (int, float) or not 0 < sigma_data < math.inf:
        raise PickleFormatError(f"sigma_data is {short_repr(sigma_data)}, not a finite number > 0")
    kwargs = _check_kwargs(network_kwargs)
    weights = _check_weights(state_dict)
    levels, blocks = len(kwargs["channel_mult"]), kwargs["num_blocks"]
    # Each Block has at least 4 tensors; the U-Net has levels·(2·num_blocks + 3) blocks.
    if 4 * levels * (2 * blocks + 3) > len(weights):
        raise PickleFormatError(
            f"the settings declare {levels} levels of {blocks} blocks, more than {len(weights)} weight tensors can hold"
        )
    try:
        with torch.device("meta"):
            network = EDM2Precond(**kwargs, sigma_data=float(sigma_data))
    except (ValueError, TypeError, RuntimeError, OverflowError, ZeroDivisionError) as exc:
        raise PickleFormatError(f"EDM2's network rejects the settings: {short_repr(str(exc), 200)}") from None
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    check_weights_fit(expected, weights)
    return network


class _SourceCheck:
    """Which classes a recorded module source defines (``class <Name>`` lines), each distinct text scanned once."""

    def __init__(self) -> None:
        self._classes: dict[int, tuple[str, frozenset[str]]] = {}

    def check(self, record: _PersistentObject, where: str) -> None:
        src = record.module_src
        if src is None:
            raise PickleFormatError(f"{where} ({record.class_name}) records no module source: not an EDM2 pickle")
        cached = self._classes.get(id(src))
        if cached is None or cached[0] is not src:
            cached = (src, frozenset(_CLASS_LINE.findall(src)))
            self._classes[id(src)] = cached
        if record.class_name not in cached[1]:
            raise PickleFormatError(
                f"{where}: the recorded module source does not define class {short_repr(record.class_name, 60)}"
            )


def _same(recorded: Any, ours: Any) -> bool:
    if isinstance(ours, tuple | list):
        return isinstance(recorded, list) and len(recorded) == len(ours) and all(map(_same, recorded, ours))
    if type(ours) is bool or type(recorded) is bool:
        return type(ours) is type(recorded) and ours == recorded
    return bool(recorded == ours)


def _check_tree(record: _ModuleRecord, module: nn.Module, where: str, sources: _SourceCheck) -> None:
    """Class names and plain attributes of the recorded tree against the network the settings build.

    The recorded tree was already walked by :func:`adcm.io.edm_pickle._flatten` (a tree, bounded depth
    and size), so this recursion is bounded too.
    """
    expected = _CLASS_NAMES.get(type(module), type(module).__name__)
    if record.class_name != expected:
        raise PickleFormatError(
            f"{where} is a {short_repr(record.class_name, 60)}, where EDM2's network has a {expected}"
        )
    if isinstance(record, _PersistentObject):
        sources.check(record, where)
    for name in _COMPARED_ATTRIBUTES:
        if name in record.state and hasattr(module, name):
            recorded = _plain(record.state[name], f"{where}.{name}")
            ours = getattr(module, name)
            if not _same(recorded, ours):
                raise PickleFormatError(
                    f"{where}.{name} is {short_repr(recorded)} in the pickle, but its settings build "
                    f"{short_repr(ours)}: not EDM2's network"
                )
    for name, child in _dict_field(record, "_modules", where).items():
        if child is None:
            continue
        ours = module._modules.get(name)
        if ours is None:
            raise PickleFormatError(f"{where} has a module {short_repr(name, 60)} that EDM2's network does not have")
        _check_tree(child, ours, f"{where}.{name}", sources)


def _settings(precond: _PersistentObject) -> tuple[dict[str, Any], float]:
    """(EDM2Backbone settings as recorded, σ_d) from Precond's recorded constructor arguments and attributes."""
    bound = _bind(precond, _PRECOND_ARGS, open_kwargs=True)
    if bound is None:
        raise PickleFormatError("Precond recorded no constructor arguments (_init_args / _init_kwargs)")
    sigma = bound.pop("sigma_data", precond.state.get("sigma_data", 0.5))
    if "sigma_data" in precond.state and _plain(precond.state["sigma_data"], "Precond sigma_data") != sigma:
        raise PickleFormatError(
            f"Precond records sigma_data={short_repr(precond.state['sigma_data'])} as an attribute but was "
            f"constructed with {short_repr(sigma)}"
        )
    if type(sigma) not in (int, float):
        raise PickleFormatError(f"Precond sigma_data is {short_repr(sigma)}, not a number")
    return bound, float(sigma)


def load_edm2_pickle(path: Path | str | os.PathLike[str], key: str = "ema") -> EDM2Network:
    """Read an EDM2 network pickle without executing any code from it (module docstring).

    Args:
        path: an EDM2 snapshot (``*.pkl``).
        key: the entry of the snapshot dict that holds the network (EDM2: ``"ema"``).

    Raises:
        UnsafePickleError: a global outside the allow-list, or an embedded storage payload that
            ``torch.load(weights_only=True)`` refuses.
        PickleFormatError: not a (complete) pickle, no ``key``, not EDM2's ``Precond``/``UNet`` network, a
            latent-space model, more work than the file's size allows, or settings and weights that do not
            pass :func:`validate_edm2_network` or do not match the recorded module tree.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    top = read_snapshot(path)
    return edm2_network(top, snapshot_network(top, key, path), path, key)


def edm2_network(top: dict[Any, Any], precond: _PersistentObject, path: Path, key: str = "ema") -> EDM2Network:
    """The EDM2 network of a snapshot (``top``, from :func:`~adcm.io.edm_pickle.read_snapshot`) whose entry
    ``key`` is the record ``precond``, checked (:func:`load_edm2_pickle`)."""
    if precond.class_name != "Precond":
        raise PickleFormatError(
            f"{path}: entry {key!r} is a {short_repr(precond.class_name, 60)}; EDM2's network class is Precond"
        )
    unet = _dict_field(precond, "_modules", "Precond").get("unet")
    if not isinstance(unet, _PersistentObject) or unet.class_name != "UNet":
        what = unet.class_name if isinstance(unet, _ModuleRecord) else type(unet).__name__
        raise PickleFormatError(f"{path}: Precond's 'unet' is {short_repr(what, 60)}, not EDM2's UNet")
    encoder = top.get("encoder")
    if isinstance(encoder, _ModuleRecord) and encoder.class_name != _PIXEL_ENCODER:
        raise PickleFormatError(
            f"{path}: the snapshot's encoder is {short_repr(encoder.class_name, 60)}: a latent-space model; "
            f"only pixel-space EDM2 models ({_PIXEL_ENCODER}) are supported"
        )
    try:
        sources = _SourceCheck()
        sources.check(precond, "Precond")
        assert precond.module_src is not None
        recorded, sigma_data = _settings(precond)
        raw: dict[str, torch.Tensor] = {}
        _flatten(precond, "", raw)
        network = validate_edm2_network(recorded, raw, sigma_data)
        _check_tree(precond, network, "Precond", sources)
    except PickleFormatError as exc:
        raise PickleFormatError(f"{path}: {exc}") from exc
    kwargs = _check_kwargs(recorded)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in raw.values()})
    return EDM2Network(
        precond_class=precond.class_name,
        network_kwargs=kwargs,
        sigma_data=sigma_data,
        state_dict={name: t.detach().to(torch.float32).contiguous() for name, t in raw.items()},
        stored_dtype="/".join(dtypes),
        module_src_sha256=hashlib.sha256(precond.module_src.encode("utf-8", "surrogatepass")).hexdigest(),
    )
