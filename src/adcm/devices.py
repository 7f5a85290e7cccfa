"""Choosing the device a command runs on (the ``device`` keys of params.yaml)."""

from __future__ import annotations

import torch

from adcm.errors import ParamsError

__all__ = ["resolve_device"]


def resolve_device(spec: str, key: str = "device") -> torch.device:
    """``auto`` → CUDA when available else CPU; otherwise ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ParamsError: CUDA was asked for (params key ``key``) but is not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(
            f"{key}: {spec!r} was asked for but CUDA is not available on this machine (use 'auto' or 'cpu')"
        )
    return device
