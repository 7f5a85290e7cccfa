r"""Time discretizations for discrete consistency training: ECT, iCT and ADCM.

The unified view (ADCM paper, Bai et al. 2025, §3 and Eq. 8–10)
------------------------------------------------------------------
Discrete consistency training (docs/method.md) pulls the student f_θ(x_t, t) towards the
stop-gradient target f_θ⁻(x_r, r) at a smaller time r = t − Δt on the same noise path. Every method
differs only in *how Δt is chosen* (and the per-sample weight). ADCM chooses Δt at each t as the
minimiser of

    L_local + λ·L_global,  L_local = E‖f⁻(x_t, t) − f⁻(x_{t−Δt}, t−Δt)‖²,
                           L_global = E‖f⁻(x_{t−Δt}, t−Δt) − x0‖²,

which after linearising f⁻ along the path (v = df⁻/dt, e = f⁻(x_t, t) − x0) gives paper Eq. 10,

    Δt* = λ/(1+λ) · E⟨v, e⟩ / E‖v‖².

This one knob spans the whole family:

* **λ → ∞**: only global consistency counts, Δt = t − ε, the target is the data x0 itself —
  plain **diffusion (denoising) training**.
* **λ = 0**: only local consistency counts, Δt → 0 — **continuous-time consistency training** (sCM).
* **ECT** (r = t·(1 − n(t)/q^(a+1))) and **iCT** (a Karras grid refined by a doubling curriculum) are
  *hand-made* Δt(t) schedules in between, with the fixed weight 1/(t − r).
* **ADCM** computes Δt(t) from the current network (paper Alg. 1), rebuilding the partition every
  ``rebuild_every_iters`` iterations, and uses the adaptive weight 1/d_c(f⁻(x_r, r), x0) (paper
  Eq. 11; computed in :func:`adcm.method.losses.consistency_loss`).

This module holds what the three share: the :class:`Discretization` interface and the interval probabilities;
each method has its own module (:mod:`adcm.method.ect`, :mod:`adcm.method.ict`, :mod:`adcm.method.adcm`). All
three implement :class:`Discretization`, which yields a :class:`PairBatch` (t, r, weight) per training
iteration. All randomness goes through a caller-provided ``torch.Generator`` (ADCM's partition building uses a
generator derived from ``(seed, iteration)``), so training resumption from ``state_dict`` is bit-exact.
Partition points are float64; sampled ``t``/``r`` are float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adcm.processes import ForwardProcess

__all__ = [
    "ConsistencyFn",
    "DataDraw",
    "Discretization",
    "PairBatch",
    "check_decreasing",
    "check_kind",
    "fraction_of_run",
    "frozen_network",
    "lognormal_interval_probs",
    "pairs_from_grid",
    "period_index",
    "period_start",
    "sample_intervals",
    "uniform_interval_probs",
]

ConsistencyFn = Callable[[Tensor, Tensor], Tensor]
"""f⁻(x, t): the frozen (no parameter gradients, eval mode, dropout off) consistency function;
``x`` of shape (B, ...), ``t`` of shape (B,)."""

DataDraw = Callable[[int, torch.Generator], Tensor]
"""sample_x0(batch_size, generator) -> a fresh data mini-batch x0 of shape (batch_size, ...)."""


@contextmanager
def frozen_network(network: nn.Module | None) -> Iterator[None]:
    """Put ``network`` in eval mode (dropout, label dropout off) under ``no_grad``; restore after.

    The training flag of every sub-module is restored individually (also when the body raises),
    so a network that was in train mode trains on exactly as before. ``None`` only disables grad.
    Used by :func:`build_partition` (docs/method.md#adcm step 2, **decision**: dropout off).
    """
    modes = [(m, m.training) for m in network.modules()] if network is not None else []
    try:
        if network is not None:
            network.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


# ---------------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairBatch:
    """One training iteration's time pairs.

    Attributes:
        t: (B,) float32 student times, ε < t ≤ t_max.
        r: (B,) float32 target times, r < t. ``r <= ε`` means the target is x_r itself (the
            boundary condition f(x, ε) = x); the caller handles it (see :meth:`target_is_data`).
        weight: (B,) float32 fixed per-sample weight (ECT/iCT: 1/(t − r)), or ``None`` for ADCM's
            adaptive weight 1/d_c(f⁻(x_r, r), x0) computed in the loss (paper Eq. 11).
    """

    t: Tensor
    r: Tensor
    weight: Tensor | None

    def target_is_data(self, eps: float) -> Tensor:
        """Boolean (B,) mask of samples whose target is x_r itself (``r <= ε``).

        The comparison is done in ``r``'s own dtype: ADCM/iCT return ``r = float32(ε)`` for the
        last interval, and ``float32(0.002) > 0.002`` in float64, so never compare against a
        float64 ε.
        """
        return self.r <= torch.tensor(eps, dtype=self.r.dtype, device=self.r.device)


class Discretization(ABC):
    """How a training iteration picks (t, r) and the per-sample weight (module docstring).

    The unified view (ADCM paper §3): r = t − Δt(t) with Δt(t) → 0 continuous-time consistency
    training (λ = 0, sCM), Δt(t) = t − ε diffusion training (λ → ∞), ECT/iCT hand-made schedules,
    ADCM the λ-trade-off optimum of paper Eq. 10.
    """

    def needs_rebuild(self, iteration: int) -> bool:
        """Whether :meth:`rebuild` must be called before training step ``iteration``."""
        del iteration
        return False

    def rebuild(  # noqa: B027
        self,
        iteration: int,
        fn: ConsistencyFn,
        sample_x0: DataDraw,
        *,
        network: nn.Module | None = None,
    ) -> None:
        """Rebuild the discretization from the current network (no-op for fixed schedules).

        Args:
            iteration: the training iteration about to run.
            fn: consistency function f⁻(x, t) of the current weights (parameters are constants).
            sample_x0: ``sample_x0(batch_size, generator)`` giving a fresh data mini-batch.
            network: the module behind ``fn`` if ``fn`` is a closure; it is put in eval mode
                (dropout off) for the build and its modes are restored afterwards. If ``fn`` is
                itself an ``nn.Module`` this happens automatically.
        """

    @abstractmethod
    def sample(self, batch_size: int, iteration: int, generator: torch.Generator) -> PairBatch:
        """Draw ``batch_size`` (t, r, weight) triples for training step ``iteration``.

        Tensors are created on ``generator.device``; all randomness comes from ``generator``.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to make resumed training bit-exact (safe for ``weights_only`` load)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def check_decreasing(points: Tensor) -> Tensor:
    points = torch.as_tensor(points, dtype=torch.float64).cpu()
    if points.ndim != 1 or points.numel() < 2:
        raise ValueError(f"need a 1-D tensor of at least 2 points, got shape {tuple(points.shape)}")
    if not bool((points[1:] < points[:-1]).all()):
        raise ValueError("points must be strictly decreasing (t_max first, ε last)")
    return points


def lognormal_interval_probs(points: Tensor, p_mean: float, p_std: float, process: ForwardProcess) -> Tensor:
    r"""Discretised log-normal probabilities of the intervals of a decreasing grid.

    iCT (Song & Dhariwal 2023, §3.5) and ADCM (paper §4, CIFAR-10) pick interval i, i.e. the pair
    (t = points[i], r = points[i+1]), with

        p(i) ∝ erf((ln ρ(t_i) − P_mean)/(√2 P_std)) − erf((ln ρ(t_{i+1}) − P_mean)/(√2 P_std)),

    ρ(t) = β_t/α_t the noise-to-signal ratio (ρ = σ = t for VE), i.e. the mass that the
    log-normal proposal ln ρ ~ N(P_mean, P_std²) of EDM puts on the interval, normalised over the
    grid (so it is the proposal truncated to [ε, t_max]). Note the grid here is *decreasing*; the
    iCT paper writes it increasing, the formula is the same with the indices reversed.

    Args:
        points: (n,) strictly decreasing times, float (converted to float64).
        p_mean: P_mean (−1.1 on CIFAR-10).
        p_std: P_std (2.0 on CIFAR-10).
        process: forward process giving the noise-to-signal ratio.

    Returns:
        (n − 1,) float64 probabilities on the CPU, non-negative, summing to 1.
    """
    points = check_decreasing(points)
    if p_std <= 0:
        raise ValueError(f"p_std must be positive, got {p_std}")
    u = (torch.log(process.noise_to_signal(points)) - p_mean) / p_std
    hi, lo = u[:-1], u[1:]
    # Φ(hi) − Φ(lo), written through the upper tail when both are positive (no cancellation).
    ndtr = torch.special.ndtr
    mass = torch.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
    total = mass.sum()
    if not bool(total > 0):
        raise ValueError("the log-normal proposal puts no mass on this grid")
    return mass / total


def uniform_interval_probs(num_intervals: int) -> Tensor:
    """Uniform probabilities over ``num_intervals`` intervals (ADCM on ImageNet), float64 CPU."""
    if num_intervals < 1:
        raise ValueError(f"need at least one interval, got {num_intervals}")
    return torch.full((num_intervals,), 1.0 / num_intervals, dtype=torch.float64)


def sample_intervals(probs: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """Draw interval indices i ~ probs by inverse CDF (one uniform per sample from ``generator``).

    Returns:
        (batch_size,) int64 indices on ``generator.device``; zero-probability intervals are never
        drawn.
    """
    device = generator.device
    cdf = torch.cumsum(probs.to(device=device, dtype=torch.float64), 0)
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64) * cdf[-1]
    idx = torch.searchsorted(cdf, u, right=True)
    return idx.clamp_(max=probs.numel() - 1)


def pairs_from_grid(
    points: Tensor, idx: Tensor, rho_points: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(t, r) = adjacent grid points; with ``rho_points`` (the grid as noise-to-signal ratios) also
    the weight 1/(ρ(t) − ρ(r)) of iCT/ECT (= 1/(t − r) for VE)."""
    pts = points.to(device=idx.device, dtype=torch.float64)
    t, r = pts[idx].float(), pts[idx + 1].float()
    if rho_points is None:
        return t, r, None
    rho = rho_points.to(device=idx.device, dtype=torch.float64)
    return t, r, (1.0 / (rho[idx] - rho[idx + 1])).float()


def check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state_dict is for discretization {state.get('kind')!r}, not {kind!r}")


def fraction_of_run(fraction: float, total_iters: int) -> float:
    """A period given as a fraction of the run, in steps (at least one, not rounded): schedules scale with the run.

    The period may be fractional (0.25 of 250 iterations is 62.5); its k-th period then starts at
    :func:`period_start` (k, period), so that the run has exactly ⌈1/fraction⌉ periods, each starting
    at the nearest iteration to k·fraction of the run — 0, 63, 125 and 188 of 250 — rather than
    periods of a rounded length, which would start a fifth one at iteration 248.
    """
    return max(1.0, float(fraction) * total_iters)


def period_start(k: int, period: float) -> int:
    """The iteration at which the k-th period (k ≥ 0) of length ``period`` starts: k·period rounded half up."""
    return math.floor(k * period + 0.5)


def period_index(iteration: int, period: float) -> int:
    """The period that ``iteration`` (≥ 0) falls in: the largest k with :func:`period_start` (k, period) ≤ iteration.

    For a whole ``period`` this is ``iteration // period``; ``period`` must be at least 1.
    """
    if period < 1:
        raise ValueError(f"a period must be at least one iteration, got {period}")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    k = int((iteration + 0.5) // period)
    while k > 0 and period_start(k, period) > iteration:
        k -= 1
    while period_start(k + 1, period) <= iteration:
        k += 1
    return k
