r"""Continuous-time consistency training in TrigFlow: sCT (Lu & Song 2024, Alg. 1; docs/method.md#continuous-time-sct).

The λ = 0 end of ADCM's unified view: the step Δt → 0, so the discrete pull of f_θ(x_t, t) towards
f_θ⁻(x_{t−Δt}, t−Δt) becomes a pull along −df_θ⁻/dt, computed exactly by one forward-mode JVP.

With the TrigFlow consistency function f = cos t·x_t − sin t·σ_d·F_θ(x_t, t) (sCM Eq. 4),

    df⁻/dt = −cos t·(σ_d F⁻ − dx_t/dt) − sin t·(x_t + σ_d·dF⁻/dt)                   (sCM Eq. 6)

and the gradient of the continuous consistency loss, per sample, is proportional to
−(df⁻/dt)ᵀ ∇_θ F_θ. sCT writes it as the gradient of ‖F_θ − F_θ.detach() − g‖² with

    g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + J),   J = σ_d·cos t·sin t·dF⁻/dt,

i.e. g = cos t·df⁻/dt with the warm-up factor r = min(1, iteration/warmup) on the second term. J is
ONE forward-mode JVP (:func:`adcm.nets.jvp.jvp`) of F⁻ at (x_t, t) with the tangent pre-multiplied by cos t·sin t:
(cos t·sin t·dx_t/dt, cos t·sin t) — so the ln-tan noise conditioning of a converted EDM backbone,
whose t-derivative is 1/(4 sin t cos t), stays bounded. Stabilisers (sCM §4): tangent normalisation
g ← g/(‖g‖ + c) (**decision**: plain L2 over all pixels of a sample), the warm-up, and the adaptive
weighting: a log-variance head w(t) (a linear layer on a positional embedding of t, kept apart from
the backbone, trained jointly) in loss = mean[e^{−w}·mean_pixels((F − F.detach() − g)²) + w].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from adcm.nets.jvp import jvp
from adcm.nets.precond import TrigFlowPrecond
from adcm.nets.songunet import Linear, PositionalEmbedding
from adcm.processes import TrigFlowProcess, broadcast_time
from adcm.rng import same_rng

__all__ = ["LogVarianceHead", "SCTModule", "sample_sct_times", "sct_batch_loss", "trigflow_tangent", "warmup_ratio"]


class LogVarianceHead(nn.Module):
    """The adaptive weighting w(t) of sCM (Eq. 8): Linear(PositionalEmbedding(t)) → one scalar per sample.

    Initialised to w ≡ 0 (zero weight and bias), so training starts unweighted.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"weight_channels must be an even number >= 2, got {channels}")
        self.embed = PositionalEmbedding(channels, endpoint=True)
        self.linear = Linear(channels, 1, init_weight=0.0)

    def forward(self, t: Tensor) -> Tensor:
        """w(t), shape (B,) for t of shape (B,) (TrigFlow time)."""
        return self.linear(self.embed(t.float())).squeeze(1)


class SCTModule(nn.Module):
    """The trainable parts of sCT in one module (what DDP wraps): the TrigFlow model and the weighting head.

    ``forward(x_t, t, labels)`` returns (F_θ(x_t, t), w(t)); w ≡ 0 when ``head`` is None.
    """

    def __init__(self, net: TrigFlowPrecond, head: LogVarianceHead | None):
        super().__init__()
        self.net = net
        self.head = head

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out = self.net.head(x, t, labels)
        logvar = self.head(t) if self.head is not None else torch.zeros_like(t, dtype=torch.float32)
        return out, logvar


def sample_sct_times(
    batch_size: int, p_mean: float, p_std: float, process: TrigFlowProcess, generator: torch.Generator
) -> Tensor:
    """t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²) truncated to t ∈ (ε, t_max] (inverse CDF), float32.

    The truncation removes a negligible tail (σ > 80 has probability 6e-5 for −1.0/1.4) so that
    sampling and training share one range; ε here is only the lower end of the proposal.
    """
    device = generator.device
    rho_lo, rho_hi = process.rho_range
    lo = torch.special.ndtr(torch.tensor((math.log(rho_lo) - p_mean) / p_std, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor((math.log(rho_hi) - p_mean) / p_std, dtype=torch.float64))
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    tau = p_mean + p_std * torch.special.ndtri(lo.to(device) + (hi - lo).to(device) * u)
    t = process.time_from_noise_to_signal(torch.exp(tau)).float()
    return t.clamp_(max=float(torch.tensor(process.t_max, dtype=torch.float32)))


def warmup_ratio(iteration: int, warmup_iters: int) -> float:
    """r = min(1, iteration/warmup_iters) (1 without warm-up)."""
    return 1.0 if warmup_iters <= 0 else min(1.0, iteration / warmup_iters)


def trigflow_tangent(
    net: TrigFlowPrecond, x_t: Tensor, t: Tensor, dx_dt: Tensor, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(F⁻, cos t·sin t·dF⁻/dt) by ONE JVP of the TrigFlow head along the path (no parameter gradients).

    dF⁻/dt = ∂_x F⁻·dx_t/dt + ∂_t F⁻; the tangent (cos t·sin t·dx_t/dt, cos t·sin t) is pre-multiplied
    (sCM §4.1). Runs under ``no_grad``; the network's train/eval mode is left as it is (dropout, if
    on, draws from the global RNG exactly like a forward pass).
    """
    cs = torch.cos(t) * torch.sin(t)

    def head(x: Tensor, tt: Tensor) -> Tensor:
        return net.head(x, tt, labels)

    return jvp(head, (x_t, t), (broadcast_time(cs, x_t) * dx_dt, cs))


def sct_batch_loss(
    net: TrigFlowPrecond,
    student: nn.Module,
    x0: Tensor,
    z: Tensor,
    t: Tensor,
    labels: Tensor | None,
    *,
    ratio: float,
    tangent_norm_c: float,
    bf16: bool = False,
) -> Tensor:
    """Mean sCT loss of one mini-batch, ready for ``backward`` (module docstring; docs/method.md#continuous-time-sct).

    Args:
        net: the current TrigFlow model θ (unwrapped: the JVP never runs through DDP).
        student: :class:`SCTModule` (or its DDP wrapper) returning (F_θ, w) with gradients.
        x0: (B, C, H, W) data; z: standard noise of the same shape (z' = σ_d·z).
        t: (B,) TrigFlow times.
        labels: class labels or None.
        ratio: warm-up factor r ∈ [0, 1].
        tangent_norm_c: c of g ← g/(‖g‖ + c); 0 disables the normalisation.
        bf16: autocast the student forward to bf16 (CUDA); the JVP and the loss stay fp32.
    """
    sd = net.sigma_data
    tb = broadcast_time(t, x0)
    cos, sin = torch.cos(tb), torch.sin(tb)
    x_t = cos * x0 + sin * sd * z
    dx_dt = cos * sd * z - sin * x0
    device = x0.device
    with same_rng(device) as replay:
        f_minus, dF = trigflow_tangent(net, x_t, t, dx_dt, labels)
        replay()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out, logvar = student(x_t, t, labels)
    out, logvar = out.float(), logvar.float()
    g = -cos.square() * (sd * f_minus - dx_dt) - ratio * (cos * sin * x_t + sd * dF)
    if tangent_norm_c > 0:
        g = g / (broadcast_time(torch.linalg.vector_norm(g.flatten(1), dim=1), g) + tangent_norm_c)
    per_sample = (out - out.detach() - g).flatten(1).pow(2).mean(1)
    return (torch.exp(-logvar) * per_sample + logvar).mean()
