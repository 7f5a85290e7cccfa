"""Samplers as pure functions of a network callable and explicit noise (k-diffusion style).

Sample i depends only on seed i: all noise comes from :class:`PerSampleNoise`, one generator per
sample, so results do not change with the batch size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adcm.processes import ForwardProcess

__all__ = ["PerSampleNoise", "as_ve_denoiser", "consistency_sample", "heun_sample"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


class PerSampleNoise:
    """One ``torch.Generator`` per sample, seeded with that sample's seed.

    Every draw returns a batch whose row i comes from generator i only, in call order: the first
    ``randn`` gives the initial latents, a second one the fresh noise of a 2-step sampler.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """(len(seeds), *shape) standard normal draws."""
        rows = [torch.randn(*shape, generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randint(self, high: int) -> Tensor:
        """(len(seeds),) integers in [0, high), e.g. class labels or dataset indices."""
        rows = [torch.randint(high, (1,), generator=g) for g in self.generators]
        return torch.cat(rows).to(self.device)


@torch.no_grad()
def heun_sample(denoiser: Denoiser, latents: Tensor, sigmas: Tensor) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1, S_churn = 0).

    Args:
        denoiser: D(x, σ) with σ of shape (B,).
        latents: (B, C, H, W) unit Gaussian noise.
        sigmas: decreasing noise levels (float64; EDM's grid is :func:`adcm.processes.karras_grid`); a
            final σ = 0 is appended. N levels cost 2N − 1 network evaluations (18 → 35 NFE).
    Returns:
        Samples (B, C, H, W) in the data scale, float32.
    """
    steps = torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * steps[0]
    batch = x.shape[0]

    def slope(x_: Tensor, s: Tensor) -> Tensor:
        d = denoiser(x_.to(torch.float32), s.to(torch.float32).expand(batch)).to(torch.float64)
        return (x_ - d) / s

    for cur, nxt in itertools.pairwise(steps):
        d_cur = slope(x, cur)
        x_next = x + (nxt - cur) * d_cur
        if nxt > 0:
            x_next = x + (nxt - cur) * 0.5 * (d_cur + slope(x_next, nxt))
        x = x_next
    return x.to(torch.float32)


@torch.no_grad()
def consistency_sample(
    fn: Denoiser, latents: Tensor, process: ForwardProcess, t_mids: Sequence[float], noise: Sequence[Tensor]
) -> Tensor:
    """Multistep consistency sampling on any forward process.

    x = f(x_T, T) with x_T = β(T)·z (the data term α(T)·x0 is dropped: T·z for VE, T·z for FM,
    σ_d·sin T·z for TrigFlow); then for each t_mid: x ← f(α(t_mid)·x + β(t_mid)·z', t_mid) with
    fresh noise z' (VE: x + t_mid·z').

    Args:
        fn: consistency function f(x, t), t of shape (B,).
        latents: (B, C, H, W) unit Gaussian noise.
        process: the forward process of ``fn`` (gives T = ``process.t_max``, α and β).
        t_mids: intermediate times in the process's own time (empty → one step).
        noise: one fresh unit-Gaussian tensor per intermediate time.
    """
    if len(noise) != len(t_mids):
        raise ValueError("need one noise tensor per intermediate time")
    batch = latents.shape[0]
    t_max = latents.new_full((batch,), process.t_max)
    x = fn(process.x_t(torch.zeros_like(latents), latents, t_max), t_max)
    for t_mid, z in zip(t_mids, noise, strict=True):
        t_vec = latents.new_full((batch,), t_mid)
        x = fn(process.x_t(x, z, t_vec), t_vec)
    return x


def as_ve_denoiser(fn: Callable[..., Tensor], process: ForwardProcess) -> Callable[..., Tensor]:
    """EDM's D(x_σ, σ) from an x0-predicting model of any process (exact change of coordinates).

    The VE point (x_σ, σ) is x_t = α(t)·x_σ at t = ρ⁻¹(σ) of ``process`` (:mod:`adcm.processes`), so
    EDM's Heun sampler runs unchanged on FM and TrigFlow teachers. For VE ``fn`` is returned as is.
    """
    if process.name == "ve":
        return fn

    def denoise(x_sigma: Tensor, sigma: Tensor, *args: object, **kwargs: object) -> Tensor:
        x_t, t = process.from_ve(x_sigma, sigma)
        return fn(x_t, t, *args, **kwargs)

    return denoise
