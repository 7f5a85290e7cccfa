"""Pieces shared by every training loop: devices, per-step seeding, batches, EMA, progress, logging.

Every step's randomness is a pure function of (seed, step): the data indices, flips and noise come
from a generator seeded per step, and dropout from the global generator re-seeded per step. A run
resumed from a checkpoint therefore ends with exactly the same weights as an uninterrupted one (on
the same device and thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

__all__ = [
    "ImageSampler",
    "MetricsLogger",
    "TrainingProgress",
    "ema_beta",
    "resolve_device",
    "same_rng",
    "seed_chunk",
    "step_generator",
    "update_ema",
]


def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; otherwise ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} was asked for but CUDA is not available")
    return device


def _mix(*values: int) -> int:
    digest = hashlib.sha256(":".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for step ``step`` of a run with ``seed``; also re-seeds the global RNG (dropout)."""
    torch.manual_seed(_mix(seed, step, stream, 1))
    return torch.Generator().manual_seed(_mix(seed, step, stream, 0))


def seed_chunk(seed: int, step: int, chunk: int) -> None:
    """Seed the global RNG (dropout) for chunk ``chunk`` of step ``step``'s global batch.

    Dropout masks then depend only on (seed, step, chunk), not on which process runs the chunk,
    so N processes reproduce a single process with the same global batch and chunk size.
    """
    torch.manual_seed(_mix(seed, step, chunk, 2))


@contextlib.contextmanager
def same_rng(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields ``replay()``: resets the global RNG (CPU and, on CUDA, the device) to its state at entry.

    The target forward (or JVP) runs first, then ``replay()``, then the student forward: both draw
    the same dropout masks (algorithm.md §3 step 2).
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    yield replay


class ImageSampler:
    """Random mini-batches from a uint8 (N, C, H, W) array, scaled to [-1, 1], kept on ``device``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, num_classes: int, xflip: bool,
                 device: torch.device):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = None if labels is None or num_classes == 0 else torch.from_numpy(labels).to(device)
        self.num_classes = num_classes
        self.xflip = xflip
        self.device = device

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(x0 in [-1, 1] float32 (B, C, H, W), one-hot labels (B, K) or None)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = self.images[idx.to(self.device)].to(torch.float32) / 127.5 - 1
        if self.xflip:
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
        onehot = None
        if self.labels is not None:
            onehot = nn.functional.one_hot(self.labels[idx.to(self.device)].long(), self.num_classes).float()
        return x, onehot


def ema_beta(batch_size: int, nimg: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EMA decay per step for a half-life in images (EDM's rule, with optional ramp-up)."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·net for every parameter; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)


class TrainingProgress:
    """A rich progress bar in kimg with loss and images/s; silent when ``enabled`` is false."""

    def __init__(self, description: str, total_kimg: float, enabled: bool = True):
        self.enabled = enabled
        self.total = total_kimg
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.1f}/{task.total:.1f} kimg"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total_kimg, info="")
        self._last = (time.perf_counter(), 0.0)

    def __enter__(self) -> TrainingProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def restart_clock(self) -> None:
        """Exclude the time since the last update (e.g. a partition rebuild) from the next images/s."""
        self._last = (time.perf_counter(), self._last[1])

    def update(self, kimg: float, **fields: float | str) -> float:
        """Advance to ``kimg``; returns images/s since the previous call."""
        now = time.perf_counter()
        last_t, last_k = self._last
        rate = (kimg - last_k) * 1000 / max(now - last_t, 1e-9)
        self._last = (now, kimg)
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, completed=kimg, info=f"{info}  img/s {rate:.1f}")
        return rate


class MetricsLogger:
    """dvclive metrics (never touching dvc.yaml) plus a plain history for PNG plots."""

    def __init__(self, directory: Path | None, resume: bool):
        self.live = None
        if directory is not None:
            from dvclive import Live

            self.live = Live(str(directory), resume=resume, dvcyaml=None, save_dvc_exp=False, report=None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log scalars at ``step``."""
        if self.live is None:
            return
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, float(value))
        self.live.make_summary()

    def image(self, name: str, image: Any) -> None:
        """Log an image (PIL image or path) under ``name``."""
        if self.live is not None:
            self.live.log_image(name, image)

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


