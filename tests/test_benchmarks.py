"""The benchmark script runs (tiny network, one round) and writes its table's numbers; nothing is timed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, tiny_params, write_params


def test_bench_script_writes_every_measurement(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params({"train.adcm.partition_batch_size": 2}))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
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
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
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
