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
from adcm.schedule import ect_steps, ict_steps, partition_rows, plot_schedules, schedule_summary
from stages.common import PARAMS_OPTION, params_epilog, read_params, user_errors, write_json


@user_errors
def schedule(
    params: Path = PARAMS_OPTION,
    student: Path = typer.Option(Path("models/student.pt"), help="Consistency model (output of `adcm train`)."),
    out_dir: Path = typer.Option(Path("reports/schedule"), help="schedule.json, schedule.csv and schedule.png."),
    metrics: Path = typer.Option(Path("metrics/schedule.json"), help="JSON metrics: |T|, smallest/largest Δt."),
) -> None:
    """Write every partition built during training (t and Δt per point, per rebuild) as JSON and CSV, metrics of the latest one, and a log–log PNG of Δt(t) against ECT's and iCT's at the same stage."""
    p = read_params(params)
    model = load_teacher(student)
    meta = model.meta
    if meta.get("kind") != "consistency":
        raise CheckpointError(f"{student}: not a consistency model written by `adcm train`")
    partitions = [(int(it), [float(x) for x in pts]) for it, pts in meta.get("partitions", [])]
    cfg = p.train
    total_iters = max(1, math.ceil(cfg.duration_kimg * 1000 / cfg.batch_size))
    iteration = partitions[-1][0] if partitions else int(meta.get("steps", total_iters))
    rows = partition_rows(partitions)
    ect_t, ect_dt = ect_steps(cfg, iteration)
    ict_t, ict_dt = ict_steps(cfg, iteration, total_iters)
    write_json(out_dir / "schedule.json", {
        "method": meta.get("method"), "lambda": meta.get("lambda"), "eps": cfg.eps, "t_max": cfg.t_max,
        "partitions": [{"iteration": it, "t": pts, "dt": [a - b for a, b in itertools.pairwise(pts)]}
                       for it, pts in partitions],
        "ect": {"iteration": iteration, "t": ect_t, "dt": ect_dt},
        "ict": {"iteration": iteration, "t": ict_t, "dt": ict_dt},
    })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["rebuild", "iteration", "index", "t", "dt"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "schedule.csv", buffer.getvalue())
    title = (f"Δt(t): method {meta.get('method')}, λ = {meta.get('lambda')}" if partitions
             else f"method {meta.get('method')}: no adaptive partition (ECT/iCT shown)")
    plot_schedules(out_dir / "schedule.png", partitions, cfg, total_iters, title)
    write_json(metrics, {"method": meta.get("method"), **schedule_summary(partitions)})
    typer.echo(f"schedule: {len(partitions)} partition(s) → {out_dir}")


def register(app: typer.Typer) -> None:
    """Add the command to the ``adcm`` app."""
    app.command("schedule", epilog=params_epilog("train"))(schedule)
