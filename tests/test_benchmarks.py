"""The benchmark script runs (tiny network, one round) and writes its table's numbers; nothing is timed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_params, write_params


def _run_benchmark(script: str, tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run benchmarks/<script> with ``args`` in ``tmp_path``; it must succeed. Returns the process and the
    JSON it wrote to ``tmp_path / "out.json"`` (``--out`` is appended)."""
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_bench_script_writes_every_measurement(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params({"train.adcm.partition_batch_size": 2}))
    proc, result = _run_benchmark(
        "bench.py",
        tmp_path,
        [
            "--params",
            str(params),
            "--batch",
            "4",
            "--rounds",
            "1",
            "--iters",
            "1",
            "--jvps",
            "2",
            "--partition-points",
            "10",
        ],
    )
    assert result["batch"] == 4 and result["partition_batch"] == 2
    for key in (
        "diffusion step (EDM loss)",
        "ECT step",
        "iCT step",
        "ADCM step (partition given)",
        "sCT step (JVP + forward + backward)",
        "sampling, 1 step",
        "sampling, Heun 35 NFE (teacher)",
    ):
        assert result["img_per_s"][key] > 0, key
    assert {"adcm_over_ect_time_paper_period", "ct_over_diffusion_time", "rebuild_s"} <= set(result["ratios"])
    assert "ADCM/ECT time" in proc.stdout


@pytest.mark.slow
def test_eval_speed_script_writes_every_measurement(tmp_path: Path) -> None:
    """benchmarks/eval_speed.py on two images with the real Inception file (skipped without one)."""
    from adcm.eval.fid import FIDError, resolve_inception_weights

    try:
        resolve_inception_weights(None)
    except FIDError as err:
        pytest.skip(f"no Inception weights available: {err}")
    params = write_params(tmp_path / "params.yaml", tiny_params({}))
    _, result = _run_benchmark(
        "eval_speed.py",
        tmp_path,
        [
            "--params",
            str(params),
            "--rounds",
            "1",
            "--fid-images",
            "2",
            "--fid-batches",
            "1,2",
            "--sample-images",
            "2",
            "--sample-batches",
            "1,2",
            "--teacher-steps",
            "2",
        ],
    )
    assert set(result["fid_img_per_s"]) == {
        "batch 1, contiguous",
        "batch 1, channels_last",
        "batch 2, contiguous",
        "batch 2, channels_last",
    }
    assert set(result["sample_nfe_img_per_s"]) == {"batch 1", "batch 2"} and result["teacher_nfe"] == 3
    assert all(v > 0 for v in [*result["fid_img_per_s"].values(), *result["sample_nfe_img_per_s"].values()])


def test_dropout_benchmark_writes_both_implementations(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params({"train.dropout": 0.2}))
    args = ["--params", str(params), "--batch", "4", "--rounds", "1", "--iters", "1"]
    _, result = _run_benchmark("dropout.py", tmp_path, args)
    for method in ("ect", "adcm"):
        assert set(result["img_per_s"][method]) == {"pytorch (bernoulli_)", "adcm (16-bit levels)"}
        assert all(v > 0 for v in result["img_per_s"][method].values())
        assert result["speedup_median_of_round_ratios"][method] > 0
