"""Checkpoint files: the teacher file every teacher source produces, and resumable training state.

Both are plain ``torch.save`` archives of dicts, lists, numbers, strings and tensors, loadable with
``torch.load(path, weights_only=True)``, and always written atomically (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adcm.io import atomic_path
from adcm.precond import Precond, make_precond
from adcm.processes import ProcessName

__all__ = [
    "TEACHER_FORMAT",
    "CheckpointError",
    "TeacherFile",
    "fingerprint",
    "load_state",
    "load_teacher",
    "save_state",
    "save_teacher",
]

TEACHER_FORMAT = "adcm-teacher/1"


class CheckpointError(ValueError):
    """A checkpoint or teacher file that is missing, unreadable or does not fit."""


@dataclass(frozen=True)
class TeacherFile:
    """A model file: DDPM++ constructor settings and (EMA) weights under EDM's names.

    The teacher (a diffusion model) and the consistency model written by ``adcm train`` share this
    format; ``meta['kind'] == 'consistency'`` marks the latter.

    Attributes:
        network_kwargs: keyword arguments of :class:`adcm.networks.SongUNet`.
        sigma_data: σ_d of the preconditioning.
        state_dict: weights, names as in EDM's ``EDMPrecond.state_dict()`` (``model.…``).
        meta: provenance (source, kimg, dataset, ...), JSON-like values only.
        process: the forward process the model's wrapper works in (``ve``, ``fm``, ``trigflow``).
        source: the parameterisation the backbone was trained in (a TrigFlow model converted from an
            EDM teacher has ``process='trigflow'``, ``source='ve'``); default ``process``.
    """

    network_kwargs: dict[str, Any]
    sigma_data: float
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    process: ProcessName = "ve"
    source: ProcessName | None = None

    @property
    def backbone_process(self) -> ProcessName:
        """The parameterisation of the backbone's weights (``source``, or ``process`` when unset)."""
        return self.source or self.process

    def wrapper(self, eps: float, process: ProcessName | None = None) -> Precond:
        """These weights in the wrapper of ``process`` (default: the file's own) with boundary ε."""
        net = make_precond(self.network_kwargs, self.sigma_data, process=process or self.process,
                           source=self.backbone_process, eps=eps)
        net.load_state_dict(self.state_dict, strict=True)
        return net

    def denoiser(self) -> Precond:
        """The diffusion model's x0-prediction (EDM's D(x, σ) for VE; ε = 0), in eval mode on the CPU."""
        return self.wrapper(0.0).eval().requires_grad_(False)

    def consistency_function(self, eps: float, process: ProcessName | None = None) -> Precond:
        """The consistency function f(x, t) (ε-shifted, algorithm.md §2) initialised from these weights.

        ``process`` other than the file's own is allowed for ``trigflow`` only (exact conversion).
        """
        return self.wrapper(eps, process)


def save_teacher(path: Path, teacher: TeacherFile) -> None:
    """Write ``teacher`` to ``path`` atomically."""
    payload = {
        "format": TEACHER_FORMAT,
        "network_kwargs": teacher.network_kwargs,
        "sigma_data": float(teacher.sigma_data),
        "process": teacher.process,
        "source": teacher.backbone_process,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict.items()},
        "meta": teacher.meta,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_teacher(path: Path) -> TeacherFile:
    """Read a teacher file (``weights_only=True``); :class:`CheckpointError` if it is not one."""
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT:
        raise CheckpointError(f"{path}: not an adcm teacher file (expected format {TEACHER_FORMAT!r})")
    return TeacherFile(
        network_kwargs=dict(payload["network_kwargs"]),
        sigma_data=float(payload["sigma_data"]),
        state_dict=dict(payload["state_dict"]),
        meta=dict(payload["meta"]),
        process=str(payload.get("process", "ve")),  # type: ignore[arg-type]
        source=str(payload.get("source", payload.get("process", "ve"))),  # type: ignore[arg-type]
    )


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state dict to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state dict written by :func:`save_state`."""
    state = _load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint")
    return state


def _load(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, unpickling refused, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({first})") from None


def fingerprint(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (dataclasses must be converted with asdict first)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
