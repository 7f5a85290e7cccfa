r"""ADCM: adaptive discretization for consistency models (Bai et al., NeurIPS 2025).

The step Δt at time t minimises local consistency plus λ times global consistency,

    L_local = E‖f⁻(x_t, t) − f⁻(x_{t−Δt}, t−Δt)‖²,   L_global = E‖f⁻(x_{t−Δt}, t−Δt) − x0‖²,

and after linearising f⁻ along the forward path (v = df⁻/dt, e = f⁻(x_t, t) − x0) the minimiser is
(paper Eq. 10)

    Δt* = λ/(1+λ) · E⟨v, e⟩ / E‖v‖²                                   (:func:`optimal_step`)

computed from ONE Jacobian-vector product of the whole preconditioned f⁻ (:func:`consistency_velocity`).
Paper Algorithm 1 walks from t_max down to ε with t ← t − Δt*(t) (:func:`build_partition`); training
draws adjacent pairs of the partition (:class:`ADCMDiscretization`) and weighs each sample by the
detached 1/d_c(f⁻(x_r, r), x0) (paper Eq. 11, :func:`adcm.method.losses.consistency_loss`).

λ → ∞ gives Δt = t − ε (diffusion training), λ = 0 gives Δt → 0 (continuous time, sCT). The clamps
of Δt* are this project's decisions (docs/method.md, "Decisions").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from adcm.errors import PartitionTooLongError
from adcm.method.discretization import (
    ConsistencyFn,
    DataDraw,
    Discretization,
    PairBatch,
    check_decreasing,
    check_kind,
    frozen_network,
    lognormal_interval_probs,
    pairs_from_grid,
    period_index,
    period_start,
    sample_intervals,
    uniform_interval_probs,
)
from adcm.nets.jvp import jvp
from adcm.processes import ForwardProcess

__all__ = [
    "ADCMDiscretization",
    "LambdaSchedule",
    "adcm_step",
    "build_partition",
    "build_partition_batched",
    "clamp_step",
    "consistency_velocity",
    "lam_factor",
    "optimal_step",
    "step_statistics",
]


def lam_factor(lam: float) -> float:
    """λ/(1+λ) of paper Eq. 10, with λ = ∞ giving exactly 1 (diffusion training)."""
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lambda must be >= 0 (inf allowed), got {lam}")
    return 1.0 if math.isinf(lam) else lam / (1.0 + lam)


def consistency_velocity(fn: ConsistencyFn, x_t: Tensor, t: Tensor, dx_dt: Tensor) -> tuple[Tensor, Tensor]:
    """f⁻(x_t, t) and v = d f⁻(x_t, t)/dt along the forward path, by ONE forward-mode JVP.

    v = ∂_x f⁻ · dx_t/dt + ∂_t f⁻, i.e. a forward-mode JVP (:func:`adcm.nets.jvp.jvp`) of the *whole*
    (preconditioned) f⁻ at primal (x_t, t) with tangent (dx_t/dt, 1) (ADCM paper Eq. 10;
    docs/method.md#adcm, docs/method.md#jacobian-vector-products). Runs under
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
    stats = {"t": float(t), "num": num, "den": den, "factor": lam_factor(lam), "global_err": glob, "dt_star": dt_star}
    return dt_star, stats


def clamp_step(
    dt_star: float, t: float, eps: float, dt_min_rel: float = 1e-4, dt_min_abs: float = 1e-5
) -> tuple[float, str]:
    """Clamp Δt* into [Δt_min(t), t − ε] (docs/method.md#adcm step 3, **decision**).

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
    sample_x0: DataDraw,
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
    """Build ADCM's adaptive partition T (paper Alg. 1; docs/method.md#adcm).

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


#: The batched builder uses the grid times where E⟨v, e⟩ exceeds this many standard errors of its estimate.
NUM_SE_MARGIN = 2.0


def step_statistics(
    fn: ConsistencyFn,
    x0: Tensor,
    z: Tensor,
    times: Tensor,
    process: ForwardProcess,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """E⟨v, e⟩ and E‖v‖² of paper Eq. 10 at every time of ``times``, over the same samples (x0, z).

    Every (time, sample) pair is one row of a batched JVP (:func:`consistency_velocity`; rows of
    different times share a call, ``chunk_size`` rows at a time); the same x0 and z at every time
    (common random numbers) make the estimated curve smooth in t. Runs under ``no_grad``.

    Args:
        fn: frozen consistency function f⁻.
        x0: (M, ...) data; z: (M, ...) standard noise.
        times: (G,) times, float64.
        process: forward process.
        chunk_size: rows per JVP call.

    Returns:
        (num, den, num_se), each (G,) float64 on the CPU: the two batch means and the standard error of
        the numerator's mean (its per-sample spread over √M).
    """
    m, g = x0.shape[0], times.numel()
    rows = g * m
    num, den = torch.zeros(g, dtype=torch.float64), torch.zeros(g, dtype=torch.float64)
    num_sq = torch.zeros(g, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, rows, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, rows))
            which_t, which_x = idx // m, idx % m
            t = times[which_t].to(dtype=x0.dtype, device=x0.device)
            xs, zs = x0[which_x.to(x0.device)], z[which_x.to(x0.device)]
            x_t = process.x_t(xs, zs, t)
            f, v = consistency_velocity(fn, x_t, t, process.dx_dt(xs, zs, t))
            v64, e64 = v.double().flatten(1), (f - xs).double().flatten(1)
            inner = (v64 * e64).sum(1).cpu()
            num.index_add_(0, which_t, inner)
            num_sq.index_add_(0, which_t, inner * inner)
            den.index_add_(0, which_t, (v64 * v64).sum(1).cpu())
    num, den = num / m, den / m
    num_se = ((num_sq / m - num * num).clamp_min(0) * m / max(m - 1, 1) / m).sqrt()
    if not (bool(torch.isfinite(num).all()) and bool(torch.isfinite(den).all())):
        raise ValueError("non-finite ADCM statistics in the batched estimate")
    return num, den, num_se


def build_partition_batched(
    fn: ConsistencyFn,
    sample_x0: DataDraw,
    generator: torch.Generator,
    *,
    process: ForwardProcess,
    lam: float,
    batch_size: int,
    num_times: int,
    chunk_size: int = 64,
    max_points: int = 4096,
    dt_min_rel: float = 1e-4,
    dt_min_abs: float = 1e-5,
    record: list[dict[str, Any]] | None = None,
    network: nn.Module | None = None,
) -> Tensor:
    """ADCM's partition from a batched estimate of Δt*(t) (paper Eq. 10) on a grid of times.

    The paper's Algorithm 1 (:func:`build_partition`) evaluates Eq. 10 at each point as it walks down
    from t_max; only the trend of Δt*(t) matters (paper §3.2). Here E⟨v, e⟩ and E‖v‖² are estimated
    once on ``num_times`` times spaced uniformly in ln ρ (the noise-to-signal ratio) from t_max to ε,
    each from the same ``batch_size`` samples (:func:`step_statistics`, batched JVPs); their ratio is
    interpolated linearly in ln ρ through its logarithm (log–log: the trend), over the grid times where
    the numerator E⟨v, e⟩ is positive by more than ``NUM_SE_MARGIN`` standard errors (**decision**: where
    it is not, Eq. 10 gives no step the samples can resolve; such times are bridged from their
    neighbours, and the nearest resolved value extends beyond the ends), and the
    recursion t ← t − Δt with Δt = :func:`clamp_step` (λ/(1+λ)·num/den) runs on the interpolant with the
    same clamps, floor and ``max_points`` as the sequential builder — without calling the network.

    Args and return value as :func:`build_partition`, plus ``num_times`` (grid size, ≥ 2) and
    ``chunk_size`` (rows per JVP call). ``record`` gets one dict per grid time (``t``, ``num``,
    ``den``, ``dt_star``, ``grid=True``) and one per step (``t``, ``dt_star``, ``dt``, ``clamp``).
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if num_times < 2:
        raise ValueError(f"num_times must be >= 2, got {num_times}")
    factor = lam_factor(lam)
    if network is None and isinstance(fn, nn.Module):
        network = fn
    eps, t_max = float(process.eps), float(process.t_max)
    rho_lo, rho_hi = process.rho_range
    u_grid = torch.linspace(math.log(rho_hi), math.log(rho_lo), num_times, dtype=torch.float64)
    times = process.time_from_noise_to_signal(torch.exp(u_grid)).to(torch.float64)
    times[0], times[-1] = t_max, eps
    with frozen_network(network):
        x0 = sample_x0(batch_size, generator)
        z = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        num, den, num_se = step_statistics(fn, x0, z, times, process, chunk_size)
    ratio = num / den.clamp_min(torch.finfo(torch.float64).tiny)
    if record is not None:
        for tg, n, se, d, r in zip(
            times.tolist(), num.tolist(), num_se.tolist(), den.tolist(), ratio.tolist(), strict=True
        ):
            record.append({"t": tg, "num": n, "num_se": se, "den": d, "dt_star": factor * r, "grid": True})
    # The trend of Δt*(t) in log–log coordinates, from the grid times where the estimate is positive (where the
    # numerator E⟨v, e⟩ is not, Eq. 10 gives no step; the interpolant bridges such times from their neighbours
    # and extends the nearest positive value beyond the ends). Increasing abscissae for the interpolation.
    valid = (num > NUM_SE_MARGIN * num_se).flip(0)
    u_inc, log_ratio = u_grid.flip(0)[valid].numpy(), torch.log(ratio.flip(0)[valid]).numpy()

    def dt_star_at(t: float) -> float:
        if factor == 0:
            return 0.0
        if len(u_inc) == 0:  # nowhere positive: every step is the floor
            return 0.0
        u = math.log(float(process.noise_to_signal(torch.tensor(t, dtype=torch.float64))))
        return factor * math.exp(float(np.interp(u, u_inc, log_ratio)))

    t, points = t_max, [t_max]
    while t > eps:
        dt_star = dt_star_at(t)
        dt, how = clamp_step(dt_star, t, eps, dt_min_rel, dt_min_abs)
        t_next = eps if (dt >= t - eps or t - dt <= eps) else t - dt
        if record is not None:
            record.append({"t": t, "dt_star": dt_star, "dt": dt, "clamp": how})
        t = t_next
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


@dataclass(frozen=True)
class LambdaSchedule:
    """A piecewise-constant λ over the run: ``steps`` are ``(first iteration, λ)``, the first at iteration 0.

    λ(iteration) is the λ of the last step whose first iteration is ≤ ``iteration`` (e.g. coarse-to-fine:
    ``((0, 0.1), (200, 0.01))``). :class:`ADCMDiscretization` evaluates it at each rebuild and also rebuilds
    at every switch, so the new λ takes effect at once.
    """

    steps: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        starts = [it for it, _ in self.steps]
        if not starts or starts[0] != 0 or any(b < a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"a lambda schedule starts at iteration 0 and never goes back, got {self.steps}")
        for _, lam in self.steps:
            lam_factor(float(lam))  # validates

    def __call__(self, iteration: int) -> float:
        """λ at ``iteration``."""
        return float([lam for it, lam in self.steps if it <= iteration][-1])

    @property
    def switches(self) -> frozenset[int]:
        """The iterations after 0 where λ changes."""
        return frozenset(it for it, _ in self.steps[1:] if it > 0)

    @classmethod
    def from_fractions(cls, steps: Sequence[tuple[float, float]], total_iters: int) -> LambdaSchedule:
        """``(fraction of the run, λ)`` steps on a run of ``total_iters`` iterations (fractions rounded to whole
        iterations, as every proportional schedule: ``train.adcm.lambda_schedule``)."""
        return cls(tuple((round(fraction * total_iters), float(lam)) for fraction, lam in steps))


class ADCMDiscretization(Discretization):
    """ADCM's adaptive discretization (Bai et al. 2025, Eq. 10, Alg. 1; docs/method.md#adcm).

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
            ImageNet 0.64 → 0.01 decay), evaluated at each rebuild; a :class:`LambdaSchedule` also
            triggers a rebuild at each of its switches.
        rebuild_every_iters: rebuild period (25k in the paper; ≥ 1, may be fractional: the k-th rebuild is
            then at k·period rounded half up, :func:`~adcm.method.discretization.period_start`).
        partition_batch_size: mini-batch size for each Δt* estimate.
        max_points: maximum partition length (default 4096).
        interval_sampling: ``'lognormal'`` or ``'uniform'``.
        p_mean, p_std: log-normal proposal (−1.1, 2.0 on CIFAR-10).
        dt_min_rel, dt_min_abs: clamp Δt_min(t) = max(dt_min_rel·t, dt_min_abs).
        seed: base seed of the partition-building generators.
        builder: ``'sequential'`` (paper Algorithm 1, :func:`build_partition`: one Δt* estimate from a fresh
            mini-batch of ``partition_batch_size`` per point) or ``'batched'`` (:func:`build_partition_batched`:
            ``num_times`` estimates from ``partition_batch_size`` samples each, in JVP calls of
            ``chunk_size`` rows, then the recursion on their interpolant).
    """

    def __init__(
        self,
        process: ForwardProcess,
        lam: float | Callable[[int], float],
        rebuild_every_iters: float,
        partition_batch_size: int,
        max_points: int = 4096,
        interval_sampling: Literal["lognormal", "uniform"] = "lognormal",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        dt_min_rel: float = 1e-4,
        dt_min_abs: float = 1e-5,
        seed: int = 0,
        builder: Literal["sequential", "batched"] = "sequential",
        num_times: int = 32,
        chunk_size: int = 64,
    ) -> None:
        if builder not in ("sequential", "batched"):
            raise ValueError(f"builder must be 'sequential' or 'batched', got {builder!r}")
        if rebuild_every_iters < 1:
            raise ValueError(f"rebuild_every_iters must be at least 1, got {rebuild_every_iters}")
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
        self.builder, self.num_times, self.chunk_size = builder, num_times, chunk_size
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
        """True if no partition exists yet, or ``iteration`` starts a rebuild period (``iteration %
        rebuild_every_iters == 0`` for a whole period; :func:`~adcm.method.discretization.period_start`) or is a
        switch of a :class:`LambdaSchedule`, and the latest partition was not already built at this iteration
        (idempotent across resumption)."""
        if not self._partitions:
            return True
        switch = isinstance(self.lam, LambdaSchedule) and iteration in self.lam.switches
        period = self.rebuild_every_iters
        due = period_start(period_index(iteration, period), period) == iteration or switch
        return due and self._partitions[-1][0] != iteration

    def rebuild(
        self,
        iteration: int,
        fn: ConsistencyFn,
        sample_x0: DataDraw,
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
        common: dict[str, Any] = dict(
            process=self.process,
            lam=self.lam_at(iteration),
            batch_size=self.partition_batch_size,
            max_points=self.max_points,
            dt_min_rel=self.dt_min_rel,
            dt_min_abs=self.dt_min_abs,
            record=record,
            network=network,
        )
        if self.builder == "batched":
            points = build_partition_batched(
                fn, sample_x0, gen, num_times=self.num_times, chunk_size=self.chunk_size, **common
            )
        else:
            points = build_partition(fn, sample_x0, gen, **common)
        self._partitions.append((int(iteration), points))
        self._probs = None

    def sample(self, batch_size: int, iteration: int, generator: torch.Generator) -> PairBatch:
        """Adjacent pairs (t, r) = (t_i, t_{i+1}) of the latest partition; weight ``None``."""
        del iteration
        idx = sample_intervals(self.interval_probs(), batch_size, generator)
        t, r, _ = pairs_from_grid(self.points, idx)
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
        check_kind(state, "adcm")
        self.seed = int(state["seed"])
        self._partitions = [
            (int(it), check_decreasing(torch.as_tensor(pts, dtype=torch.float64)).clone())
            for it, pts in state["partitions"]
        ]
        self._probs = None
