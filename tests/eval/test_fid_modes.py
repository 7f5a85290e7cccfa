"""clean-fid's ``legacy_tensorflow`` mode beside ``clean``, streamed statistics, and reference files that
record their mode (:mod:`adcm.eval.fid`, :mod:`adcm.eval.reference`, ``adcm score``).

The legacy mode's resize lives, in clean-fid, inside NVIDIA's Inception TorchScript
(``forward(x, return_features=True)``): an ``affine_grid`` whose translation is shifted by
``1/in − 1/299`` (normalised units) and a bilinear ``grid_sample`` with border padding, i.e. TensorFlow 1's
``ResizeBilinear`` without half-pixel centres. :class:`_TorchScriptForward` restates that formulation
as the test's oracle; it is fed through clean-fid's own ``InceptionV3W.forward(resize_inside=True)``
and clean-fid's own folder pipeline (``compute_fid(mode="legacy_tensorflow")``), and the features are
compared with ours. With NVIDIA's file cached at /tmp/inception-2015-12-05.pt, clean-fid's untouched
extractor is compared too.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import cleanfid.downloads_helper
import cleanfid.inception_torchscript
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid.fid import compute_fid, get_folder_features
from cleanfid.inception_torchscript import InceptionV3W
from conftest import tiny_params, write_params
from PIL import Image
from typer.testing import CliRunner

from adcm.errors import DatasetError
from adcm.eval import fid
from adcm.eval.fid import (
    FeatureAccumulator,
    FIDError,
    build_extractor,
    feature_stats,
    identity_mode,
    image_features,
    iter_image_features,
    legacy_tensorflow_resize,
    load_stats,
    resolve_inception_weights,
    weights_identity,
)
from adcm.eval.reference import (
    Reference,
    compute_reference,
    held_out_images,
    load_precomputed,
    load_reference,
    obtain_reference,
    write_precomputed,
)
from adcm.io.datasets import ImageDataset, write_prepared
from adcm.stages.cli import app

CPU = torch.device("cpu")


def noise_images(seed: int, n: int, channels: int = 3, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def blocky_images(seed: int, n: int, channels: int = 3, size: int = 32, block: int = 8) -> np.ndarray:
    return noise_images(seed, n, channels, size // block).repeat(block, axis=2).repeat(block, axis=3)


def write_pngs(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    return folder


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"download attempted: {args}")


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", _refuse)
    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", _refuse)
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", _refuse)


# --------------------------------------------------------------------------------------------------
# The oracle: NVIDIA's TorchScript forward, restated, inside clean-fid's InceptionV3W
# --------------------------------------------------------------------------------------------------


class _TorchScriptForward(torch.nn.Module):
    """``forward(img, return_features)`` of inception-2015-12-05.pt as clean-fid's legacy mode calls it."""

    def __init__(self, layers: torch.nn.Module) -> None:
        super().__init__()
        self.layers = layers

    @staticmethod
    def resize(img: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat(batch, 1, 1), [batch, channels, 299, 299], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features
        return self.layers((self.resize(img) - 128) / 128).reshape(-1, 2048)


def _clean_fid_legacy_model(layers: torch.nn.Module) -> InceptionV3W:
    """clean-fid's own ``InceptionV3W`` with ``resize_inside=True`` around the oracle (no file, no download)."""
    model = InceptionV3W.__new__(InceptionV3W)
    torch.nn.Module.__init__(model)
    model.base = _TorchScriptForward(layers)
    model.layers = layers
    model.resize_inside = True
    return model.eval()


class _Layers(torch.nn.Module):
    """A small seeded stand-in for Inception's layers: (B, 3, 299, 299) → (B, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 7, stride=4), torch.nn.Tanh(), torch.nn.Conv2d(16, 2048, 5, stride=4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3), keepdim=True)


class _NvidiaLayout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _theirs(layers: torch.nn.Module, sets: list[np.ndarray], tmp_path: Path) -> np.ndarray:
    """Features from clean-fid's own ``get_folder_features(mode="legacy_tensorflow")`` on PNG folders of ``sets``
    (what ``compute_fid`` computes before the distance), through ``InceptionV3W(resize_inside=True)``."""
    model = _clean_fid_legacy_model(layers)
    feats = []
    for i, images in enumerate(sets):
        folder = write_pngs(images, tmp_path / f"set{i}")
        feats.append(
            get_folder_features(
                str(folder), model, num_workers=0, batch_size=6, device=CPU, mode="legacy_tensorflow", verbose=False
            )
        )
    return np.concatenate(feats)


# --------------------------------------------------------------------------------------------------
# The resize
# --------------------------------------------------------------------------------------------------


def test_legacy_resize_is_tensorflow1_bilinear() -> None:
    x = torch.tensor([[0.0, 10.0]]).expand(2, 2)[None, None]
    np.testing.assert_array_equal(legacy_tensorflow_resize(x, 4)[0, 0, 0].numpy(), [0, 5, 10, 10])  # j·in/out
    big = torch.arange(598 * 598, dtype=torch.float32).reshape(1, 1, 598, 598) % 251
    np.testing.assert_array_equal(legacy_tensorflow_resize(big).numpy(), big[..., ::2, ::2].numpy())  # no antialias
    same = torch.from_numpy(noise_images(0, 1, size=299))
    np.testing.assert_array_equal(legacy_tensorflow_resize(same).numpy(), same.float().numpy())


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (28, 40), (299, 299), (512, 400)])
def test_legacy_resize_matches_the_torchscript_formulation(size: tuple[int, int]) -> None:
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, *size), dtype=np.uint8))
    theirs = _TorchScriptForward.resize(images)
    ours = legacy_tensorflow_resize(images)
    assert ours.shape == theirs.shape == (2, 3, 299, 299)
    # Only float32 round-off of the sampling positions differs (grid_sample's are computed, ours exact).
    assert float((ours - theirs).abs().max()) < 0.02


# --------------------------------------------------------------------------------------------------
# Features against clean-fid's legacy_tensorflow code path
# --------------------------------------------------------------------------------------------------


def test_legacy_features_match_clean_fid_pipeline(tmp_path: Path, no_download: None) -> None:
    """Tiny stand-in layers: clean-fid's folder pipeline + InceptionV3W(resize_inside) vs our extractor."""
    path = tmp_path / "nvidia-layout.pt"
    torch.jit.save(torch.jit.script(_NvidiaLayout()), str(path))
    set1, set2 = noise_images(2, 9), blocky_images(3, 9, channels=1)
    theirs = _theirs(_Layers(), [set1, set2], tmp_path)
    extractor = build_extractor(path, CPU, "legacy_tensorflow")
    assert extractor.mode == "legacy_tensorflow"
    ours = np.concatenate([image_features(set1, extractor, 4, CPU), image_features(set2, extractor, 4, CPU)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
    clean = np.concatenate([image_features(s, build_extractor(path, CPU), 4, CPU) for s in (set1, set2)])
    assert np.abs(clean - theirs).max() > 100 * np.abs(ours - theirs).max()  # the test tells the modes apart


def _helper_layers() -> torch.nn.Module:
    weights, _ = resolve_inception_weights(None)
    base = torch.jit.load(str(weights), map_location="cpu").eval()
    return base.layers if hasattr(base, "layers") else base.net.layers


@pytest.mark.slow
def test_legacy_features_match_clean_fid_with_real_inception(tmp_path: Path, no_download: None) -> None:
    """The real Inception layers (6 RGB noise + 6 grayscale block images, 32×32): features within 1e-4."""
    try:
        weights, identity = resolve_inception_weights(None, "legacy_tensorflow")
    except FIDError as err:
        pytest.skip(f"no Inception weights: {err}")
    set1, set2 = noise_images(4, 6), blocky_images(5, 6, channels=1)
    theirs = _theirs(_helper_layers(), [set1, set2], tmp_path)
    extractor = build_extractor(weights, CPU, "legacy_tensorflow")
    ours = np.concatenate([image_features(set1, extractor, 6, CPU), image_features(set2, extractor, 6, CPU)])
    assert "mode=legacy_tensorflow" in identity
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 1e-4 * scale, np.abs(ours - theirs).max() / scale


@pytest.mark.slow
@pytest.mark.skipif(
    not fid.CLEANFID_INCEPTION_PATH.is_file(),
    reason=f"clean-fid's own cached file {fid.CLEANFID_INCEPTION_PATH} is absent (never downloaded here)",
)
def test_legacy_fid_matches_clean_fid_own_extractor(tmp_path: Path, no_download: None) -> None:
    """With NVIDIA's file present: clean-fid's untouched compute_fid(mode="legacy_tensorflow") vs ours."""
    set1, set2 = noise_images(6, 8), blocky_images(7, 8)
    dirs = [write_pngs(s, tmp_path / f"s{i}") for i, s in enumerate((set1, set2))]
    theirs = float(
        compute_fid(
            str(dirs[0]),
            str(dirs[1]),
            mode="legacy_tensorflow",
            device=CPU,
            num_workers=0,
            batch_size=8,
            verbose=False,
            use_dataparallel=False,
        )
    )
    weights, _ = resolve_inception_weights(None, "legacy_tensorflow")
    extractor = build_extractor(weights, CPU, "legacy_tensorflow")
    ours = fid.frechet_distance(
        *feature_stats(image_features(set1, extractor, 8, CPU)), *feature_stats(image_features(set2, extractor, 8, CPU))
    )
    assert ours == pytest.approx(theirs, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# Identity, statistics in constant memory, reference files that record their mode
# --------------------------------------------------------------------------------------------------


def test_identity_names_the_mode() -> None:
    clean, legacy = weights_identity("ab12"), weights_identity("ab12", "legacy_tensorflow")
    assert clean == "clean-fid inception-2015-12-05 mode=clean (sha1 ab12)"  # unchanged: old references stay valid
    assert identity_mode(clean) == "clean" and identity_mode(legacy) == "legacy_tensorflow"
    assert identity_mode("ext-A") is None
    with pytest.raises(FIDError, match="unknown FID mode 'tf'"):
        weights_identity("ab12", "tf")  # type: ignore[arg-type]
    with pytest.raises(FIDError, match="unknown FID mode"):
        build_extractor(Path("/nonexistent.pt"), CPU, "legacy_pytorch")  # type: ignore[arg-type]


def test_feature_accumulator_equals_numpy_cov() -> None:
    rng = np.random.default_rng(8)
    feats = np.abs(rng.normal(size=(1003, 16)) @ rng.normal(size=(16, 16))) + 3.0
    acc = FeatureAccumulator()
    for start, stop in [(0, 1), (1, 50), (50, 50), (50, 999), (999, 1003)]:
        acc.add(feats[start:stop])
    mu, sigma = acc.stats()
    ref_mu, ref_sigma = feature_stats(feats)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-12 * np.abs(ref_sigma).max())
    with pytest.raises(FIDError, match="at least 2"):
        FeatureAccumulator().stats()


class _PoolExtractor:
    """Cheap stand-in features: (B, 3, 299, 299) → (B, 6) channel means and standard deviations."""

    def __init__(self, mode: str = "clean") -> None:
        self.mode = mode

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = legacy_tensorflow_resize(images) if self.mode == "legacy_tensorflow" else images.float()
        assert x.shape[1:] == (3, 299, 299)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture
def prepared_8px(tmp_path: Path) -> Path:
    images = np.random.default_rng(9).integers(0, 256, (30, 3, 8, 8), dtype=np.uint8)
    path = tmp_path / "dataset.npz"
    write_prepared(ImageDataset(images, None, "x", None), path, tmp_path / "dataset.json")
    return path


def test_reference_keeps_a_bounded_sample_of_features(prepared_8px: Path, tmp_path: Path) -> None:
    identity = weights_identity("ab12")
    full = compute_reference(
        tmp_path / "a.npz", prepared_8px, None, _PoolExtractor(), identity, batch_size=7, device=CPU
    )
    capped = compute_reference(
        tmp_path / "b.npz",
        prepared_8px,
        None,
        _PoolExtractor(),
        identity,
        batch_size=7,
        device=CPU,
        max_kept_features=10,
    )
    assert full.count == capped.count == 30 and full.features.shape == (30, 6) and capped.features.shape == (10, 6)
    np.testing.assert_allclose(capped.mu, full.mu, rtol=1e-6)  # full: of the stored float32 features
    np.testing.assert_allclose(capped.sigma, full.sigma, rtol=1e-5, atol=1e-9)
    assert all(any(np.array_equal(row, other) for other in full.features) for row in capped.features)
    _, _, meta = load_stats(tmp_path / "b.npz", expected_extractor=identity)
    assert meta["fid_mode"] == "clean" and meta["count"] == 30 and meta["kept_features"] == 10
    with pytest.raises(FIDError, match="needs every feature"):  # its statistics would not follow from its features
        write_precomputed(tmp_path / "capped.npz", capped)
    loaded = load_reference(tmp_path / "b.npz", prepared_8px, None, identity)
    np.testing.assert_allclose(loaded.features, capped.features, rtol=1e-6)  # stored as float32
    assert held_out_images(prepared_8px, 20, 10).flags.writeable
    with pytest.raises(DatasetError, match="do not fit"):
        held_out_images(prepared_8px, None, 1)
    all_feats = np.concatenate(list(iter_image_features(np.load(prepared_8px)["images"], _PoolExtractor(), 7, CPU)))
    assert np.array_equal(feature_stats(all_feats.astype(np.float32))[1], full.sigma)


def test_reference_made_in_another_mode_is_refused(prepared_8px: Path, tmp_path: Path) -> None:
    clean, legacy = weights_identity("ab12"), weights_identity("ab12", "legacy_tensorflow")
    ref = tmp_path / "ref.npz"
    compute_reference(ref, prepared_8px, 20, _PoolExtractor(), clean, batch_size=8, device=CPU)
    with pytest.raises(FIDError, match=r"made in FID mode clean, but score\.fid_mode is legacy_tensorflow"):
        load_reference(ref, prepared_8px, 20, legacy)
    with pytest.raises(FIDError, match="another FID mode"):
        compute_reference(ref, prepared_8px, 20, _PoolExtractor("legacy_tensorflow"), clean, batch_size=8, device=CPU)
    made = compute_reference(
        ref, prepared_8px, 20, _PoolExtractor("legacy_tensorflow"), legacy, batch_size=8, device=CPU
    )
    assert load_reference(ref, prepared_8px, 20, legacy).count == made.count == 20
    with pytest.raises(FIDError, match=r"made in FID mode legacy_tensorflow, but score\.fid_mode is clean"):
        load_reference(ref, prepared_8px, 20, clean)
    with pytest.raises(FIDError, match="another extractor"):
        load_reference(ref, prepared_8px, 20, weights_identity("cd34", "legacy_tensorflow"))


def test_score_command_refuses_a_reference_of_another_mode(prepared_8px: Path, tmp_path: Path) -> None:
    """`adcm score -S score.fid_mode=legacy_tensorflow` with a reference made in clean mode: exit 2, one line."""
    try:
        _, identity = resolve_inception_weights(None)
    except FIDError as err:
        pytest.skip(f"no Inception weights: {err}")
    ref = tmp_path / "ref.npz"
    compute_reference(ref, prepared_8px, 20, _PoolExtractor(), identity, batch_size=8, device=CPU)
    samples = tmp_path / "s.npz"
    np.savez(samples, images=noise_images(10, 4, size=8))
    params = write_params(tmp_path / "params.yaml", tiny_params({"score.reference_count": 20, "score.device": "cpu"}))
    args = ["score", "--params", str(params), "--data", str(prepared_8px), "--ref-stats", str(ref), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--samples", f"x={samples}", "-S", "score.fid_mode=legacy_tensorflow"])
    assert result.exit_code == 2, result.output
    assert "made in FID mode clean, but score.fid_mode is legacy_tensorflow" in result.output
    assert "adcm reference" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(app, [*args, "--samples", f"x={samples}", "-S", "score.fid_mode=tf"])
    assert bad.exit_code == 2 and "fid_mode" in bad.output


def test_paper_protocol_is_expressible(tmp_path: Path) -> None:
    """50,000 samples against the statistics of the whole training set, in legacy_tensorflow mode."""
    from adcm.config import load_params

    params = write_params(
        tmp_path / "params.yaml",
        tiny_params({"sample.num_images": 50000, "score.reference_count": None, "score.fid_mode": "legacy_tensorflow"}),
    )
    loaded = load_params(params)
    assert (loaded.sample.num_images, loaded.score.reference_count, loaded.score.fid_mode) == (
        50000,
        None,
        "legacy_tensorflow",
    )


class _CountingExtractor(_PoolExtractor):
    """A stand-in extractor that counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return super().__call__(images)


def test_reference_holds_the_floor_features(prepared_8px: Path, tmp_path: Path) -> None:
    identity = weights_identity("ab12")
    calls: list[tuple[int, int]] = []
    ref = compute_reference(
        tmp_path / "r.npz",
        prepared_8px,
        20,
        _PoolExtractor(),
        identity,
        batch_size=7,
        device=CPU,
        floor_count=6,
        progress=lambda done, total: calls.append((done, total)),
    )
    floor = np.concatenate(list(iter_image_features(held_out_images(prepared_8px, 20, 6), _PoolExtractor(), 7, CPU)))
    assert ref.floor_features is not None and np.array_equal(ref.floor_features, floor.astype(np.float32))
    assert calls[-1] == (26, 26) and all(total == 26 for _, total in calls)
    loaded = load_reference(tmp_path / "r.npz", prepared_8px, 20, identity, floor_count=6)
    assert loaded.floor_features is not None and np.array_equal(loaded.floor_features, ref.floor_features)
    assert load_reference(tmp_path / "r.npz", prepared_8px, 20, identity).floor_features is None  # not asked for
    with pytest.raises(FIDError, match=r"made with 6 floor images, not score\.floor_images 5"):
        load_reference(tmp_path / "r.npz", prepared_8px, 20, identity, floor_count=5)
    counting = _CountingExtractor()
    with pytest.raises(DatasetError, match="do not fit"):  # refused before any feature is extracted
        compute_reference(
            tmp_path / "x.npz", prepared_8px, 20, counting, identity, batch_size=7, device=CPU, floor_count=11
        )
    assert counting.seen == 0 and not (tmp_path / "x.npz").exists()


def _computed(prepared: Path, out: Path, count: int = 20, floor: int = 6) -> Reference:
    return compute_reference(
        out, prepared, count, _PoolExtractor(), weights_identity("ab12"), batch_size=7, device=CPU, floor_count=floor
    )


def test_precomputed_reference_is_the_computed_one(prepared_8px: Path, tmp_path: Path) -> None:
    """Written features turn back into the same statistics and file, without an extractor."""
    identity = weights_identity("ab12")
    ref = _computed(prepared_8px, tmp_path / "computed.npz")
    write_precomputed(tmp_path / "pre.npz", ref)

    def no_extractor() -> _PoolExtractor:
        raise AssertionError("the precomputed reference fits: nothing to extract")

    got, how = obtain_reference(
        tmp_path / "obtained.npz",
        prepared_8px,
        20,
        no_extractor,
        identity,
        batch_size=7,
        device=CPU,
        floor_count=6,
        precomputed=tmp_path / "pre.npz",
    )
    assert how.startswith("the precomputed")
    assert np.array_equal(got.mu, ref.mu) and np.array_equal(got.sigma, ref.sigma)
    assert (tmp_path / "obtained.npz").read_bytes() == (tmp_path / "computed.npz").read_bytes()
    # Another count, floor, extractor or data: computed, and the reason is given.
    for count, floor, ident, reason in (
        (21, 6, identity, "another count_requested"),
        (20, 5, identity, "another floor_count"),
        (20, 6, weights_identity("cd34"), "another extractor"),
    ):
        found = load_precomputed(tmp_path / "pre.npz", prepared_8px, count, ident, floor)
        assert isinstance(found, str) and reason in found
    other = tmp_path / "other.npz"
    write_prepared(ImageDataset(np.zeros((30, 3, 8, 8), np.uint8), None, "x", None), other, tmp_path / "other.json")
    got, how = obtain_reference(
        tmp_path / "o.npz",
        other,
        20,
        _PoolExtractor,
        identity,
        batch_size=7,
        device=CPU,
        floor_count=6,
        precomputed=tmp_path / "pre.npz",
    )
    assert how.startswith("computed (") and "another data_sha256" in how and got.count == 20


def test_hostile_precomputed_files_are_refused(prepared_8px: Path, tmp_path: Path) -> None:
    identity = weights_identity("ab12")
    ref = _computed(prepared_8px, tmp_path / "computed.npz")
    write_precomputed(tmp_path / "pre.npz", ref)
    with np.load(tmp_path / "pre.npz") as archive:
        good = {k: archive[k] for k in archive.files}

    def attempt(name: str, **arrays: np.ndarray) -> str:
        path = tmp_path / f"{name}.npz"
        np.savez_compressed(path, **{**good, **arrays})
        with pytest.raises(FIDError) as err:
            load_precomputed(path, prepared_8px, 20, identity, 6)
        return str(err.value)

    assert "NaN or inf" in attempt("nan", features=np.full((20, 6), np.nan, np.float32))
    assert "float32" in attempt("f64", features=good["features"].astype(np.float64))
    assert "float32 of 6 rows" in attempt("rows", floor_features=good["floor_features"][:3])
    assert "not JSON" in attempt("json", meta=np.array("{not json"))
    assert "JSON object" in attempt("list", meta=np.array("[1, 2]"))
    assert "'meta' is not a JSON string" in attempt("long", meta=np.array("x" * 5000))
    assert "'meta' is not a JSON string" in attempt("bytes", meta=np.zeros(3))
    assert "nested too deeply" in attempt("deep", meta=np.array('{"a":' + "[" * 2000 + "]" * 2000 + "}"))
    meta = json.loads(str(good["meta"]))
    fewer = json.dumps({**meta, "count": 19, "kept_features": 19})  # the same request, one image short
    short = attempt("fewer", meta=np.array(fewer), features=good["features"][:19])
    assert "declares 19 images, but the reference has 20" in short
    assert "declares 'x' images" in attempt("text", meta=np.array(json.dumps({**meta, "count": "x"})))
    # A header declaring far more data than its record holds is refused before anything is allocated.
    big = tmp_path / "big.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 2048)}
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        for key in ("meta", "floor_features"):
            buf = io.BytesIO()
            np.save(buf, good[key])
            zf.writestr(f"{key}.npy", buf.getvalue())
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
        zf.writestr("features.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(FIDError, match="declares"):
        load_precomputed(big, prepared_8px, 20, identity, 6)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(FIDError, match="corrupt"):
        load_precomputed(tmp_path / "junk.npz", prepared_8px, 20, identity, 6)
    with pytest.raises(FIDError, match=r"score\.reference_file: .* not found"):
        load_precomputed(tmp_path / "absent.npz", prepared_8px, 20, identity, 6)
