"""Tests for adcm.method.discretization: ECT mapping, iCT curriculum, ADCM step and partitions (CPU, fast)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from adcm.errors import PartitionTooLongError
from adcm.method.adcm import (
    ADCMDiscretization,
    adcm_step,
    build_partition,
    clamp_step,
    consistency_velocity,
    optimal_step,
)
from adcm.method.discretization import (
    PairBatch,
    frozen_network,
    lognormal_interval_probs,
    sample_intervals,
    uniform_interval_probs,
)
from adcm.method.ect import ECTDiscretization, ect_r
from adcm.method.ict import ICTDiscretization, ict_num_points
from adcm.nets.precond import VEPrecond
from adcm.nets.songunet import SongUNet
from adcm.processes import VEProcess, karras_grid

EPS, T_MAX, S = 0.002, 80.0, 0.5
VE = VEProcess(eps=EPS, t_max=T_MAX)
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Helpers: the exact consistency function of Gaussian data, and a tiny real network
# ---------------------------------------------------------------------------------------------


def gauss_g(t: float, s: float = S, eps: float = EPS) -> tuple[float, float]:
    """g(t) = sqrt((s²+ε²)/(s²+t²)) and g'(t) = −g·t/(s²+t²)."""
    g = math.sqrt((s * s + eps * eps) / (s * s + t * t))
    return g, -g * t / (s * s + t * t)


def gauss_fn(x: torch.Tensor, t: torch.Tensor, s: float = S, eps: float = EPS) -> torch.Tensor:
    """Exact VE consistency function of x0 ~ N(0, s²I): f(x, t) = x·g(t) (PF-ODE x ∝ sqrt(s²+t²))."""
    tt = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return x * torch.sqrt((s * s + eps * eps) / (s * s + tt * tt))


def gauss_stats(t: float, s: float = S, eps: float = EPS) -> tuple[float, float]:
    """Per-dimension E⟨v, e⟩ and E‖v‖² for x0 ~ N(0, s²), x_t = x0 + t z, f = g(t) x.

    v = g z + g' x_t = g'·x0 + (g + g' t)·z,   e = g x_t − x0 = (g − 1)·x0 + g t·z, so with
    E[x0²] = s², E[z²] = 1, E[x0 z] = 0:
        E⟨v, e⟩ = g'(g − 1) s² + (g + g' t)·g t,   E‖v‖² = g'² s² + (g + g' t)².
    """
    g, gp = gauss_g(t, s, eps)
    a = g + gp * t
    return gp * (g - 1.0) * s * s + a * g * t, gp * gp * s * s + a * a


def gauss_dt_star(t: float, lam: float) -> float:
    num, den = gauss_stats(t)
    return lam / (1.0 + lam) * num / den


def gauss_sampler(dim: int):
    def sample_x0(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return S * torch.randn(batch_size, dim, generator=generator, dtype=F64)

    return sample_x0


@pytest.fixture
def single_thread():
    """The tiny-network tests are latency bound: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(dropout: float = 0.0, seed: int = 0) -> VEPrecond:
    """A tiny DDPM++ (attention included) in float64 with randomised weights, as f = VEPrecond(F)."""
    torch.manual_seed(seed)
    net = SongUNet(
        img_resolution=8,
        in_channels=2,
        out_channels=2,
        label_dim=0,
        augment_dim=0,
        model_channels=8,
        channel_mult=[1, 2],
        channel_mult_emb=2,
        num_blocks=1,
        attn_resolutions=[4],
        dropout=dropout,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    )
    with torch.no_grad():  # the zero-initialised output layers would make F negligible
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return VEPrecond(net, sigma_data=0.5, eps=EPS).double()


# ---------------------------------------------------------------------------------------------
# JVP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.01, 0.5, 3.0, 40.0])
@pytest.mark.usefixtures("single_thread")
def test_jvp_matches_central_difference_tiny_unet(t: float) -> None:
    f = tiny_net().eval()
    gen = torch.Generator().manual_seed(1)
    x0 = 0.5 * torch.randn(3, 2, 8, 8, generator=gen, dtype=F64)
    z = torch.randn(3, 2, 8, 8, generator=gen, dtype=F64)
    t_vec = torch.full((3,), t, dtype=F64)
    f_t, v = consistency_velocity(f, VE.x_t(x0, z, t_vec), t_vec, VE.dx_dt(x0, z, t_vec))
    with torch.no_grad():
        h = 1e-5 * t
        fp = f(x0 + (t + h) * z, t_vec + h)
        fm = f(x0 + (t - h) * z, t_vec - h)
        assert torch.allclose(f_t, f(x0 + t * z, t_vec), rtol=0, atol=1e-12)
    fd = (fp - fm) / (2 * h)
    assert (v - fd).norm() / fd.norm() < 1e-5
    # the backbone matters: v is far from the derivative of the skip term c_skip(t)·x_t alone
    sd = 0.5
    c_skip = sd**2 / ((t - EPS) ** 2 + sd**2)
    d_skip = c_skip * z - 2 * (t - EPS) * c_skip**2 / sd**2 * (x0 + t * z)
    assert (v - d_skip).norm() / fd.norm() > 0.05
    assert not v.requires_grad


def test_jvp_matches_analytic_gaussian_velocity() -> None:
    gen = torch.Generator().manual_seed(2)
    x0, z = S * torch.randn(5, 7, generator=gen, dtype=F64), torch.randn(5, 7, generator=gen, dtype=F64)
    t = 1.7
    t_vec = torch.full((5,), t, dtype=F64)
    _, v = consistency_velocity(gauss_fn, x0 + t * z, t_vec, z)
    g, gp = gauss_g(t)
    torch.testing.assert_close(v, g * z + gp * (x0 + t * z), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Δt* (paper Eq. 10) against the closed form for Gaussian data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.005, 0.1, 1.0, 10.0, 80.0])
@pytest.mark.parametrize("lam", [0.01, 1.0, 100.0])
def test_optimal_step_matches_gaussian_closed_form(t: float, lam: float) -> None:
    n, d = 20000, 8
    gen = torch.Generator().manual_seed(3)
    x0 = S * torch.randn(n, d, generator=gen, dtype=F64)
    z = torch.randn(n, d, generator=gen, dtype=F64)
    x_t = x0 + t * z
    g, gp = gauss_g(t)
    v, e = g * z + gp * x_t, g * x_t - x0
    expected = gauss_dt_star(t, lam)
    dt, num, den = optimal_step(v, e, lam)
    num_an, den_an = gauss_stats(t)
    assert dt == pytest.approx(expected, rel=0.01)
    assert num == pytest.approx(d * num_an, rel=0.01)
    assert den == pytest.approx(d * den_an, rel=0.01)
    # the same through the JVP of the analytic consistency function
    dt2, stats = adcm_step(gauss_fn, x0, z, t, lam, VE)
    assert dt2 == pytest.approx(expected, rel=0.01)
    assert dt2 == pytest.approx(dt, rel=1e-10)
    assert stats["factor"] == pytest.approx(lam / (1 + lam))
    assert stats["global_err"] == pytest.approx(float((e * e).sum(1).mean()), rel=1e-12)


def test_optimal_step_is_ratio_of_batch_means() -> None:
    v = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=F64)
    e = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    dt, num, den = optimal_step(v, e, math.inf)
    assert (num, den) == (pytest.approx(6.0), pytest.approx(50.5))
    assert dt == pytest.approx(6.0 / 50.5)  # a mean of per-sample ratios would give (2 + 0.1)/2
    assert optimal_step(v, e, 0.0)[0] == 0.0
    assert optimal_step(v, e, 3.0)[0] == pytest.approx(0.75 * 6.0 / 50.5)
    with pytest.raises(ValueError):
        optimal_step(v, e, -1.0)


def test_step_interpretations() -> None:
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(64, 10, generator=gen, dtype=F64)
    e = v + 0.5 * torch.randn(64, 10, generator=gen, dtype=F64)
    base = optimal_step(v, e, 1.0)[0]
    assert base > 0
    # larger ‖v‖ → smaller step
    assert optimal_step(2 * v, e, 1.0)[0] == pytest.approx(base / 2)
    assert optimal_step(2 * v, e, 1.0)[0] < base
    # larger error e → larger step
    assert optimal_step(v, 3 * e, 1.0)[0] == pytest.approx(3 * base)
    # better alignment of v and e (same norms) → larger step
    u = torch.randn(64, 10, generator=gen, dtype=F64)
    u = u - (u * v).sum(1, keepdim=True) / (v * v).sum(1, keepdim=True) * v  # u ⟂ v per sample
    u = u / u.norm(dim=1, keepdim=True) * v.norm(dim=1, keepdim=True)
    steps = [optimal_step(v, math.cos(a) * v + math.sin(a) * u, 1.0)[0] for a in (1.2, 0.8, 0.4, 0.0)]
    assert all(b > a for a, b in itertools.pairwise(steps))
    # larger λ → larger step
    assert optimal_step(v, e, 0.1)[0] < base < optimal_step(v, e, 10.0)[0]


# ---------------------------------------------------------------------------------------------
# Clamping and partitions
# ---------------------------------------------------------------------------------------------


def test_clamp_step() -> None:
    assert clamp_step(math.inf, 10.0, EPS) == (10.0 - EPS, "max")
    assert clamp_step(100.0, 10.0, EPS) == (10.0 - EPS, "max")
    assert clamp_step(-1.0, 10.0, EPS) == (pytest.approx(1e-3), "min")  # 1e-4·t
    assert clamp_step(0.0, 0.01, EPS) == (pytest.approx(1e-5), "min")  # absolute floor
    assert clamp_step(0.5, 10.0, EPS) == (0.5, "none")
    # Δt_min(t) > t − ε: the upper bound wins
    assert clamp_step(0.0, EPS + 5e-6, EPS) == (pytest.approx(5e-6), "max")
    with pytest.raises(ValueError):
        clamp_step(math.nan, 1.0, EPS)


def _check_partition(points: torch.Tensor, t_max: float = T_MAX) -> None:
    assert points.dtype == F64
    assert points[0].item() == t_max
    assert points[-1].item() == EPS  # exactly ε
    assert bool((points[1:] < points[:-1]).all())


def test_large_lambda_is_one_step() -> None:
    for lam in (1e6, math.inf):
        gen = torch.Generator().manual_seed(5)
        record: list[dict] = []
        pts = build_partition(gauss_fn, gauss_sampler(4), gen, process=VE, lam=lam, batch_size=256, record=record)
        _check_partition(pts)
        assert pts.tolist() == [T_MAX, EPS]
        assert record[0]["clamp"] == "max" and record[0]["dt"] == pytest.approx(T_MAX - EPS)


def test_tiny_lambda_hits_floor_and_max_points() -> None:
    gen = torch.Generator().manual_seed(6)
    record: list[dict] = []
    with pytest.raises(PartitionTooLongError, match="max_points=50"):
        build_partition(
            gauss_fn, gauss_sampler(4), gen, process=VE, lam=1e-8, batch_size=64, max_points=50, record=record
        )
    assert len(record) == 50  # the 50th step would append point number 51
    assert all(r["clamp"] == "min" for r in record)
    assert all(r["dt"] == pytest.approx(max(1e-4 * r["t"], 1e-5)) for r in record)
    assert issubclass(PartitionTooLongError, ValueError)


def test_partition_follows_analytic_recursion() -> None:
    """With the exact Gaussian f, the built partition is the clamped recursion t ← t − Δt*(t)."""
    proc, lam = VEProcess(eps=EPS, t_max=2.0), 0.1
    gen = torch.Generator().manual_seed(7)
    pts = build_partition(gauss_fn, gauss_sampler(8), gen, process=proc, lam=lam, batch_size=4000)
    _check_partition(pts, 2.0)
    for t, r in zip(pts[:-2].tolist(), pts[1:-1].tolist(), strict=True):  # the last step is clamped
        assert t - r == pytest.approx(gauss_dt_star(t, lam), rel=0.01)
    expected, t = [2.0], 2.0
    while t > EPS:
        dt, _ = clamp_step(gauss_dt_star(t, lam), t, EPS)
        t = EPS if dt >= t - EPS else t - dt
        expected.append(t)
    assert abs(len(expected) - pts.numel()) <= 1
    assert 10 < pts.numel() < 200


@pytest.mark.usefixtures("single_thread")
def test_partition_with_network_restores_mode_and_no_grads() -> None:
    f = tiny_net(dropout=0.5)
    f.train()
    f.model.enc["4x4_block0"].eval()  # a mixed state must be restored exactly
    modes = {name: m.training for name, m in f.named_modules()}

    def sample_x0(b: int, gen: torch.Generator) -> torch.Tensor:
        return 0.5 * torch.randn(b, 2, 8, 8, generator=gen, dtype=F64)

    proc = VEProcess(eps=EPS, t_max=5.0)
    builds = []
    for _ in range(2):
        pts = build_partition(
            f, sample_x0, torch.Generator().manual_seed(8), process=proc, lam=0.3, batch_size=2, max_points=4096
        )
        _check_partition(pts, 5.0)
        assert pts.numel() > 5
        builds.append(pts)
    # dropout was off (else the two builds would differ), modes restored, no parameter gradients
    assert torch.equal(builds[0], builds[1])
    assert {name: m.training for name, m in f.named_modules()} == modes
    assert all(p.grad is None for p in f.parameters())


def test_frozen_network_restores_on_error() -> None:
    net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    net.train()
    with pytest.raises(RuntimeError), frozen_network(net):
        assert not net.training and not net[0].training
        assert not torch.is_grad_enabled()
        raise RuntimeError
    assert net.training and net[0].training and net[1].training


# ---------------------------------------------------------------------------------------------
# ADCMDiscretization
# ---------------------------------------------------------------------------------------------


def _adcm(**kw) -> ADCMDiscretization:
    args = {
        "process": VEProcess(eps=EPS, t_max=2.0),
        "lam": 0.1,
        "rebuild_every_iters": 100,
        "partition_batch_size": 256,
        "seed": 11,
    }
    args.update(kw)
    return ADCMDiscretization(**args)


def test_adcm_rebuild_deterministic_and_state_dict_round_trip(tmp_path) -> None:
    a, b = _adcm(), _adcm()
    assert a.needs_rebuild(0)
    a.rebuild(0, gauss_fn, gauss_sampler(4))
    b.rebuild(0, gauss_fn, gauss_sampler(4))
    assert torch.equal(a.points, b.points)
    assert not a.needs_rebuild(0) and not a.needs_rebuild(50) and a.needs_rebuild(100)
    a.rebuild(100, gauss_fn, gauss_sampler(4))
    assert not torch.equal(a.partitions[0][1], a.partitions[1][1])  # fresh data at a new iteration
    assert [it for it, _ in a.partitions] == [0, 100]

    path = tmp_path / "disc.pt"
    torch.save(a.state_dict(), path)
    c = _adcm(seed=999)
    c.load_state_dict(torch.load(path, weights_only=True))
    assert c.seed == 11
    assert [it for it, _ in c.partitions] == [0, 100]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.partitions, c.partitions, strict=True))
    assert not c.needs_rebuild(100) and c.needs_rebuild(200)
    # a resumed run rebuilds identically
    a.rebuild(200, gauss_fn, gauss_sampler(4))
    c.rebuild(200, gauss_fn, gauss_sampler(4))
    assert torch.equal(a.points, c.points)
    ga, gc = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    pa, pc = a.sample(64, 201, ga), c.sample(64, 201, gc)
    assert torch.equal(pa.t, pc.t) and torch.equal(pa.r, pc.r)
    with pytest.raises(ValueError):
        c.load_state_dict({"kind": "ect"})


@pytest.mark.parametrize("mode", ["lognormal", "uniform"])
def test_adcm_sample_adjacent_pairs(mode: str) -> None:
    d = _adcm(interval_sampling=mode)
    with pytest.raises(RuntimeError):
        d.sample(4, 0, torch.Generator())
    d.rebuild(0, gauss_fn, gauss_sampler(4))
    pts = d.points
    batch = d.sample(4096, 0, torch.Generator().manual_seed(0))
    assert isinstance(batch, PairBatch) and batch.weight is None
    assert batch.t.dtype == torch.float32 and batch.t.shape == (4096,)
    pts32 = pts.float()
    idx = torch.searchsorted(-pts32, -batch.t)  # position of t in the decreasing grid
    assert torch.equal(pts32[idx], batch.t) and torch.equal(pts32[idx + 1], batch.r)
    assert bool((batch.r < batch.t).all())
    probs = d.interval_probs()
    if mode == "uniform":
        assert torch.allclose(probs, torch.full_like(probs, 1 / probs.numel()))
    else:
        torch.testing.assert_close(probs, lognormal_interval_probs(pts, -1.1, 2.0, d.process))
    assert batch.target_is_data(EPS).sum() == (batch.r == torch.tensor(EPS, dtype=torch.float32)).sum()


@pytest.mark.usefixtures("single_thread")
def test_adcm_rebuild_eval_mode_via_network_kwarg() -> None:
    f = tiny_net(dropout=0.5).train()
    seen: list[bool] = []

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a closure, not an nn.Module
        seen.append(f.training or torch.is_grad_enabled())
        return f(x, t)

    def sample_x0(b: int, gen: torch.Generator) -> torch.Tensor:
        return 0.5 * torch.randn(b, 2, 8, 8, generator=gen, dtype=F64)

    builds = []
    for _ in range(2):
        d = _adcm(process=VEProcess(eps=EPS, t_max=5.0), lam=0.3, partition_batch_size=2)
        d.rebuild(100, fn, sample_x0, network=f)
        builds.append(d.points)
    assert torch.equal(builds[0], builds[1]) and builds[0].numel() > 5
    assert seen and not any(seen)  # eval mode and no grad during the build
    assert f.training  # restored


# ---------------------------------------------------------------------------------------------
# Interval probabilities and sampling
# ---------------------------------------------------------------------------------------------


def test_lognormal_interval_probs_equal_erf_formula() -> None:
    grid = karras_grid(41, EPS, T_MAX)
    probs = lognormal_interval_probs(grid, -1.1, 2.0, VE)
    assert probs.shape == (40,)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    raw = [
        math.erf((math.log(grid[i].item()) + 1.1) / (math.sqrt(2) * 2.0))
        - math.erf((math.log(grid[i + 1].item()) + 1.1) / (math.sqrt(2) * 2.0))
        for i in range(40)
    ]
    expected = torch.tensor(raw, dtype=F64) / sum(raw)
    torch.testing.assert_close(probs, expected, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError):
        lognormal_interval_probs(grid.flip(0), -1.1, 2.0, VE)


def test_sample_intervals_follows_probs() -> None:
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=F64)
    idx = sample_intervals(probs, 100000, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=4).double() / idx.numel()
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs, atol=5e-3, rtol=0)
    assert torch.equal(uniform_interval_probs(4), torch.full((4,), 0.25, dtype=F64))


# ---------------------------------------------------------------------------------------------
# iCT
# ---------------------------------------------------------------------------------------------


def test_ict_num_points_curriculum() -> None:
    K = 400_000
    k_prime = 50_000  # ⌊400000 / (log2⌊1280/10⌋ + 1)⌋ = ⌊400000 / 8⌋
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    for j, n in enumerate(expected):
        assert ict_num_points(j * k_prime, K) == n
        assert ict_num_points(j * k_prime + k_prime - 1, K) == n
        if j:
            assert ict_num_points(j * k_prime - 1, K) == expected[j - 1]
    assert ict_num_points(0, K) == 11 and ict_num_points(K - 1, K) == 1281 and ict_num_points(K, K) == 1281
    assert ict_num_points(10**9, K) == 1281
    assert ict_num_points(5, 3) in (11, 21, 41, 81, 161, 321, 641, 1281)  # toy K: K' floored at 1


def test_karras_grid() -> None:
    g = karras_grid(11, EPS, T_MAX, 7.0)
    i = torch.arange(11, dtype=F64)
    a, b = T_MAX ** (1 / 7), EPS ** (1 / 7)
    torch.testing.assert_close(g, (a + i / 10 * (b - a)) ** 7, rtol=1e-14, atol=0)
    assert g[0].item() == T_MAX and g[-1].item() == EPS
    assert bool((g[1:] < g[:-1]).all())


def test_ict_discretization_sample() -> None:
    d = ICTDiscretization(VE, total_iters=400_000)
    for it, n in [(0, 11), (49_999, 11), (50_000, 21), (399_999, 1281)]:
        grid, probs = d.grid_and_probs(it)
        assert grid.numel() == n
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
        batch = d.sample(2048, it, torch.Generator().manual_seed(it))
        g32 = grid.float()
        idx = torch.searchsorted(-g32, -batch.t)
        assert torch.equal(g32[idx], batch.t) and torch.equal(g32[idx + 1], batch.r)
        torch.testing.assert_close(batch.weight, (1.0 / (grid[idx] - grid[idx + 1])).float())
    assert d.state_dict() == {"kind": "ict"}
    d.load_state_dict(d.state_dict())
    with pytest.raises(ValueError):
        d.load_state_dict({"kind": "adcm"})


# ---------------------------------------------------------------------------------------------
# ECT
# ---------------------------------------------------------------------------------------------


def test_ect_r_by_hand() -> None:
    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    t = torch.tensor([1.0, 10.0, 0.1], dtype=F64)
    n1, n10 = 1 + 8 * sig(-1.0), 1 + 8 * sig(-10.0)  # 3.1515..., 1.00036...
    assert n1 == pytest.approx(3.151531, abs=1e-6)
    r0 = ect_r(t, 0, 25_000)  # stage 0: divide by q = 2
    assert r0[0].item() == 0.0  # 1 − 3.15/2 < 0 → clamped to 0
    assert r0[1].item() == pytest.approx(10 * (1 - n10 / 2), rel=1e-12)
    assert r0[2].item() == 0.0
    r1 = ect_r(t, 25_000, 25_000)  # stage 1: q² = 4
    assert r1[0].item() == pytest.approx(1 - n1 / 4, rel=1e-12)  # 0.2121...
    assert ect_r(t, 24_999, 25_000)[0].item() == 0.0  # still stage 0
    r2 = ect_r(t, 50_000, 25_000)
    assert r2[0].item() == pytest.approx(1 - n1 / 8, rel=1e-12)
    r_q4 = ect_r(t, 0, 25_000, q=4.0)
    assert r_q4[0].item() == pytest.approx(1 - n1 / 4, rel=1e-12)
    assert bool((ect_r(torch.logspace(-3, 2, 50, dtype=F64), 0, 1) >= 0).all())


def test_ect_discretization_sample() -> None:
    d = ECTDiscretization(VE, stage_iters=100)
    gen = torch.Generator().manual_seed(0)
    b0 = d.sample(20000, 0, gen)
    assert b0.t.dtype == torch.float32 and b0.r.dtype == torch.float32 and b0.weight is not None
    assert bool((b0.t > torch.tensor(EPS, dtype=torch.float32)).all()) and float(b0.t.max()) <= T_MAX
    assert bool((b0.r >= 0).all()) and bool((b0.r < b0.t).all())
    torch.testing.assert_close(b0.weight, (1.0 / (b0.t.double() - b0.r.double())).float())
    torch.testing.assert_close(b0.r, ect_r(b0.t.double(), 0, 100).float())
    # log-normal ln t ~ N(−1.1, 2²) (truncated to [ε, T]: the median is still close to e^−1.1)
    assert float(b0.t.log().median()) == pytest.approx(-1.1, abs=0.1)
    # small t: r clamped to 0 → the target is the data (r ≤ ε); weight 1/t there
    small = b0.t < 0.5
    assert bool(b0.target_is_data(EPS)[small].all())
    torch.testing.assert_close(b0.weight[small], 1.0 / b0.t[small])
    # next stage: Δt halves
    b1 = d.sample(5, 100, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b1.r, ect_r(b1.t.double(), 1, 1).float())
    assert d.state_dict() == {"kind": "ect"}
    d.load_state_dict({"kind": "ect"})
    with pytest.raises(ValueError):
        d.load_state_dict({"kind": "ict"})


def test_period_index_is_floor_division_for_whole_periods() -> None:
    from adcm.method.discretization import period_index, period_start

    for period in (1, 3, 100, 25_000):
        assert [period_index(i, period) for i in range(0, 3 * period + 2)] == [
            i // period for i in range(0, 3 * period + 2)
        ]
        assert [period_start(k, period) for k in range(4)] == [k * period for k in range(4)]


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.2, 0.1])
def test_fractional_periods_split_any_run_into_exactly_one_over_fraction_periods(fraction: float) -> None:
    """fraction_of_run keeps the period unrounded, so every run length has 1/fraction periods, the k-th
    starting within half an iteration of k·fraction of the run (a rounded period of 62 in a 250-iteration
    run started a fifth quarter at iteration 248)."""
    from adcm.method.discretization import fraction_of_run, period_index, period_start

    periods = round(1 / fraction)
    for total in range(periods, 600):
        period = fraction_of_run(fraction, total)
        starts = [period_start(k, period) for k in range(periods + 1)]
        assert all(abs(s - k * fraction * total) <= 0.5 for k, s in enumerate(starts))
        assert period_index(total - 1, period) == periods - 1
        index = [period_index(i, period) for i in range(total)]
        assert index == sorted(index) and set(index) == set(range(periods))
        assert [i for i in range(1, total) if index[i] != index[i - 1]] == starts[1:periods]
    assert period_index(248, fraction_of_run(0.25, 250)) == 3
    with pytest.raises(ValueError, match="at least one"):
        period_index(3, 0.5)
