"""`adcm sample`: an image set from the consistency model (1 or 2 steps) or the teacher (Heun)."""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from adcm.checkpoint import CheckpointError, load_teacher
from adcm.data import load_prepared
from adcm.generate import generate
from adcm.images import save_grid
from adcm.io import atomic_path
from adcm.processes import coordinates, make_process
from adcm.training import resolve_device
from stages.common import PARAMS_OPTION, SET_OPTION, params_epilog, read_params, user_errors


class Sampler(str, enum.Enum):
    """Which sampler."""

    one = "1step"
    two = "2step"
    teacher = "teacher"


@user_errors
def sample(
    sampler: Sampler = typer.Option(..., help="1step / 2step (consistency model) or teacher (Heun, EDM)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    model: Path = typer.Option(..., help="models/student.pt for 1step/2step, models/teacher.pt for teacher."),
    data: Path = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared data: the class distribution "
                              "of conditional models."),
    out: Path = typer.Option(..., help="Output .npz with `images` (N, C, H, W) uint8 and `seeds`."),
    grid: Path = typer.Option(..., help="PNG grid of the first sample.grid_rows² images."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Draw sample.num_images images; image i depends only on seed sample.first_seed + i.

    1step/2step sample the consistency model in its own process (the student file records it; 2step's intermediate point is sample.t_mid.<method>, a VE σ converted to that process's time); teacher runs EDM's Heun sampler on the teacher (teacher.sampler's σ range and ρ, sample.teacher_steps levels) in VE coordinates. """
    p = read_params(params, set_)
    cfg = p.sample
    device = resolve_device(cfg.device)
    file = load_teacher(model)
    is_student = file.meta.get("kind") == "consistency"
    if is_student != (sampler is not Sampler.teacher):
        want = "a teacher file" if sampler is Sampler.teacher else "a consistency model (models/student.pt)"
        raise CheckpointError(f"{model}: sampler {sampler.value} needs {want}")
    if is_student:
        meta = file.meta
        net = file.consistency_function(float(meta["eps"]))
        process = make_process(file.process, float(meta.get("range_eps", meta["eps"])), float(meta["t_max"]),
                               file.sigma_data)
        method = str(meta.get("method", "adcm"))
        t_mid = float(process.time_from_noise_to_signal(torch.tensor(getattr(cfg.t_mid, method),
                                                                     dtype=torch.float64)))
    else:
        net = file.denoiser()
        process, t_mid = coordinates(file.process, file.sigma_data), 0.0
    kwargs = file.network_kwargs
    probs = None
    if kwargs["label_dim"]:
        labels = load_prepared(data).labels
        if labels is None:
            raise CheckpointError(f"{model}: the network is class-conditional but {data} has no labels")
        probs = torch.bincount(torch.from_numpy(labels), minlength=kwargs["label_dim"]).double()
        probs = probs / probs.sum()
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.num_images))
    shape = (kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    with Progress("[bold]sample " + sampler.value, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("sample", total=len(seeds))
        images = generate(net, sampler.value, seeds, shape=shape, batch_size=cfg.batch_size, device=device,
                          label_probs=probs, process=process, t_mid=t_mid, teacher_steps=cfg.teacher_steps,
                          sigma_min=p.teacher.sampler.sigma_min, sigma_max=p.teacher.sampler.sigma_max,
                          rho=p.teacher.sampler.rho,
                          progress=lambda done: bar.update(task, completed=done))
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, images=images, seeds=np.asarray(seeds, dtype=np.int64))
    save_grid(grid, images[: cfg.grid_rows**2], cfg.grid_rows)
    typer.echo(f"sample {sampler.value}: {len(images)} images → {out}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("sample", epilog=params_epilog("sample", "teacher.sampler"))(sample)
