"""`adcm prepare`: read a dataset in its official format and store it as one uint8 array file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from adcm.data import (
    DatasetError,
    ImageDataset,
    background_value,
    pad_images,
    read_cifar10,
    read_fashion_mnist,
    read_image_folder,
    write_prepared,
)
from stages.common import PARAMS_OPTION, SET_OPTION, params_epilog, read_params, user_errors


@user_errors
def prepare(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    out_dir: Path = typer.Option(Path("data/prepared"), help="Output directory: dataset.npz and dataset.json."),
) -> None:
    """Prepare the training images: (N, C, H, W) uint8 + labels in dataset.npz, a summary in dataset.json."""
    cfg = read_params(params, set_).prepare
    source = Path(cfg.source)
    if cfg.dataset == "cifar10" and not source.is_file():
        raise DatasetError(f"{source}: prepare.source must be the path of cifar-10-python.tar.gz (file not found)")
    if cfg.dataset != "cifar10" and not source.is_dir():
        hint = " (install it with `apt-get install dataset-fashion-mnist`)" if cfg.dataset == "fashion-mnist" else ""
        raise DatasetError(f"{source}: prepare.source directory not found{hint}")
    if cfg.dataset == "fashion-mnist":
        data = read_fashion_mnist(source, cfg.split)
    elif cfg.dataset == "cifar10":
        data = read_cifar10(source, cfg.split)
    else:
        data = read_image_folder(source, cfg.labels)
    if not cfg.labels:
        data = dataclasses.replace(data, labels=None, class_names=None)
    if cfg.max_images is not None:
        keep = min(cfg.max_images, len(data.images))
        labels = None if data.labels is None else data.labels[:keep]
        data = dataclasses.replace(data, images=data.images[:keep], labels=labels)
    height, width = data.images.shape[-2:]
    if height != width:
        raise DatasetError(f"{source}: images are {height}×{width}; only square images are supported")
    if cfg.resolution < height:
        raise DatasetError(f"{source}: images are {height}×{width}, larger than prepare.resolution "
                           f"{cfg.resolution}; down-scaling is not supported")
    if cfg.resolution > height:
        data = ImageDataset(pad_images(data.images, cfg.resolution, background_value(data.images)),
                            data.labels, data.name, data.class_names)
    meta = write_prepared(data, out_dir / "dataset.npz", out_dir / "dataset.json")
    typer.echo(f"prepared {meta['count']} images {meta['channels']}×{meta['resolution']}×{meta['resolution']} "
               f"({meta['num_classes']} classes) → {out_dir}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("prepare", epilog=params_epilog("seed", "prepare"))(prepare)
