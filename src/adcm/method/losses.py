"""Per-sample losses: pseudo-Huber distance, the consistency loss (ECT/iCT/ADCM) and EDM's teacher loss.

All functions return a ``(B,)`` tensor of per-sample losses; the caller takes the batch mean
(docs/method.md#discrete-consistency-training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from adcm.processes import broadcast_time

if TYPE_CHECKING:
    from adcm.nets.precond import Precond

__all__ = [
    "DiffusionOutput",
    "consistency_loss",
    "diffusion_loss",
    "edm_loss",
    "ict_huber_c",
    "noise_levels",
    "pseudo_huber",
]


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance d_c(a, b) = sqrt(‖a − b‖² + c²) − c per sample (iCT §3.3; ADCM Eq. 11).

    The norm runs over all non-batch dims (all pixels of one sample). ``c = 0`` gives the plain L2
    norm ‖a − b‖ (whose gradient at a = b is taken as 0). For ``c > 0`` it is evaluated as
    s / (sqrt(s + c²) + c) with s = ‖a − b‖², algebraically equal and free of cancellation when
    ‖a − b‖ ≪ c.

    Args:
        a, b: tensors of the same shape (B, ...).
        c: the constant c ≥ 0.

    Returns:
        (B,) distances.
    """
    if c < 0:
        raise ValueError(f"pseudo-Huber c must be >= 0, got {c}")
    diff = (a - b).flatten(1)
    if c == 0:
        return torch.linalg.vector_norm(diff, dim=1)
    s = diff.pow(2).sum(1)
    return s / (torch.sqrt(s + c * c) + c)


def consistency_loss(
    student: Tensor,
    target: Tensor,
    x0: Tensor,
    weight: Tensor | None,
    c: float,
    floor: float = 1e-8,
) -> Tensor:
    """Per-sample consistency-training loss (docs/method.md#discrete-consistency-training step 3).

    * ``weight`` given (ECT, iCT): ``weight · d_c(student, target)`` with the fixed weight
      1/(t − r) from the discretization.
    * ``weight is None`` (ADCM, paper Eq. 11): ``d_c(student, target) / max(d_c(target, x0),
      floor)``; the denominator — the adaptive weight 1/L_global measuring how far the target still
      is from the data — is *detached*, so no gradient flows through it (**decision**: per-sample
      denominator, floored at ``floor`` for c = 0 where it can vanish, e.g. at r ≤ ε).

    ``target`` is the stop-gradient target f_θ⁻(x_r, r) (or x_r at the boundary r ≤ ε): it is
    detached here too, so gradients reach only ``student``, never ``target``, ``x0`` or ``weight``.

    Args:
        student: f_θ(x_t, t), (B, ...), carries gradients.
        target: f_θ⁻(x_r, r), (B, ...).
        x0: the clean data, (B, ...).
        weight: (B,) fixed weights, or ``None`` for ADCM's adaptive weight.
        c: pseudo-Huber constant (ADCM CIFAR-10: 0.03; ECT CIFAR-10: 0; iCT: :func:`ict_huber_c`).
        floor: lower bound of the ADCM denominator.

    Returns:
        (B,) per-sample losses.
    """
    if floor <= 0:
        raise ValueError(f"floor must be positive, got {floor}")
    target = target.detach()
    dist = pseudo_huber(student, target, c)
    if weight is None:
        with torch.no_grad():
            denom = pseudo_huber(target, x0.detach(), c).clamp(min=floor)
        return dist / denom
    return weight.detach().to(dtype=dist.dtype, device=dist.device) * dist


def noise_levels(
    batch_size: int, p_mean: float, p_std: float, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per-sample noise-to-signal ratios σ = exp(P_mean + P_std·n), n ~ N(0, 1) from ``generator``
    (EDM's log-normal proposal, Karras et al. 2022, Table 1), on ``generator.device``."""
    n = torch.randn(batch_size, generator=generator, device=generator.device, dtype=dtype)
    return torch.exp(p_mean + p_std * n)


def edm_loss(
    denoiser: Callable[..., Tensor],
    x0: Tensor,
    z: Tensor,
    sigma: Tensor,
    labels: Tensor | None,
    sigma_data: float,
    augment_labels: Tensor | None = None,
) -> Tensor:
    """EDM's denoising loss per sample, for training the diffusion teacher (Karras et al. 2022, Eq. 2,
    Table 1 "EDM" column).

    y = x0 + σ·z; λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; loss = mean over pixels of λ(σ)·(D(y, σ, labels) − x0)².

    Args:
        denoiser: ``denoiser(x, sigma, labels)`` (``augment_labels=`` added as a keyword when given),
            sigma of shape (B,).
        x0: (B, ...) clean data.
        z: (B, ...) standard Gaussian noise.
        sigma: (B,) noise levels (:func:`noise_levels`).
        labels: class labels (or ``None``), passed through.
        sigma_data: σ_d (0.5).
        augment_labels: optional augmentation labels, passed through.

    Returns:
        (B,) per-sample losses.
    """
    y = x0 + broadcast_time(sigma, x0) * z
    if augment_labels is None:
        out = denoiser(y, sigma, labels)
    else:
        out = denoiser(y, sigma, labels, augment_labels=augment_labels)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return weight * (out - x0).flatten(1).pow(2).mean(1)


class DiffusionOutput(nn.Module):
    """The quantity a diffusion model of each process regresses, as one module's ``forward``
    (what the optimizer and DDP see when a teacher trains): EDM's D(x, σ) for ``ve``, the velocity
    v(x_t, t) for ``fm``, the TrigFlow head F_T(x_t, t) for ``trigflow``."""

    def __init__(self, net: Precond):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.net.process == "ve":
            return self.net(x, t, labels)
        if self.net.process == "fm":
            return self.net.velocity(x, t, labels)  # type: ignore[operator]
        return self.net.head(x, t, labels)  # type: ignore[operator]


def diffusion_loss(
    net: Precond,
    x0: Tensor,
    z: Tensor,
    sigma: Tensor,
    labels: Tensor | None,
    output: Callable[..., Tensor] | None = None,
) -> Tensor:
    """Per-sample diffusion (teacher) loss in the wrapper's own process (docs/method.md#forward-processes).

    Every process uses the same draws — σ the noise-to-signal ratio (:func:`noise_levels`) and one
    standard z — and regresses a unit-variance target:

    * ``ve``: EDM's loss (:func:`edm_loss`), λ(σ)·‖D(x_σ, σ) − x0‖² = ‖F − F*‖²/d.
    * ``fm``: t = σ/(1 + σ) (the logit-normal of t), x_t = (1 − t)·x0 + t·z, velocity loss
      mean‖v(x_t, t) − (z − x0)‖² (rectified flow).
    * ``trigflow``: t = arctan(σ/σ_d), x_t = cos t·x0 + sin t·σ_d·z, mean‖F_T(x_t, t) − dx_t/dt/σ_d‖²
      (sCM's TrigFlow diffusion loss ‖σ_d F − dx/dt‖², divided by σ_d²). For a TrigFlow head
      converted from an EDM backbone this *is* EDM's loss (F_T = −F_VE, target −F*_VE).

    Args:
        net: the wrapper (:class:`~adcm.nets.precond.VEPrecond`, ``FMPrecond`` or ``TrigFlowPrecond``,
            ε = 0).
        x0: (B, ...) clean data.
        z: (B, ...) standard Gaussian noise.
        sigma: (B,) noise-to-signal ratios.
        labels: class labels (or ``None``).
        output: the module computing the regressed quantity (default :class:`DiffusionOutput` of
            ``net``; the training loop passes its DDP wrapper).

    Returns:
        (B,) per-sample losses.
    """
    output = output or DiffusionOutput(net)
    if net.process == "ve":
        return edm_loss(output, x0, z, sigma, labels, net.sigma_data)
    if net.process == "fm":
        t = sigma / (1 + sigma)
        tb = broadcast_time(t, x0)
        x_t = (1 - tb) * x0 + tb * z
        out, target = output(x_t, t, labels), z - x0
    elif net.process == "trigflow":
        sd = net.sigma_data
        t = torch.atan(sigma / sd)
        cos, sin = torch.cos(broadcast_time(t, x0)), torch.sin(broadcast_time(t, x0))
        x_t = cos * x0 + sin * sd * z
        out, target = output(x_t, t, labels), cos * z - sin * x0 / sd
    else:
        raise ValueError(f"no diffusion loss for process {net.process!r}")
    return (out - target).flatten(1).pow(2).mean(1)


def ict_huber_c(data_dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054·sqrt(d), d = data dimension (Song & Dhariwal 2023, §3.3)."""
    if data_dim <= 0:
        raise ValueError(f"data_dim must be positive, got {data_dim}")
    return 0.00054 * math.sqrt(data_dim)
