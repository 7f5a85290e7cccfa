"""Consistency training: every method runs, resumption is bit-exact, foreign checkpoints are refused,
non-finite losses stop the run, the stages write their outputs, and 2 gloo processes match 1."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_TINY, synthetic_dataset, tiny_params, write_params
from typer.testing import CliRunner

from adcm.config import parse_params
from adcm.errors import CheckpointError, TrainingError
from adcm.io.model_files import TeacherFile, load_student, load_teacher, save_teacher
from adcm.stages.cli import app
from adcm.train.batches import BatchSource
from adcm.train.loop import RunResult, train
from adcm.train.runs import network_kwargs_for, student_file, student_spec

CPU = torch.device("cpu")


def _params(**overrides):
    return parse_params(tiny_params({**TRAIN_TINY, **overrides}))


def _teacher(process: str = "ve") -> TeacherFile:
    params = _params()
    kwargs = network_kwargs_for(params.teacher.network, 8, 1, 3)
    from adcm.nets.precond import denoiser

    torch.manual_seed(0)
    net = denoiser(kwargs, 0.5, process)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return TeacherFile(kwargs, 0.5, net.state_dict(), {"source": "test"}, process=process)  # type: ignore[arg-type]


def _train(teacher: TeacherFile, params, checkpoint: Path, stop: int | None = None) -> RunResult:
    data = synthetic_dataset()
    spec = student_spec(params, teacher, data, teacher_id="t", data_id="d", world_size=1, device=CPU)
    return train(
        spec,
        BatchSource(data.images, data.labels, 0, False, CPU),
        checkpoint_path=checkpoint,
        device=CPU,
        show_progress=False,
        stop_after_steps=stop,
    )


def _run(tmp_path: Path, name: str, method: str = "adcm", stop: int | None = None, process: str = "ve", **overrides):
    params = _params(method=method, process=process, seed=1, **overrides)
    teacher = _teacher(process)
    run = _train(teacher, params, tmp_path / name, stop)
    spec = student_spec(params, teacher, synthetic_dataset(), teacher_id="t", data_id="d", world_size=1, device=CPU)
    return run, student_file(params, teacher, spec, run, "t")


@pytest.mark.parametrize(
    ("method", "process"),
    [
        ("adcm", "ve"),
        ("ect", "ve"),
        ("ict", "ve"),
        ("sct", "ve"),
        ("adcm", "fm"),
        ("ect", "trigflow"),
        ("sct", "trigflow"),
        ("sct", "fm"),
    ],
)
def test_resumed_run_ends_with_identical_weights(tmp_path: Path, method: str, process: str) -> None:
    whole, student = _run(tmp_path, "a.pt", method, process=process)
    first, _ = _run(tmp_path, "b.pt", method, stop=3, process=process)  # interrupted after 3 of 4 iterations
    assert first.steps == 3
    resumed, _ = _run(tmp_path, "b.pt", method, process=process)
    assert resumed.steps == whole.steps == 4 and resumed.resumed_from_kimg == pytest.approx(0.048)
    for name, value in whole.ema_state.items():
        assert torch.equal(value, resumed.ema_state[name]), name
    assert whole.partitions == resumed.partitions
    if method == "adcm":
        # built before step 0 and rebuilt at iteration 2, each strictly decreasing from T to exactly ε
        rng = _params().processes.range_of(process)
        assert [it for it, _ in whole.partitions] == [0, 2]
        for _, pts in whole.partitions:
            assert pts[0] == rng.t_max and pts[-1] == rng.eps
            assert all(a > b for a, b in itertools.pairwise(pts))
    assert student.process == ("trigflow" if method == "sct" else process) and student.source == process
    assert student.eps == (0.0 if method == "sct" else _params().processes.range_of(process).eps)
    teacher = _teacher(process).state_dict
    assert any(not torch.equal(v, teacher[k]) for k, v in whole.ema_state.items())


@pytest.mark.parametrize(("method", "process"), [("adcm", "ve"), ("ect", "fm")])
def test_distillation_trains_resumes_exactly_and_differs_from_training(
    tmp_path: Path, method: str, process: str
) -> None:
    distill = {"train.distillation": True}
    whole, _ = _run(tmp_path, "a.pt", method, process=process, **distill)
    first, _ = _run(tmp_path, "b.pt", method, stop=2, process=process, **distill)
    resumed, _ = _run(tmp_path, "b.pt", method, process=process, **distill)
    assert first.steps == 2 and resumed.steps == whole.steps == 4
    for name, value in whole.ema_state.items():
        assert torch.equal(value, resumed.ema_state[name]), name
    trained, _ = _run(tmp_path, "c.pt", method, process=process)  # same seed, consistency training
    assert any(not torch.equal(v, trained.ema_state[k]) for k, v in whole.ema_state.items())


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, "a.pt", stop=1)
    with pytest.raises(CheckpointError, match="different configuration"):
        _run(tmp_path, "a.pt", **{"lambda": 0.25})
    with pytest.raises(CheckpointError, match="different configuration"):
        _run(tmp_path, "a.pt", method="ect")
    with pytest.raises(CheckpointError, match="different configuration"):
        _run(tmp_path, "a.pt", process="trigflow")


def test_nonfinite_losses_stop_the_run(tmp_path: Path) -> None:
    teacher = _teacher()
    bad = TeacherFile(
        teacher.network_kwargs,
        0.5,
        {k: torch.full_like(v, float("nan")) if "dec" in k else v for k, v in teacher.state_dict.items()},
        {},
    )
    params = _params(method="ect", seed=1, **{"train.max_nonfinite_in_row": 3, "train.duration_kimg": 0.16})
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        _train(bad, params, tmp_path / "x.pt")


def _stage_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    from adcm.io.datasets import write_prepared

    data = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(), data, tmp_path / "dataset.json")
    teacher = tmp_path / "teacher.pt"
    save_teacher(teacher, _teacher())
    params = write_params(tmp_path / "params.yaml", tiny_params(TRAIN_TINY))
    return data, teacher, params


def _train_args(tmp_path: Path, data: Path, teacher: Path, params: Path, out: str = "student.pt") -> list[str]:
    return [
        "train",
        "--params",
        str(params),
        "--data",
        str(data),
        "--teacher",
        str(teacher),
        "--out",
        str(tmp_path / out),
        "--metrics",
        str(tmp_path / "train.json"),
        "--grid-dir",
        str(tmp_path / "grids"),
        "--checkpoint-dir",
        str(tmp_path / f"ckpt-{out}"),
        "--log-dir",
        str(tmp_path / "live"),
        "--no-progress",
    ]


def test_grids_along_training_are_this_runs_own_and_survive_a_resume(tmp_path: Path) -> None:
    """A fresh run removes an earlier run's grids; re-running the finished run (DVC persists reports/train)
    keeps the grids it drew and removes only grids of later steps; other files are left alone."""
    data, teacher, params = _stage_files(tmp_path)
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "grid-000999.png").write_bytes(b"stale")
    (grids / "notes.txt").write_text("kept")
    runner = CliRunner()
    assert runner.invoke(app, _train_args(tmp_path, data, teacher, params), catch_exceptions=False).exit_code == 0
    drawn = sorted(p.name for p in grids.glob("grid-*.png"))
    assert drawn == ["grid-000002.png", "grid-000004.png"] and (grids / "notes.txt").read_text() == "kept"
    (grids / "grid-000999.png").write_bytes(b"stale")
    before = {name: (grids / name).read_bytes() for name in drawn}
    assert runner.invoke(app, _train_args(tmp_path, data, teacher, params), catch_exceptions=False).exit_code == 0
    assert sorted(p.name for p in grids.glob("grid-*.png")) == drawn
    assert {name: (grids / name).read_bytes() for name in drawn} == before
    assert json.loads((tmp_path / "train.json").read_text())["resumed_from_kimg"] > 0


def test_train_and_schedule_stages_write_their_outputs(tmp_path: Path) -> None:
    data, teacher, params = _stage_files(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, _train_args(tmp_path, data, teacher, params), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    student = load_student(tmp_path / "student.pt")
    assert student.method == "adcm" and len(student.partitions) == 2
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["steps"] == 4 and metrics["partitions_built"] == 2
    assert (tmp_path / "grids" / "grid.png").exists() and (tmp_path / "grids" / "grid-000002.png").exists()
    result = runner.invoke(
        app,
        [
            "schedule",
            "--params",
            str(params),
            "--student",
            str(tmp_path / "student.pt"),
            "--out-dir",
            str(tmp_path / "sched"),
            "--metrics",
            str(tmp_path / "sched.json"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    sched = json.loads((tmp_path / "sched" / "schedule.json").read_text())
    assert len(sched["partitions"]) == 2 and sched["ect"]["iteration"] == 2
    rows = (tmp_path / "sched" / "schedule.csv").read_text().splitlines()
    assert rows[0] == "rebuild,iteration,index,t,dt,rho,drho"
    assert len(rows) - 1 == sum(len(p["t"]) - 1 for p in sched["partitions"])
    summary = json.loads((tmp_path / "sched.json").read_text())
    assert summary["points"] == len(sched["partitions"][-1]["t"]) and summary["min_dt"] <= summary["max_dt"]
    assert (tmp_path / "sched" / "schedule.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("partition", ["sequential", "batched"])
def test_two_gloo_processes_match_one_process(tmp_path: Path, partition: str) -> None:
    """ADCM under DDP: the partition is built on rank 0 and broadcast (either builder), the weights match."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    data, teacher, params = _stage_files(tmp_path)
    overrides = {**TRAIN_TINY, "train.batch_per_step": 8, "train.adcm.partition": partition}
    if partition == "batched":
        overrides.update({"train.adcm.partition_times": 4, "train.adcm.partition_batch_size": 8})
    write_params(params, tiny_params(overrides))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "adcm", *_train_args(tmp_path, data, teacher, params, "one.pt")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert single.returncode == 0, single.stderr
    double = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517" if partition == "sequential" else "29518",
            "-m",
            "adcm",
            *_train_args(tmp_path, data, teacher, params, "two.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = load_student(tmp_path / "one.pt"), load_student(tmp_path / "two.pt")
    assert one.partitions == two.partitions
    for name, value in one.state_dict.items():
        torch.testing.assert_close(two.state_dict[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "train.json").read_text())["processes"] == 2


def test_fast_path_switches_match_the_plain_fp32_step() -> None:
    """channels_last + foreach RAdam (the CPU-testable part of the GPU path) give the same step as plain fp32.

    Dropout is off: its masks are drawn in memory order, so channels_last draws other (equally valid) masks."""
    from adcm.method.objectives import Batch, consistency_batch_loss
    from adcm.processes import VEProcess
    from adcm.train.fastpath import FastPath

    cfg = _params().train
    requested = FastPath(cfg.bf16, cfg.channels_last, cfg.tf32, cfg.fused_optimizer, cfg.compile)
    results = []
    for fast in (FastPath(), FastPath.for_device(requested, CPU, force_cpu=True)):
        net = _teacher().consistency_function(0.002)
        for module in net.modules():
            if hasattr(module, "dropout") and isinstance(module.dropout, float):
                module.dropout = 0.0
        net.train()
        fast.apply(net)
        opt = fast.optimizer(net, cfg.optimizer, cfg.lr, cfg.beta2)
        gen = torch.Generator().manual_seed(0)
        x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
        z = torch.randn(8, 1, 8, 8, generator=gen)
        t = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0])
        torch.manual_seed(3)
        loss = consistency_batch_loss(
            net, net, VEProcess(eps=0.002, t_max=80.0), Batch(x0, z, None), t, t * 0.9, None, c=0.03
        )
        loss.backward()
        opt.step()
        results.append((loss.detach(), {k: v.detach().clone() for k, v in net.state_dict().items()}))
    assert FastPath.for_device(requested, CPU, force_cpu=True).channels_last
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("method", "process"), [("sct", "ve"), ("adcm", "fm"), ("ect", "trigflow")])
def test_teacher_train_sample_schedule_pipeline_per_process(tmp_path: Path, method: str, process: str) -> None:
    """The stages chained on a tiny config for a process/method pair: teacher (trained in that process),
    train, sample (1 step, 2 steps, teacher Heun) and schedule, each reading the files of the one before."""
    from adcm.io.datasets import write_prepared

    data = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(), data, tmp_path / "dataset.json")
    params = write_params(
        tmp_path / "params.yaml",
        tiny_params(
            {
                **TRAIN_TINY,
                "method": method,
                "process": process,
                "sample.num_images": 4,
                "sample.batch_size": 4,
                "sample.teacher_steps": 3,
                "sample.grid_rows": 2,
                "sample.device": "cpu",
            }
        ),
    )
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "teacher",
            "--params",
            str(params),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "teacher.pt"),
            "--grid",
            str(tmp_path / "tgrid.png"),
            "--metrics",
            str(tmp_path / "teacher.json"),
            "--checkpoint-dir",
            str(tmp_path / "tckpt"),
            "--log-dir",
            str(tmp_path / "tlive"),
            "--no-progress",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    teacher = load_teacher(tmp_path / "teacher.pt")
    assert teacher.process == process and json.loads((tmp_path / "teacher.json").read_text())["process"] == process
    result = runner.invoke(app, _train_args(tmp_path, data, tmp_path / "teacher.pt", params), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    student = load_student(tmp_path / "student.pt")
    expected = "trigflow" if method == "sct" else process
    assert (student.process, student.source, student.method) == (expected, process, method)
    assert json.loads((tmp_path / "train.json").read_text())["process"] == expected
    for sampler, model in (("1step", "student.pt"), ("2step", "student.pt"), ("teacher", "teacher.pt")):
        result = runner.invoke(
            app,
            [
                "sample",
                "--sampler",
                sampler,
                "--params",
                str(params),
                "--model",
                str(tmp_path / model),
                "--out",
                str(tmp_path / f"{sampler}.npz"),
                "--grid",
                str(tmp_path / f"{sampler}.png"),
                "--no-progress",
            ],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
    one, two = (np.load(tmp_path / f"{k}.npz")["images"] for k in ("1step", "2step"))
    assert one.shape == two.shape == (4, 1, 8, 8) and not np.array_equal(one, two)
    result = runner.invoke(
        app,
        [
            "schedule",
            "--params",
            str(params),
            "--student",
            str(tmp_path / "student.pt"),
            "--out-dir",
            str(tmp_path / "sched"),
            "--metrics",
            str(tmp_path / "sched.json"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    sched = json.loads((tmp_path / "sched" / "schedule.json").read_text())
    assert sched["process"] == expected and len(sched["partitions"]) == (2 if method == "adcm" else 0)
    assert sched["ect"]["t"] and all(0 < t <= sched["t_max"] for t in sched["ect"]["t"])
    assert (tmp_path / "sched" / "schedule.png").stat().st_size > 1000


def test_schedules_are_proportional_to_the_run() -> None:
    """Doubling train.duration_kimg doubles ECT's stage length, ADCM's rebuild period, sCT's warm-up and iCT's
    curriculum steps: every method stays faithful to its schedule at any budget."""
    from adcm.processes import TrigFlowProcess, VEProcess
    from adcm.train.runs import make_objective

    cfg = _params(
        **{"train.ect.stage_fraction": 0.25, "train.adcm.rebuild_fraction": 0.25, "train.sct.warmup_fraction": 0.025}
    ).train
    ve, trig = VEProcess(), TrigFlowProcess()
    for total in (400, 800):
        ect = make_objective("ect", 0.01, cfg, total, 0, ve, 64)
        adcm = make_objective("adcm", 0.01, cfg, total, 0, ve, 64)
        ict = make_objective("ict", 0.01, cfg, total, 0, ve, 64)
        sct = make_objective("sct", 0.01, cfg, total, 0, trig, 64)
        assert ect.disc.stage_iters == total // 4  # type: ignore[attr-defined]
        assert adcm.disc.rebuild_every_iters == total // 4  # type: ignore[attr-defined]
        assert ict.disc.total_iters == total  # type: ignore[attr-defined]
        assert sct.warmup_iters == total // 40  # type: ignore[attr-defined]
        # ADCM rebuilds at 0, 25, 50 and 75 % of the run
        assert [
            s for s in range(total) if adcm.disc.rebuild_every_iters and s % adcm.disc.rebuild_every_iters == 0
        ] == [0, total // 4, total // 2, 3 * total // 4]  # type: ignore[attr-defined]


@pytest.mark.parametrize("total", [250, 333, 400, 1001])
def test_a_run_not_divisible_by_its_periods_keeps_four_rebuilds_and_four_ect_stages(total: int) -> None:
    """At 16 kimg (250 iterations of 64) a quarter of the run is 62.5 iterations: ADCM rebuilds at 0, 63, 125
    and 188 and ECT has four stages — not a fifth rebuild or stage at iteration 248, as a rounded period gave."""
    from adcm.method.ect import ect_r
    from adcm.processes import VEProcess
    from adcm.train.runs import make_objective

    cfg = _params(**{"train.ect.stage_fraction": 0.25, "train.adcm.rebuild_fraction": 0.25}).train
    ve = VEProcess()
    adcm = make_objective("adcm", 0.01, cfg, total, 0, ve, 64).disc
    ect = make_objective("ect", 0.01, cfg, total, 0, ve, 64).disc
    adcm._partitions = [(-1, torch.tensor([80.0, 0.002], dtype=torch.float64))]  # type: ignore[attr-defined]
    due = [s for s in range(total) if adcm.needs_rebuild(s)]  # type: ignore[attr-defined]
    assert len(due) == 4 and all(abs(s - k * total / 4) <= 0.5 for k, s in enumerate(due))
    t = torch.tensor([1.0], dtype=torch.float64)
    dts = [float((t - ect_r(t, s, ect.stage_iters))[0]) for s in range(total)]  # type: ignore[attr-defined]
    assert len(set(dts)) == 4 and dts[-1] == pytest.approx(dts[due[1]] / 4)  # q = 2: Δt halves at each new stage
    assert [s for s in range(1, total) if dts[s] != dts[s - 1]] == due[1:]
    if total == 250:
        assert due == [0, 63, 125, 188]
