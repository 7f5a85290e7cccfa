"""Broken training inputs end in one line and exit 2 before any work, and write nothing.

Each case is built here: a teacher whose image size or channels differ from the prepared data, periods and
durations shorter than one batch, a checkpoint further along than the requested duration, an unreadable
checkpoint, and `device: cuda` on a machine without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import synthetic_dataset, tiny_params, write_params
from typer.testing import CliRunner

from adcm.config import parse_params
from adcm.io.datasets import write_prepared
from adcm.io.model_files import TeacherFile, save_teacher
from adcm.nets.precond import denoiser
from adcm.stages.cli import app
from adcm.train.runs import network_kwargs_for

runner = CliRunner()
TRAIN = {
    "train.device": "cpu",
    "train.duration_kimg": 0.032,
    "train.batch_size": 16,
    "train.log_every_kimg": 0.016,
    "train.checkpoint_every_kimg": 0.016,
    "train.grid_every_kimg": 0.032,
    "method": "ect",
    "train.ect.stage_fraction": 0.5,
}


def _files(tmp_path: Path, resolution: int = 8, channels: int = 1) -> tuple[Path, Path]:
    data = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(resolution=resolution, channels=channels), data, tmp_path / "dataset.json")
    kwargs = network_kwargs_for(parse_params(tiny_params()).teacher.network, 8, 1, 0)
    teacher = tmp_path / "teacher.pt"
    save_teacher(teacher, TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5).state_dict(), {"source": "test"}))
    return data, teacher


def _train(tmp_path: Path, data: Path, teacher: Path, **overrides: object):
    params = write_params(tmp_path / "params.yaml", tiny_params({**TRAIN, **overrides}))
    return runner.invoke(
        app,
        [
            "train",
            "--params",
            str(params),
            "--data",
            str(data),
            "--teacher",
            str(teacher),
            "--out",
            str(tmp_path / "out" / "student.pt"),
            "--metrics",
            str(tmp_path / "out" / "train.json"),
            "--grid-dir",
            str(tmp_path / "out" / "grids"),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--log-dir",
            str(tmp_path / "live"),
            "--no-progress",
        ],
    )


def _one_line_exit_2(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.output, (word, result.output)


@pytest.mark.parametrize(("resolution", "channels"), [(16, 1), (8, 3)])
def test_teacher_that_does_not_fit_the_data_is_refused(tmp_path: Path, resolution: int, channels: int) -> None:
    data, teacher = _files(tmp_path, resolution, channels)
    _one_line_exit_2(_train(tmp_path, data, teacher), "teacher.pt", "prepared data")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_periods_shorter_than_a_batch_round_up_to_one_step(tmp_path: Path) -> None:
    data, teacher = _files(tmp_path)
    result = _train(tmp_path, data, teacher, **{"train.checkpoint_every_kimg": 0.0001, "train.log_every_kimg": 0.0001})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "student.pt").is_file()


@pytest.mark.parametrize("group", ["train", "teacher"])
def test_duration_shorter_than_one_batch_is_a_params_error(tmp_path: Path, group: str) -> None:
    data, teacher = _files(tmp_path)
    result = _train(tmp_path, data, teacher, **{f"{group}.duration_kimg": 0.001})
    _one_line_exit_2(result, f"{group}.duration_kimg", "at least one batch")
    assert not (tmp_path / "out").exists()


def test_checkpoint_further_than_the_duration_is_refused(tmp_path: Path) -> None:
    data, teacher = _files(tmp_path)
    assert _train(tmp_path, data, teacher, **{"train.duration_kimg": 0.064}).exit_code == 0
    result = _train(tmp_path, data, teacher, **{"train.duration_kimg": 0.032})
    # the duration is part of the configuration (schedules are proportional to it): another run, refused
    _one_line_exit_2(result, "state.pt", "--fresh")


def test_unreadable_checkpoint_says_how_to_start_over(tmp_path: Path) -> None:
    data, teacher = _files(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"not a checkpoint")
    _one_line_exit_2(_train(tmp_path, data, teacher), "state.pt", "--fresh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_params_error(tmp_path: Path) -> None:
    data, teacher = _files(tmp_path)
    _one_line_exit_2(_train(tmp_path, data, teacher, **{"train.device": "cuda"}), "train.device", "CUDA")
    assert not (tmp_path / "out").exists()
