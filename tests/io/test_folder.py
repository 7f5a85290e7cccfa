"""ImageNet-style folders (class per folder, ADM's centre crop) and datasets that need not fit in memory.

Covers :func:`adcm.io.datasets.center_crop_arr`, :func:`~adcm.io.datasets.image_folder_stream`,
the streamed :func:`~adcm.io.datasets.write_prepared`, the memory-mapped
:func:`~adcm.io.datasets.load_prepared`, :class:`~adcm.io.datasets.ImageReader` and
:class:`adcm.train.batches.BatchSource` on a mapped dataset, and (in a subprocess) that preparing and
drawing batches from a 2,000-image tree does not grow the resident memory with the dataset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, repo_params, set_key, write_params
from PIL import Image
from typer.testing import CliRunner

from adcm.config import load_params
from adcm.io.datasets import (
    DatasetError,
    ImageDataset,
    ImageReader,
    center_crop_arr,
    image_folder_stream,
    load_prepared,
    map_npz_array,
    prepare_dataset,
    read_image_folder,
    write_prepared,
)
from adcm.stages.cli import app
from adcm.train.batches import RESIDENT_BYTES, BatchSource

CPU = torch.device("cpu")


def _save(path: Path, array: np.ndarray, mode: str, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs)


def _blocks(rng: np.random.Generator, height: int, width: int, block: int) -> np.ndarray:
    """An RGB image made of constant ``block``×``block`` squares (box filters reproduce it exactly)."""
    small = rng.integers(0, 256, (height // block, width // block, 3), dtype=np.uint8)
    return small.repeat(block, axis=0).repeat(block, axis=1)


# --------------------------------------------------------------------------------------------------
# ADM's centre crop
# --------------------------------------------------------------------------------------------------


def test_center_crop_halves_with_box_then_crops_the_centre() -> None:
    """320×256 at 64: halved twice (BOX) to 80×64, no resize (short side 64), columns 8..71 kept."""
    rng = np.random.default_rng(0)
    image = _blocks(rng, 256, 320, 4)
    out = center_crop_arr(Image.fromarray(image), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, image[::4, ::4][:, 8:72])


@pytest.mark.parametrize(("width", "height", "axis"), [(300, 64, 1), (64, 300, 0), (301, 64, 1)])
def test_center_crop_keeps_the_middle_of_a_long_side(width: int, height: int, axis: int) -> None:
    """Short side already the resolution: nothing is resampled; the crop starts at (long − 64) // 2."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = 255  # red margins
    start = ((width if axis else height) - 64) // 2
    middle = (slice(None), slice(start, start + 64)) if axis else (slice(start, start + 64), slice(None))
    image[middle] = (0, 255, 0)
    out = center_crop_arr(Image.fromarray(image), 64)
    assert out.shape == (64, 64, 3)
    assert (out == np.array([0, 255, 0], dtype=np.uint8)).all()


def _adm_description(image: Image.Image, resolution: int) -> np.ndarray:
    """The procedure as the issue describes it, written out independently for comparison."""
    img = image
    while img.width >= 2 * resolution and img.height >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    short = min(img.width, img.height)
    img = img.resize(
        (round(img.width * resolution / short), round(img.height * resolution / short)),
        resample=Image.Resampling.BICUBIC,
    )
    top, left = (img.height - resolution) // 2, (img.width - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)))


@pytest.mark.parametrize(
    ("width", "height", "resolution"),
    [(131, 67, 32), (67, 131, 32), (20, 10, 32), (500, 375, 64), (1023, 769, 64), (64, 64, 64), (33, 200, 16)],
)
def test_center_crop_odd_sizes(width: int, height: int, resolution: int) -> None:
    image = Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = center_crop_arr(image, resolution)
    assert out.shape == (resolution, resolution, 3)
    np.testing.assert_array_equal(out, _adm_description(image, resolution))
    if (width, height) == (resolution, resolution):
        np.testing.assert_array_equal(out, np.asarray(image))  # already the size: unchanged


def test_center_crop_of_a_constant_image_is_constant() -> None:
    for size in [(97, 41), (41, 97), (640, 480), (12, 9)]:
        out = center_crop_arr(Image.new("RGB", size, (12, 200, 77)), 32)
        assert out.shape == (32, 32, 3) and (out == np.array([12, 200, 77], dtype=np.uint8)).all()


# --------------------------------------------------------------------------------------------------
# Class-per-folder trees
# --------------------------------------------------------------------------------------------------


def _imagenet_tree(root: Path) -> dict[str, np.ndarray]:
    """A tiny ImageNet-layout tree: odd sizes, grayscale, RGBA, palette, a non-image file, an empty class."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    _save(root / "n01" / "a.JPEG", rgb, "RGB", quality=95)
    _save(root / "n01" / "b.png", np.full((20, 12), 77, dtype=np.uint8), "L")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent: the colour is kept, alpha dropped (no compositing)
    _save(root / "n01" / "nested" / "c.png", rgba, "RGBA")
    palette = Image.fromarray(np.zeros((9, 11), dtype=np.uint8), mode="P")
    palette.putpalette([200, 100, 50] + [0] * 765)
    (root / "n02").mkdir(parents=True)
    palette.save(root / "n02" / "d.png")
    (root / "n02" / "readme.txt").write_text("not an image: ignored")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images in this class")
    _save(root / ".cache" / "hidden.png", np.zeros((4, 4, 3), dtype=np.uint8), "RGB")
    (root / "LICENSE").write_text("a loose non-image file at the top: ignored")
    return {"rgb": rgb}


def test_imagenet_layout_labels_rgb_and_crop(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    made = _imagenet_tree(root)
    ds = read_image_folder(root, labels=True, resolution=8)
    assert ds.class_names == ["empty", "n01", "n02"]  # every class folder, sorted; the empty one keeps index 0
    # sorted relative paths: n01/a.JPEG, n01/b.png, n01/nested/c.png, n02/d.png
    assert ds.labels is not None and ds.labels.tolist() == [1, 1, 1, 2]
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == np.uint8
    assert (ds.images[1] == 77).all()  # grayscale replicated to RGB
    assert (ds.images[2].transpose(1, 2, 0) == (10, 20, 30)).all()  # RGBA: alpha dropped
    assert (ds.images[3].transpose(1, 2, 0) == (200, 100, 50)).all()  # palette expanded
    jpeg = np.asarray(Image.open(root / "n01" / "a.JPEG").convert("RGB"))
    np.testing.assert_array_equal(ds.images[0].transpose(1, 2, 0), center_crop_arr(Image.fromarray(jpeg), 8))
    assert abs(float(ds.images[0].mean()) - float(made["rgb"].mean())) < 30  # the JPEG's content, roughly

    stream = image_folder_stream(root, labels=False, resolution=8, max_images=2)
    assert stream.count == 2 and stream.labels is None and stream.class_names is None and stream.shape == (3, 8, 8)
    blocks = list(stream.blocks())
    np.testing.assert_array_equal(np.concatenate(blocks), ds.images[:2])


def test_folder_refuses_clearly(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _save(root / "cat" / "a.png", np.zeros((6, 6, 3), dtype=np.uint8), "RGB")
    (root / "cat" / "broken.png").write_bytes(b"definitely not a PNG")
    with pytest.raises(DatasetError, match=r"cat/broken\.png: not a readable PNG/JPEG image"):
        read_image_folder(root, labels=True, resolution=4)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"broken\.png"):
        write_prepared(image_folder_stream(root, True, 4), out / "dataset.npz", out / "dataset.json")
    assert not out.exists() or list(out.iterdir()) == []  # nothing committed
    (root / "cat" / "broken.png").unlink()
    _save(root / "loose.png", np.zeros((6, 6, 3), dtype=np.uint8), "RGB")
    with pytest.raises(DatasetError, match=r"loose\.png: image is not inside a class subdirectory"):
        image_folder_stream(root, labels=True, resolution=4)
    (root / "loose.png").unlink()
    Image.fromarray(np.full((6, 6), 4000, dtype=np.uint16)).save(root / "cat" / "deep.png")  # 16-bit: not clipped
    with pytest.raises(DatasetError, match=r"deep\.png: unsupported image mode 'I"):
        read_image_folder(root, labels=True, resolution=4)
    (tmp_path / "nothing" / "txt").mkdir(parents=True)
    (tmp_path / "nothing" / "txt" / "a.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no image files found"):
        image_folder_stream(tmp_path / "nothing", labels=True, resolution=4)


def test_prepare_command_on_a_folder(tmp_path: Path) -> None:
    """`adcm prepare` with prepare.dataset: folder: crop to the resolution, classes in dataset.json, mapped output."""
    root = tmp_path / "imagenet"
    _imagenet_tree(root)
    data = repo_params()
    for key, value in {
        "prepare.dataset": "folder",
        "prepare.source": str(root),
        "prepare.resolution": 8,
        "prepare.max_images": 3,
    }.items():
        set_key(data, key, value)
    params = write_params(tmp_path / "params.yaml", data)
    result = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert (meta["resolution"], meta["channels"], meta["count"]) == (8, 3, 3)
    assert meta["class_names"] == ["empty", "n01", "n02"] and meta["num_classes"] == 3
    loaded = load_prepared(tmp_path / "out" / "dataset.npz")
    assert isinstance(loaded.images, np.memmap)
    assert loaded.labels is not None and loaded.labels.tolist() == [1, 1, 1]
    direct = prepare_dataset(load_params(params).prepare)
    np.testing.assert_array_equal(loaded.images, np.concatenate(list(direct.blocks())))


# --------------------------------------------------------------------------------------------------
# Memory-mapped prepared data
# --------------------------------------------------------------------------------------------------


def _dataset(n: int = 40, size: int = 8) -> ImageDataset:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    return ImageDataset(images, rng.integers(0, 4, n).astype(np.int64), "synthetic", ["a", "b", "c", "d"])


def test_reader_reads_rows_from_the_file(tmp_path: Path) -> None:
    ds = _dataset()
    write_prepared(ds, tmp_path / "d.npz", tmp_path / "d.json")
    images = load_prepared(tmp_path / "d.npz").images
    with ImageReader(images) as reader:
        assert reader.mapped
        idx = np.array([7, 3, 3, 39, 0, 1, 2, 38])  # any order, repeats, runs
        np.testing.assert_array_equal(reader.take(idx), ds.images[idx])
        np.testing.assert_array_equal(reader.block(5, 17), ds.images[5:17])
        assert reader.take(np.zeros(0, dtype=np.int64)).shape == (0, 3, 8, 8)
        with pytest.raises(IndexError):
            reader.take(np.array([40]))
    part = images[10:30]  # a slice of the map: still read from the file, at its own offset
    with ImageReader(part) as reader:
        assert reader.mapped
        np.testing.assert_array_equal(reader.take(np.array([19, 0, 4])), ds.images[10:30][[19, 0, 4]])
    with ImageReader(np.ascontiguousarray(ds.images)) as reader:  # in memory: plain indexing
        assert not reader.mapped
        np.testing.assert_array_equal(reader.take(np.array([2, 1])), ds.images[[2, 1]])
    copy = ImageReader(images).block(0, 3)
    assert copy.flags.writeable and not isinstance(copy, np.memmap)


def test_prepared_file_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same images give the same bytes at another time (DVC sees no change when prepare re-runs)."""
    first = write_prepared(_dataset(), tmp_path / "a.npz", tmp_path / "a.json")
    later = time.time() + 86_400 * 400
    monkeypatch.setattr(time, "time", lambda: later)
    again = write_prepared(_dataset(), tmp_path / "b.npz", tmp_path / "b.json")
    assert first["sha256"] == again["sha256"]
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_batch_source_streamed_equals_resident(tmp_path: Path) -> None:
    ds = _dataset()
    write_prepared(ds, tmp_path / "d.npz", tmp_path / "d.json")
    data = load_prepared(tmp_path / "d.npz")
    resident = BatchSource(data.images, data.labels, 4, True, CPU)
    streamed = BatchSource(data.images, data.labels, 4, True, CPU, resident_bytes=0)
    assert resident.resident and not streamed.resident and data.images.nbytes <= RESIDENT_BYTES
    assert streamed.reader is not None and streamed.reader.mapped and len(streamed) == 40
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(4):
        (x1, l1), (x2, l2) = resident.sample(16, g1), streamed.sample(16, g2)
        assert torch.equal(x1, x2) and l1 is not None and l2 is not None and torch.equal(l1, l2)
    assert x1.dtype == torch.float32 and float(x1.min()) >= -1 and float(x1.max()) <= 1


def test_load_prepared_compressed_and_hostile_records(tmp_path: Path) -> None:
    ds = _dataset(6)
    write_prepared(ds, tmp_path / "ok.npz", tmp_path / "ok.json")
    with np.load(tmp_path / "ok.npz") as raw:
        arrays = dict(raw)
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)  # not mappable: read (bounded) instead
    loaded = load_prepared(tmp_path / "deflated.npz")
    assert not isinstance(loaded.images, np.memmap)
    np.testing.assert_array_equal(loaded.images, ds.images)
    # A local header that disagrees with the central directory is refused before mapping.
    raw_bytes = bytearray((tmp_path / "ok.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "ok.npz") as archive:
        offset = archive.getinfo("images.npy").header_offset
    raw_bytes[offset + 8 : offset + 10] = (8).to_bytes(2, "little")  # local header says deflated, directory stored
    (tmp_path / "bad.npz").write_bytes(bytes(raw_bytes))
    with pytest.raises(DatasetError, match="bad zip local header"):
        load_prepared(tmp_path / "bad.npz")
    np.testing.assert_array_equal(map_npz_array(tmp_path / "ok.npz", "images"), ds.images)
    assert isinstance(map_npz_array(tmp_path / "ok.npz", "images"), np.memmap)
    with pytest.raises(DatasetError, match="no array 'pixels'"):
        map_npz_array(tmp_path / "ok.npz", "pixels")


# --------------------------------------------------------------------------------------------------
# Resident memory: preparing and training on a 2,000-image tree (subprocess, peak RSS of the child)
# --------------------------------------------------------------------------------------------------

_MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from adcm.io.datasets import ImageDataset, ImageReader, image_folder_stream, load_prepared, write_prepared
from adcm.train.batches import BatchSource

def status(key):  # this process's own VmHWM (peak) or VmRSS (now), bytes; ru_maxrss would also count the
    for line in open("/proc/self/status"):  # parent's peak when it was spawned by vfork (pytest's, here)
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

root, out, res = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)

def train_and_read(images, labels):  # draw 40 batches as training does, then one pass as the FID reference does
    source = BatchSource(images, labels, 4, True, torch.device("cpu"), resident_bytes=0)
    for _ in range(40):
        source.sample(16, g)
    with ImageReader(images) as reader:
        for start in range(0, len(images), 64):
            reader.block(start, min(start + 64, len(images)))

# The same work on 64 images first: imports, allocator pools and heap reach their steady state.
warm = ImageDataset(np.zeros((64, 3, res, res), np.uint8), np.zeros(64, np.int64), "warm", ["a"])
write_prepared(warm, out / "warm.npz", out / "warm.json")
w = load_prepared(out / "warm.npz")
train_and_read(w.images, w.labels)
base = status("VmHWM")
write_prepared(image_folder_stream(root, True, res), out / "dataset.npz", out / "dataset.json")
prepared = status("VmHWM")
data = load_prepared(out / "dataset.npz")
train_and_read(data.images, data.labels)
trained = status("VmHWM")
before = status("VmRSS")
total = int(np.asarray(data.images).sum(dtype=np.int64))  # read through the mapping: its pages stay resident
touched = status("VmRSS") - before
print(json.dumps({"mapped": isinstance(data.images, np.memmap), "nbytes": int(data.images.nbytes),
                  "base": base, "prepared": prepared, "trained": trained, "touched": touched, "sum": total}))
"""


def test_preparing_and_training_do_not_hold_the_dataset_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    root = tmp_path / "tree"
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
    for i in range(2000):  # small odd-sized files, up-scaled and cropped to 128×128: 98 MB prepared
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / f"class{i % 4}" / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(root), str(out), "128"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["mapped"] and r["nbytes"] == 2000 * 3 * 128 * 128
    budget = r["nbytes"] // 5  # 20 MB: the dataset is 98 MB
    assert r["prepared"] - r["base"] < budget, r
    assert r["trained"] - r["base"] < budget, r
    # The probe sees a dataset held in memory: reading through the mapping keeps its pages resident.
    assert r["touched"] > r["nbytes"] // 2, r
