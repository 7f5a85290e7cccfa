"""`adcm export`: write a VE teacher file as an EDM network snapshot (how the pretrained teacher is shipped)."""

from __future__ import annotations

from pathlib import Path

import typer

from adcm.errors import CheckpointError
from adcm.stages.common import user_errors


@user_errors
def export(
    teacher: Path = typer.Option(Path("models/teacher.pt"), help="Teacher file (output of `adcm teacher`), VE."),
    out: Path = typer.Option(..., help="EDM snapshot pickle to write (read back by teacher.source: file)."),
) -> None:
    """Write the teacher as an EDM network snapshot — the format of EDM's released checkpoints, data only — then read it back through the safe importer, check that every weight round-trips exactly, and print its SHA-256 (for teacher.sha256)."""
    from adcm.io.edm_export import save_edm_snapshot
    from adcm.io.edm_pickle import load_edm_pickle
    from adcm.io.files import sha256_file
    from adcm.io.model_files import load_teacher

    model = load_teacher(teacher)
    save_edm_snapshot(model, out)
    back = load_edm_pickle(out)
    changed = [name for name, value in model.state_dict.items() if not back.state_dict[name].equal(value)]
    if changed or back.state_dict.keys() != model.state_dict.keys():
        raise CheckpointError(f"{out}: the snapshot does not read back to the same weights ({changed[:3]})")
    typer.echo(f"{out}: sha256 {sha256_file(out)}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("export")(export)
