"""The ``adcm`` command: one sub-command per DVC stage."""

from __future__ import annotations

import typer

from adcm.stages import export, prepare, sample, schedule, score, study, teacher, train

app = typer.Typer(
    name="adcm",
    help="Consistency models with adaptive discretization (ADCM), as a DVC pipeline. "
    "Every hyperparameter lives in params.yaml; `dvc repro` runs the stages in order.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
prepare.register(app)
teacher.register(app)
train.register(app)
schedule.register(app)
sample.register(app)
score.register(app)
study.register(app)
export.register(app)


def main() -> None:
    """Entry point of the ``adcm`` console script and of ``python -m adcm``."""
    app()
