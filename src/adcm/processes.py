"""Forward (noising) processes x_t = α(t)·x0 + β(t)·z: VE (EDM), flow matching, TrigFlow.

See docs/method.md#forward-processes.

Every consistency method in this package only needs, from the forward process,

* the time range ``eps < t <= t_max`` (``t = eps`` is the boundary where f(x, eps) = x),
* the noisy point ``x_t`` for a data point ``x0`` and a *standard* Gaussian draw ``z``,
* its time derivative along the path with the same ``x0`` and ``z`` (the tangent of ADCM's JVP,
  ADCM paper Eq. 10; sCT's dx_t/dt, sCM Eq. 6),
* the noise-to-signal ratio ρ(t) = β(t)/α(t) and its inverse. ρ is the VE noise level σ of the same
  point: x_t/α(t) = x0 + ρ(t)·z, so every process maps exactly onto VE coordinates, and the
  hyperparameters that EDM, ECT and iCT define in σ (log-normal proposals, ECT's mapping r(t), iCT's
  Karras grid, the sampler's intermediate time) are expressed through ρ and carry over unchanged.

| process    | α(t)   | β(t)      | ρ(t) = β/α  | t from ρ          |
|------------|--------|-----------|-------------|-------------------|
| ``ve``       | 1      | t         | t           | ρ                 |
| ``fm``       | 1 − t  | t         | t/(1 − t)   | ρ/(1 + ρ)         |
| ``trigflow`` | cos t  | σ_d·sin t | σ_d·tan t   | arctan(ρ/σ_d)     |

(TrigFlow writes its noise as z' = σ_d·z ~ N(0, σ_d² I); here z is always standard.)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "FMProcess",
    "ForwardProcess",
    "ProcessName",
    "TrigFlowProcess",
    "VEProcess",
    "broadcast_time",
    "coordinates",
    "karras_grid",
    "make_process",
]

ProcessName = Literal["ve", "fm", "trigflow"]


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
    """Interface of a forward process x_t = α(t)·x0 + β(t)·z (docs/method.md#forward-processes).

    Subclasses give α, β, their time derivatives and the inverse of ρ = β/α; everything else
    (x_t, dx_t/dt, ρ, conversions) follows here.

    Attributes:
        name: ``"ve"``, ``"fm"`` or ``"trigflow"``.
        eps: boundary time; the consistency function satisfies f(x, eps) = x.
        t_max: largest time used in training and sampling.
    """

    name: ClassVar[str]
    eps: float
    t_max: float

    def _check_range(self, upper: float) -> None:
        if not (0.0 < self.eps < self.t_max <= upper):
            raise ValueError(f"{self.name}: need 0 < eps < t_max <= {upper:g}, got eps={self.eps}, t_max={self.t_max}")

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal coefficient α(t) (elementwise)."""

    @abstractmethod
    def beta(self, t: Tensor) -> Tensor:
        """Noise coefficient β(t) of the standard noise z (elementwise)."""

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor:
        """dα/dt."""

    @abstractmethod
    def d_beta(self, t: Tensor) -> Tensor:
        """dβ/dt."""

    @abstractmethod
    def time_from_noise_to_signal(self, rho: Tensor) -> Tensor:
        """The time t with ρ(t) = ``rho`` (elementwise inverse of :meth:`noise_to_signal`)."""

    def noise_to_signal(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio ρ(t) = β(t)/α(t), the VE noise level σ of the same point."""
        t = torch.as_tensor(t)
        return self.beta(t) / self.alpha(t)

    def x_t(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Noisy sample α(t)·x0 + β(t)·z with ``t`` of shape ``(B,)`` broadcast over the image."""
        tb = broadcast_time(torch.as_tensor(t), x0)
        return self.alpha(tb) * x0 + self.beta(tb) * z

    def dx_dt(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Time derivative of :meth:`x_t` along the path with the same ``x0`` and ``z``."""
        tb = broadcast_time(torch.as_tensor(t), x0)
        return self.d_alpha(tb) * x0 + self.d_beta(tb) * z

    def to_ve(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_σ, σ): the same point in VE coordinates, x_σ = x/α(t), σ = ρ(t) (exact)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return x / broadcast_time(self.alpha(t), x), self.noise_to_signal(t)

    def from_ve(self, x_sigma: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, t) from VE coordinates: t = ρ⁻¹(σ), x_t = α(t)·x_σ (exact inverse of :meth:`to_ve`)."""
        sigma = torch.as_tensor(sigma, dtype=x_sigma.dtype, device=x_sigma.device)
        t = self.time_from_noise_to_signal(sigma)
        return broadcast_time(self.alpha(t), x_sigma) * x_sigma, t

    @property
    def rho_range(self) -> tuple[float, float]:
        """(ρ(ε), ρ(t_max)) in float64."""
        pts = self.noise_to_signal(torch.tensor([self.eps, self.t_max], dtype=torch.float64))
        return float(pts[0]), float(pts[1])


@dataclass(frozen=True)
class VEProcess(ForwardProcess):
    """Variance-exploding (EDM) process: x_t = x0 + t·z, t = σ (docs/method.md#forward-processes).

    Attributes:
        eps: boundary time, 0.002 (EDM/ECT/iCT/ADCM on CIFAR-10).
        t_max: maximum noise level T, 80.
    """

    eps: float = 0.002
    t_max: float = 80.0
    name: ClassVar[str] = "ve"

    def __post_init__(self) -> None:
        self._check_range(math.inf)

    def alpha(self, t: Tensor) -> Tensor:
        """α = 1."""
        return torch.ones_like(t)

    def beta(self, t: Tensor) -> Tensor:
        """β = t."""
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        """dα/dt = 0."""
        return torch.zeros_like(t)

    def d_beta(self, t: Tensor) -> Tensor:
        """dβ/dt = 1."""
        return torch.ones_like(t)

    def time_from_noise_to_signal(self, rho: Tensor) -> Tensor:
        """t = σ."""
        return torch.as_tensor(rho)

    def noise_to_signal(self, t: Tensor) -> Tensor:
        """ρ = t (returned as is, bit for bit)."""
        return torch.as_tensor(t)

    def x_t(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """x_t = x0 + t·z."""
        return x0 + broadcast_time(torch.as_tensor(t), x0) * z

    def dx_dt(self, x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """d x_t / dt = z (independent of ``x0`` and ``t``)."""
        del x0, t
        return z


@dataclass(frozen=True)
class FMProcess(ForwardProcess):
    """Flow matching (rectified flow): x_t = (1 − t)·x0 + t·z, dx_t/dt = z − x0 (docs/method.md#forward-processes).

    Attributes:
        eps: boundary time (**decision**: 1e-3).
        t_max: largest time, below 1 (**decision**: 0.999).
    """

    eps: float = 1e-3
    t_max: float = 0.999
    name: ClassVar[str] = "fm"

    def __post_init__(self) -> None:
        if self.t_max >= 1.0:
            raise ValueError(f"fm: t_max must be < 1 (x_t is pure noise at t = 1), got {self.t_max}")
        self._check_range(1.0)

    def alpha(self, t: Tensor) -> Tensor:
        """α = 1 − t."""
        return 1.0 - t

    def beta(self, t: Tensor) -> Tensor:
        """β = t."""
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        """dα/dt = −1."""
        return torch.full_like(t, -1.0)

    def d_beta(self, t: Tensor) -> Tensor:
        """dβ/dt = 1."""
        return torch.ones_like(t)

    def time_from_noise_to_signal(self, rho: Tensor) -> Tensor:
        """t = ρ/(1 + ρ)."""
        rho = torch.as_tensor(rho)
        return rho / (1.0 + rho)


@dataclass(frozen=True)
class TrigFlowProcess(ForwardProcess):
    """TrigFlow (sCM): x_t = cos t·x0 + sin t·σ_d·z, t ∈ [0, π/2] (docs/method.md#forward-processes).

    dx_t/dt = cos t·σ_d·z − sin t·x0; ρ(t) = σ_d·tan t, so t = arctan(σ/σ_d) is the VE point σ.

    Attributes:
        sigma_data: σ_d, 0.5.
        eps: boundary time of the *discrete* methods (**decision**: arctan(0.002/σ_d) ≈ 0.004, VE's
            ε); sCT's own boundary is t = 0 and ignores it.
        t_max: largest time, arctan(80/σ_d) ≈ 1.5645.
    """

    sigma_data: float = 0.5
    eps: float = 0.004
    t_max: float = math.atan(80.0 / 0.5)
    name: ClassVar[str] = "trigflow"

    def __post_init__(self) -> None:
        if self.sigma_data <= 0:
            raise ValueError(f"trigflow: sigma_data must be positive, got {self.sigma_data}")
        if self.t_max >= math.pi / 2:
            raise ValueError(f"trigflow: t_max must be < π/2, got {self.t_max}")
        self._check_range(math.pi / 2)

    def alpha(self, t: Tensor) -> Tensor:
        """α = cos t."""
        return torch.cos(t)

    def beta(self, t: Tensor) -> Tensor:
        """β = σ_d·sin t."""
        return self.sigma_data * torch.sin(t)

    def d_alpha(self, t: Tensor) -> Tensor:
        """dα/dt = −sin t."""
        return -torch.sin(t)

    def d_beta(self, t: Tensor) -> Tensor:
        """dβ/dt = σ_d·cos t."""
        return self.sigma_data * torch.cos(t)

    def time_from_noise_to_signal(self, rho: Tensor) -> Tensor:
        """t = arctan(ρ/σ_d)."""
        return torch.atan(torch.as_tensor(rho) / self.sigma_data)


def make_process(name: ProcessName, eps: float, t_max: float, sigma_data: float = 0.5) -> ForwardProcess:
    """The forward process ``name`` on [eps, t_max] (its own time)."""
    if name == "ve":
        return VEProcess(eps=eps, t_max=t_max)
    if name == "fm":
        return FMProcess(eps=eps, t_max=t_max)
    if name == "trigflow":
        return TrigFlowProcess(sigma_data=sigma_data, eps=eps, t_max=t_max)
    raise ValueError(f"unknown process {name!r} (expected ve, fm or trigflow)")


def coordinates(name: ProcessName, sigma_data: float = 0.5) -> ForwardProcess:
    """A process of kind ``name`` with its default range, for changes of coordinates only
    (:meth:`ForwardProcess.to_ve`, :meth:`ForwardProcess.from_ve`, ρ and its inverse ignore the range)."""
    if name == "ve":
        return VEProcess()
    if name == "fm":
        return FMProcess()
    if name == "trigflow":
        return TrigFlowProcess(sigma_data=sigma_data)
    raise ValueError(f"unknown process {name!r} (expected ve, fm or trigflow)")


def karras_grid(n: int, eps: float, t_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022, Eq. 5) grid, *decreasing* from t_max to ε (n points, float64).

    σ_i = (T^{1/ρ} + i/(n−1)·(ε^{1/ρ} − T^{1/ρ}))^ρ, i = 0..n−1; the endpoints are set exactly.
    """
    if n < 2:
        raise ValueError(f"need n >= 2 grid points, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    a, b = t_max ** (1.0 / rho), eps ** (1.0 / rho)
    grid = (a + i / (n - 1) * (b - a)) ** rho
    grid[0], grid[-1] = t_max, eps
    return grid
