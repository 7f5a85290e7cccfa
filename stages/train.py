"""`adcm train`: consistency training from the teacher with ADCM, ECT, iCT or sCT (top-level `method`, `process`)."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import torch
import typer

from adcm.checkpoint import CheckpointError, TeacherFile, load_teacher, save_teacher
from adcm.consistency import (
    TrainingError,
    checkpoint_matches,
    init_distributed,
    one_step_grid,
    student_process,
    train_consistency,
)
from adcm.data import load_prepared
from adcm.discretization import PartitionTooLongError
from adcm.images import save_grid
from adcm.io import sha256_file
from adcm.training import resolve_device
from stages.common import (
    PARAMS_OPTION,
    SET_OPTION,
    params_epilog,
    read_params,
    register_user_error,
    user_errors,
    write_json,
)
from stages.teacher import OnConfigChange

register_user_error(TrainingError, PartitionTooLongError)


@user_errors
def train(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    data: Path = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared images (output of `adcm prepare`)."),
    teacher: Path = typer.Option(Path("models/teacher.pt"), help="Teacher file (output of `adcm teacher`)."),
    out: Path = typer.Option(Path("models/student.pt"), help="Consistency model written: EMA weights, network "
                             "settings, and every ADCM partition built (iteration, points)."),
    metrics: Path = typer.Option(Path("metrics/train.json"), help="JSON metrics: time, kimg, |T|, final loss, …"),
    grid_dir: Path = typer.Option(Path("reports/train"), help="1-step sample grids (every train.grid_every_kimg; "
                                  "grid.png is the final one)."),
    checkpoint_dir: Path = typer.Option(Path("checkpoints/train"), help="Resumable state; a re-run continues it."),
    log_dir: Path = typer.Option(Path("dvclive/train"), help="dvclive metrics directory."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore any existing checkpoint and start over."),
    on_config_change: OnConfigChange = typer.Option(
        OnConfigChange.refuse, help="A checkpoint written under other params: refuse (exit 1 with a message) "
        "or restart from scratch (what `dvc exp run -S …` needs)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Consistency-train a one-step generator from the teacher (algorithm.md §3, §4).

    `method: adcm` builds the adaptive partition (paper Eq. 10, Alg. 1) from the teacher before the first step and rebuilds it every train.adcm.rebuild_every_iters; `ect` and `ict` use their hand-made schedules; `sct` is continuous-time training in TrigFlow (one JVP per step). `process` (ve, fm, trigflow) is the forward process; sCT converts a VE or FM teacher to TrigFlow exactly. Run several processes with `torchrun --nproc-per-node N -m adcm train` (DDP; gloo on CPU, NCCL on CUDA); only rank 0 writes files. """
    p = read_params(params, set_)
    cfg = p.train
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    started = time.perf_counter()
    dataset = load_prepared(data)
    teacher_file = load_teacher(teacher)
    if teacher_file.meta.get("kind") == "consistency":
        raise CheckpointError(f"{teacher}: a consistency model, not a diffusion teacher")
    process = student_process(p.method, p.process, p.processes, teacher_file.sigma_data)
    if process.name not in (teacher_file.process, "trigflow"):
        raise CheckpointError(f"{teacher}: a {teacher_file.process} teacher cannot train a {process.name} model "
                              f"(process: {p.process}); re-run `adcm teacher` with this process")
    data_id, teacher_id = sha256_file(data), sha256_file(teacher)
    ckpt = checkpoint_dir / "state.pt"
    restart = fresh
    if info.is_main:
        for directory in (checkpoint_dir, log_dir, grid_dir):
            directory.mkdir(parents=True, exist_ok=True)
    if on_config_change is OnConfigChange.restart and ckpt.exists() and not fresh:
        restart = not checkpoint_matches(ckpt, p.method, p.lam, cfg, seed=p.seed, teacher_id=teacher_id,
                                         data_id=data_id, process=process, world_size=info.world_size)
        if restart and info.is_main:
            typer.echo(f"{ckpt}: written under other params; starting over (--on-config-change restart)", err=True)
    run = train_consistency(teacher_file, cfg, dataset, method=p.method, lam=p.lam, seed=p.seed, process=process,
                            teacher_id=teacher_id, data_id=data_id, checkpoint_path=ckpt, device=device,
                            fresh=restart, log_dir=log_dir, grid_dir=grid_dir, show_progress=progress,
                            dist_info=info)
    if not info.is_main:
        return
    student = TeacherFile(
        network_kwargs=run.network_kwargs, sigma_data=teacher_file.sigma_data, state_dict=run.ema_state,
        meta={"kind": "consistency", "method": p.method, "lambda": p.lam, "eps": run.eps, "t_max": run.t_max,
              "range_eps": process.eps, "kimg": run.kimg, "steps": run.steps, "seed": p.seed,
              "teacher_sha256": teacher_id, "partitions": [[it, pts] for it, pts in run.partitions]},
        process=run.process, source=run.source,
    )
    save_teacher(out, student)
    save_grid(grid_dir / "grid.png", one_step_grid(student.consistency_function(run.eps), list(range(64)),
                                                   run.network_kwargs, process, device), 8)
    sizes = [len(pts) for _, pts in run.partitions]
    dts = [a - b for _, pts in run.partitions[-1:] for a, b in itertools.pairwise(pts)]
    write_json(metrics, {
        "method": p.method, "process": run.process, "teacher_process": teacher_file.process,
        "lambda": p.lam, "kimg": run.kimg, "steps": run.steps,
        "train_seconds": round(run.train_seconds, 1), "rebuild_seconds": round(run.rebuild_seconds, 1),
        "final_loss": run.final_loss if math.isfinite(run.final_loss) else None,
        "skipped_steps": run.skipped_steps, "resumed_from_kimg": run.resumed_from_kimg,
        "partition_points": sizes[-1] if sizes else None, "partitions_built": len(sizes),
        "min_dt": min(dts) if dts else None, "max_dt": max(dts) if dts else None,
        "processes": info.world_size, "device": str(device), "threads": torch.get_num_threads(),
        "total_seconds": round(time.perf_counter() - started, 1),
    })
    typer.echo(f"train ({p.method}, {run.process}) → {out}; {run.kimg:g} kimg in {run.train_seconds:.0f} s")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("train", epilog=params_epilog("lambda", "method", "process", "processes", "seed", "train"))(train)
