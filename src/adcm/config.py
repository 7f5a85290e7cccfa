"""Typed, frozen configuration objects and their strict loader.

Every hyperparameter lives in ``params.yaml``; there are no defaults in code. The loader turns the
whole file into frozen dataclasses and rejects, with one line naming the key, any unknown key (with
a "did you mean" hint), missing key, wrong type or out-of-range value. Each field carries its
documentation (with units) in its metadata; the CLI prints it in ``adcm <stage> --help``.

The library itself never reads the file: the CLI layer calls :func:`load_params` and passes the
group objects on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DatasetName",
    "Method",
    "NetworkConfig",
    "Params",
    "ParamsError",
    "PrepareConfig",
    "SamplerConfig",
    "TeacherConfig",
    "describe",
    "load_params",
    "parse_params",
]

DatasetName = Literal["fashion-mnist", "cifar10", "folder"]
Method = Literal["adcm", "ect", "ict"]
Device = str


class ParamsError(ValueError):
    """A user error in the params file: the message is one line naming the key."""


def param(doc: str, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
          lt: float | None = None, key: str | None = None) -> Any:
    """Declare a params field: its documentation (with units) and numeric bounds."""
    return field(metadata={"doc": doc, "gt": gt, "ge": ge, "le": le, "lt": lt, "key": key})


@dataclass(frozen=True)
class PrepareConfig:
    """`adcm prepare`: which images to read and how to store them."""

    dataset: DatasetName = param("dataset format: fashion-mnist (IDX .gz files), cifar10 (the official "
                                 "cifar-10-python.tar.gz) or folder (PNG/JPEG images)")
    source: str = param("directory holding the IDX files (fashion-mnist) or images (folder), or the "
                        "path of cifar-10-python.tar.gz (cifar10)")
    split: Literal["train", "test"] = param("which split to read (fashion-mnist, cifar10)")
    resolution: int = param("output size in pixels; smaller images are centre-padded with the "
                            "background value (Fashion-MNIST 28 → 32)", gt=0)
    labels: bool = param("keep class labels (folder: first-level sub-directories are the classes)")
    max_images: int | None = param("keep only the first N images (null = all)", gt=0)


@dataclass(frozen=True)
class NetworkConfig:
    """DDPM++ (SongUNet) settings for a teacher trained here."""

    model_channels: int = param("base channel count", gt=0)
    channel_mult: tuple[int, ...] = param("channel multiplier per resolution level (one level per entry, "
                                          "each halving the resolution)", gt=0)
    channel_mult_emb: int = param("embedding width as a multiple of model_channels", gt=0)
    num_blocks: int = param("residual blocks per level", gt=0)
    attn_resolutions: tuple[int, ...] = param("resolutions (pixels) that get self-attention", gt=0)
    dropout: float = param("dropout probability in the residual blocks", ge=0, lt=1)
    class_conditional: bool = param("condition on class labels (needs a labelled dataset)")


@dataclass(frozen=True)
class SamplerConfig:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1)."""

    num_steps: int = param("Heun steps; NFE = 2·num_steps − 1 (18 → 35 NFE)", ge=2)
    sigma_min: float = param("smallest noise level σ of the grid", gt=0)
    sigma_max: float = param("largest noise level σ of the grid", gt=0)
    rho: float = param("time-step exponent ρ of the Karras grid", gt=0)
    grid_rows: int = param("the sample grid PNG has grid_rows × grid_rows images", gt=0)


@dataclass(frozen=True)
class TeacherConfig:
    """`adcm teacher`: train an EDM diffusion teacher here, or import EDM's released pickle."""

    source: Literal["train", "url", "file"] = param("train: train a teacher on the prepared data; url: "
                                                    "download EDM's pickle; file: import a local EDM pickle")
    url: str | None = param("EDM pickle to download (source: url)")
    sha256: str | None = param("expected SHA-256 of the downloaded pickle (required for source: url)")
    download_path: str = param("where the downloaded pickle is kept (source: url)")
    file: str | None = param("local EDM pickle (source: file)")
    device: Device = param("auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    network: NetworkConfig = param("network of a teacher trained here (source: train)")
    sigma_data: float = param("σ_d, the data standard deviation assumed by the preconditioning", gt=0)
    p_mean: float = param("mean of ln σ in EDM's training noise distribution")
    p_std: float = param("std of ln σ in EDM's training noise distribution", gt=0)
    duration_kimg: float = param("training length in thousands of images", gt=0)
    batch_size: int = param("images per optimizer step", gt=0)
    batch_per_step: int | None = param("images per forward pass (gradient accumulation); null = batch_size",
                                       gt=0)
    lr: float = param("Adam learning rate", gt=0)
    lr_rampup_kimg: float = param("linear learning-rate warm-up, thousands of images", ge=0)
    ema_halflife_kimg: float = param("EMA half-life in thousands of images", gt=0)
    ema_rampup_ratio: float | None = param("EMA half-life is at most this fraction of the images seen so far "
                                           "(null = no ramp-up)", gt=0)
    xflip: bool = param("augment with random horizontal flips")
    checkpoint_every_kimg: float = param("write a resumable checkpoint every this many thousand images", gt=0)
    log_every_kimg: float = param("log metrics every this many thousand images", gt=0)
    sampler: SamplerConfig = param("Heun sampler for the teacher's sample grid")


@dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``."""

    lam: float = param("ADCM's λ (paper Eq. 10): weight of global vs local consistency; "
                       "λ → ∞ is diffusion training, λ = 0 continuous time", ge=0, key="lambda")
    method: Method = param("consistency-training method: adcm, ect or ict")
    seed: int = param("global random seed", ge=0)
    prepare: PrepareConfig = param("dataset preparation")
    teacher: TeacherConfig = param("diffusion teacher")


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (YAML 1.1 wants ``1.0e-3``) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _describe_type(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _describe_type(inner[0], meta) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return "a list of " + _describe_type(args[0], meta).replace("an ", "").replace("a ", "") + "s"
    bounds = []
    for name, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if meta.get(name) is not None:
            bounds.append(f"{sym} {meta[name]:g}")
    suffix = (" " + " and ".join(bounds)) if bounds else ""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + suffix
    if tp is float:
        return "a number" + suffix
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _check_bounds(value: float, meta: dict, where: str, expected: str, got: Any) -> None:
    checks = (("gt", lambda v, b: v > b), ("ge", lambda v, b: v >= b), ("lt", lambda v, b: v < b),
              ("le", lambda v, b: v <= b))
    for name, ok in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ParamsError(f"{where}: expected {expected}, got {got!r}")


def _convert(tp: Any, value: Any, where: str, meta: dict, source: str) -> Any:
    expected = _describe_type(tp, meta)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise ParamsError(f"{source}: {where}: expected {expected}, got null")
        return _convert(inner[0], value, where, meta, source)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{source}: {where}: expected {expected}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{source}: {where}: expected {expected} (a non-empty list), got {value!r}")
        return tuple(_convert(args[0], v, f"{where}[{i}]", meta, source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: {where}: expected {expected}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: {where}: expected {expected}, got {value!r}")
        _check_bounds(value, meta, f"{source}: {where}", expected, value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamsError(f"{source}: {where}: expected {expected}, got {value!r}")
        _check_bounds(float(value), meta, f"{source}: {where}", expected, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{source}: {where}: expected {expected} (non-empty), got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: {where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, near[0])}'?)" if near else ""
            allowed = ", ".join(fields)
            raise ParamsError(f"{source}: unknown key '{_join(prefix, key)}'{hint}; expected one of: {allowed}")
    values = {}
    for key, f in fields.items():
        name = _join(prefix, key)
        if key not in data:
            expected = _describe_type(hints[f.name], dict(f.metadata))
            raise ParamsError(f"{source}: missing key '{name}' ({expected}: {f.metadata.get('doc', '')})")
        values[f.name] = _convert(hints[f.name], data[key], name, dict(f.metadata), source)
    return cls(**values)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _validate(params: Params, source: str) -> None:
    """Checks that involve several keys."""
    t = params.teacher
    if t.source == "url":
        if not t.url:
            raise ParamsError(f"{source}: teacher.url: expected a URL when teacher.source is 'url', got null")
        if not t.sha256 or not re.fullmatch(r"[0-9a-fA-F]{64}", t.sha256):
            raise ParamsError(f"{source}: teacher.sha256: expected the 64-hex-digit SHA-256 of the pickle "
                              f"when teacher.source is 'url', got {t.sha256!r}")
    if t.source == "file" and not t.file:
        raise ParamsError(f"{source}: teacher.file: expected a path when teacher.source is 'file', got null")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ParamsError(f"{source}: teacher.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    levels = len(t.network.channel_mult)
    res = params.prepare.resolution
    if res % (2 ** (levels - 1)):
        raise ParamsError(f"{source}: teacher.network.channel_mult: {levels} levels need prepare.resolution "
                          f"divisible by {2 ** (levels - 1)}, got {res}")
    if t.batch_per_step is not None and t.batch_size % t.batch_per_step:
        raise ParamsError(f"{source}: teacher.batch_per_step: expected a divisor of teacher.batch_size "
                          f"({t.batch_size}), got {t.batch_per_step}")
    if t.sampler.sigma_min >= t.sampler.sigma_max:
        raise ParamsError(f"{source}: teacher.sampler.sigma_min: expected < sigma_max ({t.sampler.sigma_max}), "
                          f"got {t.sampler.sigma_min}")
    if t.network.class_conditional and not params.prepare.labels:
        raise ParamsError(f"{source}: teacher.network.class_conditional: needs prepare.labels: true")


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Build and validate :class:`Params` from already-parsed YAML data."""
    params = _build(Params, data, "", source)
    _validate(params, source)
    return params


def load_params(path: Path) -> Params:
    """Read ``path`` strictly; raise :class:`ParamsError` (one line naming the key) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_params(data, str(path))


def describe(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(key, expected type, documentation) for every leaf key of a config class, for ``--help``."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = _join(prefix, _yaml_key(f))
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, name))
        else:
            rows.append((name, _describe_type(tp, dict(f.metadata)), f.metadata.get("doc", "")))
    return rows
