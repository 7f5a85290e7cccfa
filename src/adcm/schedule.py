"""The learned time schedule: ADCM's partitions next to ECT's and iCT's Δt(t) (ADCM paper, Fig. 4).

Every ADCM partition built during training is a decreasing list t_0 = T > t_1 > … > t_n = ε; its
step at t_i is Δt_i = t_i − t_{i+1}. ECT's step at the same training iteration is t − r(t) of its
mapping function, iCT's the spacing of its Karras grid with N(k) points.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch

from adcm.config import TrainConfig
from adcm.discretization import ect_r, ict_num_points, karras_grid
from adcm.io import atomic_path

__all__ = ["ect_steps", "ict_steps", "partition_rows", "plot_schedules", "schedule_summary"]


def partition_rows(partitions: list[tuple[int, list[float]]]) -> list[dict[str, float]]:
    """One row (rebuild index, iteration, point index, t, Δt) per partition point except the last (ε)."""
    rows = []
    for k, (iteration, points) in enumerate(partitions):
        for i, (t, r) in enumerate(itertools.pairwise(points)):
            rows.append({"rebuild": k, "iteration": int(iteration), "index": i, "t": float(t), "dt": float(t - r)})
    return rows


def schedule_summary(partitions: list[tuple[int, list[float]]]) -> dict[str, Any]:
    """Metrics of the latest partition: number of points, smallest and largest Δt, where they occur."""
    if not partitions:
        return {"partitions_built": 0}
    iteration, points = partitions[-1]
    steps = [(t - r, t) for t, r in itertools.pairwise(points)]
    dt_min, t_at_min = min(steps)
    dt_max, t_at_max = max(steps)
    return {"partitions_built": len(partitions), "iteration": int(iteration), "points": len(points),
            "min_dt": dt_min, "min_dt_at_t": t_at_min, "max_dt": dt_max, "max_dt_at_t": t_at_max,
            "points_per_rebuild": [len(p) for _, p in partitions]}


def ect_steps(cfg: TrainConfig, iteration: int, num: int = 200) -> tuple[list[float], list[float]]:
    """ECT's Δt(t) = t − r(t) at ``iteration`` on a log grid of t in (ε, T] (r clamped at ε: Δt ≤ t − ε)."""
    t = torch.logspace(math.log10(cfg.eps * 1.01), math.log10(cfg.t_max), num, dtype=torch.float64)
    e = cfg.ect
    r = ect_r(t, iteration, e.stage_iters, e.k, e.b, e.q).clamp(min=cfg.eps)
    return t.tolist(), (t - r).tolist()


def ict_steps(cfg: TrainConfig, iteration: int, total_iters: int) -> tuple[list[float], list[float]]:
    """iCT's Δt at each grid point σ_i of its N(k)-point Karras grid at ``iteration``."""
    i = cfg.ict
    n = ict_num_points(iteration, total_iters, i.s0, i.s1)
    grid = karras_grid(n, cfg.eps, cfg.t_max, i.rho)
    return grid[:-1].tolist(), (grid[:-1] - grid[1:]).tolist()


def plot_schedules(path: Path, partitions: list[tuple[int, list[float]]], cfg: TrainConfig, total_iters: int,
                   title: str) -> None:
    """PNG of Δt(t) on log–log axes: every ADCM partition, and ECT/iCT at the latest one's iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    cmap = plt.get_cmap("viridis")
    for k, (iteration, points) in enumerate(partitions):
        ts = points[:-1]
        dts = [a - b for a, b in itertools.pairwise(points)]
        shade = cmap(0.15 + 0.7 * k / max(len(partitions) - 1, 1))
        ax.plot(ts, dts, "-", color=shade, lw=1.6, label=f"ADCM, built at it {iteration} (|T|={len(points)})")
    iteration = partitions[-1][0] if partitions else total_iters
    ax.plot(*ect_steps(cfg, iteration), "--", color="tab:red", lw=1.2, label=f"ECT at it {iteration}")
    ax.plot(*ict_steps(cfg, iteration, total_iters), ":", color="tab:orange", lw=1.5, label=f"iCT at it {iteration}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t (σ of the VE process)")
    ax.set_ylabel("Δt = t − r")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
