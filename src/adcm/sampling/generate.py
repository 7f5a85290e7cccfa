"""Generating image sets — the one function from seeds to images, for every sampler and every model.

A *sampler* here is always an image-generation algorithm: :class:`ConsistencySampler` (1 step
x = f(x_T, T), or more with intermediate times) for consistency models, :class:`HeunSampler` (EDM's
deterministic Heun solver) for diffusion teachers. Image i depends only on its seed: its latent,
class label and any fresh noise come, in that order, from a generator seeded with it
(:class:`~adcm.sampling.solvers.PerSampleNoise`), so a set is identical whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from adcm.io.images import to_uint8
from adcm.io.model_files import StudentFile, TeacherFile
from adcm.processes import ForwardProcess, coordinates, karras_grid
from adcm.sampling.solvers import PerSampleNoise, as_ve_denoiser, consistency_sample, heun_sample

__all__ = [
    "ConsistencySampler",
    "HeunSampler",
    "Sampler",
    "generate",
    "heun_for",
    "student_sampler",
    "uniform_label_probs",
]


@dataclass(frozen=True)
class ConsistencySampler:
    """Multistep consistency sampling in ``process``: x = f(x_T, T), then x ← f(α(t)·x + β(t)·z', t) for
    each t of ``t_mids`` (process time; empty = one step)."""

    process: ForwardProcess
    t_mids: tuple[float, ...] = ()

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return 1 + len(self.t_mids)


@dataclass(frozen=True)
class HeunSampler:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1) on the Karras grid of ``num_steps``
    levels from ``sigma_max`` to ``sigma_min`` (exponent ``rho``), run in VE coordinates for a model of
    ``process``."""

    process: ForwardProcess
    num_steps: int
    sigma_min: float
    sigma_max: float
    rho: float = 7.0

    @property
    def nfe(self) -> int:
        """Network evaluations per image (2·steps − 1)."""
        return 2 * self.num_steps - 1


Sampler = ConsistencySampler | HeunSampler


def student_sampler(student: StudentFile, steps: int, t_mid_sigma: float) -> ConsistencySampler:
    """1- or 2-step sampling of ``student`` in its own process; ``t_mid_sigma`` is the intermediate
    point as a VE σ (noise-to-signal ratio), converted to the process's time."""
    if steps not in (1, 2):
        raise ValueError(f"steps must be 1 or 2, got {steps}")
    process = student.sampling_process()
    if steps == 1:
        return ConsistencySampler(process)
    t_mid = float(process.time_from_noise_to_signal(torch.tensor(t_mid_sigma, dtype=torch.float64)))
    return ConsistencySampler(process, (t_mid,))


def heun_for(teacher: TeacherFile, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> HeunSampler:
    """EDM's Heun sampler for ``teacher`` (in VE coordinates, whatever its process)."""
    return HeunSampler(coordinates(teacher.process, teacher.sigma_data), num_steps, sigma_min, sigma_max, rho)


def uniform_label_probs(label_dim: int) -> Tensor | None:
    """Every class equally likely (sample grids of a conditional model); ``None`` when unconditional."""
    return torch.full((label_dim,), 1.0 / label_dim, dtype=torch.float64) if label_dim else None


def _labels(noise: PerSampleNoise, probs: Tensor | None) -> Tensor | None:
    """One class per sample drawn from ``probs`` (the data's label distribution), one-hot."""
    if probs is None:
        return None
    rows = [torch.multinomial(probs, 1, generator=g) for g in noise.generators]
    return torch.nn.functional.one_hot(torch.cat(rows), probs.numel()).float().to(noise.device)


@torch.no_grad()
def generate(
    net: nn.Module,
    sampler: Sampler,
    seeds: Sequence[int],
    *,
    shape: tuple[int, int, int],
    batch_size: int,
    device: torch.device,
    label_probs: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Images (N, C, H, W) uint8 for ``seeds`` with one sampler.

    Args:
        net: the consistency function f(x, t) (:class:`ConsistencySampler`) or the diffusion model's
            x0-prediction (:class:`HeunSampler`), in the wrapper of ``sampler.process``.
        sampler: the algorithm.
        seeds: one seed per image.
        shape: (C, H, W).
        batch_size: images per forward pass; does not change the result.
        device: where to run.
        label_probs: class distribution for conditional networks (None = unconditional).
        progress: called with the number of images finished after each batch.

    The network's train/eval mode is restored afterwards (sampling runs in eval mode).
    """
    was_training = net.training
    net = net.to(device).eval()
    out = []
    try:
        for start in range(0, len(seeds), batch_size):
            noise = PerSampleNoise(seeds[start : start + batch_size], device)
            latents = noise.randn(shape)
            labels = _labels(noise, label_probs)
            if isinstance(sampler, HeunSampler):
                sigmas = karras_grid(sampler.num_steps, sampler.sigma_min, sampler.sigma_max, sampler.rho).to(device)
                denoise = as_ve_denoiser(net, sampler.process)

                def x0_of_sigma(
                    x: Tensor, sigma: Tensor, labels: Tensor | None = labels, denoise: Callable[..., Tensor] = denoise
                ) -> Tensor:
                    return denoise(x, sigma, labels)

                images = heun_sample(x0_of_sigma, latents, sigmas)
            else:
                fresh = [noise.randn(shape) for _ in sampler.t_mids]

                def f(x: Tensor, t: Tensor, labels: Tensor | None = labels) -> Tensor:
                    return net(x, t, labels)

                images = consistency_sample(f, latents, sampler.process, list(sampler.t_mids), fresh)
            out.append(to_uint8(images))
            if progress is not None:
                progress(min(start + batch_size, len(seeds)))
    finally:
        net.train(was_training)
    return np.concatenate(out)
