"""Forward (noising) processes x_t = x(t; x0, z) used by consistency training.

Every discrete consistency method in this package (ECT, iCT, ADCM; docs/algorithm.md §3) only needs
four things from the forward process:

* the time range ``eps < t <= t_max`` (``t = eps`` is the boundary where f(x, eps) = x),
* the noisy point ``x_t`` for a data point ``x0`` and a noise draw ``z``,
* its time derivative along the path with the same ``x0`` and ``z`` (the tangent of ADCM's JVP,
  ADCM paper Eq. 10), and
* the noise-to-signal ratio ``beta_t / alpha_t`` (whose logarithm carries the log-normal proposal of
  EDM/iCT/ADCM).

Only the variance-exploding (EDM) process is implemented now; flow matching and TrigFlow
(algorithm.md §1) will implement the same :class:`ForwardProcess` interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["ForwardProcess", "VEProcess", "broadcast_time"]


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time ``t`` of shape ``(B,)`` (or a 0-d tensor) to broadcast over ``x``.

    Args:
        t: times, shape ``(B,)`` with ``B == x.shape[0]``, or a scalar tensor.
        x: a batch tensor of shape ``(B, ...)``.

    Returns:
        ``t`` viewed as ``(B, 1, ..., 1)`` (same number of dimensions as ``x``), cast to ``x``'s
        dtype and device.
    """
    t = t.to(dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


class ForwardProcess(ABC):
    """Interface of a forward process x_t = alpha_t * x0 + beta_t * z (algorithm.md §1).

    Attributes:
        name: short identifier (``"ve"``, later ``"fm"``, ``"trigflow"``).
        eps: boundary time; the consistency function satisfies f(x, eps) = x.
        t_max: largest time used in training and sampling.
    """

    name: str
    eps: float
    t_max: float

    @abstractmethod
    def x_t(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Noisy sample at time ``t`` (shape ``(B,)``, broadcast over the image)."""

    @abstractmethod
    def dx_dt(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Time derivative of :meth:`x_t` along the path with the same ``x0`` and ``z``."""

    @abstractmethod
    def noise_to_signal(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio beta_t / alpha_t (elementwise; same shape and dtype as ``t``)."""


@dataclass(frozen=True)
class VEProcess(ForwardProcess):
    """Variance-exploding (EDM) process: x_t = x0 + t * z, t = sigma (algorithm.md §1).

    Attributes:
        eps: boundary time, 0.002 (EDM/ECT/iCT/ADCM on CIFAR-10).
        t_max: maximum noise level T, 80.
    """

    eps: float = 0.002
    t_max: float = 80.0
    name: ClassVar[str] = "ve"

    def __post_init__(self) -> None:
        if not (0.0 < self.eps < self.t_max):
            raise ValueError(f"need 0 < eps < t_max, got eps={self.eps}, t_max={self.t_max}")

    def x_t(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """x_t = x0 + t * z with ``t`` of shape ``(B,)`` broadcast over the non-batch dims."""
        return x0 + broadcast_time(t, x0) * z

    def dx_dt(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """d x_t / dt = z (independent of ``x0`` and ``t``)."""
        del x0, t
        return z

    def noise_to_signal(self, t: Tensor) -> Tensor:
        """beta_t / alpha_t = t for VE (alpha_t = 1, beta_t = t)."""
        return torch.as_tensor(t)
