"""FID's low-rank form and bootstrap interval, KID against clean-fid, and the score stage's new metrics."""

from __future__ import annotations

import numpy as np
import pytest
from cleanfid import fid as cleanfid_fid

from adcm.eval import metrics
from adcm.eval.fid import feature_stats, frechet_distance
from adcm.eval.metrics import ReferenceGeometry, fid_with_interval, kid_subsets, kid_with_spread, set_metrics


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n draws of one correlated Gaussian in d dimensions (the same for every seed), shifted by ``shift``."""
    mix = np.random.default_rng(1000 + d).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize("n", [20, 80])  # fewer and more images than dimensions
def test_low_rank_fid_equals_the_full_formula(n: int) -> None:
    ref, gen = _features(200, 48, 0), _features(n, 48, 1, shift=0.3)
    mu1, s1 = feature_stats(ref)
    geometry = ReferenceGeometry.from_stats(mu1, s1)
    assert geometry.fid(gen) == pytest.approx(frechet_distance(mu1, s1, *feature_stats(gen)), rel=1e-6)


def test_bootstrap_interval_brackets_the_value_and_shrinks_with_n() -> None:
    ref = _features(400, 32, 0)
    geometry = ReferenceGeometry.from_stats(*feature_stats(ref))
    widths = []
    for n in (40, 320):
        value, lo, hi = fid_with_interval(_features(n, 32, 2, shift=0.2), geometry, resamples=60, seed=1)
        assert lo < value < hi and value - lo == pytest.approx(hi - value)
        widths.append(hi - lo)
    assert widths[1] < widths[0]
    assert (
        fid_with_interval(_features(40, 32, 2), geometry, resamples=0)[1:]
        == (pytest.approx(fid_with_interval(_features(40, 32, 2), geometry, resamples=0)[0]),) * 2
    )


def test_bootstrap_resamples_are_each_the_fid_of_the_resampled_rows() -> None:
    """The interval reuses one projection X Σ^½ for every resample; each must still be that resample's FID."""
    ref, gen = _features(300, 40, 0), _features(30, 40, 7, shift=0.4)
    geometry = ReferenceGeometry.from_stats(*feature_stats(ref))
    value, _lo, hi = fid_with_interval(gen, geometry, resamples=25, seed=3)
    rng = np.random.default_rng(3)
    direct = [frechet_distance(*feature_stats(ref), *feature_stats(gen[rng.integers(0, 30, 30)])) for _ in range(25)]
    assert value == pytest.approx(geometry.fid(gen), rel=1e-12)
    assert (hi - value) / 1.96 == pytest.approx(float(np.std(direct, ddof=1)), rel=1e-6)


def test_kid_from_whole_kernel_matrices_equals_the_per_subset_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, gen = _features(90, 24, 8), _features(50, 24, 9, shift=0.3)
    monkeypatch.setattr(metrics, "_KID_WHOLE_KERNEL_ENTRIES", 0)  # every subset computes its own kernels
    per_subset = kid_subsets(gen, ref, num_subsets=12, max_subset_size=40, seed=5)
    monkeypatch.setattr(metrics, "_KID_WHOLE_KERNEL_ENTRIES", 1 << 26)  # 90² + 50² + 90·50 < 12·3·40²: whole
    whole = kid_subsets(gen, ref, num_subsets=12, max_subset_size=40, seed=5)
    assert np.allclose(whole, per_subset, rtol=1e-10, atol=0) and len(set(whole.tolist())) == 12


def test_kid_matches_clean_fid_on_one_full_subset() -> None:
    a, b = _features(60, 16, 3), _features(60, 16, 4, shift=0.5)
    ours = kid_subsets(b, a, num_subsets=1, max_subset_size=60)[0]
    # one subset of every image: the estimate no longer depends on which rows the subset draws
    theirs = cleanfid_fid.kernel_distance(b, a, num_subsets=1, max_subset_size=60)
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_kid_is_near_zero_for_the_same_distribution_and_reports_a_spread() -> None:
    same, spread = kid_with_spread(_features(300, 16, 5), _features(300, 16, 6), num_subsets=20, max_subset_size=100)
    other, _ = kid_with_spread(
        _features(300, 16, 5, shift=1.0), _features(300, 16, 6), num_subsets=20, max_subset_size=100
    )
    assert abs(same) < 3 * spread and other > 10 * spread > 0


def test_set_metrics_names_every_value() -> None:
    ref = _features(100, 8, 0)
    out = set_metrics(
        "1step",
        _features(30, 8, 1),
        ReferenceGeometry.from_stats(*feature_stats(ref)),
        ref,
        bootstrap_resamples=10,
        kid_subsets=5,
        kid_subset_size=20,
    )
    assert set(out) == {
        "fid_1step",
        "fid_1step_ci95_low",
        "fid_1step_ci95_high",
        "kid_1step",
        "kid_1step_std",
        "count_1step",
    }
    assert out["count_1step"] == 30 and out["fid_1step_ci95_low"] <= out["fid_1step_ci95_high"]
