"""From params to runs: the teacher's and the student's :class:`~adcm.train.loop.RunSpec`, and their files.

:func:`teacher_spec` builds a fresh diffusion model (DDPM++ with EDM's names) and the diffusion
objective; :func:`student_spec` initialises the consistency function from the teacher (ε-shifted
preconditioning, docs/method.md#preconditioning-and-the-boundary-condition) with the method's
objective. Each spec carries the fingerprint of everything that changes its weights. After
:func:`~adcm.train.loop.train`, :func:`teacher_file` and :func:`student_file` package the EMA weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adcm.config import (
    Method,
    NetworkConfig,
    OnConfigChange,
    Params,
    ProcessesConfig,
    ProcessName,
    TeacherConfig,
    TrainConfig,
)
from adcm.errors import CheckpointError, DatasetError
from adcm.io.datasets import ImageDataset, load_prepared
from adcm.io.files import sha256_file
from adcm.io.model_files import StudentFile, TeacherFile, load_teacher
from adcm.method.adcm import ADCMDiscretization, LambdaSchedule
from adcm.method.discretization import Discretization, fraction_of_run
from adcm.method.ect import ECTDiscretization
from adcm.method.ict import ICTDiscretization
from adcm.method.losses import ict_huber_c
from adcm.method.objectives import (
    ContinuousConsistencyObjective,
    DiffusionObjective,
    DiscreteConsistencyObjective,
    Objective,
)
from adcm.nets.precond import denoiser
from adcm.processes import ForwardProcess, TrigFlowProcess, make_process
from adcm.sampling.generate import ConsistencySampler, sample_grid
from adcm.train.batches import BatchSource
from adcm.train.distributed import DistInfo
from adcm.train.ema import EMARule
from adcm.train.fastpath import FastPath
from adcm.train.loop import LoopSettings, Preview, RunResult, RunSpec, train
from adcm.train.state import fingerprint

__all__ = [
    "huber_c_for",
    "make_discretization",
    "make_objective",
    "network_kwargs_for",
    "run_student",
    "run_teacher",
    "student_file",
    "student_process",
    "student_spec",
    "teacher_file",
    "teacher_spec",
]


def network_kwargs_for(cfg: NetworkConfig, resolution: int, channels: int, num_classes: int) -> dict[str, Any]:
    """SongUNet constructor settings (EDM's names) for a DDPM++ teacher trained here."""
    return {
        "img_resolution": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "label_dim": num_classes if cfg.class_conditional else 0,
        "augment_dim": 0,
        "model_channels": cfg.model_channels,
        "channel_mult": list(cfg.channel_mult),
        "channel_mult_emb": cfg.channel_mult_emb,
        "num_blocks": cfg.num_blocks,
        "attn_resolutions": list(cfg.attn_resolutions),
        "dropout": cfg.dropout,
        "label_dropout": 0.0,
        "embedding_type": "positional",
        "channel_mult_noise": 1,
        "encoder_type": "standard",
        "decoder_type": "standard",
        "resample_filter": [1, 1],
        "adaptive_double_norm": cfg.adaptive_double_norm,
    }


def _teacher_kwargs(cfg: TeacherConfig, data: ImageDataset) -> dict[str, Any]:
    num_classes = data.num_classes
    if cfg.network.class_conditional and num_classes == 0:
        raise DatasetError("teacher.network.class_conditional is true but the prepared data has no labels")
    _, channels, height, _ = data.images.shape
    return network_kwargs_for(cfg.network, height, channels, num_classes)


def teacher_spec(params: Params, data: ImageDataset, data_id: str) -> RunSpec:
    """The run that trains a diffusion teacher in ``params.process`` on ``data`` (``params.teacher``).

    The network is initialised from ``torch.manual_seed(params.seed)``. The fingerprint covers the
    teacher params except the device, the periods, the other sources' keys and the duration (a
    longer run continues a shorter one), plus the seed, the network settings, the data and the process.
    """
    cfg = params.teacher
    kwargs = _teacher_kwargs(cfg, data)
    relevant = dataclasses.asdict(cfg)
    for key in (
        "device",
        "checkpoint_every_kimg",
        "log_every_kimg",
        "sampler",
        "url",
        "sha256",
        "sha256_record",
        "download_path",
        "file",
        "duration_kimg",
        "max_nonfinite_in_row",
    ):
        relevant.pop(key)
    fp = fingerprint(
        {"teacher": relevant, "seed": params.seed, "network": kwargs, "data": data_id, "process": params.process}
    )
    torch.manual_seed(params.seed)
    net = denoiser(kwargs, cfg.sigma_data, params.process)
    settings = LoopSettings(
        label=f"teacher {params.process}",
        duration_kimg=cfg.duration_kimg,
        batch_size=cfg.batch_size,
        batch_per_step=cfg.batch_per_step,
        optimizer="adam",
        lr=cfg.lr,
        beta2=0.999,
        ema=EMARule(halflife_kimg=cfg.ema_halflife_kimg, rampup_ratio=cfg.ema_rampup_ratio),
        lr_rampup_kimg=cfg.lr_rampup_kimg,
        lr_schedule=cfg.lr_schedule,
        lr_ref_iters=cfg.lr_ref_iters,
        xflip=cfg.xflip,
        log_every_kimg=cfg.log_every_kimg,
        checkpoint_every_kimg=cfg.checkpoint_every_kimg,
        max_nonfinite_in_row=cfg.max_nonfinite_in_row,
    )
    return RunSpec(net, DiffusionObjective(cfg.p_mean, cfg.p_std), settings, params.seed, fp)


def teacher_file(params: Params, spec: RunSpec, run: RunResult, data: ImageDataset, data_id: str) -> TeacherFile:
    """The teacher file of a finished :func:`teacher_spec` run (its EMA weights)."""
    return TeacherFile(
        network_kwargs=_teacher_kwargs(params.teacher, data),
        sigma_data=params.teacher.sigma_data,
        state_dict=run.ema_state,
        meta={
            "source": "train",
            "kimg": run.kimg,
            "steps": run.steps,
            "dataset": data.name,
            "data_id": data_id,
            "fingerprint": spec.fingerprint,
        },
        process=params.process,
    )


def student_process(method: Method, process: ProcessName, ranges: ProcessesConfig, sigma_data: float) -> ForwardProcess:
    """The forward process the consistency model of ``method`` trains and samples in.

    The discrete methods use ``process`` on its range from ``ranges``. sCT always works in TrigFlow,
    on the same noise-to-signal range as ``process`` (t = arctan(ρ/σ_d) of its ε and t_max); its ε
    is then only the lower end of the time proposal — sCT's boundary is t = 0.
    """
    rng = ranges.range_of(process)
    own = make_process(process, rng.eps, rng.t_max, sigma_data)
    if method != "sct" or process == "trigflow":
        return own
    rho_lo, rho_hi = own.rho_range
    return TrigFlowProcess(
        sigma_data=sigma_data, eps=math.atan(rho_lo / sigma_data), t_max=math.atan(rho_hi / sigma_data)
    )


def huber_c_for(method: Method, cfg: TrainConfig, data_dim: int) -> float:
    """The pseudo-Huber c of a discrete ``method`` (iCT's null → 0.00054·sqrt(d))."""
    if method == "adcm":
        return cfg.adcm.huber_c
    if method == "ect":
        return cfg.ect.huber_c
    if method == "ict":
        return ict_huber_c(data_dim) if cfg.ict.huber_c is None else cfg.ict.huber_c
    raise ValueError(f"{method} has no pseudo-Huber constant")


def make_discretization(
    method: Method,
    lam: float,
    cfg: TrainConfig,
    total_iters: int,
    seed: int,
    process: ForwardProcess,
    *,
    class_conditional: bool = False,
) -> Discretization:
    """The discretization of ``method``; ADCM's λ spans diffusion (λ → ∞) to continuous time (λ = 0).

    ECT's stages and ADCM's rebuild period are fractions of the run (``total_iters``), iCT's curriculum
    is defined on it: doubling the duration keeps every schedule proportional. ADCM's
    ``train.adcm.lambda_schedule`` (when set, in place of the constant ``lam``) switches λ at fractions of
    the run too, rebuilding the partition at each switch (:class:`~adcm.method.adcm.LambdaSchedule`).

    ``class_conditional``: the batched ADCM builder evaluates Eq. 10 in JVP calls of exactly
    ``partition_batch_size`` rows — the drawn samples, in order, at one time — because the frozen f⁻ it
    is given applies the labels drawn with those samples (``Trainer.rebuild`` in :mod:`adcm.train.loop`)
    to every call; rows mixing samples or times would get other samples' labels.
    """
    if method == "adcm":
        a = cfg.adcm
        chunk = {"chunk_size": a.partition_batch_size} if class_conditional else {}
        schedule = (
            None
            if a.lambda_schedule is None
            else LambdaSchedule.from_fractions([(s.start, s.lam) for s in a.lambda_schedule], total_iters)
        )
        return ADCMDiscretization(
            process,
            lam if schedule is None else schedule,
            fraction_of_run(a.rebuild_fraction, total_iters),
            a.partition_batch_size,
            max_points=a.max_points,
            interval_sampling=a.interval_sampling,
            p_mean=a.p_mean,
            p_std=a.p_std,
            seed=seed,
            builder=a.partition,
            num_times=a.partition_times,
            **chunk,
        )
    if method == "ect":
        e = cfg.ect
        return ECTDiscretization(
            process, fraction_of_run(e.stage_fraction, total_iters), p_mean=e.p_mean, p_std=e.p_std, k=e.k, b=e.b, q=e.q
        )
    if method == "ict":
        i = cfg.ict
        return ICTDiscretization(process, total_iters, s0=i.s0, s1=i.s1, rho=i.rho, p_mean=i.p_mean, p_std=i.p_std)
    raise ValueError(f"{method} is not a discrete method")


def make_objective(
    method: Method,
    lam: float,
    cfg: TrainConfig,
    total_iters: int,
    seed: int,
    process: ForwardProcess,
    data_dim: int,
    *,
    class_conditional: bool = False,
    teacher: nn.Module | None = None,
) -> Objective:
    """What one consistency-training step optimises: a discretization (ADCM, ECT, iCT) or sCT's loss
    (``class_conditional``: see :func:`make_discretization`). ``teacher``: the teacher's frozen
    x0-prediction in ``process`` for consistency distillation (discrete methods; ``train.distillation``)."""
    if method == "sct":
        if teacher is not None:
            raise ValueError("distillation is for the discrete methods, not sCT")
        if not isinstance(process, TrigFlowProcess):
            raise ValueError("sCT trains in TrigFlow (see student_process)")
        s = cfg.sct
        return ContinuousConsistencyObjective(
            process,
            p_mean=s.p_mean,
            p_std=s.p_std,
            tangent_norm_c=s.tangent_norm_c,
            warmup_iters=round(s.warmup_fraction * total_iters),
            weight_channels=s.weight_channels if s.adaptive_weight else None,
        )
    disc = make_discretization(method, lam, cfg, total_iters, seed, process, class_conditional=class_conditional)
    return DiscreteConsistencyObjective(disc, process, huber_c_for(method, cfg, data_dim), teacher=teacher)


def _set_dropout(net: nn.Module, p: float) -> None:
    """Set the dropout probability of every residual block of a DDPM++ network."""
    for module in net.modules():
        if isinstance(getattr(module, "dropout", None), float):
            setattr(module, "dropout", p)  # noqa: B010


def check_teacher_fits(teacher: TeacherFile, process: ForwardProcess, data: ImageDataset, *, where: str) -> None:
    """Refuse a teacher that cannot train a model in ``process`` on ``data`` (one line, before any work).

    Raises:
        CheckpointError: a student file, another process (other than TrigFlow's exact conversion), or
            an image size, channel count or class count that differs from the prepared data's.
    """
    if process.name not in (teacher.process, "trigflow"):
        raise CheckpointError(
            f"{where}: a {teacher.process} teacher cannot train a {process.name} model; "
            "re-run `adcm teacher` with this process"
        )
    _, channels, height, width = data.images.shape
    want = teacher.image_shape
    if (channels, height, width) != want:
        raise CheckpointError(
            f"{where}: the teacher makes {want[0]}×{want[1]}×{want[2]} images, the prepared data "
            f"are {channels}×{height}×{width}; prepare the data at the teacher's size"
        )
    if teacher.label_dim and teacher.label_dim != data.num_classes:
        raise CheckpointError(
            f"{where}: the teacher is conditioned on {teacher.label_dim} classes, the prepared "
            f"data have {data.num_classes}"
        )


def student_spec(
    params: Params,
    teacher: TeacherFile,
    data: ImageDataset,
    *,
    teacher_id: str,
    data_id: str,
    world_size: int,
    device: torch.device,
    where: str = "teacher",
) -> RunSpec:
    """The run that consistency-trains ``params.method`` from ``teacher`` (``params.train``, ``lambda``).

    The student is the teacher's ε-shifted consistency function in :func:`student_process` (a TrigFlow
    conversion for sCT; boundary t = 0), with dropout ``train.dropout``; EDM's augmentation input
    (fed zeros) and EDM2's uncertainty head (``model.logvar_linear``: consistency training never
    evaluates it) are frozen. A class-conditional model gets its labels everywhere: training batches,
    targets, and ADCM's partition statistics (:func:`make_discretization`).

    The fingerprint covers method, λ (ADCM), the train params except device,
    periods and the non-finite policy, seed, teacher and data hashes, the number of processes and the
    process range.
    """
    cfg = params.train
    process = student_process(params.method, params.process, params.processes, teacher.sigma_data)
    check_teacher_fits(teacher, process, data, where=where)
    relevant = dataclasses.asdict(cfg)
    for key in (
        "device",
        "grid_every_kimg",
        "checkpoint_every_kimg",
        "log_every_kimg",
        "max_nonfinite_in_row",
        "activation_checkpointing",  # recomputation gives the same gradients
    ):
        relevant.pop(key)
    for other in ("adcm", "ect", "ict", "sct"):  # only the chosen method's group matters
        if other != params.method:
            relevant.pop(other)
    if params.method == "adcm" and relevant["adcm"]["lambda_schedule"] is None:
        del relevant["adcm"]["lambda_schedule"]  # constant λ: the fingerprint it had before the key existed
    if not relevant["distillation"]:
        del relevant["distillation"]  # consistency training: the fingerprint it had before the key existed
    fp = fingerprint(
        {
            "method": params.method,
            "lambda": params.lam if params.method == "adcm" else None,
            "train": relevant,
            "seed": params.seed,
            "teacher": teacher_id,
            "data": data_id,
            "world_size": world_size,
            "process": [process.name, process.eps, process.t_max],
        }
    )
    eps = 0.0 if params.method == "sct" else process.eps  # sCT's boundary is t = 0 (sCM's f(x, 0) = x)
    net = teacher.consistency_function(eps, process.name)  # type: ignore[arg-type]
    _set_dropout(net, cfg.dropout)
    settings = LoopSettings(
        label=f"train {params.method}/{process.name}",
        duration_kimg=cfg.duration_kimg,
        batch_size=cfg.batch_size,
        batch_per_step=cfg.batch_per_step,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        beta2=cfg.beta2,
        ema=EMARule(beta=cfg.ema_beta, halflife_kimg=cfg.ema_halflife_kimg),
        lr_schedule=cfg.lr_schedule,
        lr_ref_iters=cfg.lr_ref_iters,
        xflip=cfg.xflip,
        log_every_kimg=cfg.log_every_kimg,
        checkpoint_every_kimg=cfg.checkpoint_every_kimg,
        max_nonfinite_in_row=cfg.max_nonfinite_in_row,
        fast=FastPath.for_device(
            FastPath(cfg.bf16, cfg.channels_last, cfg.tf32, cfg.fused_optimizer, cfg.compile), device
        ),
        activation_checkpointing=cfg.activation_checkpointing,
    )
    data_dim = int(math.prod(data.images.shape[1:]))
    objective = make_objective(
        params.method,
        params.lam,
        cfg,
        settings.total_steps,
        params.seed,
        process,
        data_dim,
        class_conditional=teacher.label_dim > 0,
        teacher=teacher.wrapper(0.0, process.name).to(device) if cfg.distillation else None,  # type: ignore[arg-type]
    )
    frozen = tuple(
        name for name, _ in net.named_parameters() if name.startswith(("model.map_augment", "model.logvar_linear"))
    )
    return RunSpec(net, objective, settings, params.seed, fp, frozen)


def student_file(params: Params, teacher: TeacherFile, spec: RunSpec, run: RunResult, teacher_id: str) -> StudentFile:
    """The student file of a finished :func:`student_spec` run: EMA weights, process, every partition."""
    process = student_process(params.method, params.process, params.processes, teacher.sigma_data)
    return StudentFile(
        network_kwargs=dict(teacher.network_kwargs, dropout=params.train.dropout),
        sigma_data=teacher.sigma_data,
        state_dict=run.ema_state,
        process=process.name,  # type: ignore[arg-type]
        source=teacher.backbone_process,
        method=params.method,
        lam=params.lam if params.method == "adcm" else None,
        eps=spec.net.eps,
        range_eps=process.eps,
        t_max=process.t_max,
        partitions=run.partitions,
        meta={"kimg": run.kimg, "steps": run.steps, "seed": params.seed, "teacher_sha256": teacher_id},
        network=teacher.network,
    )


def _notify_default(message: str) -> None:
    del message


def run_teacher(
    params: Params,
    data_path: Path,
    *,
    checkpoint_path: Path,
    device: torch.device,
    fresh: bool = False,
    on_config_change: OnConfigChange = OnConfigChange.refuse,
    log_dir: Path | None = None,
    show_progress: bool = True,
    notify: Callable[[str], None] = _notify_default,
) -> tuple[TeacherFile, dict[str, Any]]:
    """Train (or resume) the teacher of ``params`` on the prepared data: its file and a summary for the metrics."""
    data = load_prepared(data_path)
    data_id = sha256_file(data_path)
    spec = teacher_spec(params, data, data_id)
    run = train(
        spec,
        BatchSource(data.images, data.labels, spec.net.label_dim, spec.settings.xflip, device),
        checkpoint_path=checkpoint_path,
        device=device,
        fresh=fresh,
        on_config_change=on_config_change,
        log_dir=log_dir,
        show_progress=show_progress,
        notify=notify,
    )
    summary = {
        "process": params.process,
        "kimg": run.kimg,
        "steps": run.steps,
        "train_seconds": round(run.train_seconds, 1),
        "final_loss": _finite(run.final_loss),
        "skipped_steps": run.skipped_steps,
        "resumed_from_kimg": run.resumed_from_kimg,
        "dataset": data.name,
        "peak_memory_mib": None if run.peak_memory_mib is None else round(run.peak_memory_mib, 1),
    }
    return teacher_file(params, spec, run, data, data_id), summary


def run_student(
    params: Params,
    teacher_path: Path,
    data_path: Path,
    *,
    checkpoint_path: Path,
    device: torch.device,
    dist_info: DistInfo | None = None,
    fresh: bool = False,
    on_config_change: OnConfigChange = OnConfigChange.refuse,
    log_dir: Path | None = None,
    preview_dir: Path | None = None,
    show_progress: bool = True,
    notify: Callable[[str], None] = _notify_default,
) -> tuple[StudentFile, dict[str, Any]]:
    """Consistency-train ``params.method`` from the teacher file (resuming): the student file and a summary.

    The teacher is checked against the prepared data and the process before any training.
    """
    info = dist_info or DistInfo()
    teacher = load_teacher(teacher_path)
    data = load_prepared(data_path)
    teacher_id, data_id = sha256_file(teacher_path), sha256_file(data_path)
    spec = student_spec(
        params,
        teacher,
        data,
        teacher_id=teacher_id,
        data_id=data_id,
        world_size=info.world_size,
        device=device,
        where=str(teacher_path),
    )
    process = student_process(params.method, params.process, params.processes, teacher.sigma_data)
    preview = None
    if preview_dir is not None:
        sampler = ConsistencySampler(process)

        def render(ema: nn.Module) -> np.ndarray:
            return sample_grid(
                ema, sampler, 8, shape=teacher.image_shape, num_classes=teacher.label_dim, batch_size=64, device=device
            )

        preview = Preview(render, params.train.grid_every_kimg, preview_dir, "grid_1step.png")
    run = train(
        spec,
        BatchSource(data.images, data.labels, spec.net.label_dim, spec.settings.xflip, device),
        checkpoint_path=checkpoint_path,
        device=device,
        fresh=fresh,
        on_config_change=on_config_change,
        log_dir=log_dir,
        preview=preview,
        show_progress=show_progress,
        dist_info=info,
        notify=notify,
    )
    student = student_file(params, teacher, spec, run, teacher_id)
    sizes = [len(pts) for _, pts in run.partitions]
    dts = [a - b for _, pts in run.partitions[-1:] for a, b in itertools.pairwise(pts)]
    summary = {
        "method": params.method,
        "process": process.name,
        "teacher_process": teacher.process,
        "lambda": params.lam if params.method == "adcm" else None,
        "kimg": run.kimg,
        "steps": run.steps,
        "train_seconds": round(run.train_seconds, 1),
        "rebuild_seconds": round(run.rebuild_seconds, 1),
        "final_loss": _finite(run.final_loss),
        "skipped_steps": run.skipped_steps,
        "resumed_from_kimg": run.resumed_from_kimg,
        "partition_points": sizes[-1] if sizes else None,
        "partitions_built": len(sizes),
        "min_dt": min(dts) if dts else None,
        "max_dt": max(dts) if dts else None,
        "processes": info.world_size,
        "batch_per_step": run.batch_per_step,
        "peak_memory_mib": None if run.peak_memory_mib is None else round(run.peak_memory_mib, 1),
    }
    return student, summary


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
