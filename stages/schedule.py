"""`adcm schedule`: report the learned ADCM partitions next to ECT's and iCT's schedules (paper Fig. 4)."""

from __future__ import annotations

import csv
import io
import itertools
import math
from pathlib import Path

import typer

from adcm.checkpoint import CheckpointError, load_teacher
from adcm.io import atomic_write_text
from adcm.processes import make_process
from adcm.schedule import ect_steps, ict_steps, partition_rows, plot_schedules, schedule_summary
from stages.common import PARAMS_OPTION, SET_OPTION, params_epilog, read_params, user_errors, write_json


@user_errors
def schedule(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    student: Path = typer.Option(Path("models/student.pt"), help="Consistency model (output of `adcm train`)."),
    out_dir: Path = typer.Option(Path("reports/schedule"), help="schedule.json, schedule.csv and schedule.png."),
    metrics: Path = typer.Option(Path("metrics/schedule.json"), help="JSON metrics: |T|, smallest/largest Δt."),
) -> None:
    """Write every partition built during training (t and Δt per point, per rebuild, in the process's own time and as noise-to-signal ratios ρ) as JSON and CSV, metrics of the latest one, and a log–log PNG of Δt(t) against ECT's and iCT's at the same stage (paper Fig. 4)."""
    p = read_params(params, set_)
    model = load_teacher(student)
    meta = model.meta
    if meta.get("kind") != "consistency":
        raise CheckpointError(f"{student}: not a consistency model written by `adcm train`")
    partitions = [(int(it), [float(x) for x in pts]) for it, pts in meta.get("partitions", [])]
    process = make_process(model.process, float(meta.get("range_eps", meta["eps"])), float(meta["t_max"]),
                           model.sigma_data)
    cfg = p.train
    total_iters = max(1, math.ceil(cfg.duration_kimg * 1000 / cfg.batch_size))
    iteration = partitions[-1][0] if partitions else int(meta.get("steps", total_iters))
    rows = partition_rows(partitions, process)
    write_json(out_dir / "schedule.json", {
        "method": meta.get("method"), "lambda": meta.get("lambda"), "process": process.name, "eps": process.eps,
        "t_max": process.t_max,
        "partitions": [{"iteration": it, "t": pts, "dt": [a - b for a, b in itertools.pairwise(pts)],
                        "rho": [r["rho"] for r in rows if r["iteration"] == it and r["rebuild"] == k],
                        "drho": [r["drho"] for r in rows if r["iteration"] == it and r["rebuild"] == k]}
                       for k, (it, pts) in enumerate(partitions)],
        "ect": {"iteration": iteration, **ect_steps(cfg, iteration, process)},
        "ict": {"iteration": iteration, **ict_steps(cfg, iteration, total_iters, process)},
    })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["rebuild", "iteration", "index", "t", "dt", "rho", "drho"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "schedule.csv", buffer.getvalue())
    title = (f"Δt(t): method {meta.get('method')}, λ = {meta.get('lambda')}, process {process.name}" if partitions
             else f"method {meta.get('method')} ({process.name}): no adaptive partition (ECT/iCT shown)")
    plot_schedules(out_dir / "schedule.png", partitions, cfg, total_iters, title, process)
    write_json(metrics, {"method": meta.get("method"), "process": process.name, **schedule_summary(partitions)})
    typer.echo(f"schedule: {len(partitions)} partition(s) → {out_dir}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("schedule", epilog=params_epilog("train"))(schedule)  # process and range: from the student file
