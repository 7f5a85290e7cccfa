"""`adcm sample`: an image set from the consistency model (1 or 2 steps) or the teacher (Heun)."""

from __future__ import annotations

import enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

from adcm.stages.common import PARAMS_OPTION, PROGRESS_OPTION, SET_OPTION, params_epilog, read_params, user_errors


class Which(str, enum.Enum):
    """Which sampler."""

    one = "1step"
    two = "2step"
    teacher = "teacher"


@user_errors
def sample(
    sampler: Which = typer.Option(..., help="1step / 2step (consistency model) or teacher (Heun, EDM)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    model: Path = typer.Option(..., help="models/student.pt for 1step/2step, models/teacher.pt for teacher."),
    out: Path = typer.Option(
        ...,
        help="Output .npz with `images` (N, C, H, W) uint8, `seeds` and `labels` (N,) int64 (empty if unconditional).",
    ),
    grid: Path = typer.Option(
        ...,
        help="PNG grid of sample.grid_rows² images: the first ones, or for a conditional model with class_label null one class per row.",
    ),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Draw sample.num_images images; image i depends only on seed sample.first_seed + i.

    1step/2step sample the consistency model in its own process (the student file records it; 2step's intermediate point is sample.t_mid.<method>, a VE σ converted to that process's time); teacher runs EDM's Heun sampler on the teacher (teacher.sampler's σ range and ρ, sample.teacher_steps levels) in VE coordinates.

    A class-conditional model gets an exactly class-balanced set (image of seed s has class s mod K) with sample.class_label null, or that one class for every image; the labels are written with the images."""
    p = read_params(params, set_)

    import numpy as np

    from adcm.devices import resolve_device
    from adcm.io.files import atomic_path
    from adcm.io.images import save_grid
    from adcm.io.model_files import load_student, load_teacher
    from adcm.sampling.generate import (
        Sampler,
        balanced_labels,
        chosen_labels,
        generate,
        heun_for,
        sample_grid,
        student_sampler,
        uniform_label_probs,
    )

    cfg = p.sample
    device = resolve_device(cfg.device, "sample.device")
    if sampler is Which.teacher:
        teacher = load_teacher(model)
        net, shape, classes = teacher.denoiser(), teacher.image_shape, teacher.label_dim
        s = p.teacher.sampler
        method: Sampler = heun_for(teacher, cfg.teacher_steps, s.sigma_min, s.sigma_max, s.rho)
    else:
        student = load_student(model)
        net, shape, classes = student.consistency_function(), student.image_shape, student.label_dim
        # 1 step reads no t_mid (its stage does not depend on sample.t_mid)
        two = sampler is Which.two
        method = student_sampler(student, 2, getattr(cfg.t_mid, student.method)) if two else student_sampler(student, 1)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.num_images))
    if cfg.class_label is not None:
        labels: list[int] | None = chosen_labels(len(seeds), classes, cfg.class_label)
    else:
        labels = balanced_labels(seeds, classes) if classes else None
    with Progress(
        "[bold]sample " + sampler.value,
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    ) as bar:
        task = bar.add_task("sample", total=len(seeds))
        images = generate(
            net,
            method,
            seeds,
            shape=shape,
            batch_size=cfg.batch_size,
            device=device,
            label_probs=uniform_label_probs(classes),
            class_labels=labels,
            progress=lambda done: bar.update(task, completed=done),
        )
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            images=images,
            seeds=np.asarray(seeds, dtype=np.int64),
            labels=np.asarray(labels if labels is not None else [], dtype=np.int64),
        )
    if classes and cfg.class_label is None:  # one class per row, from the set where it holds the images
        grid_images = sample_grid(
            net,
            method,
            cfg.grid_rows,
            shape=shape,
            num_classes=classes,
            batch_size=cfg.batch_size,
            device=device,
            first_seed=cfg.first_seed,
            available=(seeds, images),
        )
    else:
        grid_images = images[: cfg.grid_rows**2]
    save_grid(grid, grid_images, cfg.grid_rows)
    typer.echo(f"sample {sampler.value}: {len(images)} images → {out}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("sample", epilog=params_epilog("sample", "teacher.sampler"))(sample)
