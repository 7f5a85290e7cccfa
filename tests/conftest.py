"""Shared fixtures: the repository's params.yaml shrunk to tiny sizes, synthetic prepared data."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from adcm.io.datasets import ImageDataset, write_prepared

ROOT = Path(__file__).resolve().parent.parent


def repo_params() -> dict[str, Any]:
    """The repository's params.yaml as plain data."""
    from adcm.config import _Loader

    return yaml.load((ROOT / "params.yaml").read_text(), Loader=_Loader)


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts."""
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


TINY: dict[str, Any] = {
    "prepare.resolution": 8,
    "teacher.source": "train",  # tests train their tiny teachers (the repository default imports a shipped one)
    "teacher.device": "cpu",
    "teacher.network.model_channels": 8,
    "teacher.network.channel_mult": [1, 2],
    "teacher.network.channel_mult_emb": 2,
    "teacher.network.attn_resolutions": [4],
    "teacher.network.dropout": 0.2,
    "teacher.duration_kimg": 0.096,
    "teacher.batch_size": 16,
    "teacher.batch_per_step": 8,
    "teacher.lr_rampup_kimg": 0.032,
    "teacher.ema_halflife_kimg": 0.05,
    "teacher.checkpoint_every_kimg": 0.032,
    "teacher.log_every_kimg": 0.016,
    "teacher.sampler.num_steps": 3,
    "teacher.sampler.grid_rows": 2,
    "score.reference_file": None,  # tests compute their references (the repository default uses a shipped one)
}


TRAIN_TINY: dict[str, Any] = {
    "train.device": "cpu",
    "train.duration_kimg": 0.064,  # 4 iterations of 16
    "train.batch_size": 16,
    "train.batch_per_step": 8,
    "train.lr": 1e-3,
    "train.ema_halflife_kimg": 0.02,
    "train.grid_every_kimg": 0.032,
    "train.checkpoint_every_kimg": 0.016,
    "train.log_every_kimg": 0.016,
    "train.adcm.rebuild_fraction": 0.5,
    "train.adcm.partition": "sequential",  # Algorithm 1: the reference of the regression data and DDP tests
    "train.adcm.partition_batch_size": 4,
    "train.ect.stage_fraction": 0.5,
    "train.sct.warmup_fraction": 0.5,
    "train.sct.weight_channels": 8,
    "lambda": 0.5,
}
"""Consistency training at tiny sizes (with TINY): 4 iterations, every period and schedule within them."""


EDM2_TINY: dict[str, Any] = dict(
    img_resolution=8,
    img_channels=1,
    label_dim=0,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=8,
    dropout=0.2,
    use_fp16=False,
    logvar_channels=16,
)
"""A tiny EDM2 network (``EDM2Precond`` settings) for tests."""


def tiny_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's params with tiny sizes, plus ``overrides`` (dotted keys)."""
    data = copy.deepcopy(repo_params())
    for key, value in {**TINY, **(overrides or {})}.items():
        set_key(data, key, value)
    return data


def write_params(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def synthetic_dataset(n: int = 64, channels: int = 1, resolution: int = 8, classes: int = 3) -> ImageDataset:
    """Seeded random blobs with labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, channels, resolution, resolution), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    return ImageDataset(images, labels, "synthetic", [f"c{i}" for i in range(classes)])


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A prepared synthetic dataset (dataset.npz + dataset.json) in tmp_path/data."""
    out = tmp_path / "data"
    out.mkdir()
    write_prepared(synthetic_dataset(), out / "dataset.npz", out / "dataset.json")
    return out / "dataset.npz"
