"""Consistency distillation (train.distillation): the teacher's Euler step, its exact limits, the params key."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from conftest import set_key, synthetic_dataset, tiny_params, write_params

from adcm.config import ParamsError, load_params
from adcm.io.model_files import TeacherFile
from adcm.method.objectives import DiscreteConsistencyObjective, teacher_ode_step
from adcm.nets.precond import denoiser
from adcm.processes import FMProcess, TrigFlowProcess, VEProcess
from adcm.train.runs import network_kwargs_for, student_spec

PROCESSES = [VEProcess(eps=0.002, t_max=80.0), FMProcess(eps=1e-3, t_max=0.999), TrigFlowProcess(eps=0.004)]


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_an_oracle_teacher_gives_consistency_trainings_point(process) -> None:
    """With x̂0 = x0 the Euler step lands on α(r)·x0 + β(r)·z: exactly for any Δt where x_t is linear in t
    (VE, FM), within Euler's error bound on TrigFlow's curved path."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64)
    lo, hi = process.eps, process.t_max
    t = lo + (hi - lo) * torch.rand(6, generator=gen, dtype=torch.float64).clamp(0.05, 1.0)
    r = lo + (t - lo) * torch.rand(6, generator=gen, dtype=torch.float64)
    x_t = process.x_t(x0, z, t)

    def oracle(x: torch.Tensor, time: torch.Tensor, labels: object) -> torch.Tensor:
        assert torch.equal(x, x_t) and torch.equal(time, t)
        return x0

    x_r = teacher_ode_step(oracle, process, x_t, t, r, None)
    expected = process.x_t(x0, z, r)
    if process.name == "trigflow":  # a curved path: Euler's error ≤ ½Δt²·max|x''| ≤ ½Δt²·(|x0| + σ_d·|z|)
        bound = 0.5 * (t - r).view(-1, 1, 1, 1) ** 2 * (x0.abs() + 0.5 * z.abs())
        assert ((x_r - expected).abs() <= bound).all()
        assert (x_r - expected).abs().max() > 0
    else:
        torch.testing.assert_close(x_r, expected, rtol=1e-12, atol=1e-12)


def test_the_step_follows_the_exact_ode_of_gaussian_data_to_second_order() -> None:
    """Data N(0, s²): D(x, σ) = s²/(s² + σ²)·x and the ODE's solution is x_r = x_t·√(s² + r²)/√(s² + t²);
    the Euler step's error falls as Δt² (one-step local error)."""
    s = 0.5
    process = VEProcess(eps=0.002, t_max=80.0)
    x_t = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3

    def gaussian(x: torch.Tensor, sigma: torch.Tensor, labels: object) -> torch.Tensor:
        return s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2) * x

    t = torch.full((4,), 2.0, dtype=torch.float64)
    errors = []
    for dt in (0.2, 0.1, 0.05):
        r = t - dt
        exact = x_t * math.sqrt(s**2 + (2.0 - dt) ** 2) / math.sqrt(s**2 + 4.0)
        errors.append((teacher_ode_step(gaussian, process, x_t, t, r, None) - exact).abs().max().item())
    assert errors[0] > 0
    for coarse, fine in itertools.pairwise(errors):
        assert 3.5 < coarse / fine < 4.5


def _spec(tmp_path: Path, **keys):
    base = tiny_params({"train.device": "cpu"})
    for key, value in keys.items():
        set_key(base, key.replace("__", "."), value)
    params = load_params(write_params(tmp_path / "p.yaml", base))
    kwargs = network_kwargs_for(params.teacher.network, 8, 1, 0)
    torch.manual_seed(0)
    teacher = TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5, "ve").state_dict(), {}, "ve")
    data = synthetic_dataset(n=16)
    return student_spec(params, teacher, data, teacher_id="t", data_id="d", world_size=1, device=torch.device("cpu"))


def test_the_params_key_builds_a_frozen_teacher_and_is_validated(tmp_path: Path) -> None:
    plain = _spec(tmp_path)
    distilled = _spec(tmp_path, train__distillation=True)
    assert isinstance(plain.objective, DiscreteConsistencyObjective) and plain.objective.teacher is None
    assert isinstance(distilled.objective, DiscreteConsistencyObjective)
    teacher = distilled.objective.teacher
    assert teacher is not None and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher is not distilled.net  # a frozen copy: the student's updates never reach it
    assert distilled.fingerprint != plain.fingerprint
    with pytest.raises(ParamsError, match=r"train\.distillation: .*not for method 'sct'"):
        _spec(tmp_path, train__distillation=True, method="sct")
