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
from adcm.precond import VEPrecond, consistency_function, denoiser

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
    """A diffusion teacher: DDPM++ constructor settings and EMA weights under EDM's names.

    Attributes:
        network_kwargs: keyword arguments of :class:`adcm.networks.SongUNet`.
        sigma_data: σ_d of the EDM preconditioning.
        state_dict: EMA weights, names as in EDM's ``EDMPrecond.state_dict()`` (``model.…``).
        meta: provenance (source, kimg, dataset, ...), JSON-like values only.
    """

    network_kwargs: dict[str, Any]
    sigma_data: float
    state_dict: dict[str, Tensor]
    meta: dict[str, Any]

    def denoiser(self) -> VEPrecond:
        """The EDM denoiser D(x, σ) (ε = 0) with these weights, in eval mode on the CPU."""
        net = denoiser(self.network_kwargs, self.sigma_data)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval().requires_grad_(False)

    def consistency_function(self, eps: float) -> VEPrecond:
        """The consistency function f(x, t) (ε-shifted, algorithm.md §2) initialised from the teacher."""
        net = consistency_function(self.network_kwargs, self.sigma_data, eps)
        net.load_state_dict(self.state_dict, strict=True)
        return net


def save_teacher(path: Path, teacher: TeacherFile) -> None:
    """Write ``teacher`` to ``path`` atomically."""
    payload = {
        "format": TEACHER_FORMAT,
        "network_kwargs": teacher.network_kwargs,
        "sigma_data": float(teacher.sigma_data),
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
