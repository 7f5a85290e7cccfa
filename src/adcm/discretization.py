r"""Time discretizations for discrete consistency training: ECT, iCT and ADCM.

The unified view (ADCM paper, Bai et al. 2025, §3 and Eq. 8–10)
------------------------------------------------------------------
Discrete consistency training (docs/algorithm.md §3) pulls the student f_θ(x_t, t) towards the
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
  Eq. 11; computed in :func:`adcm.losses.consistency_loss`).

All three implement :class:`Discretization`, which yields a :class:`PairBatch` (t, r, weight) per
training iteration. All randomness goes through a caller-provided ``torch.Generator`` (ADCM's
partition building uses a generator derived from ``(seed, iteration)``), so training resumption
from ``state_dict`` is bit-exact. Partition points are float64; sampled ``t``/``r`` are float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adcm.jvp import jvp
from adcm.processes import ForwardProcess

__all__ = [
    "ADCMDiscretization",
    "ConsistencyFn",
    "DataSampler",
    "Discretization",
    "ECTDiscretization",
    "ICTDiscretization",
    "PairBatch",
    "PartitionTooLongError",
    "adcm_step",
    "build_partition",
    "clamp_step",
    "consistency_velocity",
    "ect_r",
    "frozen_network",
    "ict_num_points",
    "karras_grid",
    "lam_factor",
    "lognormal_interval_probs",
    "optimal_step",
    "sample_intervals",
    "uniform_interval_probs",
]

ConsistencyFn = Callable[[Tensor, Tensor], Tensor]
"""f⁻(x, t): the frozen (no parameter gradients, eval mode, dropout off) consistency function;
``x`` of shape (B, ...), ``t`` of shape (B,)."""

DataSampler = Callable[[int, torch.Generator], Tensor]
"""sample_x0(batch_size, generator) -> a fresh data mini-batch x0 of shape (batch_size, ...)."""


@contextmanager
def frozen_network(network: nn.Module | None) -> Iterator[None]:
    """Put ``network`` in eval mode (dropout, label dropout off) under ``no_grad``; restore after.

    The training flag of every sub-module is restored individually (also when the body raises),
    so a network that was in train mode trains on exactly as before. ``None`` only disables grad.
    Used by :func:`build_partition` (algorithm.md §3.3 step 2, **decision**: dropout off).
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
        sample_x0: DataSampler,
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


# ---------------------------------------------------------------------------------------------
# Interval probabilities and sampling (shared by iCT and ADCM)
# ---------------------------------------------------------------------------------------------


def _check_decreasing(points: Tensor) -> Tensor:
    points = torch.as_tensor(points, dtype=torch.float64).cpu()
    if points.ndim != 1 or points.numel() < 2:
        raise ValueError(f"need a 1-D tensor of at least 2 points, got shape {tuple(points.shape)}")
    if not bool((points[1:] < points[:-1]).all()):
        raise ValueError("points must be strictly decreasing (t_max first, ε last)")
    return points


def lognormal_interval_probs(
    points: Tensor, p_mean: float, p_std: float, process: ForwardProcess
) -> Tensor:
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
    points = _check_decreasing(points)
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


def _pairs_from_grid(
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


# ---------------------------------------------------------------------------------------------
# ECT (Geng et al. 2024)
# ---------------------------------------------------------------------------------------------


def ect_r(
    t: Tensor, iteration: int, stage_iters: int, k: float = 8.0, b: float = 1.0, q: float = 2.0
) -> Tensor:
    """ECT's mapping r(t) (Geng et al. 2024, §3 "mapping function"; algorithm.md §3.1).

    r = t·(1 − n(t)/q^(a+1)), n(t) = 1 + k·sigmoid(−b·t), stage a = ⌊iteration / stage_iters⌋,
    clamped at r ≥ 0. Each stage divides Δt = t − r by q, approaching continuous time.

    Args:
        t: times, any shape.
        iteration: training iteration.
        stage_iters: iterations per stage (25k on CIFAR-10).
        k, b, q: ECT constants (8, 1, 2 on CIFAR-10; q = 4 on ImageNet).

    Returns:
        r with the shape and dtype of ``t``.
    """
    if stage_iters <= 0:
        raise ValueError(f"stage_iters must be positive, got {stage_iters}")
    stage = iteration // stage_iters
    n = 1.0 + k * torch.sigmoid(-b * t)
    return (t * (1.0 - n / q ** (stage + 1))).clamp(min=0.0)


class ECTDiscretization(Discretization):
    """ECT's hand-made schedule (Geng et al. 2024; algorithm.md §3.1).

    In the unified view Δt(t) = t·n(t)/q^(a+1) is fixed by hand and halved (q = 2) every stage,
    moving from near-diffusion training (large Δt, r clamped to 0 at small t) towards continuous
    time (Δt → 0). Weight 1/(t − r).

    ECT is defined on the VE noise level σ. On any process it runs *through the noise-to-signal
    ratio* ρ(t) = β_t/α_t (the σ of the same point): ln ρ ~ N(P_mean, P_std²), ρ_r = ECT's r(ρ_t),
    t and r the process times of ρ_t and ρ_r, weight 1/(ρ_t − ρ_r). For VE this is ECT itself; for FM
    and TrigFlow the same hyperparameters apply without retuning.

    **Decision**: the log-normal is *truncated* to (ρ(ε), ρ(t_max)] (equivalent to resampling until
    ε < t ≤ t_max, but done exactly by inverse CDF with one uniform per sample), rather than clipped:
    clipping would put point masses at ε (where the loss is identically zero) and at t_max (≈ 0.5 %
    and 0.3 % of samples for −1.1/2.0); truncation matches the normalised interval masses used by
    iCT and ADCM. After the float32 cast t is clamped to [nextafter(float32(ε), ∞), float32(t_max)]
    to keep ε < t strictly, and r to at most nextafter(t, 0): in late stages on FM/TrigFlow, near
    t_max, ECT's Δρ is below float32 resolution in t, and the pair becomes the closest representable
    one (its weight 1/(ρ_t − ρ_r) computed from the actual r, so finite) instead of an error.
    """

    def __init__(
        self,
        process: ForwardProcess,
        stage_iters: int,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        q: float = 2.0,
    ) -> None:
        if stage_iters <= 0:
            raise ValueError(f"stage_iters must be positive, got {stage_iters}")
        if p_std <= 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.process = process
        self.stage_iters = stage_iters
        self.p_mean, self.p_std = p_mean, p_std
        self.k, self.b, self.q = k, b, q

    def sample_t(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """t with ln ρ(t) ~ N(P_mean, P_std²) truncated to (ε, t_max], float32, on ``generator.device``."""
        device = generator.device
        rho_lo, rho_hi = self.process.rho_range
        lo = torch.special.ndtr(torch.tensor((math.log(rho_lo) - self.p_mean) / self.p_std, dtype=torch.float64))
        hi = torch.special.ndtr(torch.tensor((math.log(rho_hi) - self.p_mean) / self.p_std, dtype=torch.float64))
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        n = torch.special.ndtri(lo.to(device) + (hi - lo).to(device) * u)
        t = self.process.time_from_noise_to_signal(torch.exp(self.p_mean + self.p_std * n)).float()
        t_lo = torch.nextafter(torch.tensor(self.process.eps, dtype=torch.float32),
                               torch.tensor(math.inf, dtype=torch.float32)).item()
        return t.clamp_(min=t_lo, max=float(torch.tensor(self.process.t_max, dtype=torch.float32)))

    def sample(self, batch_size: int, iteration: int, generator: torch.Generator) -> PairBatch:
        """t ~ truncated log-normal in ρ, ρ_r = :func:`ect_r` (ρ_t, iteration), weight 1/(ρ_t − ρ_r)."""
        t = self.sample_t(batch_size, generator)
        nsr = self.process.noise_to_signal
        rho_r = ect_r(nsr(t.double()), iteration, self.stage_iters, self.k, self.b, self.q)
        r = self.process.time_from_noise_to_signal(rho_r).float()
        # Late stages can put r within float32 resolution of t (FM/TrigFlow near t_max): take the next
        # float below t instead, so that Δt > 0 and the weight below (from the actual r) stays finite.
        r = torch.minimum(r, torch.nextafter(t, torch.zeros_like(t)))
        weight = (1.0 / (nsr(t.double()) - nsr(r.double()))).float()
        return PairBatch(t=t, r=r, weight=weight)

    def state_dict(self) -> dict[str, Any]:
        """Stateless apart from the generator (owned by the caller): only the kind."""
        return {"kind": "ect"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the kind."""
        _check_kind(state, "ect")


# ---------------------------------------------------------------------------------------------
# iCT (Song & Dhariwal 2023)
# ---------------------------------------------------------------------------------------------


def ict_num_points(k: int, total_iters: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum (Song & Dhariwal 2023, Eq. 6; algorithm.md §3.2).

    N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋, K = ``total_iters``.
    (K' is floored at 1 for toy runs with K < log2⌊s1/s0⌋ + 1.)
    """
    if k < 0 or total_iters <= 0 or s0 <= 0 or s1 < s0:
        raise ValueError(f"bad arguments k={k}, total_iters={total_iters}, s0={s0}, s1={s1}")
    k_prime = max(1, math.floor(total_iters / (math.log2(math.floor(s1 / s0)) + 1)))
    doublings = k // k_prime
    if doublings >= 64:  # avoid huge integers; s1 is reached long before
        return s1 + 1
    return min(s0 * 2**doublings, s1) + 1


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


class ICTDiscretization(Discretization):
    """iCT's hand-made schedule (Song & Dhariwal 2023; algorithm.md §3.2).

    In the unified view the Karras grid with N(k) points fixes Δt(t) by hand; the doubling
    curriculum N(k) moves from coarse (near-diffusion) towards fine (near-continuous-time) steps.
    Interval i of the current grid (t = σ_i, r = σ_{i+1}, grid decreasing) is drawn with the
    discretised log-normal :func:`lognormal_interval_probs`; weight 1/(σ_i − σ_{i+1}).

    The grid lives in the noise-to-signal ratio ρ = σ (Karras grid from ρ(t_max) to ρ(ε)) and is
    mapped to the process's own time, so iCT runs on FM and TrigFlow without retuning.
    """

    def __init__(
        self,
        process: ForwardProcess,
        total_iters: int,
        s0: int = 10,
        s1: int = 1280,
        rho: float = 7.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
    ) -> None:
        ict_num_points(0, total_iters, s0, s1)  # validates
        self.process = process
        self.total_iters = total_iters
        self.s0, self.s1, self.rho = s0, s1, rho
        self.p_mean, self.p_std = p_mean, p_std
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def grid_and_probs(self, iteration: int) -> tuple[Tensor, Tensor]:
        """The (decreasing) Karras grid at ``iteration`` in process time, and its interval probabilities."""
        grid, _, probs = self._grids(iteration)
        return grid, probs

    def rho_grid(self, iteration: int) -> Tensor:
        """The Karras grid at ``iteration`` as noise-to-signal ratios σ_i (float64, decreasing)."""
        return self._grids(iteration)[1]

    def _grids(self, iteration: int) -> tuple[Tensor, Tensor, Tensor]:
        n = ict_num_points(iteration, self.total_iters, self.s0, self.s1)
        if n not in self._cache:
            rho_lo, rho_hi = self.process.rho_range
            rho = karras_grid(n, rho_lo, rho_hi, self.rho)
            grid = self.process.time_from_noise_to_signal(rho).to(torch.float64)
            grid[0], grid[-1] = self.process.t_max, self.process.eps
            if not bool((grid[1:] < grid[:-1]).all()):
                raise ValueError(f"iCT grid of {n} points is not strictly decreasing in {self.process.name} time")
            self._cache[n] = (grid, rho, lognormal_interval_probs(grid, self.p_mean, self.p_std, self.process))
        return self._cache[n]

    def sample(self, batch_size: int, iteration: int, generator: torch.Generator) -> PairBatch:
        """Interval i ~ discretised log-normal; t = σ_i, r = σ_{i+1} (process time), weight 1/(σ_i − σ_{i+1})."""
        grid, rho, probs = self._grids(iteration)
        idx = sample_intervals(probs, batch_size, generator)
        t, r, weight = _pairs_from_grid(grid, idx, rho)
        return PairBatch(t=t, r=r, weight=weight)

    def state_dict(self) -> dict[str, Any]:
        """Stateless apart from the generator (owned by the caller): only the kind."""
        return {"kind": "ict"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the kind."""
        _check_kind(state, "ict")


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state_dict is for discretization {state.get('kind')!r}, not {kind!r}")


# ---------------------------------------------------------------------------------------------
# ADCM (Bai et al. 2025)
# ---------------------------------------------------------------------------------------------


class PartitionTooLongError(ValueError):
    """The adaptive partition would exceed ``max_points`` (λ too small or a degenerate network)."""


def lam_factor(lam: float) -> float:
    """λ/(1+λ) of paper Eq. 10, with λ = ∞ giving exactly 1 (diffusion training)."""
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lambda must be >= 0 (inf allowed), got {lam}")
    return 1.0 if math.isinf(lam) else lam / (1.0 + lam)


def consistency_velocity(fn: ConsistencyFn, x_t: Tensor, t: Tensor, dx_dt: Tensor) -> tuple[Tensor, Tensor]:
    """f⁻(x_t, t) and v = d f⁻(x_t, t)/dt along the forward path, by ONE forward-mode JVP.

    v = ∂_x f⁻ · dx_t/dt + ∂_t f⁻, i.e. a forward-mode JVP (:func:`adcm.jvp.jvp`) of the *whole*
    (preconditioned) f⁻ at primal (x_t, t) with tangent (dx_t/dt, 1) (ADCM paper Eq. 10;
    algorithm.md §3.3, §5). Runs under
    ``torch.no_grad``: parameters are constants, nothing is recorded for backward.

    Args:
        fn: frozen consistency function f⁻(x, t).
        x_t: (B, ...) noisy inputs.
        t: (B,) times (same dtype as ``x_t``).
        dx_dt: (B, ...) path derivative dx_t/dt.

    Returns:
        (f, v), both shaped like ``x_t``.
    """
    return jvp(fn, (x_t, t), (dx_dt, torch.ones_like(t)))


def optimal_step(v: Tensor, e: Tensor, lam: float) -> tuple[float, float, float]:
    """Paper Eq. 10: Δt* = λ/(1+λ) · E⟨v, e⟩ / E‖v‖² as a ratio of *batch means*.

    Inner products run over all non-batch dims, in float64. If E‖v‖² = 0 the objective does not
    depend on Δt through the local term; Δt* is then +∞ for λ > 0 (take the largest admissible
    step) and 0 for λ = 0.

    Args:
        v: (B, ...) time derivative of f⁻ along the path.
        e: (B, ...) global error f⁻(x_t, t) − x0.
        lam: λ ≥ 0 (``math.inf`` allowed).

    Returns:
        (dt_star, num, den) with num = E⟨v, e⟩ and den = E‖v‖².
    """
    factor = lam_factor(lam)
    v64, e64 = v.detach().double().flatten(1), e.detach().double().flatten(1)
    num = float((v64 * e64).sum(1).mean())
    den = float((v64 * v64).sum(1).mean())
    if not (math.isfinite(num) and math.isfinite(den)):
        raise ValueError(f"non-finite ADCM statistics: E<v,e>={num}, E|v|^2={den}")
    if den == 0.0:
        return (math.inf if factor > 0 else 0.0), num, den
    return factor * num / den, num, den


def adcm_step(
    fn: ConsistencyFn, x0: Tensor, z: Tensor, t: float, lam: float, process: ForwardProcess
) -> tuple[float, dict[str, float]]:
    """The adaptive step Δt* at one time t (ADCM paper Eq. 10, one iteration of Alg. 1).

    x_t = x(t; x0, z) via ``process``; (f, v) by one JVP (:func:`consistency_velocity`);
    e = f − x0; Δt* = λ/(1+λ)·E⟨v, e⟩/E‖v‖² (:func:`optimal_step`). The whole mini-batch shares the
    scalar ``t``. No clamping here (see :func:`clamp_step`).

    Args:
        fn: frozen consistency function f⁻(x, t) (eval mode, dropout off).
        x0: (B, ...) data mini-batch.
        z: (B, ...) standard Gaussian noise, same shape as ``x0``.
        t: the time (ε < t ≤ t_max).
        lam: λ ≥ 0; ``math.inf`` gives the factor 1.
        process: forward process.

    Returns:
        (dt_star, stats) with stats keys ``t``, ``num`` (E⟨v,e⟩), ``den`` (E‖v‖²), ``factor``
        (λ/(1+λ)), ``global_err`` (E‖e‖²), ``dt_star``.
    """
    t_vec = torch.full((x0.shape[0],), float(t), dtype=x0.dtype, device=x0.device)
    with torch.no_grad():
        x_t = process.x_t(x0, z, t_vec)
        dx = process.dx_dt(x0, z, t_vec)
    f, v = consistency_velocity(fn, x_t, t_vec, dx)
    e = f - x0
    dt_star, num, den = optimal_step(v, e, lam)
    glob = float(e.detach().double().flatten(1).pow(2).sum(1).mean())
    stats = {"t": float(t), "num": num, "den": den, "factor": lam_factor(lam), "global_err": glob,
             "dt_star": dt_star}
    return dt_star, stats


def clamp_step(
    dt_star: float, t: float, eps: float, dt_min_rel: float = 1e-4, dt_min_abs: float = 1e-5
) -> tuple[float, str]:
    """Clamp Δt* into [Δt_min(t), t − ε] (algorithm.md §3.3 step 3, **decision**).

    Δt_min(t) = max(dt_min_rel·t, dt_min_abs) guards against a non-positive or vanishing
    numerator E⟨v, e⟩. Where Δt_min(t) > t − ε the upper bound wins. **Decision (no slivers)**: if
    the step would leave a remainder t − Δt − ε below Δt_min(ε), the step is extended to t − ε, so
    no interval is shorter than dt_min_abs except possibly one starting within dt_min_abs of ε
    (keeps adjacent points distinct after the float32 cast of t and r).

    Returns:
        (dt, how) with ``how`` in {"none", "min", "max", "snap"}.
    """
    if math.isnan(dt_star):
        raise ValueError(f"dt_star is NaN at t={t}")
    hi = t - eps
    lo = max(dt_min_rel * t, dt_min_abs)
    if not dt_star < hi:  # also catches +inf
        return hi, "max"
    if dt_star < lo:
        dt, how = min(lo, hi), ("min" if lo < hi else "max")
    else:
        dt, how = dt_star, "none"
    if hi - dt < max(dt_min_rel * eps, dt_min_abs) and dt < hi:
        return hi, "snap"
    return dt, how


def build_partition(
    fn: ConsistencyFn,
    sample_x0: DataSampler,
    generator: torch.Generator,
    *,
    process: ForwardProcess,
    lam: float,
    batch_size: int,
    max_points: int = 4096,
    dt_min_rel: float = 1e-4,
    dt_min_abs: float = 1e-5,
    record: list[dict[str, Any]] | None = None,
    network: nn.Module | None = None,
) -> Tensor:
    """Build ADCM's adaptive partition T (paper Alg. 1; algorithm.md §3.3).

    t ← t_max; repeat: draw a *fresh* mini-batch x0 = sample_x0(batch_size, generator) and
    z ~ N(0, I) (from ``generator``), Δt* = :func:`adcm_step` at t, Δt = :func:`clamp_step`,
    t ← t − Δt, until t reaches ε (the last point is set to exactly ε).

    Args:
        fn: frozen consistency function f⁻ (eval mode, dropout off; parameters are constants).
        sample_x0: data sampler ``sample_x0(batch_size, generator)``.
        generator: source of all randomness (x0 via ``sample_x0``, z drawn on its device).
        process: forward process (gives ε, t_max, x_t, dx_t/dt).
        lam: λ ≥ 0 (``math.inf``: one interval [ε, t_max], diffusion training).
        batch_size: partition mini-batch size.
        max_points: maximum number of points (including t_max and ε).
        dt_min_rel, dt_min_abs: Δt_min(t) = max(dt_min_rel·t, dt_min_abs).
        record: if given, one dict per step is appended (the :func:`adcm_step` stats plus ``dt``
            and ``clamp``), also when the build fails.
        network: the module behind ``fn`` (defaults to ``fn`` itself when ``fn`` is an
            ``nn.Module``); it is put in eval mode (dropout off) for the build and its train/eval
            flags are restored afterwards (:func:`frozen_network`). Everything runs under
            ``no_grad``: no parameter gradients are produced.

    Returns:
        Strictly decreasing float64 CPU tensor of points, ``points[0] == t_max``,
        ``points[-1] == ε`` exactly.

    Raises:
        PartitionTooLongError: (a ``ValueError``) if more than ``max_points`` points are needed.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    lam_factor(lam)  # validates λ before any network evaluation
    if network is None and isinstance(fn, nn.Module):
        network = fn
    eps, t = float(process.eps), float(process.t_max)
    points = [t]
    with frozen_network(network):
        while t > eps:
            x0 = sample_x0(batch_size, generator)
            z = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype)
            dt_star, stats = adcm_step(fn, x0, z.to(x0.device), t, lam, process)
            dt, how = clamp_step(dt_star, t, eps, dt_min_rel, dt_min_abs)
            # The last point is exactly ε (also if t − Δt rounds to or below ε).
            t = eps if (dt >= t - eps or t - dt <= eps) else t - dt
            if record is not None:
                record.append({**stats, "dt": dt, "clamp": how})
            points.append(t)
            if len(points) > max_points:
                raise PartitionTooLongError(
                    f"ADCM partition exceeds max_points={max_points} (at t={t:.6g}, eps={eps}); "
                    f"lambda={lam} is too small for this network, or raise max_points"
                )
    return torch.tensor(points, dtype=torch.float64)


def _rebuild_seed(seed: int, iteration: int) -> int:
    """Mix (seed, iteration) into a 63-bit seed (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + iteration + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class ADCMDiscretization(Discretization):
    """ADCM's adaptive discretization (Bai et al. 2025, Eq. 10, Alg. 1; algorithm.md §3.3).

    Unified view: Δt(t) is the minimiser of L_local + λ·L_global, Δt* = λ/(1+λ)·E⟨v,e⟩/E‖v‖²;
    λ → ∞ recovers diffusion training (Δt = t − ε), λ = 0 continuous-time training (sCM), and ECT
    /iCT are hand-made Δt(t) schedules in between. The partition is rebuilt from scratch with the
    current network every ``rebuild_every_iters`` iterations, *starting at iteration 0* (from the
    teacher, before the first step). Training draws an adjacent pair (t_i, t_{i+1}) of the latest
    partition per sample, with the discretised log-normal (``'lognormal'``: erf mass of
    ln β_t/α_t, P_mean/P_std) or uniform interval probabilities; the weight is ``None`` — the
    adaptive 1/d_c(f⁻(x_r, r), x0) of paper Eq. 11 is computed in the loss.

    Every partition built is kept as ``(iteration, points)`` in :attr:`partitions` and in the state
    dict. A rebuild draws its data/noise from a generator seeded by ``(seed, iteration)``, so it is
    reproducible and does not disturb the training data stream.

    Args:
        process: forward process.
        lam: λ ≥ 0 (``math.inf`` allowed), or a callable ``iteration -> λ`` (a λ schedule, e.g. the
            ImageNet 0.64 → 0.01 decay), evaluated at each rebuild.
        rebuild_every_iters: rebuild period (25k in the paper).
        partition_batch_size: mini-batch size for each Δt* estimate.
        max_points: maximum partition length (default 4096).
        interval_sampling: ``'lognormal'`` or ``'uniform'``.
        p_mean, p_std: log-normal proposal (−1.1, 2.0 on CIFAR-10).
        dt_min_rel, dt_min_abs: clamp Δt_min(t) = max(dt_min_rel·t, dt_min_abs).
        seed: base seed of the partition-building generators.
    """

    def __init__(
        self,
        process: ForwardProcess,
        lam: float | Callable[[int], float],
        rebuild_every_iters: int,
        partition_batch_size: int,
        max_points: int = 4096,
        interval_sampling: Literal["lognormal", "uniform"] = "lognormal",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        dt_min_rel: float = 1e-4,
        dt_min_abs: float = 1e-5,
        seed: int = 0,
    ) -> None:
        if rebuild_every_iters <= 0:
            raise ValueError(f"rebuild_every_iters must be positive, got {rebuild_every_iters}")
        if partition_batch_size <= 0:
            raise ValueError(f"partition_batch_size must be positive, got {partition_batch_size}")
        if interval_sampling not in ("lognormal", "uniform"):
            raise ValueError(f"interval_sampling must be 'lognormal' or 'uniform', got {interval_sampling!r}")
        if not callable(lam):
            lam_factor(float(lam))  # validates
        self.process = process
        self.lam = lam
        self.rebuild_every_iters = rebuild_every_iters
        self.partition_batch_size = partition_batch_size
        self.max_points = max_points
        self.interval_sampling = interval_sampling
        self.p_mean, self.p_std = p_mean, p_std
        self.dt_min_rel, self.dt_min_abs = dt_min_rel, dt_min_abs
        self.seed = seed
        self._partitions: list[tuple[int, Tensor]] = []
        self._probs: Tensor | None = None
        self.last_build_record: list[dict[str, Any]] = []

    # -- partitions ---------------------------------------------------------------------------

    @property
    def partitions(self) -> list[tuple[int, Tensor]]:
        """Every partition built so far as ``(iteration, float64 points)``, oldest first."""
        return list(self._partitions)

    @property
    def points(self) -> Tensor:
        """The current (latest) partition."""
        if not self._partitions:
            raise RuntimeError("no ADCM partition yet: call rebuild() before sampling")
        return self._partitions[-1][1]

    def lam_at(self, iteration: int) -> float:
        """λ used by a rebuild at ``iteration``."""
        return float(self.lam(iteration)) if callable(self.lam) else float(self.lam)

    def interval_probs(self) -> Tensor:
        """Interval probabilities of the current partition (float64, CPU)."""
        if self._probs is None:
            pts = self.points
            if self.interval_sampling == "uniform":
                self._probs = uniform_interval_probs(pts.numel() - 1)
            else:
                self._probs = lognormal_interval_probs(pts, self.p_mean, self.p_std, self.process)
        return self._probs

    def needs_rebuild(self, iteration: int) -> bool:
        """True if no partition exists yet, or ``iteration % rebuild_every_iters == 0`` and the
        latest partition was not already built at this iteration (idempotent across resumption)."""
        if not self._partitions:
            return True
        return iteration % self.rebuild_every_iters == 0 and self._partitions[-1][0] != iteration

    def rebuild(
        self,
        iteration: int,
        fn: ConsistencyFn,
        sample_x0: DataSampler,
        *,
        network: nn.Module | None = None,
    ) -> None:
        """Build a new partition with the current f⁻ (:func:`build_partition`) and keep it.

        ``network`` (or ``fn`` itself if it is an ``nn.Module``) is switched to eval mode for the
        build and restored afterwards; pass it when ``fn`` is a closure around the network. The
        data/noise come from a CPU generator seeded by ``(seed, iteration)``.
        """
        gen = torch.Generator().manual_seed(_rebuild_seed(self.seed, iteration))
        record: list[dict[str, Any]] = []
        self.last_build_record = record
        points = build_partition(
            fn, sample_x0, gen, process=self.process, lam=self.lam_at(iteration),
            batch_size=self.partition_batch_size, max_points=self.max_points,
            dt_min_rel=self.dt_min_rel, dt_min_abs=self.dt_min_abs, record=record, network=network,
        )
        self._partitions.append((int(iteration), points))
        self._probs = None

    def sample(self, batch_size: int, iteration: int, generator: torch.Generator) -> PairBatch:
        """Adjacent pairs (t, r) = (t_i, t_{i+1}) of the latest partition; weight ``None``."""
        del iteration
        idx = sample_intervals(self.interval_probs(), batch_size, generator)
        t, r, _ = _pairs_from_grid(self.points, idx)
        return PairBatch(t=t, r=r, weight=None)

    def state_dict(self) -> dict[str, Any]:
        """``{'kind', 'seed', 'partitions': [(iteration, float64 points), ...]}``."""
        return {
            "kind": "adcm",
            "seed": int(self.seed),
            "partitions": [(int(it), pts.clone()) for it, pts in self._partitions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the partitions and the seed (the saved seed wins over the constructor's, so
        later rebuilds are the ones the interrupted run would have made)."""
        _check_kind(state, "adcm")
        self.seed = int(state["seed"])
        self._partitions = [
            (int(it), _check_decreasing(torch.as_tensor(pts, dtype=torch.float64)).clone())
            for it, pts in state["partitions"]
        ]
        self._probs = None
