"""Forward processes (VE, FM, TrigFlow), exact conversions between them, the wrappers' boundary conditions,
the per-process diffusion losses, and sCT's math: the tangent against float64 finite differences and the
sCT gradient against the limit of the discrete consistency gradient (docs/method.md: forward processes,
preconditioning, continuous-time sCT)."""

from __future__ import annotations

import math

import pytest
import torch

from adcm.method.adcm import build_partition
from adcm.method.ect import ECTDiscretization, ect_r
from adcm.method.ict import ICTDiscretization
from adcm.method.losses import diffusion_loss, edm_loss, noise_levels
from adcm.method.sct import LogVarianceHead, SCTModule, sample_sct_times, sct_batch_loss, trigflow_tangent
from adcm.nets.precond import FMPrecond, TrigFlowPrecond, VEPrecond
from adcm.nets.songunet import SongUNet
from adcm.processes import FMProcess, TrigFlowProcess, VEProcess, coordinates, karras_grid, make_process
from adcm.sampling.solvers import as_ve_denoiser

F64 = torch.float64
SD = 0.5
PROCESSES = {"ve": VEProcess(), "fm": FMProcess(), "trigflow": TrigFlowProcess()}


def _backbone(seed: int = 0, adaptive_double_norm: bool = False, channels: int = 2) -> SongUNet:
    torch.manual_seed(seed)
    net = SongUNet(
        img_resolution=8,
        in_channels=channels,
        out_channels=channels,
        label_dim=0,
        augment_dim=0,
        model_channels=8,
        channel_mult=[1, 2],
        channel_mult_emb=2,
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
        adaptive_double_norm=adaptive_double_norm,
    )
    with torch.no_grad():  # the zero-initialised output layers would make F negligible
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.double()


def _data(seed: int = 1, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = 0.5 * torch.randn(batch, 2, 8, 8, generator=gen, dtype=F64)
    z = torch.randn(batch, 2, 8, 8, generator=gen, dtype=F64)
    return x0, z


# ---------------------------------------------------------------------------------------------
# Processes and conversions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ve", "fm", "trigflow"])
def test_process_to_ve_and_back_round_trips(name: str) -> None:
    proc = PROCESSES[name]
    x0, z = _data()
    t = torch.tensor([proc.eps * 3, (proc.eps + proc.t_max) / 2, proc.t_max * 0.99], dtype=F64)
    x_t = proc.x_t(x0, z, t)
    x_sigma, sigma = proc.to_ve(x_t, t)
    # x_t / α(t) is the VE point x0 + σ z with σ the noise-to-signal ratio
    torch.testing.assert_close(x_sigma, x0 + sigma.reshape(-1, 1, 1, 1) * z, rtol=1e-12, atol=1e-12)
    back, t_back = proc.from_ve(x_sigma, sigma)
    torch.testing.assert_close(t_back, t, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(back, x_t, rtol=1e-12, atol=1e-12)


def test_conversions_match_the_closed_form_formulas() -> None:
    """VE σ ↔ TrigFlow t = arctan(σ/σ_d), x_trig = cos t·x_σ; FM s ↔ σ = s/(1 − s), x_σ = x_s/(1 − s)."""
    x0, z = _data()
    sigma = torch.tensor([0.01, 0.7, 30.0], dtype=F64)
    x_sigma = x0 + sigma.reshape(-1, 1, 1, 1) * z
    trig, fm = TrigFlowProcess(), FMProcess()
    x_trig, t = trig.from_ve(x_sigma, sigma)
    torch.testing.assert_close(t, torch.atan(sigma / SD))
    torch.testing.assert_close(x_trig, torch.cos(t).reshape(-1, 1, 1, 1) * x_sigma)
    torch.testing.assert_close(x_trig, trig.x_t(x0, z, t))
    x_s, s = fm.from_ve(x_sigma, sigma)
    torch.testing.assert_close(s / (1 - s), sigma)
    torch.testing.assert_close(x_s / (1 - s).reshape(-1, 1, 1, 1), x_sigma)
    # TrigFlow → FM through VE, and back
    x_s2, s2 = fm.from_ve(*trig.to_ve(x_trig, t))
    torch.testing.assert_close(x_s2, x_s)
    x_trig2, t2 = trig.from_ve(*fm.to_ve(x_s2, s2))
    torch.testing.assert_close(x_trig2, x_trig)
    torch.testing.assert_close(t2, t)


@pytest.mark.parametrize("name", ["ve", "fm", "trigflow"])
def test_dx_dt_matches_central_difference(name: str) -> None:
    proc = PROCESSES[name]
    x0, z = _data()
    t = torch.tensor([proc.t_max * 0.01, proc.t_max * 0.3, proc.t_max * 0.9], dtype=F64)
    h = 1e-6
    fd = (proc.x_t(x0, z, t + h) - proc.x_t(x0, z, t - h)) / (2 * h)
    torch.testing.assert_close(proc.dx_dt(x0, z, t), fd, rtol=1e-7, atol=1e-8)


def test_process_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="t_max must be < 1"):
        FMProcess(eps=0.001, t_max=1.0)
    with pytest.raises(ValueError, match="π/2"):
        TrigFlowProcess(eps=0.001, t_max=1.6)
    with pytest.raises(ValueError, match="eps < t_max"):
        make_process("ve", 1.0, 0.5)
    assert TrigFlowProcess().rho_range == pytest.approx((0.5 * math.tan(0.004), 80.0), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Wrappers: boundary conditions and exact TrigFlow conversions
# ---------------------------------------------------------------------------------------------


def _wrapper(process: str, eps: float, source: str | None = None, seed: int = 0):
    net = _backbone(seed)
    if process == "ve":
        return VEPrecond(net, SD, eps)
    if process == "fm":
        return FMPrecond(net, SD, eps)
    return TrigFlowPrecond(net, SD, eps, source or "trigflow")


@pytest.mark.parametrize(
    ("process", "source", "eps"),
    [
        ("ve", None, 0.002),
        ("fm", None, 0.001),
        ("trigflow", None, 0.004),
        ("trigflow", "ve", 0.004),
        ("trigflow", "fm", 0.004),
        ("trigflow", None, 0.0),
        ("trigflow", "ve", 0.0),
        ("trigflow", "fm", 0.0),
    ],
)
def test_boundary_condition_is_exact_for_every_process(process: str, source: str | None, eps: float) -> None:
    f = _wrapper(process, eps, source).float()
    x = torch.randn(4, 2, 8, 8)
    t = torch.full((4,), eps) if eps > 0 else torch.zeros(4)
    if eps == 0:  # sCM's f(x, 0) = x, also for an EDM backbone (whose c_noise = ln(σ_d tan t)/4 is -inf at 0)
        assert torch.isfinite(f.head(x, t)).all()
    assert torch.equal(f(x, t), x)
    assert not torch.allclose(f(x, torch.full((4,), 0.3)), x)


@pytest.mark.parametrize("source", ["ve", "fm"])
def test_trigflow_head_from_another_backbone_is_exact(source: str) -> None:
    """The TrigFlow wrapper around a VE (EDM) or FM backbone predicts the same x0 at the same point."""
    native = _wrapper(source, 0.0)
    trig = TrigFlowPrecond(native.model, SD, 0.0, source)  # the very same backbone and weights
    x0, z = _data()
    sigma = torch.tensor([0.02, 0.9, 25.0], dtype=F64)
    x_trig, t = TrigFlowProcess().from_ve(x0 + sigma.reshape(-1, 1, 1, 1) * z, sigma)
    x_src, t_src = coordinates(source).from_ve(*TrigFlowProcess().to_ve(x_trig, t))
    torch.testing.assert_close(trig(x_trig, t), native(x_src, t_src), rtol=1e-10, atol=1e-10)
    # and as VE denoisers, the Heun sampler's view of both is the same function
    d_trig = as_ve_denoiser(trig, TrigFlowProcess())
    d_src = as_ve_denoiser(native, coordinates(source))
    x_sigma = x0 + sigma.reshape(-1, 1, 1, 1) * z
    torch.testing.assert_close(d_trig(x_sigma, sigma), d_src(x_sigma, sigma), rtol=1e-10, atol=1e-10)


def test_trigflow_of_ve_backbone_is_minus_edm_f_with_log_noise() -> None:
    """F_T(x_t, t) = −F_VE(x_t/σ_d, ln(σ_d tan t)/4): same inputs, negated output (module docstring)."""
    net = _backbone()
    trig = TrigFlowPrecond(net, SD, 0.0, "ve")
    x = torch.randn(3, 2, 8, 8, dtype=F64)
    t = torch.tensor([0.05, 0.8, 1.5], dtype=F64)
    torch.testing.assert_close(trig.head(x, t), -net(x / SD, torch.log(SD * torch.tan(t)) / 4))


def test_trigflow_diffusion_loss_of_converted_edm_equals_edm_loss() -> None:
    """With the same draws, the TrigFlow diffusion loss of an EDM backbone seen as TrigFlow is EDM's loss."""
    net = _backbone()
    x0, _ = _data(batch=6)
    gen = torch.Generator().manual_seed(5)
    sigma = noise_levels(6, -1.2, 1.2, gen, dtype=F64)
    z = torch.randn(x0.shape, generator=gen, dtype=F64)
    edm = edm_loss(VEPrecond(net, SD, 0.0), x0, z, sigma, None, SD)
    trig = diffusion_loss(TrigFlowPrecond(net, SD, 0.0, "ve"), x0, z, sigma, None)
    torch.testing.assert_close(trig, edm, rtol=1e-9, atol=1e-12)


def test_fm_diffusion_loss_is_velocity_regression() -> None:
    net = FMPrecond(_backbone(), SD, 0.0)
    x0, _ = _data(batch=4)
    gen = torch.Generator().manual_seed(7)
    n = torch.randn(4, generator=gen, dtype=F64)
    z = torch.randn(x0.shape, generator=gen, dtype=F64)
    loss = diffusion_loss(net, x0, z, torch.exp(-0.5 + n), None)
    s = torch.exp(-0.5 + n) / (1 + torch.exp(-0.5 + n))
    x_s = (1 - s).reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * z
    expected = (net.model(x_s, s) - (z - x0)).flatten(1).pow(2).mean(1)
    torch.testing.assert_close(loss, expected)


def test_adaptive_double_norm_changes_the_affine_layer_and_keeps_jvp_exact() -> None:
    net = _backbone(adaptive_double_norm=True)
    plain = _backbone(adaptive_double_norm=False)
    assert net.enc["8x8_block0"].affine.weight.shape[0] == 2 * plain.enc["8x8_block0"].affine.weight.shape[0]
    f = TrigFlowPrecond(net, SD, 0.0)
    x0, z = _data()
    t = torch.tensor([0.1, 0.7, 1.4], dtype=F64)
    proc = TrigFlowProcess()
    x_t, dx = proc.x_t(x0, z, t), proc.dx_dt(x0, z, t)
    _, jvp = torch.func.jvp(lambda x, tt: f.head(x, tt), (x_t, t), (dx, torch.ones_like(t)))
    h = 1e-6
    fd = (f.head(proc.x_t(x0, z, t + h), t + h) - f.head(proc.x_t(x0, z, t - h), t - h)) / (2 * h)
    torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The discrete schedules through the noise-to-signal ratio
# ---------------------------------------------------------------------------------------------


def test_ect_on_fm_is_ect_in_the_noise_to_signal_ratio() -> None:
    fm = FMProcess()
    ect = ECTDiscretization(fm, stage_iters=10, p_mean=-1.1, p_std=2.0)
    pairs = ect.sample(2000, 15, torch.Generator().manual_seed(0))
    assert bool(((pairs.t > fm.eps) & (pairs.t <= fm.t_max) & (pairs.r < pairs.t)).all())
    rho_t, rho_r = fm.noise_to_signal(pairs.t.double()), fm.noise_to_signal(pairs.r.double())
    torch.testing.assert_close(rho_r, ect_r(rho_t, 15, 10), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(pairs.weight.double(), 1 / (rho_t - rho_r), rtol=1e-6, atol=0)
    # ln ρ(t) follows N(−1.1, 2²) truncated to (ρ(ε), ρ(t_max)]: compare the median
    lo, hi = (torch.special.ndtr(torch.tensor((math.log(v) + 1.1) / 2.0, dtype=F64)) for v in fm.rho_range)
    median = math.exp(-1.1 + 2.0 * float(torch.special.ndtri((lo + hi) / 2)))
    assert float(rho_t.median()) == pytest.approx(median, rel=0.1)
    # On VE the same code is plain ECT: r = ect_r(t)
    ve = ECTDiscretization(VEProcess(), stage_iters=10).sample(100, 15, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ve.r.double(), ect_r(ve.t.double(), 15, 10).float().double())


@pytest.mark.parametrize("name", ["fm", "trigflow"])
def test_ect_late_stages_keep_r_below_t_in_float32(name: str) -> None:
    """At stage 30 ECT's Δρ is far below float32 resolution in t near t_max: r is the next float below t
    (never r ≥ t, never an infinite weight), and the weight is 1/(ρ_t − ρ_r) of the r actually used."""
    proc = PROCESSES[name]
    pairs = ECTDiscretization(proc, stage_iters=1).sample(4000, 30, torch.Generator().manual_seed(0))
    rho_t, rho_r = proc.noise_to_signal(pairs.t.double()), proc.noise_to_signal(pairs.r.double())
    exact_r = proc.time_from_noise_to_signal(ect_r(rho_t, 30, 1)).float()
    clamped = exact_r >= pairs.t
    assert bool(clamped.any()), "the test should reach the float32 limit"
    assert bool((pairs.r < pairs.t).all()) and bool(torch.isfinite(pairs.weight).all())
    torch.testing.assert_close(pairs.r[clamped], torch.nextafter(pairs.t[clamped], torch.tensor(0.0)), rtol=0, atol=0)
    torch.testing.assert_close(pairs.r[~clamped], exact_r[~clamped], rtol=0, atol=0)
    torch.testing.assert_close(pairs.weight.double(), (1 / (rho_t - rho_r)).float().double(), rtol=0, atol=0)


def test_ict_on_trigflow_uses_the_karras_grid_in_rho() -> None:
    trig = TrigFlowProcess()
    ict = ICTDiscretization(trig, total_iters=100)
    grid, probs = ict.grid_and_probs(0)
    assert grid[0].item() == trig.t_max and grid[-1].item() == trig.eps
    torch.testing.assert_close(trig.noise_to_signal(grid)[1:-1], karras_grid(11, *trig.rho_range)[1:-1])
    pairs = ict.sample(500, 0, torch.Generator().manual_seed(1))
    rho = ict.rho_grid(0)
    idx = torch.searchsorted(-grid.float(), -pairs.t, right=False)
    torch.testing.assert_close(pairs.weight.double(), 1 / (rho[idx] - rho[idx + 1]), rtol=1e-6, atol=0)
    assert probs.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["fm", "trigflow"])
def test_adcm_partition_on_other_processes(name: str) -> None:
    """ADCM on FM/TrigFlow: a partition from t_max to exactly ε; λ → ∞ is one interval (diffusion training)."""
    proc = PROCESSES[name]
    f = _wrapper(name, proc.eps)

    def sample_x0(n: int, gen: torch.Generator) -> torch.Tensor:
        return 0.5 * torch.randn(n, 2, 8, 8, generator=gen, dtype=F64)

    pts = build_partition(
        f, sample_x0, torch.Generator().manual_seed(0), process=proc, lam=0.3, batch_size=2, max_points=4096
    )
    assert pts[0].item() == proc.t_max and pts[-1].item() == proc.eps and bool((pts[1:] < pts[:-1]).all())
    assert len(pts) > 3

    def gauss(x: torch.Tensor, t: torch.Tensor, s: float = 0.5) -> torch.Tensor:
        """The exact consistency function of x0 ~ N(0, s²I) in this process: the VE one in VE coordinates."""
        rho, rho_eps = proc.noise_to_signal(t), proc.noise_to_signal(torch.tensor(proc.eps, dtype=F64))
        scale = proc.alpha(torch.tensor(proc.eps, dtype=F64)) / proc.alpha(t)
        return x * (scale * torch.sqrt((s * s + rho_eps**2) / (s * s + rho**2))).reshape(-1, 1, 1, 1)

    one = build_partition(gauss, sample_x0, torch.Generator().manual_seed(0), process=proc, lam=math.inf, batch_size=64)
    # λ → ∞ (diffusion training): one interval on FM; TrigFlow's t bends ρ so hard near π/2 that the
    # linearised optimum needs a few jumps
    assert one.tolist() == [proc.t_max, proc.eps] if name == "fm" else len(one) < 8
    # On ρ ∈ [ρ(ε), 2] (at large ρ the Gaussian's optimum is one jump), λ = 0.01 in any time coordinate gives
    # about as many points as on VE: Δt* is invariant to first order under a change of time variable.
    short = make_process(name, proc.eps, float(proc.time_from_noise_to_signal(torch.tensor(2.0, dtype=F64))))
    fine = build_partition(gauss, sample_x0, torch.Generator().manual_seed(0), process=short, lam=0.01, batch_size=64)
    eps_ve = float(proc.noise_to_signal(torch.tensor(proc.eps, dtype=F64)))
    ve = build_partition(
        lambda x, t: x * torch.sqrt((0.25 + eps_ve**2) / (0.25 + t * t)).reshape(-1, 1, 1, 1),
        sample_x0,
        torch.Generator().manual_seed(0),
        process=VEProcess(eps_ve, 2.0),
        lam=0.01,
        batch_size=64,
    )
    assert len(ve) > 100 and len(fine) == pytest.approx(len(ve), rel=0.05)


# ---------------------------------------------------------------------------------------------
# sCT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["trigflow", "ve", "fm"])
def test_sct_tangent_matches_float64_finite_difference(source: str) -> None:
    """(F⁻, cos t sin t·dF⁻/dt) from one JVP equals a central difference of F along the path."""
    trig = TrigFlowPrecond(_backbone(), SD, 0.0, source)
    proc = TrigFlowProcess()
    x0, z = _data()
    t = torch.tensor([0.02, 0.6, 1.5], dtype=F64)
    x_t, dx = proc.x_t(x0, z, t), proc.dx_dt(x0, z, t)
    f_minus, tangent = trigflow_tangent(trig, x_t, t, dx)
    torch.testing.assert_close(f_minus, trig.head(x_t, t))
    h = 1e-6
    fd = (trig.head(proc.x_t(x0, z, t + h), t + h) - trig.head(proc.x_t(x0, z, t - h), t - h)) / (2 * h)
    cs = (torch.cos(t) * torch.sin(t)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(tangent, cs * fd, rtol=1e-5, atol=1e-8)


def test_sct_gradient_equals_continuous_consistency_gradient() -> None:
    """∇θ of the sCT loss (r = 1, no normalisation, w ≡ 0) is the Δt → 0 limit of the discrete gradient.

    Discrete, per sample: (1/Δt)·∇θ‖f_θ(x_t, t) − f_θ⁻(x_{t−Δt}, t−Δt)‖² → 2(df⁻/dt)ᵀ∇θ f = −2σ_d sin t·(df⁻/dt)ᵀ∇θ F.
    sCT: ∇θ mean_b mean_pixels (F − F.detach() − g)² = −2/(B·d)·Σ_b g_bᵀ∇θ F_b with g = cos t·df⁻/dt.
    So the discrete sum weighted by cos t/(σ_d sin t·B·d) must converge to the sCT gradient.
    """
    torch.manual_seed(0)
    trig = TrigFlowPrecond(_backbone(), SD, 0.0, "trigflow").train()
    x0, z = _data(batch=2)
    t = torch.tensor([0.3, 1.1], dtype=F64)
    module = SCTModule(trig, None)
    params = [p for p in trig.parameters()]
    loss = sct_batch_loss(trig, module, x0, z, t, None, ratio=1.0, tangent_norm_c=0.0)
    grad_sct = torch.autograd.grad(loss, params)

    proc = TrigFlowProcess()
    d = x0[0].numel()
    dt = 1e-6

    def discrete_grad(delta: float) -> list[torch.Tensor]:
        total = None
        for b in range(2):
            tb, xb, zb = t[b : b + 1], x0[b : b + 1], z[b : b + 1]
            with torch.no_grad():
                target = trig(proc.x_t(xb, zb, tb - delta), tb - delta)
            student = trig(proc.x_t(xb, zb, tb), tb)
            w = math.cos(tb.item()) / (SD * math.sin(tb.item()) * 2 * d * delta)
            g = torch.autograd.grad(w * (student - target).pow(2).sum(), params)
            total = g if total is None else [a + c for a, c in zip(total, g, strict=True)]
        return list(total)

    # Richardson extrapolation of the first-order difference quotient
    g1, g2 = discrete_grad(dt), discrete_grad(dt / 2)
    limit = [2 * b - a for a, b in zip(g1, g2, strict=True)]
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(limit, grad_sct, strict=True))
    den = sum(float(b.pow(2).sum()) for b in grad_sct)
    assert den > 0 and math.sqrt(num / den) < 1e-4


def test_sct_loss_parts_warmup_normalisation_and_adaptive_weight() -> None:
    trig = TrigFlowPrecond(_backbone(), SD, 0.0, "trigflow").train()
    head = LogVarianceHead(8).double()
    with torch.no_grad():
        head.linear.bias.fill_(0.5)
    module = SCTModule(trig, head)
    x0, z = _data(batch=3)
    t = torch.tensor([0.2, 0.9, 1.3], dtype=F64)
    loss = sct_batch_loss(trig, module, x0, z, t, None, ratio=0.25, tangent_norm_c=0.1)
    # the value: F − F.detach() = 0, so it is mean(e^{−w}·mean(g²) + w) with the normalised g
    proc = TrigFlowProcess()
    x_t, dx = proc.x_t(x0, z, t), proc.dx_dt(x0, z, t)
    f_minus, tangent = trigflow_tangent(trig, x_t, t, dx)
    cos, sin = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    g = -(cos**2) * (SD * f_minus - dx) - 0.25 * (cos * sin * x_t + SD * tangent)
    g = g / (g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + 0.1)
    expected = (math.exp(-0.5) * g.flatten(1).pow(2).mean(1) + 0.5).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert head.linear.weight.grad is not None and float(head.linear.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in trig.parameters() if p.requires_grad)


def test_sct_times_follow_the_proposal() -> None:
    trig = TrigFlowProcess()
    t = sample_sct_times(20000, -1.0, 1.4, trig, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and bool(((t > 0) & (t <= trig.t_max)).all())
    tau = torch.log(SD * torch.tan(t.double()))
    assert float(tau.mean()) == pytest.approx(-1.0, abs=0.03)
    assert float(tau.std()) == pytest.approx(1.4, abs=0.03)


def test_forward_ad_jvp_equals_torch_func_jvp() -> None:
    """adcm.nets.jvp (dual tensors) computes what torch.func.jvp computes, through the whole wrapper."""
    from adcm.nets.jvp import jvp

    f = VEPrecond(_backbone(), SD, 0.002)
    x0, z = _data()
    t = torch.tensor([0.01, 0.7, 30.0], dtype=F64)
    x_t = x0 + t.reshape(-1, 1, 1, 1) * z
    ours = jvp(f, (x_t, t), (z, torch.ones_like(t)))
    with torch.no_grad():
        theirs = torch.func.jvp(f, (x_t, t), (z, torch.ones_like(t)))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
    assert not any(p.grad is not None for p in f.parameters())


def test_first_jvp_prints_no_pytorch_deprecation_warning() -> None:
    """PyTorch's first dual tensor loads its forward-AD decompositions through the deprecated torch.jit.script;
    that warning (PyTorch's own) is silenced in adcm.nets.jvp, and only it. A fresh interpreter, because the
    decompositions load once per process; every other FutureWarning still raises there."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from adcm.nets.jvp import jvp\n"
        "x = torch.ones(3)\n"
        "out, tangent = jvp(lambda a: (a * a).sum(), (x,), (torch.ones(3),))\n"
        "assert float(tangent) == 6.0\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
