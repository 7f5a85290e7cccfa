"""ADCM's λ schedule (coarse-to-fine): LambdaSchedule, the rebuild at each switch, train.adcm.lambda_schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import repo_params, set_key, synthetic_dataset, tiny_params, write_params
from test_discretization import EPS, gauss_fn, gauss_sampler

from adcm.config import ParamsError, load_params
from adcm.io.model_files import TeacherFile
from adcm.method.adcm import ADCMDiscretization, LambdaSchedule
from adcm.nets.precond import denoiser
from adcm.processes import VEProcess
from adcm.train.runs import make_discretization, network_kwargs_for, student_spec

VE2 = VEProcess(eps=EPS, t_max=2.0)


def test_lambda_schedule_values_switches_and_fractions() -> None:
    sched = LambdaSchedule(((0, 0.1), (50, 0.01)))
    assert [sched(i) for i in (0, 49, 50, 99)] == [0.1, 0.1, 0.01, 0.01]
    assert sched.switches == {50}
    assert LambdaSchedule.from_fractions([(0.0, 0.1), (0.5, 0.01)], 7).steps == ((0, 0.1), (4, 0.01))
    assert LambdaSchedule(((0, 0.3),)).switches == frozenset()
    for bad in (((1, 0.1),), ((0, 0.1), (5, 0.2), (3, 0.3)), ((0, -1.0),), ()):
        with pytest.raises(ValueError):
            LambdaSchedule(bad)


def _disc(lam) -> ADCMDiscretization:
    return ADCMDiscretization(VE2, lam, rebuild_every_iters=40, partition_batch_size=64, seed=3)


def test_rebuild_at_the_switch_with_the_new_lambda_and_resume() -> None:
    coarse_to_fine = _disc(LambdaSchedule(((0, 0.1), (30, 0.01))))
    fine = _disc(0.01)
    sample = gauss_sampler(4)
    steps = []
    for it in range(0, 81):
        if coarse_to_fine.needs_rebuild(it):
            coarse_to_fine.rebuild(it, gauss_fn, sample)
            steps.append(it)
    assert steps == [0, 30, 40, 80]  # the periodic rebuilds plus the switch at 30
    sizes = {it: pts.numel() for it, pts in coarse_to_fine.partitions}
    assert sizes[30] > 3 * sizes[0]  # λ 0.1 → 0.01: a much finer partition
    # the partition at the switch is exactly the constant-λ 0.01 one built at that iteration (same generator)
    fine.rebuild(30, gauss_fn, sample)
    assert torch.equal(coarse_to_fine.partitions[1][1], fine.points)
    # resumed from its state dict, the schedule neither rebuilds twice nor forgets the switch
    resumed = _disc(LambdaSchedule(((0, 0.1), (30, 0.01))))
    resumed.load_state_dict(
        {**coarse_to_fine.state_dict(), "partitions": coarse_to_fine.state_dict()["partitions"][:1]}
    )
    assert not resumed.needs_rebuild(29) and resumed.needs_rebuild(30)
    resumed.rebuild(30, gauss_fn, sample)
    assert not resumed.needs_rebuild(30) and torch.equal(resumed.points, fine.points)
    # a constant λ has no switch
    assert not fine.needs_rebuild(30) and fine.needs_rebuild(40)


def _params(tmp_path: Path, schedule, lam: float = 0.01):
    data = repo_params()
    set_key(data, "lambda", lam)
    set_key(data, "train.adcm.lambda_schedule", schedule)
    return load_params(write_params(tmp_path / "params.yaml", data))


def test_params_key_builds_the_schedule_and_is_validated(tmp_path: Path) -> None:
    assert _params(tmp_path, None).train.adcm.lambda_schedule is None
    params = _params(tmp_path, [{"start": 0.0, "lambda": 0.1}, {"start": 0.5, "lambda": 0.01}])
    disc = make_discretization("adcm", params.lam, params.train, 400, 0, VE2)
    assert isinstance(disc, ADCMDiscretization) and isinstance(disc.lam, LambdaSchedule)
    assert disc.lam.steps == ((0, 0.1), (200, 0.01)) and disc.rebuild_every_iters == 100
    constant = make_discretization("adcm", 0.01, _params(tmp_path, None).train, 400, 0, VE2)
    assert constant.lam == 0.01  # type: ignore[attr-defined]
    bad = [
        ([{"start": 0.1, "lambda": 0.1}, {"start": 0.5, "lambda": 0.01}], r"starts beginning at 0"),
        ([{"start": 0.0, "lambda": 0.1}, {"start": 0.0, "lambda": 0.01}], r"strictly increasing"),
        ([{"start": 0.0, "lambda": 0.1}, {"start": 0.5, "lambda": 0.02}], r"last lambda to equal the top-level"),
        ([{"start": 0.0, "lambda": 0.1}, {"start": 1.0, "lambda": 0.01}], r"lambda_schedule\[1\]\.start"),
        ([{"start": 0.0, "lamda": 0.01}], r"unknown key 'train\.adcm\.lambda_schedule\[0\]\.lamda'"),
        ([], r"train\.adcm\.lambda_schedule"),
    ]
    for schedule, message in bad:
        with pytest.raises(ParamsError, match=message):
            _params(tmp_path, schedule)


def test_the_schedule_is_part_of_the_training_fingerprint(tmp_path: Path) -> None:
    data = synthetic_dataset(n=16)
    base = tiny_params({"train.device": "cpu"})

    def fingerprint(schedule, lam: float = 0.01) -> str:
        set_key(base, "lambda", lam)
        set_key(base, "train.adcm.lambda_schedule", schedule)
        params = load_params(write_params(tmp_path / "p.yaml", base))
        kwargs = network_kwargs_for(params.teacher.network, 8, 1, 0)
        torch.manual_seed(0)
        teacher = TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5, "ve").state_dict(), {}, "ve")
        spec = student_spec(
            params, teacher, data, teacher_id="t", data_id="d", world_size=1, device=torch.device("cpu")
        )
        return spec.fingerprint

    c2f = [{"start": 0.0, "lambda": 0.1}, {"start": 0.5, "lambda": 0.01}]
    assert fingerprint(None) == fingerprint(None)
    assert fingerprint(c2f) != fingerprint(None)
    assert fingerprint(c2f) != fingerprint([{"start": 0.0, "lambda": 0.1}, {"start": 0.25, "lambda": 0.01}])
