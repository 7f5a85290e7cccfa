"""Class-conditional consistency training and sampling, on a tiny DDPM++ and a tiny EDM2 teacher.

Labels must reach every network evaluation: the training batches and targets, ADCM's Eq. 10 statistics
(the batched builder's JVP calls), the teacher's Heun sampler and the 1- and 2-step samplers; sampling
takes one chosen class (``sample.class_label``) or an exactly balanced set (class = seed mod K).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TRAIN_TINY, synthetic_dataset, tiny_params, write_params
from torch import Tensor, nn
from typer.testing import CliRunner

from adcm.config import Params, parse_params
from adcm.errors import ParamsError
from adcm.io.datasets import load_prepared, write_prepared
from adcm.io.model_files import StudentFile, TeacherFile, load_student, save_student, save_teacher
from adcm.method.adcm import ADCMDiscretization
from adcm.method.objectives import DiscreteConsistencyObjective
from adcm.nets.precond import make_precond
from adcm.sampling.generate import (
    ConsistencySampler,
    balanced_labels,
    chosen_labels,
    generate,
    grid_seeds,
    heun_for,
    sample_grid,
    student_sampler,
    uniform_label_probs,
)
from adcm.stages.cli import app
from adcm.train.batches import BatchSource
from adcm.train.loop import Trainer
from adcm.train.runs import network_kwargs_for, run_student, student_spec

CLASSES = 3
EDM2_TINY: dict[str, Any] = {
    "img_resolution": 8,
    "img_channels": 1,
    "label_dim": CLASSES,
    "use_fp16": False,
    "logvar_channels": 8,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
    "channels_per_head": 8,
    "dropout": 0.0,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params_for(tmp_path: Path, **overrides: Any) -> tuple[Path, Params]:
    data = tiny_params(
        {
            **TRAIN_TINY,
            "teacher.network.class_conditional": True,
            "train.adcm.partition": "batched",  # the builder whose JVP calls must carry the right labels
            "train.adcm.partition_batch_size": 4,
            "train.adcm.partition_times": 4,
            "sample.num_images": 9,
            "sample.batch_size": 4,
            "sample.teacher_steps": 2,
            "sample.grid_rows": 2,
            "sample.device": "cpu",
            **overrides,
        }
    )
    return write_params(tmp_path / "params.yaml", data), parse_params(data)


def prepared(tmp_path: Path) -> Path:
    path = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(n=32, channels=1, resolution=8, classes=CLASSES), path, tmp_path / "dataset.json")
    return path


def teacher_file(kind: str, params: Params) -> TeacherFile:
    """A randomly initialised class-conditional teacher of ``kind`` (the wiring, not the quality, is tested)."""
    torch.manual_seed(0)
    if kind == "edm2":
        kwargs = dict(EDM2_TINY)
        net = make_precond(kwargs, 0.5, process="ve", eps=0.0, network="edm2")
        with torch.no_grad():  # EDM2 initialises its gains at 0: make the output depend on the labels
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape))
    else:
        kwargs = network_kwargs_for(params.teacher.network, 8, 1, CLASSES)
        net = make_precond(kwargs, 0.5, process="ve", eps=0.0)
    return TeacherFile(kwargs, 0.5, net.state_dict(), {"source": "test"}, network=kind)  # type: ignore[arg-type]


class LabelSpy(nn.Module):
    """Wraps a model f(x, t, labels) and records the labels of every call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls: list[tuple[int, Tensor | None]] = []

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append((x.shape[0], None if labels is None else labels.detach().clone()))
        return self.net(x, t, labels)


# --------------------------------------------------------------------------------------------
# Training through run_student.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "method"), [("ddpmpp", "adcm"), ("edm2", "adcm"), ("edm2", "sct")])
def test_run_student_trains_a_class_conditional_model(tmp_path: Path, kind: str, method: str) -> None:
    _, params = params_for(tmp_path, method=method)
    teacher = teacher_file(kind, params)
    save_teacher(tmp_path / "teacher.pt", teacher)
    data = prepared(tmp_path)
    student, summary = run_student(
        params,
        tmp_path / "teacher.pt",
        data,
        checkpoint_path=tmp_path / "ckpt" / "state.pt",
        device=torch.device("cpu"),
        preview_dir=tmp_path / "grids",
        show_progress=False,
    )
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert summary["partitions_built"] == (2 if method == "adcm" else 0)
    assert (
        student.network == kind
        and student.method == method
        and student.label_dim == CLASSES
        and student.image_shape == (1, 8, 8)
    )
    assert math.isfinite(summary["final_loss"])
    moved = [k for k, v in student.state_dict.items() if not torch.equal(v, teacher.state_dict[k])]
    assert moved  # the EMA moved away from the teacher
    if kind == "edm2":  # the uncertainty head is frozen: consistency training never evaluates it
        name = "model.logvar_linear.weight"
        assert torch.equal(student.state_dict[name], teacher.state_dict[name])
        assert any(k.startswith("model.unet.emb_label") for k in moved)  # the label embedding trained
    assert sorted(p.name for p in (tmp_path / "grids").glob("grid-*.png")) == ["grid-000002.png", "grid-000004.png"]
    save_student(tmp_path / "student.pt", student)
    assert load_student(tmp_path / "student.pt").network == kind


@pytest.mark.parametrize("kind", ["ddpmpp", "edm2"])
def test_partition_statistics_get_the_labels_of_their_samples(tmp_path: Path, kind: str) -> None:
    """ADCM's batched builder (Eq. 10 on labelled batches): every JVP call is the drawn samples at one time
    with the labels drawn with them; with calls that mix samples (chunk ≠ batch) the labels would not fit."""
    _, params = params_for(tmp_path)
    teacher = teacher_file(kind, params)
    data = load_prepared(prepared(tmp_path))
    spec = student_spec(params, teacher, data, teacher_id="t", data_id="d", world_size=1, device=torch.device("cpu"))
    assert isinstance(spec.objective, DiscreteConsistencyObjective)
    disc = spec.objective.disc
    assert isinstance(disc, ADCMDiscretization) and disc.chunk_size == 4 == disc.partition_batch_size
    cpu = torch.device("cpu")
    trainer = Trainer(spec, BatchSource(data.images, data.labels, CLASSES, False, cpu), cpu)
    seen: list[tuple[int, Tensor | None]] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args[0].shape[0], kwargs.get("class_labels")))

    handle = trainer.net.model.register_forward_pre_hook(record, with_kwargs=True)
    assert trainer.rebuild(0)
    handle.remove()
    drawn = trainer._partition_labels
    assert drawn is not None and drawn.shape == (4, CLASSES)
    assert len(seen) == disc.num_times  # one JVP call per grid time
    for rows, labels in seen:
        assert rows == 4 and labels is not None and torch.equal(labels, drawn)
    # The hazard the chunk size avoids: JVP calls of 8 rows (2 times × 4 samples) with 4 drawn labels.
    disc.chunk_size = 8
    with pytest.raises(RuntimeError):
        disc.rebuild(1, trainer._frozen_fn, trainer._draw_x0, network=trainer.net)


# --------------------------------------------------------------------------------------------
# Sampling.
# --------------------------------------------------------------------------------------------


def _student(kind: str, params: Params) -> StudentFile:
    teacher = teacher_file(kind, params)
    f = teacher.consistency_function(0.002)
    kw = teacher.network_kwargs
    return StudentFile(kw, 0.5, f.state_dict(), "ve", "ve", "adcm", 0.1, 0.002, 0.002, 80.0, network=teacher.network)


@pytest.mark.parametrize("kind", ["ddpmpp", "edm2"])
def test_every_sampler_gives_the_chosen_class_to_every_image(tmp_path: Path, kind: str) -> None:
    _, params = params_for(tmp_path)
    teacher, student = teacher_file(kind, params), _student(kind, params)
    seeds = list(range(5))
    labels = chosen_labels(len(seeds), CLASSES, 2)
    runs = [
        (student.consistency_function(), student_sampler(student, 1), 1),
        (student.consistency_function(), student_sampler(student, 2, 0.5), 2),
        (teacher.denoiser(), heun_for(teacher, 2, 0.002, 80.0, 7.0), 3),
    ]
    for net, sampler, calls_per_batch in runs:
        spy = LabelSpy(net)
        out = generate(
            spy,
            sampler,
            seeds,
            shape=(1, 8, 8),
            batch_size=2,
            device=torch.device("cpu"),
            label_probs=uniform_label_probs(CLASSES),
            class_labels=labels,
        )
        assert out.shape == (5, 1, 8, 8)
        assert len(spy.calls) == 3 * calls_per_batch  # batches of 2, 2, 1
        for rows, got in spy.calls:
            assert got is not None and torch.equal(got, torch.eye(CLASSES)[[2] * rows])


def test_a_chosen_class_changes_only_the_label() -> None:
    """The seed's label draw is made whatever the class: same latent, different class → different image."""
    params = parse_params(tiny_params({"teacher.network.class_conditional": True}))
    student = _student("edm2", params)
    f, sampler = student.consistency_function(), student_sampler(student, 2, 0.5)
    kw: dict[str, Any] = dict(shape=(1, 8, 8), batch_size=4, device=torch.device("cpu"))
    probs = uniform_label_probs(CLASSES)
    drawn = generate(f, sampler, [0, 1, 2, 3], label_probs=probs, **kw)
    spy = LabelSpy(f)
    generate(spy, sampler, [0, 1, 2, 3], label_probs=probs, **kw)
    drawn_classes = spy.calls[0][1].argmax(1).tolist()  # type: ignore[union-attr]
    given = generate(f, sampler, [0, 1, 2, 3], label_probs=probs, class_labels=drawn_classes, **kw)
    assert np.array_equal(given, drawn)  # giving the drawn classes reproduces the images exactly
    shifted = [(c + 1) % 3 for c in drawn_classes]
    other = generate(f, sampler, [0, 1, 2, 3], label_probs=probs, class_labels=shifted, **kw)
    assert not np.array_equal(other, drawn)


def test_balanced_labels_and_grid_seeds() -> None:
    seeds = list(range(7, 7 + 30))
    labels = balanced_labels(seeds, CLASSES)
    assert np.bincount(labels).tolist() == [10, 10, 10] and labels[:4] == [1, 2, 0, 1]
    assert np.bincount(balanced_labels(range(1000), 1000)).tolist() == [1] * 1000
    grid = grid_seeds(4, CLASSES, first_seed=7)  # 4 rows, 3 classes: rows of class 0, 1, 2, 0
    rows = [grid[4 * r : 4 * r + 4] for r in range(4)]
    assert [{s % CLASSES for s in row} for row in rows] == [{0}, {1}, {2}, {0}]
    assert len(set(grid)) == 16 and min(grid) >= 7
    assert rows[0] == [9, 12, 15, 18] and rows[3] == [21, 24, 27, 30]
    assert grid_seeds(2, 0, first_seed=5) == [5, 6, 7, 8]
    with pytest.raises(ParamsError, match=r"sample.class_label: expected a class in \[0, 2\]"):
        chosen_labels(4, CLASSES, 3)
    with pytest.raises(ParamsError, match="unconditional"):
        chosen_labels(4, 0, 0)


def test_the_grid_of_a_set_is_made_of_the_sets_images() -> None:
    params = parse_params(tiny_params({"teacher.network.class_conditional": True}))
    student = _student("ddpmpp", params)
    f, sampler = student.consistency_function(), ConsistencySampler(student.sampling_process())
    kw: dict[str, Any] = dict(shape=(1, 8, 8), batch_size=8, device=torch.device("cpu"), num_classes=CLASSES)
    seeds = list(range(12))
    images = generate(
        f,
        sampler,
        seeds,
        shape=(1, 8, 8),
        batch_size=8,
        device=torch.device("cpu"),
        label_probs=uniform_label_probs(CLASSES),
        class_labels=balanced_labels(seeds, CLASSES),
    )
    drawn = sample_grid(f, sampler, 3, **kw)
    reused = sample_grid(f, sampler, 3, available=(seeds, images), **kw)  # seeds 9, 10, 11 are in the set
    assert np.array_equal(drawn, reused)
    assert np.array_equal(reused[:3], images[[0, 3, 6]])  # row 0: class 0, seeds 0, 3, 6


# --------------------------------------------------------------------------------------------
# `adcm sample`.
# --------------------------------------------------------------------------------------------


def _sample(tmp_path: Path, params: Path, model: Path, sampler: str, *sets: str) -> Any:
    args = ["sample", "--sampler", sampler, "--params", str(params), "--model", str(model)]
    args += ["--out", str(tmp_path / "s.npz"), "--grid", str(tmp_path / "s.png"), "--no-progress"]
    for s in sets:
        args += ["-S", s]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("kind", ["ddpmpp", "edm2"])
def test_sample_stage_balanced_or_chosen(tmp_path: Path, kind: str) -> None:
    params_path, params = params_for(tmp_path)
    save_student(tmp_path / "student.pt", _student(kind, params))
    save_teacher(tmp_path / "teacher.pt", teacher_file(kind, params))
    for sampler, model in (("1step", "student.pt"), ("teacher", "teacher.pt")):
        result = _sample(tmp_path, params_path, tmp_path / model, sampler)
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / "s.npz") as out:
            assert out["labels"].tolist() == [s % CLASSES for s in range(9)] == balanced_labels(range(9), CLASSES)
            assert np.bincount(out["labels"]).tolist() == [3, 3, 3] and out["images"].shape == (9, 1, 8, 8)
        result = _sample(tmp_path, params_path, tmp_path / model, sampler, "sample.class_label=1")
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / "s.npz") as out:
            assert out["labels"].tolist() == [1] * 9
    result = _sample(tmp_path, params_path, tmp_path / "student.pt", "2step", "sample.class_label=3")
    assert result.exit_code == 2 and "sample.class_label: expected a class in [0, 2]" in result.output


def test_sample_stage_unconditional_records_no_labels(tmp_path: Path) -> None:
    params_path, params = params_for(tmp_path, **{"teacher.network.class_conditional": False})
    kwargs = network_kwargs_for(params.teacher.network, 8, 1, 0)
    f = make_precond(kwargs, 0.5, process="ve", eps=0.002)
    student = StudentFile(kwargs, 0.5, f.state_dict(), "ve", "ve", "ect", None, 0.002, 0.002, 80.0)
    save_student(tmp_path / "s.pt", student)
    assert _sample(tmp_path, params_path, tmp_path / "s.pt", "1step").exit_code == 0
    with np.load(tmp_path / "s.npz") as out:
        assert out["labels"].shape == (0,) and out["labels"].dtype == np.int64
    result = _sample(tmp_path, params_path, tmp_path / "s.pt", "1step", "sample.class_label=0")
    assert result.exit_code == 2 and "unconditional" in result.output


# --------------------------------------------------------------------------------------------
# Through the CLI: the train stage with an EDM2 teacher, and the export that must refuse it.
# --------------------------------------------------------------------------------------------


def test_train_stage_with_an_edm2_teacher_writes_its_outputs_and_export_refuses_it(tmp_path: Path) -> None:
    params_path, params = params_for(tmp_path)
    save_teacher(tmp_path / "teacher.pt", teacher_file("edm2", params))
    data = prepared(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--params",
            str(params_path),
            "--data",
            str(data),
            "--teacher",
            str(tmp_path / "teacher.pt"),
            "--out",
            str(tmp_path / "student.pt"),
            "--metrics",
            str(tmp_path / "train.json"),
            "--grid-dir",
            str(tmp_path / "grids"),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--log-dir",
            str(tmp_path / "live"),
            "--no-progress",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    student = load_student(tmp_path / "student.pt")
    assert student.network == "edm2" and student.label_dim == CLASSES
    assert (tmp_path / "grids" / "grid.png").stat().st_size > 100
    refused = runner.invoke(
        app, ["export", "--teacher", str(tmp_path / "teacher.pt"), "--out", str(tmp_path / "x.pkl")]
    )
    assert refused.exit_code == 2 and "DDPM++" in refused.output, refused.output
    assert not (tmp_path / "x.pkl").exists()
