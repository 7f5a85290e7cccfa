"""Generating image sets — the one function from seeds to images, for every sampler and every model.

A *sampler* here is always an image-generation algorithm: :class:`ConsistencySampler` (1 step
x = f(x_T, T), or more with intermediate times) for consistency models, :class:`HeunSampler` (EDM's
deterministic Heun solver) for diffusion teachers. Image i depends only on its seed: its latent,
class label and any fresh noise come, in that order, from a generator seeded with it
(:class:`~adcm.sampling.solvers.PerSampleNoise`), so a set is identical whatever the batch size.

Class-conditional models take one class per image, either drawn from the seed's generator (from a class
distribution, e.g. :func:`uniform_label_probs`) or given (``class_labels``): every image of one class
(:func:`chosen_labels`), or an exactly balanced set for FID (:func:`balanced_labels`, class = seed mod K).
A grid of a conditional model (:func:`sample_grid`) shows one class per row: its seeds
(:func:`grid_seeds`) are those of that class in the balanced labelling, so the grid's images are images of
the balanced set. A given class still consumes the seed's label draw, so the latent and any fresh noise of
image i are the same whichever way its class is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from adcm.errors import ParamsError
from adcm.io.images import to_uint8
from adcm.io.model_files import StudentFile, TeacherFile
from adcm.processes import ForwardProcess, coordinates, karras_grid
from adcm.sampling.solvers import PerSampleNoise, as_ve_denoiser, consistency_sample, heun_sample

__all__ = [
    "ConsistencySampler",
    "HeunSampler",
    "Sampler",
    "balanced_labels",
    "chosen_labels",
    "generate",
    "grid_seeds",
    "heun_for",
    "sample_grid",
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


def student_sampler(student: StudentFile, steps: int, t_mid_sigma: float | None = None) -> ConsistencySampler:
    """1- or 2-step sampling of ``student`` in its own process; ``t_mid_sigma`` (2 steps only) is the intermediate
    point as a VE σ (noise-to-signal ratio), converted to the process's time."""
    if steps not in (1, 2):
        raise ValueError(f"steps must be 1 or 2, got {steps}")
    process = student.sampling_process()
    if steps == 1:
        return ConsistencySampler(process)
    if t_mid_sigma is None:
        raise ValueError("2-step sampling needs t_mid_sigma")
    t_mid = float(process.time_from_noise_to_signal(torch.tensor(t_mid_sigma, dtype=torch.float64)))
    return ConsistencySampler(process, (t_mid,))


def heun_for(teacher: TeacherFile, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> HeunSampler:
    """EDM's Heun sampler for ``teacher`` (in VE coordinates, whatever its process)."""
    return HeunSampler(coordinates(teacher.process, teacher.sigma_data), num_steps, sigma_min, sigma_max, rho)


def uniform_label_probs(label_dim: int) -> Tensor | None:
    """Every class equally likely (sample grids of a conditional model); ``None`` when unconditional."""
    return torch.full((label_dim,), 1.0 / label_dim, dtype=torch.float64) if label_dim else None


def balanced_labels(seeds: Sequence[int], num_classes: int) -> list[int]:
    """An exactly class-balanced set: image of seed s has class s mod ``num_classes`` (seed-indexed round robin).

    Any ``num_classes`` consecutive seeds cover every class once, so a set of N consecutive seeds has
    ⌊N/K⌋ or ⌈N/K⌉ images of each class (exactly N/K when K divides N), and image i's class depends on its
    seed only. This is the label set of ``adcm sample`` for FID.
    """
    if num_classes <= 0:
        raise ValueError(f"need at least one class, got {num_classes}")
    return [int(s) % num_classes for s in seeds]


def chosen_labels(
    num_images: int, num_classes: int, class_label: int, *, where: str = "sample.class_label"
) -> list[int]:
    """Every image of class ``class_label``; :class:`~adcm.errors.ParamsError` (naming ``where``) when the
    model has no such class or is unconditional."""
    if num_classes == 0:
        raise ParamsError(f"{where}: the model is unconditional (no classes); set it to null")
    if not 0 <= class_label < num_classes:
        raise ParamsError(f"{where}: expected a class in [0, {num_classes - 1}] of this model, got {class_label}")
    return [int(class_label)] * num_images


def grid_seeds(rows: int, num_classes: int, first_seed: int = 0, cols: int | None = None) -> list[int]:
    """Seeds of a ``rows`` × ``cols`` grid (row-major; ``cols`` default ``rows``), from ``first_seed`` on.

    Unconditional (``num_classes`` = 0): the first rows·cols seeds. Conditional: row r shows class
    c = r mod K (so every row is one class, also with fewer classes than rows), and its images are the
    next seeds s ≥ ``first_seed`` with s mod K = c — the images of class c in the balanced labelling
    (:func:`balanced_labels`) of the seeds from ``first_seed`` on.
    """
    cols = rows if cols is None else cols
    if num_classes <= 0:
        return list(range(first_seed, first_seed + rows * cols))
    out = []
    for r in range(rows):
        c = r % num_classes
        start = first_seed + (c - first_seed) % num_classes  # the first seed of class c
        out += [start + ((r // num_classes) * cols + j) * num_classes for j in range(cols)]
    return out


def _labels(noise: PerSampleNoise, probs: Tensor | None, given: Sequence[int] | None = None) -> Tensor | None:
    """One-hot labels: one class per sample drawn from ``probs`` with the sample's generator, replaced by
    ``given`` (one class per sample) when it is set; the draw is made either way."""
    if probs is None:
        return None
    classes = torch.cat([torch.multinomial(probs, 1, generator=g) for g in noise.generators])
    if given is not None:
        classes = torch.as_tensor(list(given), dtype=torch.int64)
    return torch.nn.functional.one_hot(classes, probs.numel()).float().to(noise.device)


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
    class_labels: Sequence[int] | None = None,
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
        label_probs: class distribution for conditional networks (None = unconditional); each image's
            class is drawn from it with the image's generator.
        class_labels: one class per seed (conditional networks; needs ``label_probs`` for the number of
            classes): these classes instead of the drawn ones (the draw is still made, so the noise of
            image i does not depend on how its class was chosen).
        progress: called with the number of images finished after each batch.

    The network's train/eval mode is restored afterwards (sampling runs in eval mode).
    """
    if class_labels is not None:
        if label_probs is None:
            raise ValueError("class_labels need label_probs (the number of classes of a conditional network)")
        if len(class_labels) != len(seeds):
            raise ValueError(f"need one class per seed, got {len(class_labels)} classes for {len(seeds)} seeds")
        if not all(0 <= int(c) < label_probs.numel() for c in class_labels):
            raise ValueError(f"class_labels must lie in [0, {label_probs.numel() - 1}]")
    was_training = net.training
    net = net.to(device).eval()
    out = []
    try:
        for start in range(0, len(seeds), batch_size):
            noise = PerSampleNoise(seeds[start : start + batch_size], device)
            latents = noise.randn(shape)
            given = None if class_labels is None else class_labels[start : start + batch_size]
            labels = _labels(noise, label_probs, given)
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


def sample_grid(
    net: nn.Module,
    sampler: Sampler,
    rows: int,
    *,
    shape: tuple[int, int, int],
    num_classes: int,
    batch_size: int,
    device: torch.device,
    first_seed: int = 0,
    available: tuple[Sequence[int], np.ndarray] | None = None,
) -> np.ndarray:
    """The images (row-major) of a ``rows`` × ``rows`` sample grid of the seeds :func:`grid_seeds` gives.

    A conditional model (``num_classes`` > 0) is shown by class, row r with class r mod K, each image
    with its balanced label (:func:`balanced_labels`); an unconditional one shows the first rows² seeds.

    Args:
        available: (seeds, images) already generated by ``net`` and ``sampler`` with balanced labels
            (``adcm sample``'s set): grid images of those seeds are taken from it, only the others drawn.
    """
    seeds = grid_seeds(rows, num_classes, first_seed)
    have = {} if available is None else {int(s): i for i, s in enumerate(available[0])}
    missing = [s for s in seeds if s not in have]
    drawn: dict[int, np.ndarray] = {}
    if missing:
        images = generate(
            net,
            sampler,
            missing,
            shape=shape,
            batch_size=batch_size,
            device=device,
            label_probs=uniform_label_probs(num_classes),
            class_labels=balanced_labels(missing, num_classes) if num_classes else None,
        )
        drawn = dict(zip(missing, images, strict=True))
    if available is not None:
        drawn.update({s: available[1][have[s]] for s in seeds if s not in drawn})
    return np.stack([drawn[s] for s in seeds])
