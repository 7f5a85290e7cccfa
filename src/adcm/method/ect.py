"""ECT's hand-made schedule (Geng et al. 2024, "Consistency Models Made Easy", §3): the mapping r(t)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adcm.method.discretization import Discretization, PairBatch, check_kind, period_index
from adcm.processes import ForwardProcess

__all__ = ["ECTDiscretization", "ect_r"]


def ect_r(t: Tensor, iteration: int, stage_iters: float, k: float = 8.0, b: float = 1.0, q: float = 2.0) -> Tensor:
    """ECT's mapping r(t) (Geng et al. 2024, §3 "mapping function"; docs/method.md#ect).

    r = t·(1 − n(t)/q^(a+1)), n(t) = 1 + k·sigmoid(−b·t), stage a = ⌊iteration / stage_iters⌋
    (:func:`~adcm.method.discretization.period_index`: stage a starts at a·stage_iters rounded half up
    when stage_iters is fractional), clamped at r ≥ 0. Each stage divides Δt = t − r by q, approaching
    continuous time.

    Args:
        t: times, any shape.
        iteration: training iteration.
        stage_iters: iterations per stage (25k on CIFAR-10; ≥ 1, may be fractional).
        k, b, q: ECT constants (8, 1, 2 on CIFAR-10; q = 4 on ImageNet).

    Returns:
        r with the shape and dtype of ``t``.
    """
    if stage_iters < 1:
        raise ValueError(f"stage_iters must be at least 1, got {stage_iters}")
    stage = period_index(iteration, stage_iters)
    n = 1.0 + k * torch.sigmoid(-b * t)
    return (t * (1.0 - n / q ** (stage + 1))).clamp(min=0.0)


class ECTDiscretization(Discretization):
    """ECT's hand-made schedule (Geng et al. 2024; docs/method.md#ect).

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
        stage_iters: float,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        q: float = 2.0,
    ) -> None:
        if stage_iters < 1:
            raise ValueError(f"stage_iters must be at least 1, got {stage_iters}")
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
        t_lo = torch.nextafter(
            torch.tensor(self.process.eps, dtype=torch.float32), torch.tensor(math.inf, dtype=torch.float32)
        ).item()
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
        check_kind(state, "ect")
