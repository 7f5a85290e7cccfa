"""`adcm teacher`: train a diffusion teacher here (VE/EDM, FM or TrigFlow), or import EDM's or EDM2's released pickle safely."""

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
def teacher(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    data: Path = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared images (output of `adcm prepare`)."),
    out: Path = typer.Option(
        Path("models/teacher.pt"),
        help="Teacher file written (loadable with "
        "torch.load(..., weights_only=True)): network kind and settings + EMA weights, EDM's names.",
    ),
    grid: Path = typer.Option(
        Path("reports/teacher/grid.png"),
        help="PNG grid of Heun samples from the teacher (conditional: one class per row).",
    ),
    metrics: Path = typer.Option(Path("metrics/teacher.json"), help="JSON metrics: time, kimg, final loss, …"),
    checkpoint_dir: Path = typer.Option(
        Path("checkpoints/teacher"), help="Resumable training state (source: train); a re-run continues from it."
    ),
    log_dir: Path = typer.Option(Path("dvclive/teacher"), help="dvclive metrics directory (source: train)."),
    fresh: bool = FRESH_OPTION,
    on_config_change: OnConfigChange = ON_CONFIG_CHANGE_OPTION,
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Produce the diffusion teacher: train one in `process` (EDM loss for ve, velocity loss for fm, TrigFlow diffusion loss for trigflow; Adam, EMA) or import an EDM (DDPM++) or EDM2 snapshot pickle without executing it (a ve teacher; the file's network class says which).

    Every source writes the same teacher file, after the network has been rebuilt and its weights checked; the command ends by drawing a sample grid with EDM's deterministic Heun sampler (teacher.sampler; 18 steps = 35 NFE), run in VE coordinates for every process; a class-conditional teacher shows one class per row."""
    p = read_params(params, set_)

    import torch

    from adcm.devices import resolve_device
    from adcm.io.files import write_json
    from adcm.io.images import save_grid
    from adcm.io.model_files import save_teacher
    from adcm.io.teacher_import import import_teacher
    from adcm.sampling.generate import heun_for, sample_grid
    from adcm.train.runs import run_teacher

    cfg = p.teacher
    device = resolve_device(cfg.device, "teacher.device")
    started = time.perf_counter()
    for directory in (checkpoint_dir, log_dir):  # declared DVC outputs, whatever the source
        directory.mkdir(parents=True, exist_ok=True)
    if cfg.source == "train":
        result, summary = run_teacher(
            p,
            data,
            checkpoint_path=checkpoint_dir / "state.pt",
            device=device,
            fresh=fresh,
            on_config_change=on_config_change,
            log_dir=log_dir,
            show_progress=progress,
            notify=lambda m: typer.echo(m, err=True),
        )
    else:
        result = import_teacher(cfg, show_progress=progress)
        summary = {"process": "ve", "network": result.network, "pickle_sha256": result.meta["pickle_sha256"]}
    net = result.denoiser()
    save_teacher(out, result)
    s = cfg.sampler
    t0 = time.perf_counter()
    images = sample_grid(
        net,
        heun_for(result, s.num_steps, s.sigma_min, s.sigma_max, s.rho),
        s.grid_rows,
        shape=result.image_shape,
        num_classes=result.label_dim,
        batch_size=s.grid_rows**2,
        device=device,
    )
    save_grid(grid, images, s.grid_rows)
    write_json(
        metrics,
        {
            "source": cfg.source,
            **summary,
            "parameters": sum(q.numel() for q in net.parameters()),
            "grid_nfe": 2 * s.num_steps - 1,
            "grid_seconds": round(time.perf_counter() - t0, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
    )
    typer.echo(f"teacher ({cfg.source}) → {out}; grid → {grid}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("teacher", epilog=params_epilog("process", "seed", "teacher"))(teacher)
