"""EDM teacher training: bit-exact resumption, refusal of foreign checkpoints, Heun sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import synthetic_dataset, tiny_params

from adcm.config import parse_params
from adcm.errors import CheckpointError
from adcm.processes import karras_grid
from adcm.sampling.solvers import heun_sample
from adcm.train.batches import BatchSource
from adcm.train.loop import RunResult, train
from adcm.train.runs import teacher_spec

CPU = torch.device("cpu")


def _params(**overrides):
    return parse_params(tiny_params({"seed": 3, **overrides}))


def _train(tmp_path: Path, name: str, duration: float, fresh: bool = False, **overrides) -> RunResult:
    params = _params(**{"teacher.duration_kimg": duration, **overrides})
    data = synthetic_dataset()
    spec = teacher_spec(params, data, "x")
    return train(
        spec,
        BatchSource(data.images, data.labels, 0, params.teacher.xflip, CPU),
        checkpoint_path=tmp_path / name,
        device=CPU,
        show_progress=False,
        fresh=fresh,
    )


@pytest.mark.parametrize("overrides", [{}, {"teacher.lr_ref_iters": 2}], ids=["warm-up", "warm-up+rsqrt-decay"])
def test_resumed_training_is_bit_exact(tmp_path: Path, overrides: dict[str, int]) -> None:
    """A run of 4 steps extended to 8 equals a run of 8: resuming is exact, and (the duration being left out of
    the fingerprint and of every schedule: warm-up, rsqrt decay, EMA ramp-up) a shorter run is the beginning of a
    longer one — what the shipped teacher's spot check relies on (data/teachers/README.md)."""
    whole = _train(tmp_path, "a.pt", 0.128, **overrides)
    _train(tmp_path, "b.pt", 0.064, **overrides)  # "interrupted" after 4 steps, checkpoint written
    resumed = _train(tmp_path, "b.pt", 0.128, **overrides)
    assert resumed.resumed_from_kimg == pytest.approx(0.064)
    assert whole.steps == resumed.steps == 8
    for name, value in whole.ema_state.items():
        assert torch.equal(value, resumed.ema_state[name]), name
    # and training actually moved the weights
    fresh = _train(tmp_path, "c.pt", 0.016, **overrides)
    assert any(not torch.equal(v, fresh.ema_state[k]) for k, v in whole.ema_state.items())


def test_foreign_checkpoint_is_refused_unless_fresh(tmp_path: Path) -> None:
    _train(tmp_path, "a.pt", 0.032)
    with pytest.raises(CheckpointError, match="different configuration"):
        _train(tmp_path, "a.pt", 0.032, **{"teacher.lr": 5e-4})
    run = _train(tmp_path, "a.pt", 0.032, fresh=True, **{"teacher.lr": 5e-4})
    assert run.resumed_from_kimg == 0


def test_heun_sampler_is_exact_for_gaussian_data() -> None:
    """For x0 ~ N(0, s²) the ideal denoiser is D(x, σ) = x·s²/(s²+σ²) and the probability-flow ODE has
    x(σ) = x(σ_max)·sqrt((s²+σ²)/(s²+σ_max²)); 18 Heun steps (and a last Euler step to 0) get close."""
    s = 0.5

    def ideal(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1, 1, 1, 1)
        return x * s**2 / (s**2 + sigma**2)

    sigmas = karras_grid(18, 0.002, 80.0, 7.0)
    latents = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    exact = latents * 80.0 * (s**2 / (s**2 + 80.0**2)) ** 0.5
    errors = []
    for n in (18, 50, 200):
        out = heun_sample(ideal, latents, karras_grid(n, 0.002, 80.0, 7.0)).double()
        errors.append(((out - exact).norm() / exact.norm()).item())
    assert errors[0] < 0.06 and errors[2] < 1e-3
    assert errors[0] / errors[1] > (50 / 18) ** 2 * 0.8  # second order in the step count
    assert len(sigmas) == 18 and sigmas[0] == 80.0 and sigmas[-1] == pytest.approx(0.002)


def test_checkpoint_further_than_the_duration_is_refused(tmp_path: Path) -> None:
    """A longer run continues a shorter one (the duration is not in the teacher's fingerprint), but a checkpoint
    further along than the requested duration is refused rather than silently returned."""
    _train(tmp_path, "a.pt", 0.064)
    with pytest.raises(CheckpointError, match=r"further than the requested 0\.032 kimg.*--fresh"):
        _train(tmp_path, "a.pt", 0.032)
    longer = _train(tmp_path, "a.pt", 0.096)
    assert longer.resumed_from_kimg == pytest.approx(0.064) and longer.steps == 6


def test_progress_of_a_resumed_run_measures_images_per_second_from_where_it_resumed() -> None:
    """A run resumed at 25.6 kimg (or already finished) must not show 25,600 images over a few microseconds."""
    import time

    from adcm.train.progress import TrainingProgress

    with TrainingProgress("t", 51.2, enabled=False) as progress:
        progress.resume_at(25.6)
        time.sleep(0.05)
        rate = progress.update(25.6 + 0.064)  # 64 images in ≥ 50 ms
    assert 0 < rate <= 64 / 0.05 + 1e-6
