"""The noise pass-through κ(t) against closed forms on Gaussian data (adcm.eval.passthrough)."""

from __future__ import annotations

import math

import pytest
import torch

from adcm.eval.passthrough import noise_passthrough
from adcm.nets.precond import VEPrecond
from adcm.nets.songunet import SongUNet
from adcm.processes import FMProcess, ForwardProcess, TrigFlowProcess, VEProcess, broadcast_time

S, EPS = 0.5, 0.002
SIGMAS = [0.2, 0.42, 0.821, 2.0]
VE = VEProcess(eps=EPS, t_max=80.0)
F64 = torch.float64


def gaussian_x0(n: int = 2048, shape: tuple[int, ...] = (3, 8, 8), seed: int = 1) -> torch.Tensor:
    return S * torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=F64)


def posterior_mean(process: ForwardProcess):
    """E[x0 | x_t] of x0 ~ N(0, s²I) in ``process``: α s²/(α² s² + β²)·x_t."""

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = process.alpha(broadcast_time(t, x)), process.beta(broadcast_time(t, x))
        return a * S * S / (a * a * S * S + b * b) * x

    return f


def exact_consistency_map(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The VE probability-flow ODE of N(0, s²I) data mapped to ε: x_t ∝ √(s² + t²)."""
    tt = broadcast_time(t, x)
    return x * torch.sqrt((S * S + EPS * EPS) / (S * S + tt * tt))


def check(results, expected: list[float], sigmas: list[float] = SIGMAS, tol_se: float = 4.0) -> None:
    assert [r.sigma for r in results] == sigmas
    for r, want in zip(results, expected, strict=True):
        assert 0 < r.se < 0.05
        assert abs(r.kappa - want) < tol_se * r.se, (r.sigma, r.kappa, want, r.se)


def test_identity_passes_all_noise_and_oracle_none() -> None:
    x0 = gaussian_x0(256)
    identity = noise_passthrough(lambda x, t: x, x0, SIGMAS, VE, seed=0, batch_size=64)
    assert [r.kappa for r in identity] == pytest.approx([1.0] * 4, abs=0.02)  # E‖z‖²/d = 1 up to sampling
    # x0 oracle: a dataset of one image c, whose posterior mean is c itself, passes no noise at all
    c = torch.linspace(-1, 1, 3 * 8 * 8, dtype=F64).reshape(1, 3, 8, 8)
    oracle = noise_passthrough(lambda x, t: c.expand_as(x), c.expand(64, -1, -1, -1), SIGMAS, VE, seed=0, batch_size=7)
    assert all(r.kappa == pytest.approx(0.0, abs=1e-12) for r in oracle)
    # the identity's κ is ‖z‖²/d exactly: same z at every level (common random numbers)
    assert len({round(r.kappa, 12) for r in identity}) == 1


def test_gaussian_posterior_mean_and_exact_consistency_map_on_ve() -> None:
    x0 = gaussian_x0()
    pm = noise_passthrough(posterior_mean(VE), x0, SIGMAS, VE, seed=3, batch_size=512)
    check(pm, [S * S / (S * S + s * s) for s in SIGMAS])
    cm = noise_passthrough(exact_consistency_map, x0, SIGMAS, VE, seed=3, batch_size=512)
    check(cm, [math.sqrt(S * S + EPS * EPS) / math.sqrt(S * S + s * s) for s in SIGMAS])
    # the exact consistency map passes more noise than the denoiser (it does not average it away)
    assert all(c.kappa > p.kappa for c, p in zip(cm, pm, strict=True))
    # a map that is wrong by a small factor is told apart: 0.9 × posterior mean
    off = noise_passthrough(lambda x, t: 0.9 * posterior_mean(VE)(x, t), x0, [0.42], VE, seed=3, batch_size=512)
    assert abs(off[0].kappa - S * S / (S * S + 0.42**2)) > 4 * off[0].se


@pytest.mark.parametrize(
    "process", [FMProcess(eps=0.001, t_max=0.999), TrigFlowProcess(sigma_data=0.5, eps=0.004, t_max=1.5645)]
)
def test_other_processes_normalise_by_the_noise_to_signal_ratio(process: ForwardProcess) -> None:
    x0 = gaussian_x0()
    # the posterior mean is the same map in every process: κ = s²/(s² + ρ²) at ρ = σ
    pm = noise_passthrough(posterior_mean(process), x0, SIGMAS, process, seed=5, batch_size=1024)
    check(pm, [S * S / (S * S + s * s) for s in SIGMAS])
    assert [r.t for r in pm] == pytest.approx(
        [float(process.time_from_noise_to_signal(torch.tensor(s, dtype=F64))) for s in SIGMAS]
    )

    def ve_identity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # returns x_t/α(t) = x0 + ρ z
        return x / process.alpha(broadcast_time(t, x))

    ident = noise_passthrough(ve_identity, x0, SIGMAS, process, seed=5, batch_size=1024)
    assert [r.kappa for r in ident] == pytest.approx([1.0] * 4, abs=0.01)
    literal = noise_passthrough(lambda x, t: x, x0, [0.42], process, seed=5, batch_size=1024)
    alpha = float(process.alpha(torch.tensor(pm[1].t, dtype=F64)))
    assert abs(literal[0].kappa - alpha) < 4 * literal[0].se  # a literal f(x, t) = x has κ = α(t)


def _tiny_net() -> VEPrecond:
    torch.manual_seed(0)
    net = SongUNet(
        img_resolution=8,
        in_channels=1,
        out_channels=1,
        label_dim=0,
        augment_dim=0,
        model_channels=8,
        channel_mult=[1, 2],
        channel_mult_emb=2,
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.5,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return VEPrecond(net, sigma_data=0.5, eps=EPS)


def test_deterministic_batch_independent_and_restores_the_mode() -> None:
    net = _tiny_net().train()
    x0 = gaussian_x0(24, (1, 8, 8)).float()
    a = noise_passthrough(net, x0, SIGMAS, VE, seed=7, batch_size=24)
    b = noise_passthrough(net, x0, SIGMAS, VE, seed=7, batch_size=24)
    c = noise_passthrough(net, x0, SIGMAS, VE, seed=7, batch_size=5)
    d = noise_passthrough(net, x0, SIGMAS, VE, seed=8, batch_size=24)
    assert a == b  # dropout off (eval mode) and the same z: bit-identical
    assert [r.kappa for r in c] == pytest.approx([r.kappa for r in a], abs=1e-5)
    assert [r.kappa for r in d] != [r.kappa for r in a]
    assert net.training and all(m.training for m in net.modules())
    assert all(not p.grad for p in net.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="positive"):
        noise_passthrough(net, x0, [0.0], VE, seed=7, batch_size=4)
