"""The study's plan: which arms run at which scale, and each run's params (the arm applied to params.yaml)."""

from __future__ import annotations

from pathlib import Path

from adcm.config import Params, StudyArm, StudyConfig, StudyScale, load_params
from adcm.errors import ParamsError

__all__ = ["arm_params", "find_arm", "selected_arms", "study_scale"]


def study_scale(study: StudyConfig, quick: bool) -> StudyScale:
    """The full study, or its CI-sized ``quick`` variant."""
    return study.quick if quick else study.full


def selected_arms(study: StudyConfig, quick: bool) -> tuple[list[StudyArm], list[StudyArm]]:
    """(the compared arms, the method × process arms) that the scale runs."""
    scale = study_scale(study, quick)
    arms = [a for a in study.arms if scale.arms is None or a.name in scale.arms]
    procs = [a for a in study.process_arms if scale.process_arms is None or a.name in scale.process_arms]
    return arms, procs


def find_arm(study: StudyConfig, name: str) -> StudyArm:
    """The arm called ``name`` (:class:`~adcm.errors.ParamsError` naming the known ones otherwise)."""
    for arm in (*study.arms, *study.process_arms):
        if arm.name == name:
            return arm
    raise ParamsError(
        f"unknown arm {name!r}; the study file defines {[a.name for a in (*study.arms, *study.process_arms)]}"
    )


def arm_params(params_path: Path, study: StudyConfig, arm: StudyArm, seed: int, quick: bool) -> Params:
    """params.yaml with the arm's method, λ, process, seed and the study's budget (and overrides) applied."""
    scale = study_scale(study, quick)
    sets = [
        f"method={arm.method}",
        f"process={arm.process}",
        f"seed={seed}",
        f"train.duration_kimg={scale.budget_kimg}",
        *(scale.overrides or ()),
        *(arm.overrides or ()),
    ]
    if arm.lam is not None:
        sets.append(f"lambda={arm.lam}")
    return load_params(params_path, sets)
