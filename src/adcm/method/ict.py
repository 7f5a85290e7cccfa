"""iCT's hand-made schedule (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", §3.4–3.5):
a Karras grid refined by a doubling curriculum N(k)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adcm.method.discretization import (
    Discretization,
    PairBatch,
    check_kind,
    lognormal_interval_probs,
    pairs_from_grid,
    sample_intervals,
)
from adcm.processes import ForwardProcess, karras_grid

__all__ = ["ICTDiscretization", "ict_num_points"]


def ict_num_points(k: int, total_iters: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum (Song & Dhariwal 2023, Eq. 6; docs/method.md#ict).

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


class ICTDiscretization(Discretization):
    """iCT's hand-made schedule (Song & Dhariwal 2023; docs/method.md#ict).

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
        t, r, weight = pairs_from_grid(grid, idx, rho)
        return PairBatch(t=t, r=r, weight=weight)

    def state_dict(self) -> dict[str, Any]:
        """Stateless apart from the generator (owned by the caller): only the kind."""
        return {"kind": "ict"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the kind."""
        check_kind(state, "ict")
