"""`adcm schedule`: report the learned ADCM partitions next to ECT's and iCT's schedules (paper Fig. 4)."""

from __future__ import annotations

from pathlib import Path

import typer

from adcm.stages.common import PARAMS_OPTION, SET_OPTION, params_epilog, read_params, user_errors


@user_errors
def schedule(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    student: Path = typer.Option(Path("models/student.pt"), help="Consistency model (output of `adcm train`)."),
    out_dir: Path = typer.Option(Path("reports/schedule"), help="schedule.json, schedule.csv and schedule.png."),
    metrics: Path = typer.Option(Path("metrics/schedule.json"), help="JSON metrics: |T|, smallest/largest Δt."),
) -> None:
    """Write every partition built during training (t and Δt per point, per rebuild, in the process's own time and as noise-to-signal ratios ρ) as JSON and CSV, metrics of the latest one, and a log–log PNG of Δt(t) against ECT's and iCT's at the same stage (paper Fig. 4)."""
    cfg = read_params(params, set_).train

    from adcm.eval.schedule import write_schedule_report
    from adcm.io.files import write_json
    from adcm.io.model_files import load_student

    model = load_student(student)
    summary = write_schedule_report(model, cfg, out_dir)
    write_json(metrics, summary)
    typer.echo(f"schedule: {summary['partitions_built']} partition(s) → {out_dir}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("schedule", epilog=params_epilog("train"))(schedule)  # process and range: from the student file
