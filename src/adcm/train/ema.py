"""The exponential moving average of the weights used for evaluation (EDM's half-life rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["EMARule", "ema_beta", "update_ema"]


def ema_beta(batch_size: int, nimg: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EMA decay per step for a half-life in images (EDM's rule, with optional ramp-up)."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·net for every parameter; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)


@dataclass(frozen=True)
class EMARule:
    """How the EMA decays per step: a constant ``beta``, or a half-life in kimg (with optional ramp-up).

    Attributes:
        beta: constant decay per step (ECT/ADCM on CIFAR-10: 0.9999), or ``None``.
        halflife_kimg: half-life in thousands of images (when ``beta`` is None).
        rampup_ratio: the half-life is at most this fraction of the images seen so far (EDM's ramp-up).
    """

    beta: float | None = None
    halflife_kimg: float | None = None
    rampup_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.beta is None) == (self.halflife_kimg is None):
            raise ValueError("EMARule: give exactly one of beta and halflife_kimg")

    def beta_at(self, batch_size: int, nimg: int) -> float:
        """The decay of the step that brought the run to ``nimg`` images."""
        if self.beta is not None:
            return self.beta
        assert self.halflife_kimg is not None
        return ema_beta(batch_size, nimg, self.halflife_kimg, self.rampup_ratio)
