"""The batched partition builder against the closed form for Gaussian data and against Algorithm 1."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
from test_discretization import EPS, gauss_dt_star, gauss_fn, gauss_sampler

from adcm.errors import PartitionTooLongError
from adcm.method.adcm import ADCMDiscretization, build_partition, build_partition_batched
from adcm.processes import FMProcess, VEProcess


def _step_errors(points: torch.Tensor, lam: float) -> list[float]:
    """|Δt/Δt*_exact − 1| at every point whose step is not clamped (floor or last step)."""
    pts = points.tolist()
    return [
        abs((t - r) / gauss_dt_star(t, lam) - 1)
        for t, r in itertools.pairwise(pts[:-1])
        if t - r > 1.01 * max(1e-4 * t, 1e-5)
    ]


@pytest.mark.parametrize("lam", [0.1, 0.01])
def test_both_builders_match_the_gaussian_closed_form(lam: float) -> None:
    """For x0 ~ N(0, s²) and the exact consistency map, Δt* is known in closed form (gauss_dt_star)."""
    proc = VEProcess(eps=EPS, t_max=2.0)
    seq = build_partition(
        gauss_fn,
        gauss_sampler(64),
        torch.Generator().manual_seed(0),
        process=proc,
        lam=lam,
        batch_size=8,
        max_points=20000,
    )
    bat = build_partition_batched(
        gauss_fn,
        gauss_sampler(64),
        torch.Generator().manual_seed(0),
        process=proc,
        lam=lam,
        batch_size=64,
        num_times=32,
        max_points=20000,
    )
    for points in (seq, bat):
        assert points[0] == 2.0 and points[-1] == EPS and bool((points[1:] < points[:-1]).all())
        errors = _step_errors(points, lam)
        # median and 95th percentile (the sequential builder's estimates come from 8 samples each)
        assert statistics.median(errors) < 0.01 and statistics.quantiles(errors, n=20)[-1] < 0.05
    assert abs(bat.numel() / seq.numel() - 1) < 0.03


def test_batched_builder_evaluates_the_network_only_on_its_grid() -> None:
    calls = []

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return gauss_fn(x, t)

    proc = VEProcess(eps=EPS, t_max=2.0)
    record: list[dict] = []
    pts = build_partition_batched(
        counting,
        gauss_sampler(16),
        torch.Generator().manual_seed(1),
        process=proc,
        lam=0.01,
        batch_size=24,
        num_times=10,
        chunk_size=50,
        record=record,
    )
    assert sum(calls) == 24 * 10 and max(calls) <= 50  # one JVP row per (time, sample); none in the recursion
    grid = [r for r in record if r.get("grid")]
    assert len(grid) == 10 and grid[0]["t"] == 2.0 and grid[-1]["t"] == EPS
    assert len(record) - len(grid) == pts.numel() - 1


def test_batched_builder_limits_and_other_processes() -> None:
    proc = VEProcess(eps=EPS, t_max=2.0)
    one = build_partition_batched(
        gauss_fn,
        gauss_sampler(8),
        torch.Generator().manual_seed(2),
        process=proc,
        lam=math.inf,
        batch_size=8,
        num_times=4,
    )
    assert one.tolist() == [2.0, EPS]  # λ → ∞: diffusion training, one interval
    with pytest.raises(PartitionTooLongError):
        build_partition_batched(
            gauss_fn,
            gauss_sampler(8),
            torch.Generator().manual_seed(2),
            process=proc,
            lam=1e-4,
            batch_size=8,
            num_times=4,
            max_points=50,
        )
    fm = FMProcess(eps=1e-3, t_max=0.999)

    def fm_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the same map in FM coordinates
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        x_ve, sigma = x / (1 - tt), t / (1 - t)
        return gauss_fn(x_ve, sigma)

    pts = build_partition_batched(
        fm_fn, gauss_sampler(8), torch.Generator().manual_seed(3), process=fm, lam=0.1, batch_size=32, num_times=16
    )
    assert pts[0] == 0.999 and pts[-1] == 1e-3 and bool((pts[1:] < pts[:-1]).all())


def test_discretization_uses_the_chosen_builder() -> None:
    proc = VEProcess(eps=EPS, t_max=2.0)
    for builder in ("sequential", "batched"):
        disc = ADCMDiscretization(proc, 0.1, 10, 16, builder=builder, num_times=8)
        disc.rebuild(0, gauss_fn, gauss_sampler(8))
        grid = [r for r in disc.last_build_record if r.get("grid")]
        assert (len(grid) == 8) == (builder == "batched")
    with pytest.raises(ValueError, match="builder"):
        ADCMDiscretization(proc, 0.1, 10, 16, builder="parallel")  # type: ignore[arg-type]


def test_non_positive_estimates_are_bridged_by_the_trend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where E⟨v, e⟩ is ≤ 0 or within two standard errors of 0 at some grid times (no step from Eq. 10 that
    the samples resolve), the walk follows the log–log trend of the resolved neighbours instead of crawling
    on the floor Δt_min or on a spuriously tiny step."""
    import adcm.method.adcm as adcm_module

    proc = VEProcess(eps=EPS, t_max=2.0)

    def fake(fn, x0, z, times, process, chunk_size):  # Δt* = 0.1·t exactly, except negative at the middle times
        num = 0.1 * times.clone()
        num[3:6] = -1.0
        num[6] = 1e-3 * times[6]  # positive but within two standard errors of zero: unresolved
        se = torch.full_like(times, 1e-9)
        se[6] = 1.0
        return num, torch.ones_like(times), se

    monkeypatch.setattr(adcm_module, "step_statistics", fake)
    pts = build_partition_batched(
        gauss_fn,
        gauss_sampler(4),
        torch.Generator().manual_seed(0),
        process=proc,
        lam=math.inf,
        batch_size=4,
        num_times=10,
    )
    steps = (pts[:-2] - pts[1:-1]) / pts[:-2]
    assert torch.allclose(steps, torch.full_like(steps, 0.1), rtol=1e-6)  # Δt = 0.1·t everywhere, no floor steps
