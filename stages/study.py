"""`adcm study`: the equal-budget comparison of ADCM (several λ), ECT, iCT and sCT from one shared teacher.

Sub-commands: `run` (one arm, one seed: train to each evaluation point, FID there), `ceiling` (the
teacher's Heun FID), `report` (tables and figures), and `all` (everything in order, in one process;
`--quick` for the CI-sized variant). The DVC pipeline `study/dvc.yaml` calls `run`, `ceiling` and
`report` as stages: `dvc repro study/dvc.yaml` re-runs the study.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from adcm.checkpoint import CheckpointError, load_teacher, save_teacher
from adcm.config import Params, StudyArm, StudyConfig, StudyScale, load_params, load_study
from adcm.data import DatasetError, ImageDataset, load_prepared
from adcm.fid import (
    FIDError,
    build_extractor,
    feature_stats,
    image_features,
    load_stats,
    resolve_inception_weights,
    save_stats,
)
from adcm.io import sha256_file
from adcm.study import EvalSetup, run_arm, teacher_ceiling, write_report
from adcm.teacher import train_teacher
from adcm.training import resolve_device
from stages.common import PARAMS_OPTION, user_errors

study_app = typer.Typer(help="The equal-budget study (study/params.yaml; `dvc repro study/dvc.yaml`).",
                        no_args_is_help=True, rich_markup_mode="rich")

STUDY_OPTION = typer.Option(Path("study/params.yaml"), "--study", help="The study's own params file (arms, "
                            "budget, evaluation points, seeds, FID size).")
QUICK_OPTION = typer.Option(False, "--quick", help="The CI-sized variant (the study file's `quick` section).")
DATA_OPTION = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared training images.")
REF_STATS_OPTION = typer.Option(Path("data/fid/reference.npz"), help="Reference FID statistics (shared).")


def _scale(study: StudyConfig, quick: bool) -> StudyScale:
    return study.quick if quick else study.full


def _arms(study: StudyConfig, quick: bool) -> tuple[list[StudyArm], list[StudyArm]]:
    scale = _scale(study, quick)
    arms = [a for a in study.arms if scale.arms is None or a.name in scale.arms]
    procs = [a for a in study.process_arms if scale.process_arms is None or a.name in scale.process_arms]
    return arms, procs


def _find_arm(study: StudyConfig, name: str) -> StudyArm:
    for arm in (*study.arms, *study.process_arms):
        if arm.name == name:
            return arm
    raise typer.BadParameter(f"unknown arm {name!r}; the study file defines "
                             f"{[a.name for a in (*study.arms, *study.process_arms)]}")


def arm_params(params_path: Path, study: StudyConfig, arm: StudyArm, seed: int, quick: bool) -> Params:
    """params.yaml with the arm's method, λ, process, seed and the study's budget (and overrides) applied."""
    scale = _scale(study, quick)
    sets = [f"method={arm.method}", f"process={arm.process}", f"seed={seed}",
            f"train.duration_kimg={scale.budget_kimg}", *(scale.overrides or ()), *(arm.overrides or ())]
    if arm.lam is not None:
        sets.append(f"lambda={arm.lam}")
    return load_params(params_path, sets)


def _setup(params: Params, ref_stats: Path, scale: StudyScale) -> EvalSetup:
    cfg = params.score
    device = resolve_device(cfg.device)
    weights, identity = resolve_inception_weights(Path(cfg.inception_path) if cfg.inception_path else None)
    mu, sigma, meta = load_stats(ref_stats, expected_extractor=identity)
    return EvalSetup(build_extractor(weights, device), mu, sigma, int(meta["count"]), identity,
                     list(range(scale.fid_images)), cfg.batch_size, device)


def _reference(params: Params, data: Path, ref_stats: Path) -> None:
    """Reference statistics of the first score.reference_count training images (if missing)."""
    if ref_stats.is_file():
        return
    cfg = params.score
    device = resolve_device(cfg.device)
    weights, identity = resolve_inception_weights(Path(cfg.inception_path) if cfg.inception_path else None)
    images = load_prepared(data).images
    if cfg.reference_count is not None:
        if cfg.reference_count > len(images):
            raise DatasetError(f"score.reference_count {cfg.reference_count} exceeds the {len(images)} images in {data}")
        images = images[: cfg.reference_count]
    feats = image_features(images, build_extractor(weights, device), cfg.batch_size, device)
    save_stats(ref_stats, *feature_stats(feats), {"extractor": identity, "count": len(images),
                                                  "data_sha256": sha256_file(data)})


def _run_one(params_path: Path, study: StudyConfig, arm: StudyArm, seed: int, quick: bool, teacher: Path,
             data: Path, ref_stats: Path, out: Path, checkpoint: Path, dataset: ImageDataset | None = None,
             eval_kimg: tuple[float, ...] | None = None) -> None:
    params = arm_params(params_path, study, arm, seed, quick)
    scale = _scale(study, quick)
    teacher_file = load_teacher(teacher)
    if teacher_file.process != arm.process and not (arm.method == "sct" or arm.process == "trigflow"):
        raise CheckpointError(f"{teacher}: a {teacher_file.process} teacher, arm {arm.name} needs {arm.process}")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    run_arm(params, teacher_file, dataset or load_prepared(data), arm=arm.name,
            eval_kimg=eval_kimg or scale.eval_kimg, setup=_setup(params, ref_stats, scale),
            teacher_id=sha256_file(teacher), data_id=sha256_file(data), checkpoint_path=checkpoint, out=out,
            device=resolve_device(params.train.device), log=lambda m: typer.echo(m, err=True))


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
    scale = _scale(cfg, quick)
    _run_one(params, cfg, _find_arm(cfg, arm), seed, quick, teacher, data, ref_stats, out, checkpoint,
             eval_kimg=(scale.budget_kimg,) if final_only else None)


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
    cfg = load_study(study)
    p = load_params(params)
    record = teacher_ceiling(load_teacher(teacher), load_prepared(data), p, _setup(p, ref_stats, _scale(cfg, quick)),
                             out, resolve_device(p.sample.device))
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
    cfg = load_study(study)
    arms, procs = _arms(cfg, quick)
    records = {p.stem: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))}
    runs = [r for r in records.values() if "evals" in r and r["arm"] in {a.name for a in arms}]
    process_runs = [r for r in records.values() if "evals" in r and r["arm"] in {a.name for a in procs}]
    # the ve column of the method × process table is the study's own first-seed run of that method
    seed0 = _scale(cfg, quick).seeds[0]
    for arm in arms:
        if arm.process == "ve" and (arm.method != "adcm" or arm.lam == 0.01):
            process_runs += [r for r in runs if r["arm"] == arm.name and r["seed"] == seed0]
    ceilings = [r for r in records.values() if str(r.get("arm", "")).startswith("teacher-")]
    if not runs and not process_runs:
        raise FIDError(f"{runs_dir}: no run records (run `adcm study run` or `dvc repro study/dvc.yaml` first)")
    p = arm_params(params, cfg, arms[0], seed0, quick) if arms else load_params(params)
    write_report(out_dir, runs, process_runs, ceilings, [a.name for a in arms],
                 list(dict.fromkeys(["ve", *(a.process for a in procs)])), p,
                 "Equal-budget study" + (" (quick variant)" if quick else ""))
    typer.echo((out_dir / "results.md").read_text())


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
    arms, procs = _arms(cfg, quick)
    scale = _scale(cfg, quick)
    base = load_params(params, list(scale.overrides or ()))
    dataset = load_prepared(data)
    work_dir.mkdir(parents=True, exist_ok=True)
    ref = work_dir / "reference.npz"
    _reference(base, data, ref)
    teachers: dict[str, Path] = {}
    for process in dict.fromkeys(["ve", *(a.process for a in procs)]):
        path = teacher if (process == "ve" and teacher is not None) else work_dir / "models" / f"teacher-{process}.pt"
        if not path.is_file():
            p = load_params(params, [*(scale.overrides or ()), f"process={process}"])
            typer.echo(f"training the {process} teacher → {path}", err=True)
            result = train_teacher(p.teacher, dataset, seed=p.seed, data_id=sha256_file(data),
                                   checkpoint_path=work_dir / "checkpoints" / f"teacher-{process}.pt",
                                   device=resolve_device(p.teacher.device), show_progress=False, process=process)
            save_teacher(path, result.teacher)
        teachers[process] = path
        ceiling_out = work_dir / "runs" / f"teacher-{process}.json"
        if not ceiling_out.is_file():
            teacher_ceiling(load_teacher(path), dataset, base, _setup(base, ref, scale), ceiling_out,
                            resolve_device(base.sample.device))
    for arm in arms:
        for seed in scale.seeds:
            name = f"{arm.name}-s{seed}"
            _run_one(params, cfg, arm, seed, quick, teachers[arm.process], data, ref, work_dir / "runs" / f"{name}.json",
                     work_dir / "checkpoints" / f"{name}.pt", dataset)
    for arm in procs:
        name = f"{arm.name}-s{scale.seeds[0]}"
        _run_one(params, cfg, arm, scale.seeds[0], quick, teachers[arm.process], data, ref,
                 work_dir / "runs" / f"{name}.json", work_dir / "checkpoints" / f"{name}.pt", dataset,
                 eval_kimg=(scale.budget_kimg,))
    report(params=params, study=study, quick=quick, runs_dir=work_dir / "runs", out_dir=out_dir)


def register(app: typer.Typer) -> None:
    """Add the ``study`` command group to the ``adcm`` app."""
    app.add_typer(study_app, name="study")
