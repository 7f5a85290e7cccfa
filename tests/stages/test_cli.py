"""The `adcm` command line: help texts, strict params (exit 2, one line), prepare and teacher stages."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, repo_params, set_key, tiny_params, write_params
from typer.testing import CliRunner

from adcm.config import load_params
from adcm.io.model_files import load_teacher
from adcm.stages.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_repository_params_are_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.lam == 0.01 and params.method == "adcm"


def test_help_lists_commands_and_every_teacher_key() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "prepare" in result.output and "teacher" in result.output
    result = invoke("teacher", "--help")
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    for key in (
        "teacher.duration_kimg",
        "teacher.ema_halflife_kimg",
        "teacher.sampler.num_steps",
        "teacher.network.attn_resolutions",
        "teacher.sha256",
        "--on-config-change",
        "--fresh",
    ):
        assert key in flat, key
    assert "thousands of images" in flat


def test_python_dash_m_adcm_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "adcm", "--help"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "teacher" in proc.stdout


_LOADED = """
import sys
from adcm.stages.cli import main
sys.argv = ["adcm", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    print("exit", exc.code, file=sys.stderr)
heavy = ("torch", "numpy", "cleanfid", "torchvision", "scipy")
print("loaded:", *(m for m in heavy if m in sys.modules))
"""


def run_cli_and_list_heavy_modules(*args: str) -> tuple[str, str]:
    """(stdout, stderr) of `adcm ARGS` in a fresh interpreter; stdout ends with the heavy modules it loaded."""
    proc = subprocess.run([sys.executable, "-c", _LOADED, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["score", "--help"], ["study", "run", "--help"]])
def test_help_loads_neither_torch_nor_the_library(args: list[str]) -> None:
    """Each stage imports the library inside its command: `adcm … --help` starts in a fraction of a second."""
    out, err = run_cli_and_list_heavy_modules(*args)
    assert "exit 0" in err and "Usage" in out
    assert out.splitlines()[-1] == "loaded:"


def test_a_bad_key_is_refused_before_the_library_loads(tmp_path: Path) -> None:
    data = tiny_params()
    set_key(data, "train.lr", -1.0)
    params = str(write_params(tmp_path / "p.yaml", data))
    study = tmp_path / "study.yaml"
    study.write_text("arms: 3\n")
    for args, needle in [
        (["train", "--params", params], "train.lr"),
        (["schedule", "--params", params], "train.lr"),
        (["study", "plan", "--study", str(study)], "study.yaml"),
        (["study", "report", "--study", str(study)], "study.yaml"),
    ]:
        out, err = run_cli_and_list_heavy_modules(*args)
        assert "exit 2" in err and needle in err, (args, err)
        assert out.splitlines()[-1] == "loaded:", args


def test_scoring_leaves_torchvision_out() -> None:
    """clean-fid's `cleanfid.fid` (it loads torchvision, ≈ 3 s) is imported only by the parity check that uses it."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import adcm.eval.fid, adcm.eval.metrics, adcm.eval.reference\n"
        "print('torchvision' in sys.modules, 'cleanfid.fid' in sys.modules)\n"
        "adcm.eval.fid.cleanfid_frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))\n"
        "print('cleanfid.fid' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.split() == ["False", "False", "True"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"lamda": 0.01}, "unknown key 'lamda' (did you mean 'lambda'?)"),
        ({"lambda": -0.1}, "lambda: expected a number ≥ 0, got -0.1"),
        ({"lambda": "big"}, "lambda: expected a number"),
        ({"method": "sgd"}, "method: expected one of 'adcm', 'ect', 'ict', 'sct'"),
        ({"process": "vp"}, "process: expected one of 've', 'fm', 'trigflow'"),
        ({"processes.fm.t_max": 1.0}, "processes.fm.t_max: expected < 1"),
        ({"processes.trigflow.t_max": 1.6}, "processes.trigflow.t_max: expected < 1.5708"),
        ({"processes.ve.eps": 100.0}, "processes.ve.eps: expected < processes.ve.t_max"),
        ({"process": "fm", "teacher.source": "file", "teacher.file": "x.pkl"}, "process: 'fm' needs teacher.source"),
        ({"sample.t_mid.sct": 0.0001}, "sample.t_mid.sct: expected a σ between"),
        ({"train.sct.tangent_norm_c": -1}, "train.sct.tangent_norm_c: expected a number ≥ 0"),
        ({"prepare.dataset": "mnist"}, "prepare.dataset: expected one of"),
        ({"teacher.batch_size": 0}, "teacher.batch_size: expected an integer > 0, got 0"),
        ({"teacher.network.channel_mult": []}, "teacher.network.channel_mult"),
        ({"teacher.source": "url", "teacher.sha256": None}, "teacher.sha256"),
        ({"teacher.batch_per_step": 24}, "teacher.batch_per_step: expected a divisor"),
        ({"teacher.network.dropout": 1.5}, "teacher.network.dropout"),
        (
            {"teacher.network.model_channels": 48},
            "teacher.network.model_channels: 48 × channel_mult [1, 2, 2] gives a 144",
        ),
    ],
)
def test_bad_params_exit_2_with_one_line(tmp_path: Path, change: dict, needle: str) -> None:
    data = repo_params()
    for key, value in change.items():
        if key == "lamda":
            del data["lambda"]
            data["lamda"] = value
        else:
            set_key(data, key, value)
    path = write_params(tmp_path / "params.yaml", data)
    for command in ("prepare", "teacher"):
        result = runner.invoke(app, [command, "--params", str(path)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert needle in lines[0], lines[0]
        assert "Traceback" not in result.output
    assert not (tmp_path / "data").exists()


def test_missing_key_and_missing_file_exit_2(tmp_path: Path) -> None:
    data = repo_params()
    del data["teacher"]["p_std"]
    path = write_params(tmp_path / "params.yaml", data)
    result = runner.invoke(app, ["teacher", "--params", str(path)])
    assert result.exit_code == 2 and "missing key 'teacher.p_std'" in result.output
    result = runner.invoke(app, ["prepare", "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "params file not found" in result.output


def test_bad_params_via_subprocess_print_no_traceback(tmp_path: Path) -> None:
    data = repo_params()
    data["lambda"] = -1
    path = write_params(tmp_path / "params.yaml", data)
    proc = subprocess.run(
        [sys.executable, "-m", "adcm", "teacher", "--params", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "lambda" in proc.stderr and "Traceback" not in proc.stderr


def _write_idx(directory: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, :2, :] = 0
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    (directory / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    )
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", 0x801, n) + labels.tobytes())
    )


def test_prepare_command_pads_fashion_mnist_to_32(tmp_path: Path) -> None:
    _write_idx(tmp_path / "fm", 12)
    data = repo_params()
    set_key(data, "prepare.source", str(tmp_path / "fm"))
    path = write_params(tmp_path / "params.yaml", data)
    result = runner.invoke(app, ["prepare", "--params", str(path), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert (meta["resolution"], meta["channels"], meta["count"], meta["num_classes"]) == (32, 1, 12, 10)
    with np.load(tmp_path / "out" / "dataset.npz") as arrays:
        assert arrays["images"].shape == (12, 1, 32, 32)
        assert (arrays["images"][:, :, :2, :] == 0).all()


def test_prepare_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    data = repo_params()
    set_key(data, "prepare.source", str(tmp_path / "absent"))
    path = write_params(tmp_path / "params.yaml", data)
    result = runner.invoke(app, ["prepare", "--params", str(path), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "absent" in result.output and "not found" in result.output
    assert not (tmp_path / "out").exists()


def _teacher_args(tmp_path: Path, params: Path, data: Path, *extra: str) -> list[str]:
    return [
        "teacher",
        "--params",
        str(params),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "teacher.pt"),
        "--grid",
        str(tmp_path / "grid.png"),
        "--metrics",
        str(tmp_path / "teacher.json"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--log-dir",
        str(tmp_path / "live"),
        "--no-progress",
        *extra,
    ]


def test_teacher_command_trains_resumes_and_refuses_other_config(tmp_path: Path, prepared: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params())
    result = runner.invoke(app, _teacher_args(tmp_path, params, prepared))
    assert result.exit_code == 0, result.output
    teacher = load_teacher(tmp_path / "teacher.pt")
    torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert teacher.network_kwargs["img_resolution"] == 8 and teacher.meta["source"] == "train"
    metrics = json.loads((tmp_path / "teacher.json").read_text())
    assert metrics["kimg"] == pytest.approx(0.096) and metrics["grid_nfe"] == 5
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert (tmp_path / "live" / "metrics.json").exists()

    # Longer duration with the same params: resumes from the checkpoint.
    longer = tiny_params({"teacher.duration_kimg": 0.128})
    write_params(params, longer)
    result = runner.invoke(app, _teacher_args(tmp_path, params, prepared))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "teacher.json").read_text())["resumed_from_kimg"] == pytest.approx(0.096)

    # Other hyperparameters: refused with one line, or restarted on request.
    write_params(params, tiny_params({"teacher.duration_kimg": 0.128, "teacher.lr": 1e-3}))
    result = runner.invoke(app, _teacher_args(tmp_path, params, prepared))
    assert result.exit_code == 2 and "--fresh" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, _teacher_args(tmp_path, params, prepared, "--on-config-change", "restart"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "teacher.json").read_text())["resumed_from_kimg"] == 0


def test_teacher_file_source_missing_file(tmp_path: Path, prepared: Path) -> None:
    params = write_params(
        tmp_path / "params.yaml", tiny_params({"teacher.source": "file", "teacher.file": str(tmp_path / "edm.pkl")})
    )
    result = runner.invoke(app, _teacher_args(tmp_path, params, prepared))
    assert result.exit_code == 2 and "edm.pkl" in result.output and "not found" in result.output
    assert not (tmp_path / "teacher.pt").exists()


def test_yaml_written_by_tests_round_trips() -> None:
    assert yaml.safe_load(yaml.safe_dump(tiny_params()))["teacher"]["batch_size"] == 16
