"""The learned time schedule: ADCM's partitions next to ECT's and iCT's Δt(t) (ADCM paper, Fig. 4).

Every ADCM partition built during training is a decreasing list t_0 = T > t_1 > … > t_n = ε in the
process's own time; its step at t_i is Δt_i = t_i − t_{i+1}. ECT's step at the same training
iteration is t − r(t) of its mapping function, iCT's the spacing of its Karras grid with N(k) points;
both are defined on the noise-to-signal ratio ρ (the VE σ) and mapped to the process's time
(:mod:`adcm.method.discretization`). Every schedule is reported in both coordinates: the process's own
time t and ρ(t), where schedules of different processes can be compared.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from adcm.config import TrainConfig
from adcm.io.files import atomic_path, atomic_write_text
from adcm.io.model_files import StudentFile
from adcm.method.discretization import fraction_of_run
from adcm.method.ect import ect_r
from adcm.method.ict import ict_num_points
from adcm.processes import ForwardProcess, karras_grid

__all__ = [
    "Schedule",
    "ect_steps",
    "ict_steps",
    "partition_rows",
    "plot_schedules",
    "schedule_summary",
    "write_schedule_report",
]

Schedule = dict[str, list[float]]
"""``{'t': …, 'dt': …, 'rho': …, 'drho': …}``: points and steps in process time and as noise-to-signal ratios."""


def _both(t: torch.Tensor, r: torch.Tensor, process: ForwardProcess) -> Schedule:
    rho_t, rho_r = process.noise_to_signal(t), process.noise_to_signal(r)
    return {"t": t.tolist(), "dt": (t - r).tolist(), "rho": rho_t.tolist(), "drho": (rho_t - rho_r).tolist()}


def partition_rows(partitions: list[tuple[int, list[float]]], process: ForwardProcess) -> list[dict[str, float]]:
    """One row (rebuild index, iteration, point index, t, Δt, ρ, Δρ) per partition point except the last (ε)."""
    rows = []
    for k, (iteration, points) in enumerate(partitions):
        pts = torch.tensor(points, dtype=torch.float64)
        both = _both(pts[:-1], pts[1:], process)
        for i in range(len(points) - 1):
            rows.append(
                {
                    "rebuild": k,
                    "iteration": int(iteration),
                    "index": i,
                    "t": both["t"][i],
                    "dt": both["dt"][i],
                    "rho": both["rho"][i],
                    "drho": both["drho"][i],
                }
            )
    return rows


def schedule_summary(partitions: list[tuple[int, list[float]]]) -> dict[str, Any]:
    """Metrics of the latest partition: number of points, smallest and largest Δt, where they occur."""
    if not partitions:
        return {"partitions_built": 0}
    iteration, points = partitions[-1]
    steps = [(t - r, t) for t, r in itertools.pairwise(points)]
    dt_min, t_at_min = min(steps)
    dt_max, t_at_max = max(steps)
    return {
        "partitions_built": len(partitions),
        "iteration": int(iteration),
        "points": len(points),
        "min_dt": dt_min,
        "min_dt_at_t": t_at_min,
        "max_dt": dt_max,
        "max_dt_at_t": t_at_max,
        "points_per_rebuild": [len(p) for _, p in partitions],
    }


def ect_steps(cfg: TrainConfig, iteration: int, total_iters: int, process: ForwardProcess, num: int = 200) -> Schedule:
    """ECT's step at ``iteration`` on a log grid of ρ in (ρ(ε), ρ(T)]: ρ_r = r(ρ) clamped at ρ(ε)."""
    rho_lo, rho_hi = process.rho_range
    rho = torch.logspace(math.log10(rho_lo * 1.01), math.log10(rho_hi), num, dtype=torch.float64)
    e = cfg.ect
    stage_iters = fraction_of_run(e.stage_fraction, total_iters)
    rho_r = ect_r(rho, iteration, stage_iters, e.k, e.b, e.q).clamp(min=rho_lo)
    return _both(process.time_from_noise_to_signal(rho), process.time_from_noise_to_signal(rho_r), process)


def ict_steps(cfg: TrainConfig, iteration: int, total_iters: int, process: ForwardProcess) -> Schedule:
    """iCT's step at each point of its N(k)-point Karras grid (in ρ) at ``iteration``."""
    i = cfg.ict
    n = ict_num_points(iteration, total_iters, i.s0, i.s1)
    grid = process.time_from_noise_to_signal(karras_grid(n, *process.rho_range, i.rho))
    return _both(grid[:-1], grid[1:], process)


def plot_schedules(
    path: Path,
    partitions: list[tuple[int, list[float]]],
    cfg: TrainConfig,
    total_iters: int,
    title: str,
    process: ForwardProcess,
) -> None:
    """PNG of Δt(t) on log–log axes: every ADCM partition, and ECT/iCT at the latest one's iteration.

    For VE one panel (t = ρ); for FM and TrigFlow two: the process's own time, and ρ.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("t", "dt")] if process.name == "ve" else [("t", "dt"), ("rho", "drho")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), dpi=120, squeeze=False)
    cmap = plt.get_cmap("viridis")
    iteration = partitions[-1][0] if partitions else total_iters
    ect = ect_steps(cfg, iteration, total_iters, process)
    ict = ict_steps(cfg, iteration, total_iters, process)
    for ax, (x, y) in zip(axes[0], panels, strict=True):
        for k, (it, points) in enumerate(partitions):
            pts = torch.tensor(points, dtype=torch.float64)
            both = _both(pts[:-1], pts[1:], process)
            shade = cmap(0.15 + 0.7 * k / max(len(partitions) - 1, 1))
            ax.plot(both[x], both[y], "-", color=shade, lw=1.6, label=f"ADCM, built at it {it} (|T|={len(points)})")
        ax.plot(ect[x], ect[y], "--", color="tab:red", lw=1.2, label=f"ECT at it {iteration}")
        ax.plot(ict[x], ict[y], ":", color="tab:orange", lw=1.5, label=f"iCT at it {iteration}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if x == "t":
            ax.set_xlabel(f"t ({process.name} time{', = σ' if process.name == 've' else ''})")
            ax.set_ylabel("Δt = t − r")
        else:
            ax.set_xlabel("ρ = noise-to-signal ratio (VE σ)")
            ax.set_ylabel("Δρ")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_schedule_report(student: StudentFile, cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Write ``schedule.json`` (every partition with t, Δt, ρ, Δρ; ECT's and iCT's steps at the last
    partition's iteration), ``schedule.csv`` and ``schedule.png`` to ``out_dir``; return the metrics of
    the latest partition (:func:`schedule_summary`)."""
    partitions = [(int(it), [float(x) for x in pts]) for it, pts in student.partitions]
    process = student.sampling_process()
    total_iters = max(1, math.ceil(cfg.duration_kimg * 1000 / cfg.batch_size))
    iteration = partitions[-1][0] if partitions else int(student.meta.get("steps", total_iters))
    rows = partition_rows(partitions, process)
    report = {
        "method": student.method,
        "lambda": student.lam,
        "process": process.name,
        "eps": process.eps,
        "t_max": process.t_max,
        "partitions": [
            {
                "iteration": it,
                "t": pts,
                "dt": [a - b for a, b in itertools.pairwise(pts)],
                "rho": [r["rho"] for r in rows if r["iteration"] == it and r["rebuild"] == k],
                "drho": [r["drho"] for r in rows if r["iteration"] == it and r["rebuild"] == k],
            }
            for k, (it, pts) in enumerate(partitions)
        ],
        "ect": {"iteration": iteration, **ect_steps(cfg, iteration, total_iters, process)},
        "ict": {"iteration": iteration, **ict_steps(cfg, iteration, total_iters, process)},
    }
    atomic_write_text(out_dir / "schedule.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["rebuild", "iteration", "index", "t", "dt", "rho", "drho"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "schedule.csv", buffer.getvalue())
    title = (
        f"Δt(t): method {student.method}, λ = {student.lam}, process {process.name}"
        if partitions
        else f"method {student.method} ({process.name}): no adaptive partition (ECT/iCT shown)"
    )
    plot_schedules(out_dir / "schedule.png", partitions, cfg, total_iters, title, process)
    return {"method": student.method, "process": process.name, **schedule_summary(partitions)}
