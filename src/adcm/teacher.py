"""Training a diffusion teacher: EDM's loss (Karras et al. 2022, Eq. 2) with ln σ ~ N(P_mean, P_std²), or the
flow-matching velocity loss / TrigFlow diffusion loss with the same proposal (:func:`adcm.losses.diffusion_loss`).

The loop is resumable bit for bit: the state (network, EMA, Adam, step) is checkpointed atomically
every ``checkpoint_every_kimg`` and every step's randomness derives from (seed, step).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adcm.checkpoint import CheckpointError, TeacherFile, fingerprint, load_state, save_state
from adcm.config import NetworkConfig, SamplerConfig, TeacherConfig
from adcm.data import DatasetError, ImageDataset
from adcm.images import to_uint8
from adcm.losses import diffusion_loss
from adcm.precond import Precond, denoiser
from adcm.processes import ProcessName, coordinates
from adcm.samplers import PerSampleNoise, as_ve_denoiser, heun_sample, karras_sigmas
from adcm.training import ImageSampler, MetricsLogger, TrainingProgress, ema_beta, step_generator, update_ema

__all__ = ["TeacherRun", "TrainingError", "checkpoint_matches", "network_kwargs_for",
           "sample_teacher", "train_teacher"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass(frozen=True)
class TeacherRun:
    """What a finished teacher training produced."""

    teacher: TeacherFile
    kimg: float
    steps: int
    train_seconds: float
    final_loss: float
    skipped_steps: int
    resumed_from_kimg: float


def network_kwargs_for(cfg: NetworkConfig, resolution: int, channels: int, num_classes: int) -> dict[str, Any]:
    """SongUNet constructor settings (EDM's names) for a DDPM++ teacher trained here."""
    return {
        "img_resolution": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "label_dim": num_classes if cfg.class_conditional else 0,
        "augment_dim": 0,
        "model_channels": cfg.model_channels,
        "channel_mult": list(cfg.channel_mult),
        "channel_mult_emb": cfg.channel_mult_emb,
        "num_blocks": cfg.num_blocks,
        "attn_resolutions": list(cfg.attn_resolutions),
        "dropout": cfg.dropout,
        "label_dropout": 0.0,
        "embedding_type": "positional",
        "channel_mult_noise": 1,
        "encoder_type": "standard",
        "decoder_type": "standard",
        "resample_filter": [1, 1],
        "adaptive_double_norm": cfg.adaptive_double_norm,
    }


def _training_fingerprint(cfg: TeacherConfig, seed: int, kwargs: dict[str, Any], data_id: str,
                          process: ProcessName) -> str:
    """Everything that changes the trained weights; not the logging/checkpoint periods or the device."""
    relevant = dataclasses.asdict(cfg)
    for key in ("device", "checkpoint_every_kimg", "log_every_kimg", "sampler", "url", "sha256",
                "download_path", "file", "duration_kimg"):
        relevant.pop(key)
    return fingerprint({"teacher": relevant, "seed": seed, "network": kwargs, "data": data_id, "process": process})


def _data_kwargs(cfg: TeacherConfig, data: ImageDataset) -> dict[str, Any]:
    num_classes = int(data.labels.max()) + 1 if data.labels is not None and data.labels.size else 0
    if cfg.network.class_conditional and num_classes == 0:
        raise DatasetError("teacher.network.class_conditional is true but the prepared data has no labels")
    _, channels, height, _ = data.images.shape
    return network_kwargs_for(cfg.network, height, channels, num_classes)


def checkpoint_matches(path: Path, cfg: TeacherConfig, *, seed: int, data: ImageDataset, data_id: str,
                       process: ProcessName = "ve") -> bool:
    """Whether the training checkpoint at ``path`` was written under this configuration and data."""
    fp = _training_fingerprint(cfg, seed, _data_kwargs(cfg, data), data_id, process)
    return load_state(path).get("fingerprint") == fp


def train_teacher(
    cfg: TeacherConfig,
    data: ImageDataset,
    *,
    seed: int,
    data_id: str,
    checkpoint_path: Path,
    device: torch.device,
    fresh: bool = False,
    log_dir: Path | None = None,
    show_progress: bool = True,
    process: ProcessName = "ve",
) -> TeacherRun:
    """Train (or resume training) a diffusion teacher on ``data`` for ``cfg.duration_kimg``.

    Args:
        cfg: the ``teacher`` params group.
        data: prepared images (uint8, N×C×H×W) and labels.
        seed: global seed; step k's randomness is a function of (seed, k).
        data_id: identity of the data (e.g. its SHA-256), part of the checkpoint fingerprint.
        checkpoint_path: resumable state; resumed when present and from the same configuration.
        device: where to train.
        fresh: ignore an existing checkpoint and start over.
        log_dir: dvclive directory (None = no metrics logging).
        show_progress: show a rich progress bar.
        process: ``ve`` (EDM), ``fm`` (velocity loss) or ``trigflow`` (TrigFlow diffusion loss).

    Raises:
        CheckpointError: the checkpoint belongs to another configuration (and ``fresh`` is false).
        TrainingError: 20 non-finite losses in a row.
    """
    kwargs = _data_kwargs(cfg, data)
    fp = _training_fingerprint(cfg, seed, kwargs, data_id, process)

    torch.manual_seed(seed)
    net = denoiser(kwargs, cfg.sigma_data, process).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    step, nimg, skipped, elapsed, last_loss = 0, 0, 0, 0.0, float("nan")
    resumed = False
    if checkpoint_path.exists() and not fresh:
        state = load_state(checkpoint_path)
        if state.get("fingerprint") != fp:
            raise CheckpointError(
                f"{checkpoint_path}: checkpoint from a different configuration; re-run with --fresh to "
                "start over (or restore the params it was made with)"
            )
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, nimg, skipped = int(state["step"]), int(state["nimg"]), int(state["skipped"])
        elapsed, last_loss = float(state["seconds"]), float(state["loss"])
        resumed = True
    resumed_kimg = nimg / 1000

    def checkpoint() -> None:
        save_state(checkpoint_path, {
            "fingerprint": fp, "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "nimg": nimg, "skipped": skipped, "seconds": elapsed, "loss": last_loss,
        })

    sampler = ImageSampler(data.images, data.labels, kwargs["label_dim"], cfg.xflip, device)
    micro = cfg.batch_per_step or cfg.batch_size
    total = int(cfg.duration_kimg * 1000)
    logger = MetricsLogger(log_dir, resume=resumed and nimg > 0)
    next_ckpt = (nimg // int(cfg.checkpoint_every_kimg * 1000) + 1) * int(cfg.checkpoint_every_kimg * 1000)
    next_log = (nimg // int(cfg.log_every_kimg * 1000) + 1) * int(cfg.log_every_kimg * 1000)
    bad_in_row, losses = 0, []
    start = time.perf_counter() - elapsed
    with TrainingProgress("teacher", total / 1000, enabled=show_progress) as progress:
        progress.update(nimg / 1000)
        while nimg < total:
            gen = step_generator(seed, step)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1.0)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(cfg.batch_size // micro):
                x0, labels = sampler.sample(micro, gen)
                loss = diffusion_loss(net, x0, labels, cfg.p_mean, cfg.p_std, gen).mean()
                (loss * micro / cfg.batch_size).backward()
                loss_sum += loss.item() * micro / cfg.batch_size
            step += 1
            nimg += cfg.batch_size
            grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
            if np.isfinite(loss_sum) and grads_ok:
                opt.step()
                update_ema(ema, net, ema_beta(cfg.batch_size, nimg, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio))
                bad_in_row = 0
                losses.append(loss_sum)
                last_loss = loss_sum
            else:
                skipped += 1
                bad_in_row += 1
                if bad_in_row >= 20:
                    raise TrainingError(f"20 non-finite losses in a row at step {step}; lower teacher.lr")
            elapsed = time.perf_counter() - start
            if nimg >= next_log or nimg >= total:
                mean_loss = float(np.mean(losses)) if losses else float("nan")
                rate = progress.update(nimg / 1000, loss=mean_loss)
                logger.log(step, {"loss": mean_loss, "img_per_s": rate, "kimg": nimg / 1000,
                                  "lr": opt.param_groups[0]["lr"], "skipped_steps": skipped})
                losses = []
                next_log += int(cfg.log_every_kimg * 1000)
            if nimg >= next_ckpt or nimg >= total:
                checkpoint()
                next_ckpt += int(cfg.checkpoint_every_kimg * 1000)
    logger.close()
    teacher = TeacherFile(
        network_kwargs=kwargs,
        sigma_data=cfg.sigma_data,
        state_dict={k: v.detach().cpu() for k, v in ema.state_dict().items()},
        meta={"source": "train", "kimg": nimg / 1000, "steps": step, "dataset": data.name, "data_id": data_id,
              "fingerprint": fp},
        process=process,
    )
    return TeacherRun(teacher, nimg / 1000, step, elapsed, last_loss, skipped, resumed_kimg)


def sample_teacher(net: Precond, cfg: SamplerConfig, seeds: list[int], label_dim: int,
                   device: torch.device, shape: tuple[int, int, int]) -> np.ndarray:
    """Heun samples (uint8, N×C×H×W) from the teacher's x0-prediction, sample i from seed i (labels uniform).

    EDM's sampler runs in VE coordinates on every process (:func:`adcm.samplers.as_ve_denoiser`).
    """
    noise = PerSampleNoise(seeds, device)
    latents = noise.randn(shape)
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(noise.randint(label_dim), label_dim).float()
    sigmas = karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    net = net.to(device).eval()
    denoise = as_ve_denoiser(net, coordinates(net.process, net.sigma_data))
    images = heun_sample(lambda x, s: denoise(x, s, labels), latents, sigmas.to(device))
    return to_uint8(images)
