"""Model files: the teacher every teacher source produces, and the consistency model ``adcm train`` writes.

Both are plain ``torch.save`` archives of dicts, lists, numbers, strings and tensors, loadable with
``torch.load(path, weights_only=True)``, written atomically (temporary file + rename), and marked by
a ``format`` entry: ``adcm-teacher/1`` (:class:`TeacherFile`) or ``adcm-student/1`` (:class:`StudentFile`).
Weights are stored under EDM's ``EDMPrecond`` names (``model.…``) whatever the parameterisation. The
``network`` entry names the backbone (:data:`~adcm.nets.precond.NetworkKind`: ``ddpmpp``, EDM's DDPM++, or
``edm2``, EDM2's U-Net); files without it (written before EDM2 was supported) hold a DDPM++.
"""

from __future__ import annotations

import json
import math
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adcm.config import Method
from adcm.errors import CheckpointError
from adcm.io.files import save_torch
from adcm.io.safe_unpickle import RefusedError, scan_pickle, short_repr
from adcm.nets.precond import NetworkKind, Precond, image_shape, make_precond, network_label_dim
from adcm.processes import ForwardProcess, ProcessName, make_process

__all__ = [
    "STUDENT_FORMAT",
    "TEACHER_FORMAT",
    "StudentFile",
    "TeacherFile",
    "load_student",
    "load_teacher",
    "save_student",
    "save_teacher",
]

TEACHER_FORMAT = "adcm-teacher/1"
STUDENT_FORMAT = "adcm-student/1"


@dataclass(frozen=True)
class TeacherFile:
    """A diffusion teacher: backbone constructor settings and (EMA) weights under EDM's names.

    Attributes:
        network_kwargs: keyword arguments of the backbone (:func:`adcm.nets.precond.build_network`):
            :class:`adcm.nets.songunet.SongUNet`'s for ``ddpmpp``, :class:`adcm.nets.edm2.EDM2Backbone`'s
            for ``edm2``.
        sigma_data: σ_d of the preconditioning.
        state_dict: weights, names as in EDM's ``EDMPrecond.state_dict()`` (``model.…``).
        meta: provenance (source, kimg, dataset, ...), JSON-like values only.
        process: the forward process the model's wrapper works in (``ve``, ``fm``, ``trigflow``).
        source: the parameterisation the backbone was trained in (a TrigFlow model converted from an
            EDM teacher has ``process='trigflow'``, ``source='ve'``); default ``process``.
        network: the backbone's kind, ``ddpmpp`` or ``edm2``.
    """

    network_kwargs: dict[str, Any]
    sigma_data: float
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    process: ProcessName = "ve"
    source: ProcessName | None = None
    network: NetworkKind = "ddpmpp"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the teacher makes."""
        return image_shape(self.network_kwargs, self.network)

    @property
    def label_dim(self) -> int:
        """Number of classes the teacher is conditioned on (0 = unconditional)."""
        return network_label_dim(self.network_kwargs, self.network)

    def describe_network(self) -> dict[str, Any]:
        """The backbone for a record: its kind, constructor settings and number of parameters (JSON values only).

        A study's run record stores the params it was planned with; when the teacher file was made with other network
        settings (``--teacher`` of another width), this is what the run actually trained.
        """
        return {
            "kind": self.network,
            "kwargs": json.loads(json.dumps(self.network_kwargs)),
            "parameters": self.parameter_count(),
        }

    def parameter_count(self) -> int:
        """Number of trainable parameters of the backbone (built on the meta device: no memory, no weights)."""
        with torch.device("meta"):
            net = self._build(0.0, None)
        return int(sum(p.numel() for p in net.parameters()))

    @property
    def backbone_process(self) -> ProcessName:
        """The parameterisation of the backbone's weights (``source``, or ``process`` when unset)."""
        return self.source or self.process

    def wrapper(self, eps: float, process: ProcessName | None = None) -> Precond:
        """These weights in the wrapper of ``process`` (default: the file's own) with boundary ε."""
        net = self._build(eps, process)
        net.load_state_dict(self.state_dict, strict=True)
        return net

    def _build(self, eps: float, process: ProcessName | None) -> Precond:
        """The wrapper of ``process`` (default: the file's own) around a freshly initialised backbone."""
        return make_precond(
            self.network_kwargs,
            self.sigma_data,
            process=process or self.process,
            source=self.backbone_process,
            eps=eps,
            network=self.network,
        )

    def denoiser(self) -> Precond:
        """The diffusion model's x0-prediction (EDM's D(x, σ) for VE; ε = 0), in eval mode on the CPU."""
        return self.wrapper(0.0).eval().requires_grad_(False)

    def consistency_function(self, eps: float, process: ProcessName | None = None) -> Precond:
        """The consistency function f(x, t), ε-shifted, initialised from these weights
        (docs/method.md#preconditioning-and-the-boundary-condition).

        ``process`` other than the file's own is allowed for ``trigflow`` only (exact conversion).
        """
        return self.wrapper(eps, process)


@dataclass(frozen=True)
class StudentFile:
    """A consistency model written by ``adcm train``: its EMA weights, where it samples, and every ADCM partition.

    Attributes:
        network_kwargs: keyword arguments of the backbone (as :attr:`TeacherFile.network_kwargs`).
        sigma_data: σ_d of the preconditioning.
        state_dict: EMA weights under EDM's names.
        process: the forward process the model samples in (sCT: ``trigflow``).
        source: the parameterisation of the backbone's weights (the teacher's process).
        method: ``adcm``, ``ect``, ``ict`` or ``sct``.
        lam: ADCM's λ (None for the other methods).
        eps: the boundary time of f (f(x, ε) = x; 0 for sCT).
        range_eps: the lower end of the process's time range (sCT: of its time proposal).
        t_max: the largest time, where sampling starts.
        partitions: every ADCM partition built, ``(iteration, points)`` (empty for the other methods).
        meta: provenance (kimg, steps, seed, the teacher's SHA-256), JSON-like values only.
        network: the backbone's kind, ``ddpmpp`` or ``edm2`` (the teacher's).
    """

    network_kwargs: dict[str, Any]
    sigma_data: float
    state_dict: dict[str, Tensor]
    process: ProcessName
    source: ProcessName
    method: Method
    lam: float | None
    eps: float
    range_eps: float
    t_max: float
    partitions: list[tuple[int, list[float]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    network: NetworkKind = "ddpmpp"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes."""
        return image_shape(self.network_kwargs, self.network)

    @property
    def label_dim(self) -> int:
        """Number of classes the model is conditioned on (0 = unconditional)."""
        return network_label_dim(self.network_kwargs, self.network)

    def sampling_process(self) -> ForwardProcess:
        """The forward process (and range) the model samples in."""
        return make_process(self.process, self.range_eps, self.t_max, self.sigma_data)

    def consistency_function(self) -> Precond:
        """f(x, t) with these weights, in eval mode on the CPU."""
        net = make_precond(
            self.network_kwargs,
            self.sigma_data,
            process=self.process,
            source=self.source,
            eps=self.eps,
            network=self.network,
        )
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval().requires_grad_(False)


def save_teacher(path: Path, teacher: TeacherFile) -> None:
    """Write ``teacher`` to ``path`` atomically."""
    payload = {
        "format": TEACHER_FORMAT,
        "network_kwargs": teacher.network_kwargs,
        "sigma_data": float(teacher.sigma_data),
        "process": teacher.process,
        "source": teacher.backbone_process,
        "network": teacher.network,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict.items()},
        "meta": teacher.meta,
    }
    save_torch(path, payload)


def load_teacher(path: Path) -> TeacherFile:
    """Read a teacher file (``weights_only=True``); :class:`CheckpointError` if it is not one.

    A missing entry, or one of the wrong type (settings and meta not dicts, σ_data not a finite
    number > 0, weights not a dict of named tensors, an unknown process or network kind), is one line
    naming it. A file without the ``network`` entry holds a DDPM++.
    """
    payload = _payload(
        path,
        TEACHER_FORMAT,
        "a diffusion teacher (written by `adcm teacher`)",
        ("network_kwargs", "sigma_data", "state_dict", "meta", "process", "source"),
    )
    return TeacherFile(
        network_kwargs=dict(_entry(path, payload, "network_kwargs", dict, "a dict")),
        sigma_data=_positive_float(path, payload, "sigma_data"),
        state_dict=_weights(path, payload, "state_dict"),
        meta=dict(_entry(path, payload, "meta", dict, "a dict")),
        process=_process_name(path, payload, "process"),
        source=_process_name(path, payload, "source"),
        network=_network_kind(path, payload),
    )


def _entry(path: Path, payload: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``payload[key]`` if it is a ``kind`` (``what`` names it in the error); :class:`CheckpointError` if not."""
    if key not in payload:
        raise CheckpointError(f"{path}: model file without the entry {key!r}")
    value = payload[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CheckpointError(f"{path}: model file entry {key!r} is {short_repr(value)}, not {what}")
    return value


def _positive_float(path: Path, payload: dict[str, Any], key: str) -> float:
    """``payload[key]`` as a finite float > 0."""
    value = float(_entry(path, payload, key, (int, float), "a number"))
    if not 0 < value < math.inf:
        raise CheckpointError(f"{path}: model file entry {key!r} is {value}, not a finite number > 0")
    return value


def _weights(path: Path, payload: dict[str, Any], key: str) -> dict[str, Tensor]:
    """``payload[key]`` as a dict of tensors with string names."""
    value = _entry(path, payload, key, dict, "a dict of tensors")
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise CheckpointError(
                f"{path}: model file entry {key!r} holds {short_repr(name)}: "
                f"{type(tensor).__name__}, not a named tensor"
            )
    return dict(value)


def _process_name(path: Path, payload: dict[str, Any], key: str) -> ProcessName:
    """``payload[key]`` as one of the forward processes' names."""
    value = _entry(path, payload, key, str, "a process name")
    names = typing.get_args(ProcessName)
    if value not in names:
        raise CheckpointError(f"{path}: model file entry {key!r} is {short_repr(value)}, not one of {list(names)}")
    return typing.cast(ProcessName, value)


def _network_kind(path: Path, payload: dict[str, Any]) -> NetworkKind:
    """``payload['network']`` as a backbone kind; ``ddpmpp`` when the entry is absent (older files)."""
    if "network" not in payload:
        return "ddpmpp"
    value = _entry(path, payload, "network", str, "a network kind")
    kinds = typing.get_args(NetworkKind)
    if value not in kinds:
        raise CheckpointError(f"{path}: model file entry 'network' is {short_repr(value)}, not one of {list(kinds)}")
    return typing.cast(NetworkKind, value)


def save_student(path: Path, student: StudentFile) -> None:
    """Write ``student`` to ``path`` atomically."""
    payload = {
        "format": STUDENT_FORMAT,
        "network_kwargs": student.network_kwargs,
        "sigma_data": float(student.sigma_data),
        "process": student.process,
        "source": student.source,
        "network": student.network,
        "method": student.method,
        "lambda": student.lam,
        "eps": float(student.eps),
        "range_eps": float(student.range_eps),
        "t_max": float(student.t_max),
        "partitions": [[int(it), [float(x) for x in pts]] for it, pts in student.partitions],
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in student.state_dict.items()},
        "meta": student.meta,
    }
    save_torch(path, payload)


def load_student(path: Path) -> StudentFile:
    """Read a student file (``weights_only=True``); :class:`CheckpointError` if it is not one."""
    payload = _payload(
        path,
        STUDENT_FORMAT,
        "a consistency model (written by `adcm train`)",
        (
            "network_kwargs",
            "sigma_data",
            "state_dict",
            "process",
            "source",
            "method",
            "lambda",
            "eps",
            "range_eps",
            "t_max",
            "partitions",
            "meta",
        ),
    )
    method = _entry(path, payload, "method", str, "a method name")
    if method not in typing.get_args(Method):
        raise CheckpointError(f"{path}: model file entry 'method' is {short_repr(method)}, not a known method")
    lam = payload["lambda"]
    if lam is not None:
        lam = float(_entry(path, payload, "lambda", (int, float), "a number or None"))
    partitions = _entry(path, payload, "partitions", list, "a list")
    try:
        parts = [(int(it), [float(x) for x in pts]) for it, pts in partitions]
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: model file entry 'partitions' is not a list of (iteration, points)") from None
    times = {key: float(_entry(path, payload, key, (int, float), "a number")) for key in ("eps", "range_eps", "t_max")}
    if not 0 <= times["eps"] < times["t_max"] < math.inf or not 0 < times["range_eps"] < times["t_max"]:
        raise CheckpointError(f"{path}: model file time range {times} is not 0 ≤ eps < t_max, 0 < range_eps < t_max")
    return StudentFile(
        network_kwargs=dict(_entry(path, payload, "network_kwargs", dict, "a dict")),
        sigma_data=_positive_float(path, payload, "sigma_data"),
        state_dict=_weights(path, payload, "state_dict"),
        process=_process_name(path, payload, "process"),
        source=_process_name(path, payload, "source"),
        method=typing.cast(Method, method),
        lam=lam,
        eps=times["eps"],
        range_eps=times["range_eps"],
        t_max=times["t_max"],
        partitions=parts,
        meta=dict(_entry(path, payload, "meta", dict, "a dict")),
        network=_network_kind(path, payload),
    )


def _payload(path: Path, expected: str, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The archive at ``path`` if it is a model file of format ``expected`` with every entry in ``keys``."""
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") not in (TEACHER_FORMAT, STUDENT_FORMAT):
        raise CheckpointError(f"{path}: not an adcm model file (expected format {expected!r})")
    if payload["format"] != expected:
        raise CheckpointError(f"{path}: a {payload['format']!r} file, where {what} is needed")
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: model file without the entry {missing[0]!r}")
    return payload


def _load(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        _scan_archive(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt zip, unpickling refused, a bound exceeded, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({first})") from None


_MAX_COMPRESSION_RATIO = 1100
"""Bytes a compressed zip record may declare per compressed byte (deflate reaches about 1032)."""


def _scan_archive(path: Path) -> None:
    """Check a ``torch.save`` zip archive before ``torch.load`` reads it, in time proportional to its size.

    Every record may declare no more bytes than the file (or its compressed size) can hold, and the
    one ``data.pkl`` is walked by :func:`adcm.io.safe_unpickle.scan_pickle`: ``weights_only=True``
    restricts what a pickle calls, not how much work it asks for (a tuple key nesting the previous
    one twice, 40 levels deep, takes 2^40 steps to hash). adcm writes only zip archives; the legacy
    ``torch.save`` format is refused.
    """
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: cannot be read as a checkpoint (not a torch.save zip archive)")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        for info in infos:
            limit = size if info.compress_type == zipfile.ZIP_STORED else _MAX_COMPRESSION_RATIO * info.compress_size
            if info.compress_size > size or info.file_size > limit:
                raise CheckpointError(
                    f"{path}: cannot be read as a checkpoint (record {short_repr(info.filename)} "
                    f"declares {info.file_size} bytes, more than the file can hold)"
                )
        pickles = [info for info in infos if info.filename.rsplit("/", 1)[-1] == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({len(pickles)} data.pkl records)")
        try:
            scan_pickle(archive.read(pickles[0]))
        except RefusedError as exc:
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({exc})") from None
