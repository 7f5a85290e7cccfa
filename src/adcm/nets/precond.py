"""Preconditioning wrappers around a backbone F, kept apart from the network.

See docs/method.md#preconditioning-and-the-boundary-condition.

A wrapper turns the backbone into f(x, t), the estimate of the clean data x0 from the point x = x_t
of its forward process (:mod:`adcm.processes`), with the boundary condition f(x, ε) = x:

* **VE / EDM** (:class:`VEPrecond`): f = c_skip·x + c_out·F(c_in·x, c_noise),
  c_skip = σ_d²/((t − ε)² + σ_d²), c_out = σ_d·(t − ε)/sqrt(σ_d² + t²), c_in = 1/sqrt(σ_d² + t²),
  c_noise = ln(t)/4. With ε = 0 it is EDM's denoiser D(x, σ) (Karras et al. 2022, Table 1).
* **Flow matching** (:class:`FMPrecond`): f = x − (t − ε)·v, v = F(x, t) the velocity z − x0
  (c_in = 1, c_noise = t).
* **TrigFlow** (:class:`TrigFlowPrecond`, sCM Eq. 4): f = cos(t − ε)·x − sin(t − ε)·σ_d·F_T(x, t) with
  the TrigFlow head F_T(x, t) = F(x/σ_d, t) (c_noise = t, through the positional embedding). ε = 0
  is sCM's own f(x, 0) = x.

**Decision**: the ε-shifted form is used everywhere a consistency function is needed; at t ≫ ε it
equals the diffusion model's own output, so a teacher initialises the student directly.

A TrigFlow head can also be built *exactly* from a VE or FM backbone (``source``), which is how sCT
trains from an EDM teacher. With ρ = σ_d·tan t the VE point of x_t, x_σ = x_t/cos t, EDM's
coefficients become c_skip = cos²t, c_out = σ_d·sin t, c_in·x_σ = x_t/σ_d, so

    F_T(x_t, t) = −F_VE(x_t/σ_d, ln(σ_d·tan t)/4)                                   (source ``ve``)
    F_T(x_t, t) = A·x_t + B·v(B·x_t, s),  s = σ_d sin t/D, D = cos t + σ_d sin t,
                  A = (σ_d cos t − sin t)/(σ_d D), B = 1/D                          (source ``fm``)

(``fm``: x_s = x_t/D is the FM point and σ_d·F_T = cos t·ẑ·σ_d − sin t·x̂0 with x̂0 = x_s − s·v,
ẑ = x_s + (1 − s)·v.) Every wrapper holds the backbone as ``model`` so state-dict names match EDM's
``EDMPrecond`` (``model.…``) whatever the parameterisation.

Two backbones (:data:`NetworkKind`) fit every wrapper: ``ddpmpp`` (:class:`~adcm.nets.songunet.SongUNet`,
EDM's DDPM++, the settings under EDM's names) and ``edm2`` (:class:`~adcm.nets.edm2.EDM2Backbone`, EDM2's
magnitude-preserving U-Net with its settings under EDM2's ``Precond`` names). EDM2's own preconditioning is
EDM's, so the VE wrapper with ε = 0 *is* EDM2's denoiser D(x, σ), and its ε-shifted form the consistency
function; the weights are named ``model.unet.…``, ``model.logvar_…``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from adcm.nets.edm2 import EDM2Backbone
from adcm.nets.songunet import SongUNet
from adcm.processes import ProcessName

__all__ = [
    "FMPrecond",
    "NetworkKind",
    "Precond",
    "TrigFlowPrecond",
    "VEPrecond",
    "build_network",
    "consistency_function",
    "denoiser",
    "image_shape",
    "make_precond",
    "network_label_dim",
]

NetworkKind = Literal["ddpmpp", "edm2"]
"""The backbone architectures: EDM's DDPM++ (``SongUNet``) and EDM2's U-Net (``EDM2Backbone``)."""


class Precond(nn.Module):
    """Base of the wrappers: holds the backbone ``model``, σ_d, ε and the names of its process/source.

    Attributes:
        process: the forward process whose points ``forward`` takes (``ve``, ``fm``, ``trigflow``).
        source: the parameterisation the backbone was trained in (equal to ``process`` except for a
            TrigFlow head built from a VE or FM backbone).
        eps: boundary time (0 for a diffusion model's denoiser).
    """

    process: ProcessName = "ve"

    def __init__(self, model: nn.Module, sigma_data: float, eps: float, source: ProcessName):
        if sigma_data <= 0 or eps < 0:
            raise ValueError(f"need sigma_data > 0 and eps >= 0 (got {sigma_data}, {eps})")
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.eps = float(eps)
        self.source: ProcessName = source

    @property
    def label_dim(self) -> int:
        """Number of classes the backbone is conditioned on (0 = unconditional)."""
        return int(getattr(self.model, "label_dim", 0))

    @staticmethod
    def _times(t: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        if t.numel() == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        return t


class VEPrecond(Precond):
    """ε-shifted VE preconditioning; ε = 0 gives EDM's denoiser, ε > 0 a consistency function."""

    process: ProcessName = "ve"

    def __init__(self, model: nn.Module, sigma_data: float, eps: float):
        super().__init__(model, sigma_data, eps, "ve")

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at times ``t`` of shape (B,) (module docstring)."""
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
        t = self._times(t, x)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(t))
        out = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * out.to(x.dtype)


class FMPrecond(Precond):
    """Flow-matching parameterisation: f(x, t) = x − (t − ε)·v(x, t), v = F(x, t) (module docstring)."""

    process: ProcessName = "fm"

    def __init__(self, model: nn.Module, sigma_data: float, eps: float):
        super().__init__(model, sigma_data, eps, "fm")

    def velocity(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None
    ) -> Tensor:
        """The predicted velocity v(x_t, t) ≈ E[z − x0 | x_t] (c_in = 1, c_noise = t)."""
        t = self._times(t, x)
        return self.model(x, t, class_labels=class_labels, augment_labels=augment_labels).to(x.dtype)

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None
    ) -> Tensor:
        """f(x, t) = x − (t − ε)·v(x, t); f(x, ε) = x exactly."""
        t = self._times(t, x)
        v = self.velocity(x, t, class_labels, augment_labels)
        return x - (t - self.eps).reshape(-1, 1, 1, 1) * v


class TrigFlowPrecond(Precond):
    """TrigFlow: f(x, t) = cos(t − ε)·x − sin(t − ε)·σ_d·F_T(x, t) (sCM Eq. 4; module docstring).

    Args:
        model: the backbone.
        sigma_data: σ_d.
        eps: boundary time (0 for sCT and for the TrigFlow diffusion model).
        source: ``trigflow`` (F_T = F(x/σ_d, t), c_noise = t), or ``ve`` / ``fm`` for the exact
            conversion of an EDM or flow-matching backbone (module docstring).
    """

    process: ProcessName = "trigflow"

    def __init__(self, model: nn.Module, sigma_data: float, eps: float, source: ProcessName = "trigflow"):
        if source not in ("trigflow", "ve", "fm"):
            raise ValueError(f"unknown TrigFlow source {source!r}")
        super().__init__(model, sigma_data, eps, source)

    def head_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, B, C, c_noise) with F_T(x, t) = A·x + B·F(C·x, c_noise) for ``t`` of shape (B,)."""
        sd = self.sigma_data
        if self.source == "trigflow":
            return torch.zeros_like(t), torch.ones_like(t), torch.full_like(t, 1.0 / sd), t
        if self.source == "ve":
            # c_noise = ln(σ)/4 with σ = σ_d·tan t, floored at the dtype's smallest normal number so that
            # t = 0 (where the head is multiplied by sin(t − ε) = 0) gives f(x, 0) = x, not NaN.
            sigma = (sd * torch.tan(t)).clamp_min(torch.finfo(t.dtype).tiny)
            return torch.zeros_like(t), torch.full_like(t, -1.0), torch.full_like(t, 1.0 / sd), torch.log(sigma) / 4
        cos, sin = torch.cos(t), torch.sin(t)
        d = cos + sd * sin
        return (sd * cos - sin) / (sd * d), 1.0 / d, 1.0 / d, sd * sin / d

    def head(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None
    ) -> Tensor:
        """The TrigFlow head F_T(x_t, t): σ_d·F_T ≈ E[dx_t/dt | x_t] for a diffusion model."""
        t = self._times(t, x)
        a, b, c, c_noise = self.head_coefficients(t)
        out = self.model(
            c.reshape(-1, 1, 1, 1) * x, c_noise, class_labels=class_labels, augment_labels=augment_labels
        ).to(x.dtype)
        if self.source == "trigflow":
            return out
        return a.reshape(-1, 1, 1, 1) * x + b.reshape(-1, 1, 1, 1) * out

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None
    ) -> Tensor:
        """f(x, t) = cos(t − ε)·x − sin(t − ε)·σ_d·F_T(x, t); f(x, ε) = x exactly."""
        t = self._times(t, x)
        shifted = (t - self.eps).reshape(-1, 1, 1, 1)
        return torch.cos(shifted) * x - torch.sin(shifted) * self.sigma_data * self.head(
            x, t, class_labels, augment_labels
        )


def _check_kind(network: str) -> None:
    if network not in get_args(NetworkKind):
        raise ValueError(f"unknown network kind {network!r} (expected one of {list(get_args(NetworkKind))})")


def build_network(network_kwargs: dict[str, Any], network: NetworkKind = "ddpmpp") -> nn.Module:
    """Construct the backbone of kind ``network`` from its recorded constructor settings.

    ``ddpmpp``: :class:`~adcm.nets.songunet.SongUNet` (EDM's argument names); ``edm2``:
    :class:`~adcm.nets.edm2.EDM2Backbone` (the arguments of EDM2's ``Precond`` except ``sigma_data``).
    """
    _check_kind(network)
    if network == "edm2":
        return EDM2Backbone(**network_kwargs)
    return SongUNet(**network_kwargs)


def image_shape(network_kwargs: dict[str, Any], network: NetworkKind = "ddpmpp") -> tuple[int, int, int]:
    """(C, H, W) of the images a backbone of kind ``network`` with these settings makes."""
    _check_kind(network)
    channels = network_kwargs["img_channels" if network == "edm2" else "in_channels"]
    resolution = network_kwargs["img_resolution"]
    return int(channels), int(resolution), int(resolution)


def network_label_dim(network_kwargs: dict[str, Any], network: NetworkKind = "ddpmpp") -> int:
    """Number of classes a backbone with these settings is conditioned on (0 = unconditional)."""
    _check_kind(network)
    return int(network_kwargs.get("label_dim", 0))


def make_precond(
    network_kwargs: dict[str, Any],
    sigma_data: float,
    *,
    process: ProcessName,
    source: ProcessName | None = None,
    eps: float,
    network: NetworkKind = "ddpmpp",
) -> Precond:
    """A fresh backbone of kind ``network`` in the wrapper of ``process`` (trained in ``source``, default
    ``process``).

    Supported: ``source == process``, and a TrigFlow wrapper around a VE or FM backbone.
    """
    source = source or process
    net = build_network(network_kwargs, network)
    if process == "trigflow":
        return TrigFlowPrecond(net, sigma_data, eps, source)
    if source != process:
        raise ValueError(f"a {source} backbone cannot be used as a {process} model (only as a TrigFlow one)")
    if process == "ve":
        return VEPrecond(net, sigma_data, eps)
    if process == "fm":
        return FMPrecond(net, sigma_data, eps)
    raise ValueError(f"unknown process {process!r}")


def denoiser(
    network_kwargs: dict[str, Any],
    sigma_data: float,
    process: Literal["ve", "fm", "trigflow"] = "ve",
    network: NetworkKind = "ddpmpp",
) -> Precond:
    """The diffusion model's x0-prediction (EDM's D(x, σ) for VE): the wrapper with ε = 0."""
    return make_precond(network_kwargs, sigma_data, process=process, eps=0.0, network=network)


def consistency_function(
    network_kwargs: dict[str, Any],
    sigma_data: float,
    eps: float,
    process: Literal["ve", "fm", "trigflow"] = "ve",
    network: NetworkKind = "ddpmpp",
) -> Precond:
    """Consistency function f(x, t) with f(x, ε) = x (docs/method.md#preconditioning-and-the-boundary-condition)."""
    if eps <= 0:
        raise ValueError(f"a consistency function needs eps > 0 (got {eps})")
    return make_precond(network_kwargs, sigma_data, process=process, eps=eps, network=network)
