"""Generating image sets: 1-/2-step consistency sampling and the teacher's Heun sampler, per-sample seeds.

Image i depends only on its seed: its latent, class label and any fresh noise come, in that order,
from a generator seeded with it (:class:`~adcm.samplers.PerSampleNoise`), so a set is identical
whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from adcm.images import to_uint8
from adcm.precond import Precond
from adcm.processes import ForwardProcess
from adcm.samplers import PerSampleNoise, as_ve_denoiser, consistency_sample, heun_sample, karras_sigmas

__all__ = ["SamplerName", "generate"]

SamplerName = Literal["1step", "2step", "teacher"]


def _labels(noise: PerSampleNoise, probs: Tensor | None) -> Tensor | None:
    """One class per sample drawn from ``probs`` (the data's label distribution), one-hot."""
    if probs is None:
        return None
    rows = [torch.multinomial(probs, 1, generator=g) for g in noise.generators]
    return torch.nn.functional.one_hot(torch.cat(rows), probs.numel()).float().to(noise.device)


@torch.no_grad()
def generate(
    net: Precond,
    sampler: SamplerName,
    seeds: Sequence[int],
    *,
    shape: tuple[int, int, int],
    batch_size: int,
    device: torch.device,
    label_probs: Tensor | None,
    process: ForwardProcess,
    t_mid: float,
    teacher_steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Images (N, C, H, W) uint8 for ``seeds`` with one sampler.

    Args:
        net: consistency function f(x, t) (``1step``/``2step``) or the teacher's x0-prediction
            (``teacher``), in the wrapper of ``process``.
        sampler: ``1step``: x = f(x_T, T); ``2step``: then x ← f(α·x + β·z', t_mid) (algorithm.md
            §2; :func:`~adcm.samplers.consistency_sample`); ``teacher``: EDM's Heun sampler in VE
            coordinates with ``teacher_steps`` levels (2·steps − 1 NFE) from ``sigma_max`` to
            ``sigma_min``, ρ = ``rho``.
        seeds: one seed per image.
        shape: (C, H, W).
        batch_size: images per forward pass; does not change the result.
        label_probs: class distribution for conditional networks (None = unconditional).
        process: the wrapper's forward process (T = ``process.t_max`` for the consistency samplers).
        t_mid: the 2-step intermediate time, in ``process``'s own time.
        progress: called with the number of images finished after each batch.
    """
    net = net.to(device).eval()
    out = []
    for start in range(0, len(seeds), batch_size):
        noise = PerSampleNoise(seeds[start:start + batch_size], device)
        latents = noise.randn(shape)
        labels = _labels(noise, label_probs)
        if sampler == "teacher":
            sigmas = karras_sigmas(teacher_steps, sigma_min, sigma_max, rho).to(device)
            images = heun_sample(lambda x, s, lab=labels, d=as_ve_denoiser(net, process): d(x, s, lab), latents,
                                 sigmas)
        else:
            mids = [t_mid] if sampler == "2step" else []
            fresh = [noise.randn(shape)] if sampler == "2step" else []
            images = consistency_sample(lambda x, t, lab=labels: net(x, t, lab), latents, process, mids, fresh)
        out.append(to_uint8(images))
        if progress is not None:
            progress(min(start + batch_size, len(seeds)))
    return np.concatenate(out)
