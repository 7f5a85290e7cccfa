r"""The noise pass-through κ of a consistency function: how much of the noise at level t reaches its output.

On the VE process (x_t = x0 + t·z, z ~ N(0, I), d the data dimension)

    κ(t) = E⟨f(x0 + t·z, t) − x0, z⟩ / (t·d).

κ = 1 for f(x, t) = x (the input, noise and all, is returned) and κ = 0 for a map that removes the noise
exactly (the x0 oracle). It measures the failure docs/results.md describes for fine-Δt training:
2-step sampling re-noises the 1-step image to t_mid, x_mid = x + t_mid·z', and a consistency function
whose κ(t_mid) is close to 1 hands z' back instead of removing it.

Closed forms for Gaussian data x0 ~ N(0, s²I) (tests/eval/test_passthrough.py checks them): the posterior
mean E[x0 | x_t] = s²/(s² + t²)·x_t (the diffusion teacher's x0-prediction) has

    κ(t) = s²/(s² + t²),

and the exact consistency map of the probability-flow ODE, whose trajectories are x_t ∝ √(s² + t²), i.e.
f(x, t) = x·√(s² + ε²)/√(s² + t²), has

    κ(t) = √(s² + ε²)/√(s² + t²):

a perfect consistency model passes *more* noise than the teacher's denoiser (it maps the noise to image
content instead of averaging it away), so κ is read against the teacher's and the exact map's, not against 0.

**Other processes** (x_t = α(t)·x0 + β(t)·z, :mod:`adcm.processes`): the noisy point is the process's own
x_t and the normaliser is the noise-to-signal ratio ρ(t) = β(t)/α(t), the VE σ of the same point,

    κ(t) = E⟨f(α(t)·x0 + β(t)·z, t) − x0, z⟩ / (ρ(t)·d).

With it κ is the VE κ at σ = ρ(t) of the same map: the function that returns its input in VE coordinates,
x_t/α(t) = x0 + ρ(t)·z, has κ = 1, the posterior mean has s²/(s² + ρ²) in every process, and the levels
are given as VE σ like ``sample.t_mid`` (a literal f(x, t) = x has κ = α(t) there).

The estimate is deterministic given ``seed``: z for all images comes from one CPU generator, the same z at
every level (common random numbers, so κ(t) is a smooth curve), and batching does not change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adcm.method.discretization import frozen_network
from adcm.processes import ForwardProcess

__all__ = ["Passthrough", "noise_passthrough"]


@dataclass(frozen=True)
class Passthrough:
    """κ at one level: its mean over the images, the standard error of that mean, and the count."""

    sigma: float
    t: float
    kappa: float
    se: float
    count: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain JSON values."""
        return {"sigma": self.sigma, "t": self.t, "kappa": self.kappa, "se": self.se, "count": self.count}


@torch.no_grad()
def noise_passthrough(
    fn: Callable[..., Tensor],
    x0: Tensor,
    sigmas: Sequence[float],
    process: ForwardProcess,
    *,
    seed: int,
    batch_size: int,
    labels: Tensor | None = None,
    device: torch.device | None = None,
) -> list[Passthrough]:
    """κ of ``fn`` at every noise level of ``sigmas`` (module docstring), on the images ``x0``.

    Args:
        fn: consistency function f(x, t) of ``process`` (a student's EMA, or a teacher's ε-shifted consistency
            function); called as ``fn(x, t)``, or ``fn(x, t, labels)`` when ``labels`` is given. An ``nn.Module``
            is evaluated in eval mode (dropout off) and every sub-module's mode restored afterwards.
        x0: (N, ...) images in the model's data range ([-1, 1]), float.
        sigmas: noise levels as VE σ (noise-to-signal ratios, like ``sample.t_mid``); each is converted to the
            process's time t = ρ⁻¹(σ) (VE: t = σ).
        process: the forward process ``fn`` works in.
        seed: seeds the CPU generator of z (N draws of x0's shape, shared by every level).
        batch_size: images per forward pass (does not change the result beyond float round-off).
        labels: (N, K) one-hot class labels for a conditional ``fn`` (None = unconditional).
        device: where ``fn`` runs (default: ``x0``'s device).

    Returns:
        One :class:`Passthrough` per level, in the order of ``sigmas``.
    """
    if x0.ndim < 2 or x0.shape[0] < 2:
        raise ValueError(f"need at least 2 images of shape (N, ...), got {tuple(x0.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if labels is not None and labels.shape[0] != x0.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {x0.shape[0]} images")
    if not all(math.isfinite(s) and s > 0 for s in sigmas):
        raise ValueError(f"noise levels must be positive and finite, got {list(sigmas)}")
    device = device or x0.device
    n, dim = x0.shape[0], math.prod(x0.shape[1:])
    z_all = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    results = []
    with frozen_network(fn if isinstance(fn, nn.Module) else None):
        for sigma in sigmas:
            t = float(process.time_from_noise_to_signal(torch.tensor(float(sigma), dtype=torch.float64)))
            rho = float(process.noise_to_signal(torch.tensor(t, dtype=torch.float64)))
            values = torch.empty(n, dtype=torch.float64)
            for start in range(0, n, batch_size):
                rows = slice(start, min(start + batch_size, n))
                xs = x0[rows].to(device)
                zs = z_all[rows].to(device=device, dtype=xs.dtype)
                t_vec = torch.full((xs.shape[0],), t, dtype=xs.dtype, device=device)
                x_t = process.x_t(xs, zs, t_vec)
                out = fn(x_t, t_vec) if labels is None else fn(x_t, t_vec, labels[rows].to(device))
                inner = ((out.double() - xs.double()) * zs.double()).flatten(1).sum(1)
                values[rows] = (inner / (rho * dim)).cpu()
            mean = float(values.mean())
            se = float(values.std(unbiased=True)) / math.sqrt(n)
            if not (math.isfinite(mean) and math.isfinite(se)):
                raise ValueError(f"non-finite noise pass-through at σ = {sigma}")
            results.append(Passthrough(float(sigma), t, mean, se, n))
    return results
