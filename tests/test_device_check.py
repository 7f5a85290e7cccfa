"""benchmarks/device_check.py: the ``--smoke`` run (tiny networks, CPU, no dvc repro) writes every section and
prints the table, so the device check cannot rot before a GPU runs it; a failing or late section is recorded
and the others go on; the MFU peak table. Nothing is timed here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "device_check.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module
    spec.loader.exec_module(module)
    return module


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False, cwd=cwd, env=env
    )


def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = _run("--smoke", "--device", "cpu", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "adcm-device-check/1" and report["smoke"] is True
    sections = report["sections"]
    expected = ["environment", "steps", "checkpointing", "agreement", "adcm_rebuild", "sampling", "fid_features"]
    assert list(sections) == [*expected, "compiled"]  # no dvc repro with --smoke
    for name, entry in sections.items():
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))

    rows = sections["steps"]["result"]["rows"]
    table = {(r["network"], r["method"], r["mode"]): r for r in rows}
    for network in ("ddpmpp-tiny", "edm2-tiny"):
        for method in ("diffusion", "ect", "adcm", "sct"):
            for mode in ("fp32", "bf16"):
                row = table[(network, method, mode)]
                assert row["img_per_s"] > 0 and row["step_ms"] > 0 and row["peak_memory_mib"] > 0, row
                assert row["flops_per_step"] > 0 and row["mfu"] is None  # no peak FLOP/s for a CPU
        # the sCT step's JVP is counted: more FLOPs than ECT's target forward
        assert table[(network, "sct", "fp32")]["flops_per_step"] > table[(network, "ect", "fp32")]["flops_per_step"]
    assert table[("ddpmpp-tiny", "ect", "bf16+checkpointing")]["img_per_s"] > 0

    for method in ("ect", "sct"):
        a = sections["agreement"]["result"][method]
        assert a["steps"] == 4 and len(a["loss_bf16"]) == 4
        assert 0 < a["update_difference"] < 0.5 and a["max_abs_loss_diff_over_mean_abs_loss"] < 0.1

    rebuild = sections["adcm_rebuild"]["result"]
    assert rebuild["lam"] == 0.01 and rebuild["builder"] == "batched" and rebuild["points"] > 2
    assert rebuild["seconds"] > 0
    assert {k: v["nfe"] for k, v in sections["sampling"]["result"].items()} == {"1step": 1, "2step": 2, "heun35": 35}
    assert sections["fid_features"]["result"]["img_per_s"] > 0

    compiled = sections["compiled"]["result"]["rows"][0]
    assert compiled["mode"] == "bf16+compile" and compiled["compile_s"] > 0
    assert compiled["compiled_vs_eager"]["masks_match"] and compiled["compiled_vs_eager"]["dropout"] == 0.13

    summary = report["summary"]
    assert set(summary) == {f"ddpmpp_{m}_img_per_s" for m in ("ect", "adcm", "sct")} | {"mfu", "dvc_repro_s"}
    assert summary["ddpmpp_ect_img_per_s"]["measured"] > 0 and summary["ddpmpp_ect_img_per_s"]["met"] is None
    assert summary["dvc_repro_s"]["measured"] is None
    for text in ("device check", "≥2500", "≥1200", "target ≥ 30 %", "target ≤ 120", "bf16 vs fp32, SCT"):
        assert text in proc.stdout, text


def test_a_failing_or_late_section_is_recorded_and_the_next_runs(tmp_path: Path) -> None:
    dc = _module()
    out = tmp_path / "check.json"
    args = argparse.Namespace(
        smoke=True, device="cpu", budget_s=60.0, out=out, params=ROOT / "params.yaml", min_seconds=0.0
    )
    check = dc.Check(args)
    with check.section("broken", 10) as result:
        assert result is not None
        raise RuntimeError("boom\nsecond line")
    with check.section("late", 10) as result:
        check.need(20, "a long measurement")
    with check.section("fine", 10) as result:
        assert result is not None
        result["value"] = 1
    with check.section("starved", 10, reserve_s=1e6) as result:
        assert result is None
    sections = json.loads(out.read_text())["sections"]
    assert sections["broken"]["status"] == "failed" and sections["broken"]["error"] == "RuntimeError: boom"
    assert "RuntimeError" in sections["broken"]["traceback"]
    assert sections["late"]["status"] == "out of time" and "a long measurement" in sections["late"]["error"]
    assert sections["fine"] == {"status": "ok", "budget_s": 10.0, "seconds": 0.0, "result": {"value": 1}}
    assert sections["starved"]["status"] == "skipped"


def test_peak_flops_table() -> None:
    dc = _module()
    assert dc.peak_tflops("NVIDIA H200") == 989.0
    assert dc.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert dc.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert dc.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dc.peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert dc.cases(False)[0].kwargs["model_channels"] == 128 and dc.cases(False)[0].batch == 128
    assert dc.cases(False)[1].kwargs["model_channels"] == 192 and dc.cases(False)[1].shape == (3, 64, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _run("--device", "cuda", "--out", str(tmp_path / "x.json"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda was asked for but CUDA is not available on this machine"
    ]
    assert not (tmp_path / "x.json").exists()


def test_dvc_repro_section_runs_in_a_temporary_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline section with a stand-in for `dvc` (the real run takes minutes): it runs `dvc repro --force` in
    a temporary copy of the repository's files, records its wall time and metrics, and leaves the repository
    alone."""
    dc = _module()
    log = tmp_path / "calls.txt"
    fake = tmp_path / "dvc"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$PWD $*" >> {log}\n'
        'if [ "$1" = repro ]; then mkdir -p metrics && echo \'{"kimg": 25.6}\' > metrics/train.json; '
        "echo reproduced; fi\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(dc.shutil, "which", lambda name, path=None: str(fake) if name == "dvc" else None)
    repo_metrics = ROOT / "metrics" / "train.json"
    before = repo_metrics.read_bytes() if repo_metrics.exists() else None
    args = argparse.Namespace(
        smoke=False, device="cpu", budget_s=120.0, out=tmp_path / "c.json", params=ROOT / "params.yaml", min_seconds=0
    )
    check = dc.Check(args)
    with check.section("dvc_repro", 100) as result:
        assert result is not None
        dc.section_dvc_repro(check, result)
    entry = json.loads((tmp_path / "c.json").read_text())["sections"]["dvc_repro"]
    if entry["status"] == "failed" and "prepare.source" in entry["error"]:
        pytest.skip("the embedded default's dataset is not installed here")
    assert entry["status"] == "ok", entry
    res = entry["result"]
    assert res["returncode"] == 0 and res["metrics_train"] == {"kimg": 25.6} and "reproduced" in res["log_tail"]
    assert res["file_list"] == "git ls-files" and res["files"] > 100
    cwd, command = log.read_text().split(" ", 1)
    assert command.strip() == "repro --force"
    assert Path(cwd) != ROOT and not Path(cwd).exists()  # a temporary copy, removed afterwards
    assert (repo_metrics.read_bytes() if repo_metrics.exists() else None) == before


def test_file_list_without_git_leaves_out_the_pipeline_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    dc = _module()

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(dc.subprocess, "run", no_git)
    files, how = dc._repo_files()
    assert how == "walk (no git)"
    names = {str(p) for p in files}
    assert {"dvc.yaml", "params.yaml", "benchmarks/device_check.py"} <= names
    outputs = (".git/", ".venv/", "checkpoints/", "models/", "dvclive/", "samples/")
    assert not any(n.startswith(outputs) and not n.endswith(".gitignore") for n in names)
    assert "metrics/train.json" not in names and "data/prepared/dataset.npz" not in names
