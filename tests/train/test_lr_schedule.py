"""The learning-rate schedules of :class:`adcm.train.loop.LoopSettings`: values against their formulas."""

from __future__ import annotations

import itertools
import math

import pytest

from adcm.train.ema import EMARule
from adcm.train.loop import LoopSettings


def _settings(**kw: object) -> LoopSettings:
    base: dict[str, object] = {
        "label": "t",
        "duration_kimg": 0.64,  # 10 steps of 64
        "batch_size": 64,
        "batch_per_step": None,
        "optimizer": "radam",
        "lr": 2e-4,
        "beta2": 0.99,
        "ema": EMARule(halflife_kimg=1.0),
    }
    base.update(kw)
    return LoopSettings(**base)  # type: ignore[arg-type]


def test_constant_and_warm_up() -> None:
    s = _settings()
    assert [s.lr_at(k) for k in (0, 5, 9)] == [2e-4] * 3
    w = _settings(lr_rampup_kimg=0.128)  # two steps of 64
    assert [w.lr_at(k) for k in (0, 1, 2, 9)] == pytest.approx([0.0, 1e-4, 2e-4, 2e-4])


def test_rsqrt_decay() -> None:
    s = _settings(lr_schedule="rsqrt", lr_ref_iters=4)
    assert [s.lr_at(k) for k in (0, 4, 9)] == pytest.approx([2e-4, 2e-4, 2e-4 / math.sqrt(9 / 4)])


def test_cosine_anneals_over_the_run() -> None:
    s = _settings(lr_schedule="cosine")
    assert s.total_steps == 10
    lrs = [s.lr_at(k) for k in range(s.total_steps)]
    assert lrs[0] == pytest.approx(2e-4)
    assert s.lr_at(5) == pytest.approx(1e-4)  # half-way: half the rate
    assert lrs[-1] == pytest.approx(2e-4 * (1 + math.cos(math.pi * 0.9)) / 2)
    assert all(a > b > 0 for a, b in itertools.pairwise(lrs))
    # A fraction of the run: twice the duration reaches each rate at twice the step.
    d = _settings(lr_schedule="cosine", duration_kimg=1.28)
    assert [d.lr_at(2 * k) for k in range(10)] == pytest.approx(lrs)


def test_cosine_composes_with_warm_up() -> None:
    s = _settings(lr_schedule="cosine", lr_rampup_kimg=0.128)
    assert s.lr_at(1) == pytest.approx(1e-4 * (1 + math.cos(math.pi * 0.1)) / 2)
    assert s.lr_at(0) == 0.0
