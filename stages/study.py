"""`adcm study`: the equal-budget comparison of ADCM (several λ, coarse-to-fine), ECT, iCT and sCT (docs/study.md).

Sub-commands: `plan` (the pieces and which are done), `shared` (the data floor and the teacher's records),
`run` (every evaluation point of one arm × seed), `all` (everything in order, in slices with `--max-minutes`),
`report` (recomputed from the records) and `compare` (two records of one run side by side: a re-run's check). The DVC pipeline `study/dvc.yaml` calls `shared`, `run` and
`report` as stages.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from adcm.config import Params, load_params, load_study
from adcm.errors import ParamsError
from adcm.stages.common import PARAMS_OPTION, user_errors

if TYPE_CHECKING:
    from adcm.study.plan import ParamsLoader
    from adcm.study.runner import Scorer, Study, StudyProgress

study_app = typer.Typer(
    help="The equal-budget study (study/params.yaml; `dvc repro study/dvc.yaml`).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

STUDY_OPTION = typer.Option(
    Path("study/params.yaml"),
    "--study",
    help="The study's own params file (arms, seeds, budget, evaluation points, N, t_mids, differences).",
)
QUICK_OPTION = typer.Option(False, "--quick", help="The CI-sized variant (the study file's `quick` section).")
TEACHER_OPTION = typer.Option(Path("models/teacher.pt"), help="The shared teacher (the main pipeline's).")
DATA_OPTION = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared training images.")
REF_STATS_OPTION = typer.Option(Path("data/fid/reference.npz"), help="Reference FID statistics (shared).")
RUNS_OPTION = typer.Option(Path("study/runs"), help="The records: <arm>/<seed>/record.json, floor.json, teacher.json.")
CHECKPOINTS_OPTION = typer.Option(Path("study/checkpoints"), help="Resumable training states, <arm>/<seed>.pt.")
OUT_OPTION = typer.Option(Path("reports/study"), help="The report: summary.md/.json and the figures.")
MINUTES_OPTION = typer.Option(
    None, "--max-minutes", help="Start no new piece after this many minutes (the current one finishes)."
)


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _loader(params: Path) -> ParamsLoader:
    return functools.partial(load_params, params)


def _study(
    params: Path, study: Path, quick: bool, teacher: Path, data: Path, ref_stats: Path, runs: Path, ckpt: Path
) -> Study:
    cfg = load_study(study)  # first: a bad study file exits 2 before torch loads

    from adcm.study.runner import Study, StudyPaths, inception_scorer

    load = _loader(params)

    def scorer(p: Params) -> Scorer:
        return inception_scorer(p.score, data, ref_stats)

    return Study(load, cfg, quick, StudyPaths(teacher, data, runs, ckpt), scorer, log=_log)


def _finish(progress: StudyProgress) -> None:
    if progress.remaining:
        typer.echo(f"stopped: {progress.ran} pieces ran, {len(progress.remaining)} left; run the same command again")
    else:
        typer.echo(f"done: {progress.ran} pieces ran, nothing left")


@study_app.command("plan")
@user_errors
def plan(
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    runs_dir: Path = RUNS_OPTION,
) -> None:
    """List the study's pieces in the order they run (the shared records, then seed by seed every arm's evaluation points), each marked done or pending from the records."""
    s = _study(params, study, quick, Path(), Path(), Path(), runs_dir, Path())
    pieces = s.pieces()
    done = 0
    for piece in pieces:
        mark = s.is_done(piece)
        done += mark
        typer.echo(f"{'done   ' if mark else 'pending'}  {piece.describe()}")
    typer.echo(f"{done} of {len(pieces)} pieces done")


@study_app.command("shared")
@user_errors
def shared(
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    teacher: Path = TEACHER_OPTION,
    data: Path = DATA_OPTION,
    ref_stats: Path = REF_STATS_OPTION,
    runs_dir: Path = RUNS_OPTION,
) -> None:
    """The records every arm is read against: the data floor (held-out real images at both N) and the teacher (its Heun metrics, and its consistency function — every arm's start — with κ)."""
    s = _study(params, study, quick, teacher, data, ref_stats, runs_dir, Path())
    _finish(s.run(s.shared_pieces()))


@study_app.command("run")
@user_errors
def run(
    arm: str = typer.Option(..., help="Arm name from the study file."),
    seed: int = typer.Option(..., help="Training seed (the same for every arm: a paired design)."),
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    teacher: Path = TEACHER_OPTION,
    data: Path = DATA_OPTION,
    ref_stats: Path = REF_STATS_OPTION,
    runs_dir: Path = RUNS_OPTION,
    checkpoint_dir: Path = CHECKPOINTS_OPTION,
    max_minutes: float | None = MINUTES_OPTION,
) -> None:
    """Train one arm for one seed from the shared teacher, pausing at every evaluation point for the 1-step and 2-step KID/FID (every t_mid) and κ of the EMA; the record is rewritten after each point, and a re-run continues where it ends."""
    s = _study(params, study, quick, teacher, data, ref_stats, runs_dir, checkpoint_dir)
    _finish(s.run(s.run_pieces(arm, seed), max_minutes=max_minutes))


@study_app.command("all")
@user_errors
def run_all(
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    teacher: Path = TEACHER_OPTION,
    data: Path = DATA_OPTION,
    ref_stats: Path = REF_STATS_OPTION,
    runs_dir: Path = RUNS_OPTION,
    checkpoint_dir: Path = CHECKPOINTS_OPTION,
    out_dir: Path = OUT_OPTION,
    max_minutes: float | None = MINUTES_OPTION,
    write_report: bool = typer.Option(True, "--report/--no-report", help="Write the report at the end."),
) -> None:
    """Every piece not yet in the records, in order (the shared records, then seed by seed every arm), in one process; with --max-minutes it stops cleanly after the piece that crosses the limit, so a session can run the study in slices. Then the report of what is there."""
    s = _study(params, study, quick, teacher, data, ref_stats, runs_dir, checkpoint_dir)

    from adcm.study.report import report_study

    progress = s.run(max_minutes=max_minutes)
    if write_report and any(runs_dir.glob("*/*/record.json")):
        report_study(s.load, s.study, quick, runs_dir, out_dir)
        typer.echo(f"report → {out_dir / 'summary.md'}")
    _finish(progress)


@study_app.command("report")
@user_errors
def report(
    params: Path = PARAMS_OPTION,
    study: Path = STUDY_OPTION,
    quick: bool = QUICK_OPTION,
    runs_dir: Path = RUNS_OPTION,
    out_dir: Path = OUT_OPTION,
) -> None:
    """Recompute the report from the records: mean and 95 % t-interval over seeds at the budget, paired differences (arm − baseline), the plateau check, κ against the 2-step metric, the learned Δt(t) against ECT/iCT, and the figures."""
    cfg = load_study(study)

    from adcm.study.report import report_study

    typer.echo(report_study(_loader(params), cfg, quick, runs_dir, out_dir))


@study_app.command("compare")
@user_errors
def compare(
    record: Path = typer.Argument(..., help="A run's record (e.g. study/runs/ect/0/record.json)."),
    other: Path = typer.Argument(..., help="Another record of the same run (e.g. a re-run with --runs-dir elsewhere)."),
) -> None:
    """Two records of one run side by side: the settings that differ (none for a re-run), and at every evaluation step both have, the step's loss and the 1-step KID/FID in each (the final N at the budget); says whether they are bit-identical."""
    from adcm.study.report import compare_records

    result = compare_records(*(_read_record(p) for p in (record, other)))
    if result["settings_differ"]:
        typer.echo(f"settings that differ: {', '.join(result['settings_differ'])}")
    typer.echo("| step | loss | 1-step KID ×10³ | 1-step FID |")
    typer.echo("|---|---|---|---|")
    for row in result["steps"]:
        m = row.get("final", row["metrics"])
        cells = [
            "{} / {}".format(*(f"{v:.7g}" if v is not None else "—" for v in row["loss"])),
            "{:.2f} / {:.2f}".format(*m["1step.kid"]),
            "{:.2f} / {:.2f}".format(*m["1step.fid"]),
        ]
        n = "final N" if "final" in row else "curve N"
        typer.echo(f"| {row['step']} ({n}) | " + " | ".join(cells) + " |")
    typer.echo("bit-identical" if result["identical"] else "not identical (see above)")


def _read_record(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise ParamsError(f"{path}: cannot read it as a study record ({exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("evals"), list):
        raise ParamsError(f"{path}: not a study record (no evals)")
    return record


def register(app: typer.Typer) -> None:
    """Add the ``study`` command group to the ``adcm`` app."""
    app.add_typer(study_app, name="study")
