"""`adcm prepare`: read a dataset in its official format and store it as one uint8 array file."""

from __future__ import annotations

from pathlib import Path

import typer

from adcm.stages.common import PARAMS_OPTION, SET_OPTION, params_epilog, read_params, user_errors


@user_errors
def prepare(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    out_dir: Path = typer.Option(Path("data/prepared"), help="Output directory: dataset.npz and dataset.json."),
) -> None:
    """Prepare the training images: (N, C, H, W) uint8 + labels in dataset.npz, a summary in dataset.json.

    The images are streamed into dataset.npz one block at a time (a folder of any size: one image at a
    time), and later stages memory-map them, so the dataset never has to fit in memory.
    """
    cfg = read_params(params, set_).prepare

    from adcm.io.datasets import prepare_dataset, write_prepared

    data = prepare_dataset(cfg)
    meta = write_prepared(data, out_dir / "dataset.npz", out_dir / "dataset.json")
    typer.echo(
        f"prepared {meta['count']} images {meta['channels']}×{meta['resolution']}×{meta['resolution']} "
        f"({meta['num_classes']} classes) → {out_dir}"
    )


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("prepare", epilog=params_epilog("prepare"))(prepare)
