"""`adcm study`: the equal-budget comparison of ADCM (several λ), ECT, iCT and sCT from one shared teacher.

Sub-commands: `run` (one arm, one seed: train to each evaluation point, FID there), `ceiling` (the
teacher's Heun FID), `report` (tables and figures), and `all` (everything in order, in one process;
`--quick` for the CI-sized variant). The DVC pipeline `study/dvc.yaml` calls `run`, `ceiling` and
`report` as stages: `dvc repro study/dvc.yaml` re-runs the study.
"""

from __future__ import annotations

from pathlib import Path

import typer

from adcm.config import load_params, load_study
from adcm.devices import resolve_device
from adcm.io.datasets import load_prepared
from adcm.io.model_files import load_teacher
from adcm.stages.common import PARAMS_OPTION, user_errors
from adcm.study.plan import find_arm, study_scale
from adcm.study.report import report_study
from adcm.study.runner import eval_setup, run_one, run_study, teacher_ceiling

study_app = typer.Typer(
    help="The equal-budget study (study/params.yaml; `dvc repro study/dvc.yaml`).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

STUDY_OPTION = typer.Option(
    Path("study/params.yaml"),
    "--study",
    help="The study's own params file (arms, budget, evaluation points, seeds, FID size).",
)
QUICK_OPTION = typer.Option(False, "--quick", help="The CI-sized variant (the study file's `quick` section).")
DATA_OPTION = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared training images.")
REF_STATS_OPTION = typer.Option(Path("data/fid/reference.npz"), help="Reference FID statistics (shared).")


def _log(message: str) -> None:
    typer.echo(message, err=True)


@study_app.command("run")
@user_errors
def run(
    arm: str = typer.Option(..., help="Arm name from the study file (`arms` or `process_arms`)."),
    seed: int = typer.Option(..., help="Training seed (the global `seed` of this run)."),
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    teacher: Path = typer.Option(Path("models/teacher.pt"), help="The shared teacher (of the arm's process)."),
    data: Path = DATA_OPTION,
    ref_stats: Path = REF_STATS_OPTION,
    out: Path = typer.Option(..., help="Run record (JSON), rewritten after each evaluation point."),
    checkpoint: Path = typer.Option(..., help="Resumable training state of this run."),
    final_only: bool = typer.Option(False, help="Evaluate at the budget only (the method × process table)."),
) -> None:
    """Train one arm for one seed from the shared teacher, pausing at every evaluation point of the budget to measure the 1-step and 2-step FID of the EMA weights (fixed sample seeds, shared reference statistics). Resumes after an interruption."""
    cfg = load_study(study)
    run_one(
        params,
        cfg,
        find_arm(cfg, arm),
        seed,
        quick,
        teacher_path=teacher,
        data_path=data,
        ref_stats=ref_stats,
        out=out,
        checkpoint=checkpoint,
        eval_kimg=(study_scale(cfg, quick).budget_kimg,) if final_only else None,
        log=_log,
    )


@study_app.command("ceiling")
@user_errors
def ceiling(
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    teacher: Path = typer.Option(Path("models/teacher.pt"), help="The teacher."),
    data: Path = DATA_OPTION,
    ref_stats: Path = REF_STATS_OPTION,
    out: Path = typer.Option(..., help="Record (JSON) with the teacher's FID."),
) -> None:
    """The teacher's FID with EDM's Heun sampler (sample.teacher_steps levels; 35 NFE) at the study's N: the ceiling."""
    p = load_params(params)
    setup = eval_setup(p, data, ref_stats, study_scale(load_study(study), quick).fid_images)
    record = teacher_ceiling(
        load_teacher(teacher), load_prepared(data), p, setup, out, resolve_device(p.sample.device, "sample.device")
    )
    typer.echo(f"teacher ({record['process']}): FID {record['fid']:.2f} at N = {record['fid_images']}")


@study_app.command("report")
@user_errors
def report(
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    runs_dir: Path = typer.Option(Path("study/runs"), help="Directory of the run records."),
    out_dir: Path = typer.Option(Path("reports/study"), help="results.md/.json, fid_vs_kimg.png, schedules.png."),
) -> None:
    """Aggregate the runs: the table (mean ± half-range over seeds at every evaluation point, the teacher's ceiling), the method × process table, FID vs kimg, and the learned schedules vs ECT/iCT."""
    typer.echo(report_study(params, load_study(study), quick, runs_dir, out_dir))


@study_app.command("all")
@user_errors
def run_all(
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    data: Path = DATA_OPTION,
    teacher: Path | None = typer.Option(None, help="The VE teacher to share (default: train one into the work dir)."),
    work_dir: Path = typer.Option(Path("study"), help="Teachers, reference statistics, checkpoints, run records."),
    out_dir: Path = typer.Option(Path("reports/study"), help="The report."),
) -> None:
    """Everything in one process, in order: teachers (one per process), reference statistics, the teacher ceilings, every arm × seed, the method × process arms, the report. What exists already is reused (runs resume)."""
    cfg = load_study(study)
    runs_dir = run_study(params, cfg, quick, data_path=data, teacher_path=teacher, work_dir=work_dir, log=_log)
    typer.echo(report_study(params, cfg, quick, runs_dir, out_dir))


def register(app: typer.Typer) -> None:
    """Add the ``study`` command group to the ``adcm`` app."""
    app.add_typer(study_app, name="study")
