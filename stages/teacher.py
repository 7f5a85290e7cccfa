"""`adcm teacher`: train a diffusion teacher here (VE/EDM, FM or TrigFlow), or import EDM's released pickle safely."""

from __future__ import annotations

import enum
import time
from pathlib import Path

import torch
import typer

from adcm.checkpoint import TeacherFile, save_teacher
from adcm.config import Params
from adcm.data import load_prepared
from adcm.download import download
from adcm.edm_pickle import EDMFormatError, UnsafePickleError, load_edm_pickle
from adcm.images import save_grid
from adcm.io import sha256_file
from adcm.teacher import TrainingError, checkpoint_matches, sample_teacher, train_teacher
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

register_user_error(EDMFormatError, UnsafePickleError, TrainingError)


class OnConfigChange(str, enum.Enum):
    """What to do with a checkpoint written under other params."""

    refuse = "refuse"
    restart = "restart"


@user_errors
def teacher(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    data: Path = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared images (output of `adcm prepare`)."),
    out: Path = typer.Option(Path("models/teacher.pt"), help="Teacher file written (loadable with "
                             "torch.load(..., weights_only=True)): network settings + EMA weights, EDM's names."),
    grid: Path = typer.Option(Path("reports/teacher/grid.png"), help="PNG grid of Heun samples from the teacher."),
    metrics: Path = typer.Option(Path("metrics/teacher.json"), help="JSON metrics: time, kimg, final loss, …"),
    checkpoint_dir: Path = typer.Option(Path("checkpoints/teacher"), help="Resumable training state "
                                        "(source: train); a re-run continues from it."),
    log_dir: Path = typer.Option(Path("dvclive/teacher"), help="dvclive metrics directory (source: train)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore any existing training checkpoint and start over."),
    on_config_change: OnConfigChange = typer.Option(
        OnConfigChange.refuse, help="A checkpoint written under other params: refuse (exit 1 with a message) "
        "or restart from scratch (what `dvc exp run -S …` needs)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Produce the diffusion teacher: train one in `process` (EDM loss for ve, velocity loss for fm, TrigFlow diffusion loss for trigflow; Adam, EMA) or convert EDM's pickle (a ve teacher).

    Every source writes the same teacher file; the command ends by drawing a sample grid with EDM's deterministic Heun sampler (teacher.sampler; 18 steps = 35 NFE), run in VE coordinates for every process. """
    p: Params = read_params(params, set_)
    cfg = p.teacher
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    summary: dict[str, object] = {"source": cfg.source}
    for directory in (checkpoint_dir, log_dir):  # declared DVC outputs, whatever the source
        directory.mkdir(parents=True, exist_ok=True)
    if cfg.source == "train":
        dataset = load_prepared(data)
        data_id = sha256_file(data)
        ckpt = checkpoint_dir / "state.pt"
        restart = fresh
        if on_config_change is OnConfigChange.restart and ckpt.exists() and not fresh:
            restart = not checkpoint_matches(ckpt, cfg, seed=p.seed, data=dataset, data_id=data_id, process=p.process)
            if restart:
                typer.echo(f"{ckpt}: written under other params; starting over (--on-config-change restart)",
                           err=True)
        run = train_teacher(cfg, dataset, seed=p.seed, data_id=data_id, checkpoint_path=ckpt, device=device,
                            fresh=restart, log_dir=log_dir, show_progress=progress, process=p.process)
        result = run.teacher
        summary.update(process=p.process, kimg=run.kimg, steps=run.steps, train_seconds=round(run.train_seconds, 1),
                       final_loss=run.final_loss, skipped_steps=run.skipped_steps,
                       resumed_from_kimg=run.resumed_from_kimg, dataset=dataset.name)
    else:
        if cfg.source == "url":
            assert cfg.url is not None and cfg.sha256 is not None  # checked by the params loader
            pickle_path = download(cfg.url, Path(cfg.download_path), cfg.sha256, show_progress=progress)
        else:
            assert cfg.file is not None
            pickle_path = Path(cfg.file)
            if not pickle_path.is_file():
                raise FileNotFoundError(f"{pickle_path}: teacher.file not found")
        edm = load_edm_pickle(pickle_path)
        result = TeacherFile(
            network_kwargs=edm.network_kwargs,
            sigma_data=edm.sigma_data,
            state_dict=edm.state_dict,
            meta={"source": cfg.source, "pickle": str(pickle_path), "pickle_sha256": sha256_file(pickle_path),
                  "precond_class": edm.precond_class, "sigma_min": edm.sigma_min,
                  "sigma_max": edm.sigma_max},
        )
        summary.update(process="ve", pickle_sha256=result.meta["pickle_sha256"])
    save_teacher(out, result)

    net = result.denoiser()
    kwargs = result.network_kwargs
    shape = (kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    rows = cfg.sampler.grid_rows
    t0 = time.perf_counter()
    images = sample_teacher(net, cfg.sampler, list(range(rows * rows)), kwargs["label_dim"], device, shape)
    save_grid(grid, images, rows)
    summary.update(parameters=sum(q.numel() for q in net.parameters()),
                   grid_nfe=2 * cfg.sampler.num_steps - 1, grid_seconds=round(time.perf_counter() - t0, 1),
                   total_seconds=round(time.perf_counter() - started, 1), device=str(device),
                   threads=torch.get_num_threads())
    write_json(metrics, summary)
    typer.echo(f"teacher ({cfg.source}) → {out}; grid → {grid}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("teacher", epilog=params_epilog("process", "seed", "teacher"))(teacher)
