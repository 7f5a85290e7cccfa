"""Preconditioning wrappers around a backbone F (algorithm.md §2), kept apart from the network.

One formula serves both uses of the VE / EDM parameterisation:

    f(x, t) = c_skip(t)·x + c_out(t)·F(c_in(t)·x, c_noise(t))
    c_skip = σ_d² / ((t − ε)² + σ_d²),  c_out = σ_d·(t − ε) / sqrt(σ_d² + t²),
    c_in = 1 / sqrt(σ_d² + t²),        c_noise = ln(t) / 4.

With ε = 0 it is EDM's denoiser D(x, σ) (Karras et al. 2022, Table 1); with ε > 0 it is the
consistency function with the boundary condition f(x, ε) = x holding exactly (c_skip = 1,
c_out = 0 at t = ε). At t ≫ ε the two coincide, so an EDM teacher initialises the consistency
model directly. The wrapper holds the backbone as ``model`` so state-dict names match EDM's
``EDMPrecond`` (``model.…``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adcm.networks import SongUNet

__all__ = ["VEPrecond", "build_network", "consistency_function", "denoiser"]


class VEPrecond(nn.Module):
    """ε-shifted VE preconditioning; ε = 0 gives EDM's denoiser, ε > 0 a consistency function."""

    def __init__(self, model: nn.Module, sigma_data: float, eps: float):
        if sigma_data <= 0 or eps < 0:
            raise ValueError(f"need sigma_data > 0 and eps >= 0 (got {sigma_data}, {eps})")
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.eps = float(eps)

    @property
    def label_dim(self) -> int:
        """Number of classes the backbone is conditioned on (0 = unconditional)."""
        return int(getattr(self.model, "label_dim", 0))

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at times ``t`` of shape (B,), algorithm.md §2."""
        sd, eps = self.sigma_data, self.eps
        c_skip = sd**2 / ((t - eps) ** 2 + sd**2)
        c_out = sd * (t - eps) / (sd**2 + t**2).sqrt()
        c_in = 1.0 / (sd**2 + t**2).sqrt()
        c_noise = t.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """f(x, t) for a batch ``x`` (B, C, H, W) and times ``t`` (B,) (a scalar is broadcast)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        if t.numel() == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(t))
        out = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * out.to(x.dtype)


def build_network(network_kwargs: dict[str, Any]) -> SongUNet:
    """Construct the backbone from its recorded constructor settings."""
    return SongUNet(**network_kwargs)


def denoiser(network_kwargs: dict[str, Any], sigma_data: float) -> VEPrecond:
    """EDM denoiser D(x, σ): the VE preconditioning with ε = 0."""
    return VEPrecond(build_network(network_kwargs), sigma_data=sigma_data, eps=0.0)


def consistency_function(network_kwargs: dict[str, Any], sigma_data: float, eps: float) -> VEPrecond:
    """Consistency function f(x, t) with f(x, ε) = x (algorithm.md §2)."""
    if eps <= 0:
        raise ValueError(f"a consistency function needs eps > 0 (got {eps})")
    return VEPrecond(build_network(network_kwargs), sigma_data=sigma_data, eps=eps)
