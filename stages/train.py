"""`adcm train`: consistency training from the teacher with ADCM, ECT, iCT or sCT (top-level `method`, `process`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from adcm.config import OnConfigChange
from adcm.stages.common import (
    FRESH_OPTION,
    ON_CONFIG_CHANGE_OPTION,
    PARAMS_OPTION,
    PROGRESS_OPTION,
    SET_OPTION,
    params_epilog,
    read_params,
    user_errors,
)


@user_errors
def train(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    data: Path = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared images (output of `adcm prepare`)."),
    teacher: Path = typer.Option(Path("models/teacher.pt"), help="Teacher file (output of `adcm teacher`)."),
    out: Path = typer.Option(
        Path("models/student.pt"),
        help="Consistency model written: EMA weights, network "
        "settings, its process, and every ADCM partition built (iteration, points).",
    ),
    metrics: Path = typer.Option(Path("metrics/train.json"), help="JSON metrics: time, kimg, |T|, final loss, …"),
    grid_dir: Path = typer.Option(
        Path("reports/train"), help="1-step sample grids (every train.grid_every_kimg; grid.png is the final one)."
    ),
    checkpoint_dir: Path = typer.Option(Path("checkpoints/train"), help="Resumable state; a re-run continues it."),
    log_dir: Path = typer.Option(Path("dvclive/train"), help="dvclive metrics directory."),
    fresh: bool = FRESH_OPTION,
    on_config_change: OnConfigChange = ON_CONFIG_CHANGE_OPTION,
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Consistency-train a one-step generator from the teacher (docs/method.md).

    `method: adcm` builds the adaptive partition (paper Eq. 10, Algorithm 1) from the teacher before the first step and rebuilds it at every train.adcm.rebuild_fraction of the run; `ect` and `ict` use their hand-made schedules; `sct` is continuous-time training in TrigFlow (one JVP per step). `process` (ve, fm, trigflow) is the forward process; sCT converts a VE or FM teacher to TrigFlow exactly. Run several processes with `torchrun --nproc-per-node N -m adcm train` (DDP; gloo on CPU, NCCL on CUDA); only rank 0 writes files."""
    p = read_params(params, set_)

    import torch

    from adcm.devices import resolve_device
    from adcm.io.files import write_json
    from adcm.io.images import save_grid
    from adcm.io.model_files import save_student
    from adcm.sampling.generate import ConsistencySampler, sample_grid
    from adcm.train.distributed import init_distributed
    from adcm.train.runs import run_student

    device = resolve_device(p.train.device, "train.device")
    info = init_distributed(device)
    if info.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    started = time.perf_counter()
    if info.is_main:
        for directory in (checkpoint_dir, log_dir, grid_dir):
            directory.mkdir(parents=True, exist_ok=True)
    student, summary = run_student(
        p,
        teacher,
        data,
        checkpoint_path=checkpoint_dir / "state.pt",
        device=device,
        dist_info=info,
        fresh=fresh,
        on_config_change=on_config_change,
        log_dir=log_dir,
        preview_dir=grid_dir,
        show_progress=progress,
        notify=lambda m: typer.echo(m, err=True),
    )
    if not info.is_main:
        return
    save_student(out, student)
    images = sample_grid(
        student.consistency_function(),
        ConsistencySampler(student.sampling_process()),
        8,
        shape=student.image_shape,
        num_classes=student.label_dim,
        batch_size=64,
        device=device,
    )
    save_grid(grid_dir / "grid.png", images, 8)
    write_json(
        metrics,
        {
            **summary,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
    )
    typer.echo(
        f"train ({p.method}, {student.process}) → {out}; {summary['kimg']:g} kimg in {summary['train_seconds']:.0f} s"
    )


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("train", epilog=params_epilog("lambda", "method", "process", "processes", "seed", "train"))(train)
