"""The study's plan: which arm runs with which seeds, each run's params, its evaluation steps, and the pieces.

A *piece* is the unit of work that a session runs whole (docs/study.md#running-it-in-pieces): the shared
records (the data floor, the teacher), or one evaluation point of one arm × seed — training from the
previous point (resuming the checkpoint) and evaluating there. Pieces are ordered seed by seed, every arm
of a seed before the next seed, so a study stopped halfway has complete paired comparisons for its first
seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from adcm.config import Params, StudyArm, StudyConfig, StudyScale
from adcm.errors import ParamsError

__all__ = [
    "ParamsLoader",
    "Piece",
    "arm_params",
    "arm_seeds",
    "eval_steps",
    "find_arm",
    "plan_pieces",
    "selected_arms",
    "study_scale",
    "total_steps",
]

ParamsLoader = Callable[[Sequence[str]], Params]
"""The params file with ``KEY=VALUE`` overrides applied and validated (the CLI passes ``load_params`` of
its ``--params`` file): the library never reads the file itself."""


def study_scale(study: StudyConfig, quick: bool) -> StudyScale:
    """The full study, or its CI-sized ``quick`` variant."""
    return study.quick if quick else study.full


def selected_arms(study: StudyConfig, quick: bool) -> list[StudyArm]:
    """The arms that the scale runs, in the study file's order."""
    scale = study_scale(study, quick)
    return [a for a in study.arms if scale.arms is None or a.name in scale.arms]


def find_arm(study: StudyConfig, name: str) -> StudyArm:
    """The arm called ``name`` (:class:`~adcm.errors.ParamsError` naming the known ones otherwise)."""
    for arm in study.arms:
        if arm.name == name:
            return arm
    raise ParamsError(f"unknown arm {name!r}; the study file defines {[a.name for a in study.arms]}")


def arm_seeds(study: StudyConfig, arm: StudyArm, quick: bool) -> list[int]:
    """The training seeds of ``arm``: its own list restricted to the scale's seeds, or all of them."""
    seeds = list(study_scale(study, quick).seeds)
    return seeds if arm.seeds is None else [s for s in seeds if s in arm.seeds]


def arm_params(load: ParamsLoader, study: StudyConfig, arm: StudyArm, seed: int, quick: bool) -> Params:
    """The params of one run: the arm's method, λ, process and seed and the study's budget (and overrides).

    The seed is the same for every arm (paired design): every discrete method and sCT draw their data
    batches from the same per-step stream (:mod:`adcm.rng`), so the arms see the same images in the same order.
    """
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
    return load(sets)


def total_steps(params: Params) -> int:
    """Optimizer steps of a run of ``params.train``: the training loop's count (``LoopSettings.total_steps``)."""
    return max(1, math.ceil(params.train.duration_kimg * 1000 / params.train.batch_size))


def eval_steps(scale: StudyScale, steps: int) -> list[int]:
    """The steps of the evaluation points: each fraction of ``steps`` rounded (at least 1; the last = ``steps``).

    Raises:
        ParamsError: two fractions fall on the same step at this budget.
    """
    points = [max(1, round(f * steps)) for f in scale.eval_fractions]
    if len(set(points)) != len(points):
        raise ParamsError(
            f"eval_fractions {list(scale.eval_fractions)} fall on the same step twice in a run of {steps} steps "
            "(raise budget_kimg or use fewer points)"
        )
    return points


@dataclass(frozen=True)
class Piece:
    """One unit of work: ``shared`` (the floor and teacher records) or one evaluation ``point`` of an arm × seed."""

    kind: Literal["shared", "point"]
    arm: str = ""
    seed: int = -1
    step: int = 0
    fraction: float = 0.0

    def describe(self) -> str:
        """One line for logs."""
        if self.kind == "shared":
            return "shared records (data floor, teacher)"
        return f"{self.arm} seed {self.seed}: {self.fraction:.0%} of the run (step {self.step})"


def plan_pieces(load: ParamsLoader, study: StudyConfig, quick: bool) -> list[Piece]:
    """Every piece of the study in the order they run: the shared records, then seed by seed every arm's points."""
    scale = study_scale(study, quick)
    arms = selected_arms(study, quick)
    pieces = [Piece("shared")]
    for seed in scale.seeds:
        for arm in arms:
            if seed not in arm_seeds(study, arm, quick):
                continue
            steps = total_steps(arm_params(load, study, arm, seed, quick))
            for fraction, step in zip(scale.eval_fractions, eval_steps(scale, steps), strict=True):
                pieces.append(Piece("point", arm.name, seed, step, fraction))
    return pieces
