"""A teacher trained here, exported as an EDM snapshot, comes back through `teacher.source: file` unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_params, write_params
from typer.testing import CliRunner

from adcm.config import parse_params
from adcm.io.datasets import write_prepared
from adcm.io.files import sha256_file
from adcm.io.model_files import TeacherFile, load_teacher, save_teacher
from adcm.nets.precond import denoiser
from adcm.stages.cli import app
from adcm.train.runs import network_kwargs_for

runner = CliRunner()


def test_export_then_import_round_trips_and_checks_the_hash(tmp_path: Path) -> None:
    from conftest import synthetic_dataset

    kwargs = network_kwargs_for(parse_params(tiny_params()).teacher.network, 8, 1, 0)
    torch.manual_seed(0)
    original = TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5).state_dict(), {"source": "train"})
    save_teacher(tmp_path / "teacher.pt", original)
    pkl = tmp_path / "teacher.pkl"
    result = runner.invoke(app, ["export", "--teacher", str(tmp_path / "teacher.pt"), "--out", str(pkl)])
    assert result.exit_code == 0, result.output
    digest = sha256_file(pkl)
    assert digest in result.output
    data = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(), data, tmp_path / "dataset.json")

    def teacher_stage(sha: str) -> object:
        params = write_params(
            tmp_path / "params.yaml",
            tiny_params({"teacher.source": "file", "teacher.file": str(pkl), "teacher.sha256": sha}),
        )
        return runner.invoke(
            app,
            [
                "teacher",
                "--params",
                str(params),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "imported.pt"),
                "--grid",
                str(tmp_path / "grid.png"),
                "--metrics",
                str(tmp_path / "teacher.json"),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--log-dir",
                str(tmp_path / "live"),
                "--no-progress",
            ],
        )

    wrong = teacher_stage("0" * 64)
    assert wrong.exit_code == 2 and "SHA-256" in wrong.output and not (tmp_path / "imported.pt").exists()
    result = teacher_stage(digest)
    assert result.exit_code == 0, result.output
    imported = load_teacher(tmp_path / "imported.pt")
    assert imported.process == "ve" and imported.meta["pickle_sha256"] == digest
    for name, value in original.state_dict.items():
        assert torch.equal(imported.state_dict[name], value), name
