"""The equal-budget study: every arm trained from one shared teacher, FID at several points of the budget.

An *arm* is a consistency-training configuration (ADCM with some λ, ECT, iCT, sCT; a forward
process). :func:`run_arm` trains it for one seed in chunks ending at each evaluation point — resuming
from its checkpoint, so an evaluation point is only a pause of one uninterrupted run — and measures
the 1-step and 2-step FID of the EMA weights there with a fixed set of sample seeds and one shared
set of reference statistics (equal N for every arm). :func:`teacher_ceiling` measures the teacher's
Heun FID with the same N. :func:`run_study` does everything in order in one process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adcm.config import Params, StudyArm, StudyConfig
from adcm.devices import resolve_device
from adcm.errors import CheckpointError
from adcm.eval.fid import (
    Extractor,
    build_extractor,
    feature_stats,
    frechet_distance,
    image_features,
    resolve_inception_weights,
)
from adcm.eval.reference import compute_reference, load_reference
from adcm.io.datasets import ImageDataset, load_prepared
from adcm.io.files import sha256_file, write_json
from adcm.io.model_files import TeacherFile, load_teacher, save_teacher
from adcm.sampling.generate import generate, heun_for, student_sampler
from adcm.study.plan import arm_params, selected_arms, study_scale
from adcm.train.batches import BatchSource
from adcm.train.loop import train
from adcm.train.runs import run_teacher, student_file, student_process, student_spec

__all__ = ["EvalSetup", "eval_setup", "run_arm", "run_one", "run_study", "teacher_ceiling"]


@dataclass(frozen=True)
class EvalSetup:
    """What every FID of the study shares: the feature extractor, reference statistics and sample seeds."""

    extractor: Extractor
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    reference_count: int
    extractor_id: str
    seeds: list[int]
    batch_size: int
    device: torch.device

    def fid(self, images: np.ndarray) -> float:
        """FID of uint8 (N, C, H, W) images against the reference statistics."""
        feats = image_features(images, self.extractor, self.batch_size, self.device)
        return frechet_distance(*feature_stats(feats), self.ref_mu, self.ref_sigma)


def eval_setup(params: Params, data_path: Path, ref_stats: Path, fid_images: int) -> EvalSetup:
    """The extractor and the reference statistics of ``params.score`` (read, never recomputed)."""
    cfg = params.score
    device = resolve_device(cfg.device, "score.device")
    weights, identity = resolve_inception_weights(Path(cfg.inception_path) if cfg.inception_path else None)
    ref = load_reference(ref_stats, data_path, cfg.reference_count, identity)
    return EvalSetup(
        build_extractor(weights, device),
        ref.mu,
        ref.sigma,
        ref.count,
        identity,
        list(range(fid_images)),
        cfg.batch_size,
        device,
    )


def run_arm(
    params: Params,
    teacher: TeacherFile,
    data: ImageDataset,
    *,
    arm: str,
    eval_kimg: Sequence[float],
    setup: EvalSetup,
    teacher_id: str,
    data_id: str,
    checkpoint_path: Path,
    out: Path,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one arm for one seed (``params`` already carries method, λ, process, seed and budget) and
    write ``out`` (JSON) after every evaluation point; an existing ``out`` of the same configuration is
    continued, so a re-run after an interruption only does what is missing.

    Returns:
        The run record: configuration, ``evals`` (kimg, steps, fid_1step, fid_2step, seconds), the
        ADCM partitions, training and rebuild seconds.
    """
    cfg = params.train
    process = student_process(params.method, params.process, params.processes, teacher.sigma_data)
    config = {
        "arm": arm,
        "method": params.method,
        "lambda": params.lam if params.method == "adcm" else None,
        "process": params.process,
        "student_process": process.name,
        "seed": params.seed,
        "budget_kimg": cfg.duration_kimg,
        "batch_size": cfg.batch_size,
        "fid_images": len(setup.seeds),
        "reference_count": setup.reference_count,
        "extractor": setup.extractor_id,
        "teacher_sha256": teacher_id,
        "data_sha256": data_id,
    }
    record: dict[str, Any] = {**config, "evals": []}
    if out.is_file():
        previous = json.loads(out.read_text())
        if {k: previous.get(k) for k in config} == config:
            record = previous
    done = {round(e["kimg"], 6) for e in record["evals"]}
    shape = (
        teacher.network_kwargs["in_channels"],
        teacher.network_kwargs["img_resolution"],
        teacher.network_kwargs["img_resolution"],
    )
    probs = data.label_probs(teacher.network_kwargs["label_dim"])
    batches = BatchSource(data.images, data.labels, teacher.network_kwargs["label_dim"], cfg.xflip, device)
    for kimg in sorted(eval_kimg):
        if round(kimg, 6) in done:
            continue
        target = max(1, math.ceil(kimg * 1000 / cfg.batch_size))
        state_step = 0
        if checkpoint_path.is_file():
            state_step = int(torch.load(checkpoint_path, map_location="cpu", weights_only=True)["step"])
        spec = student_spec(params, teacher, data, teacher_id=teacher_id, data_id=data_id, world_size=1, device=device)
        run = train(
            spec,
            batches,
            checkpoint_path=checkpoint_path,
            device=device,
            show_progress=False,
            stop_after_steps=max(0, target - state_step),
        )
        student = student_file(params, teacher, spec, run, teacher_id)
        net = student.consistency_function().to(device)
        t_mid_sigma = getattr(params.sample.t_mid, params.method)
        started = time.perf_counter()
        fids = {}
        for steps in (1, 2):
            images = generate(
                net,
                student_sampler(student, steps, t_mid_sigma),
                setup.seeds,
                shape=shape,
                batch_size=setup.batch_size,
                device=device,
                label_probs=probs,
            )
            fids[f"fid_{steps}step"] = round(setup.fid(images), 4)
        record["evals"].append(
            {
                "kimg": run.kimg,
                "steps": run.steps,
                **fids,
                "train_seconds": round(run.train_seconds, 1),
                "rebuild_seconds": round(run.rebuild_seconds, 1),
                "eval_seconds": round(time.perf_counter() - started, 1),
            }
        )
        record["evals"].sort(key=lambda e: e["kimg"])
        record["partitions"] = [[it, pts] for it, pts in run.partitions]
        record["schedule_process"] = {"name": process.name, "eps": process.eps, "t_max": process.t_max}
        write_json(out, record)
        log(
            f"{arm} seed {params.seed}: {run.kimg:g} kimg  FID 1-step {fids['fid_1step']:.2f}  "
            f"2-step {fids['fid_2step']:.2f}"
        )
    return record


def teacher_ceiling(
    teacher: TeacherFile, data: ImageDataset, params: Params, setup: EvalSetup, out: Path, device: torch.device
) -> dict[str, Any]:
    """The teacher's FID with EDM's Heun sampler (``sample.teacher_steps`` levels, 35 NFE by default)."""
    shape = (
        teacher.network_kwargs["in_channels"],
        teacher.network_kwargs["img_resolution"],
        teacher.network_kwargs["img_resolution"],
    )
    s = params.teacher.sampler
    sampler = heun_for(teacher, params.sample.teacher_steps, s.sigma_min, s.sigma_max, s.rho)
    images = generate(
        teacher.denoiser(),
        sampler,
        setup.seeds,
        shape=shape,
        batch_size=setup.batch_size,
        device=device,
        label_probs=data.label_probs(teacher.network_kwargs["label_dim"]),
    )
    record = {
        "arm": f"teacher-{teacher.process}",
        "process": teacher.process,
        "nfe": sampler.nfe,
        "fid": round(setup.fid(images), 4),
        "fid_images": len(setup.seeds),
        "reference_count": setup.reference_count,
        "extractor": setup.extractor_id,
    }
    write_json(out, record)
    return record


def run_one(
    params_path: Path,
    study: StudyConfig,
    arm: StudyArm,
    seed: int,
    quick: bool,
    *,
    teacher_path: Path,
    data_path: Path,
    ref_stats: Path,
    out: Path,
    checkpoint: Path,
    dataset: ImageDataset | None = None,
    eval_kimg: tuple[float, ...] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One arm × seed of the study from files (the ``adcm study run`` command)."""
    params = arm_params(params_path, study, arm, seed, quick)
    scale = study_scale(study, quick)
    teacher = load_teacher(teacher_path)
    if teacher.process != arm.process and not (arm.method == "sct" or arm.process == "trigflow"):
        raise CheckpointError(f"{teacher_path}: a {teacher.process} teacher, arm {arm.name} needs {arm.process}")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    return run_arm(
        params,
        teacher,
        dataset or load_prepared(data_path),
        arm=arm.name,
        eval_kimg=eval_kimg or scale.eval_kimg,
        setup=eval_setup(params, data_path, ref_stats, scale.fid_images),
        teacher_id=sha256_file(teacher_path),
        data_id=sha256_file(data_path),
        checkpoint_path=checkpoint,
        out=out,
        device=resolve_device(params.train.device, "train.device"),
        log=log,
    )


def run_study(
    params_path: Path,
    study: StudyConfig,
    quick: bool,
    *,
    data_path: Path,
    teacher_path: Path | None,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> Path:
    """Everything in one process, in order: teachers (one per process), reference statistics, the teacher
    ceilings, every arm × seed, the method × process arms. What exists already is reused (runs resume).

    Returns:
        The directory of the run records (``work_dir/runs``), ready for :func:`adcm.study.report.write_report`.
    """
    from adcm.config import load_params

    arms, procs = selected_arms(study, quick)
    scale = study_scale(study, quick)
    base = load_params(params_path, list(scale.overrides or ()))
    dataset = load_prepared(data_path)
    work_dir.mkdir(parents=True, exist_ok=True)
    ref = work_dir / "reference.npz"
    if not ref.is_file():
        cfg = base.score
        device = resolve_device(cfg.device, "score.device")
        weights, identity = resolve_inception_weights(Path(cfg.inception_path) if cfg.inception_path else None)
        compute_reference(
            ref,
            data_path,
            cfg.reference_count,
            build_extractor(weights, device),
            identity,
            batch_size=cfg.batch_size,
            device=device,
        )
    teachers: dict[str, Path] = {}
    for process in dict.fromkeys(["ve", *(a.process for a in procs)]):
        path = (
            teacher_path
            if (process == "ve" and teacher_path is not None)
            else work_dir / "models" / f"teacher-{process}.pt"
        )
        if not path.is_file():
            p = load_params(params_path, [*(scale.overrides or ()), f"process={process}"])
            log(f"training the {process} teacher → {path}")
            teacher, _ = run_teacher(
                p,
                data_path,
                checkpoint_path=work_dir / "checkpoints" / f"teacher-{process}.pt",
                device=resolve_device(p.teacher.device, "teacher.device"),
                show_progress=False,
            )
            save_teacher(path, teacher)
        teachers[process] = path
        ceiling_out = work_dir / "runs" / f"teacher-{process}.json"
        if not ceiling_out.is_file():
            teacher_ceiling(
                load_teacher(path),
                dataset,
                base,
                eval_setup(base, data_path, ref, scale.fid_images),
                ceiling_out,
                resolve_device(base.sample.device, "sample.device"),
            )
    for arm in arms:
        for seed in scale.seeds:
            name = f"{arm.name}-s{seed}"
            run_one(
                params_path,
                study,
                arm,
                seed,
                quick,
                teacher_path=teachers[arm.process],
                data_path=data_path,
                ref_stats=ref,
                out=work_dir / "runs" / f"{name}.json",
                checkpoint=work_dir / "checkpoints" / f"{name}.pt",
                dataset=dataset,
                log=log,
            )
    for arm in procs:
        name = f"{arm.name}-s{scale.seeds[0]}"
        run_one(
            params_path,
            study,
            arm,
            scale.seeds[0],
            quick,
            teacher_path=teachers[arm.process],
            data_path=data_path,
            ref_stats=ref,
            out=work_dir / "runs" / f"{name}.json",
            checkpoint=work_dir / "checkpoints" / f"{name}.pt",
            dataset=dataset,
            eval_kimg=(scale.budget_kimg,),
            log=log,
        )
    return work_dir / "runs"
