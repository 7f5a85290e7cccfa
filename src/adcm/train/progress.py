"""What a running training shows and records: a rich progress bar with an ETA, dvclive metrics, peak memory."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["MetricsLogger", "TrainingProgress", "peak_memory_mib", "reset_peak_memory"]


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory in MiB: on CUDA the most the caching allocator held in tensors since the last
    :func:`reset_peak_memory` (``torch.cuda.max_memory_allocated``); on the CPU the process's peak
    resident set size since it started (``resource.getrusage``; None where that does not exist)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mib` (CUDA; the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def resume_at(self, kimg: float) -> None:
        """Start the bar at ``kimg`` (where a resumed run continues), without an images/s figure: the next
        :meth:`update` measures from here, not from zero."""
        self._last = (time.perf_counter(), kimg)
        self._progress.update(self._task, completed=kimg)

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
