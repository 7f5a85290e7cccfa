"""The study's report: seeds aggregated per arm and evaluation point, tables, FID-vs-kimg and schedule figures."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adcm.config import Params, StudyConfig, load_params
from adcm.errors import FIDError
from adcm.eval.schedule import ect_steps, ict_steps
from adcm.io.files import atomic_path, atomic_write_text, write_json
from adcm.study.plan import arm_params, selected_arms, study_scale

__all__ = ["load_records", "report_study", "summarise", "write_report"]


def load_records(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Every run record (``*.json``) in ``runs_dir``, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*.json"))}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arm, kimg): mean and ± half-range of the 1-/2-step FID over the seeds, and the seeds."""
    rows = []
    key = lambda r: r["arm"]  # noqa: E731
    for arm, members in itertools.groupby(sorted(runs, key=key), key=key):
        group = list(members)
        points = sorted({round(e["kimg"], 6) for r in group for e in r["evals"]})
        for kimg in points:
            row: dict[str, Any] = {
                "arm": arm,
                "method": group[0]["method"],
                "lambda": group[0]["lambda"],
                "process": group[0]["process"],
                "kimg": kimg,
            }
            for k in ("fid_1step", "fid_2step"):
                vals = [e[k] for r in group for e in r["evals"] if round(e["kimg"], 6) == kimg]
                row[k] = float(np.mean(vals))
                row[f"{k}_spread"] = float((max(vals) - min(vals)) / 2)
                row[f"{k}_values"] = vals
            row["seeds"] = sorted(r["seed"] for r in group if any(round(e["kimg"], 6) == kimg for e in r["evals"]))
            secs = [e["train_seconds"] for r in group for e in r["evals"] if round(e["kimg"], 6) == kimg]
            row["train_seconds"] = float(np.mean(secs))
            rows.append(row)
    return rows


def _fmt(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f} ± {row[key + '_spread']:.2f}" if len(row[key + "_values"]) > 1 else f"{row[key]:.2f}"


def write_report(
    out_dir: Path,
    runs: list[dict[str, Any]],
    process_runs: list[dict[str, Any]],
    ceilings: list[dict[str, Any]],
    arm_order: Sequence[str],
    process_order: Sequence[str],
    params: Params,
    title: str,
) -> dict[str, Any]:
    """``results.json``, ``results.md`` (tables), ``fid_vs_kimg.png`` and ``schedules.png`` in ``out_dir``."""
    rows = summarise(runs)
    order = {a: i for i, a in enumerate(arm_order)}
    rows.sort(key=lambda r: (order.get(r["arm"], len(order)), r["kimg"]))
    final = [r for r in rows if r["kimg"] == max(x["kimg"] for x in rows if x["arm"] == r["arm"])]
    ceiling = {c["process"]: c for c in ceilings}
    # The arms' own teachers' ceilings only (the other processes' teachers belong to the method × process table).
    arm_ceiling = {proc: c for proc, c in ceiling.items() if proc in {r["process"] for r in runs}}
    lines = [f"# {title}", ""]
    if runs:
        n, ref = runs[0]["fid_images"], runs[0]["reference_count"]
        lines += [
            f"FID (clean-fid, N = {n} generated images vs {ref} training images; mean ± half-range over the "
            f"seeds). Budget {runs[0]['budget_kimg']:g} kimg, batch {runs[0]['batch_size']}.",
            "",
            "| arm | kimg | seeds | 1-step FID | 2-step FID | train s (mean) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['arm']} | {r['kimg']:g} | {len(r['seeds'])} | {_fmt(r, 'fid_1step')} | "
                f"{_fmt(r, 'fid_2step')} | {r['train_seconds']:.0f} |"
            )
        for proc, c in sorted(arm_ceiling.items()):
            lines.append(f"| teacher ({proc}, Heun {c['nfe']} NFE) | — | — | {c['fid']:.2f} | | |")
        lines.append("")
    if process_runs:
        lines += ["## Method × process (first seed, FID at the budget)", ""]
        methods = list(dict.fromkeys(r["method"] for r in process_runs))
        lines.append("| method | " + " | ".join(f"{p}: 1-step / 2-step" for p in process_order) + " |")
        lines.append("|---" * (len(process_order) + 1) + "|")
        for m in methods:
            cells = []
            for p in process_order:
                hit = [r for r in process_runs if r["method"] == m and r["process"] == p and r["evals"]]
                cells.append(
                    f"{hit[0]['evals'][-1]['fid_1step']:.2f} / {hit[0]['evals'][-1]['fid_2step']:.2f}" if hit else "—"
                )
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append(
            "| teacher (Heun) | "
            + " | ".join(f"{ceiling[p]['fid']:.2f}" if p in ceiling else "—" for p in process_order)
            + " |"
        )
        lines.append("")
    summary = {
        "rows": rows,
        "final": final,
        "ceilings": ceilings,
        "process_runs": [
            {k: r[k] for k in ("arm", "method", "lambda", "process", "seed", "budget_kimg", "fid_images")}
            | {"final": r["evals"][-1] if r["evals"] else None}
            for r in process_runs
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.md", "\n".join(lines))
    write_json(out_dir / "results.json", summary)
    _plot_fid(out_dir / "fid_vs_kimg.png", rows, arm_ceiling, arm_order)
    _plot_schedules(out_dir / "schedules.png", runs, params)
    return summary


def _plot_fid(
    path: Path, rows: list[dict[str, Any]], ceiling: dict[str, dict[str, Any]], arm_order: Sequence[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, key, label in ((axes[0], "fid_1step", "1-step"), (axes[1], "fid_2step", "2-step")):
        for i, arm in enumerate(arm_order):
            pts = [r for r in rows if r["arm"] == arm]
            if not pts:
                continue
            x = [r["kimg"] for r in pts]
            lo = [min(r[f"{key}_values"]) for r in pts]
            hi = [max(r[f"{key}_values"]) for r in pts]
            color = plt.get_cmap("tab10")(i % 10)
            ax.plot(x, [r[key] for r in pts], "o-", color=color, label=arm, lw=1.5, ms=4)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        for proc, c in ceiling.items():
            ax.axhline(c["fid"], color="k", ls=":", lw=1, label=f"teacher {proc} (Heun {c['nfe']} NFE)")
        ax.set_xlabel("training kimg")
        ax.set_ylabel(f"{label} FID")
        ax.set_title(f"{label} FID vs budget (mean, band = seed range)", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plot_schedules(path: Path, runs: list[dict[str, Any]], params: Params) -> None:
    """Learned Δt(t) of every ADCM arm (first seed, its first and last partition) vs ECT's and iCT's (paper Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adcm.processes import make_process

    fig, ax = plt.subplots(figsize=(6.6, 4.6), dpi=120)
    adcm_runs = sorted(
        (r for r in runs if r["method"] == "adcm" and r.get("partitions")), key=lambda r: (r["lambda"], r["seed"])
    )
    seen: set[float] = set()
    process = None
    for r in adcm_runs:
        if r["lambda"] in seen:
            continue
        seen.add(r["lambda"])
        sp = r["schedule_process"]
        process = make_process(sp["name"], sp["eps"], sp["t_max"])
        for k, (it, pts) in enumerate(r["partitions"][:: max(1, len(r["partitions"]) - 1)]):
            ts = pts[:-1]
            dts = [a - b for a, b in itertools.pairwise(pts)]
            ax.plot(
                ts,
                dts,
                "-" if k == 0 else "-.",
                lw=1.4,
                label=f"ADCM λ={r['lambda']:g} (|T|={len(pts)}, built at it {it})",
            )
    total = max(1, math.ceil(params.train.duration_kimg * 1000 / params.train.batch_size))
    process = process or make_process(
        params.process, params.processes.range_of(params.process).eps, params.processes.range_of(params.process).t_max
    )
    for it, style in ((0, "--"), (total - 1, ":")):
        ect = ect_steps(params.train, it, total, process)
        ict = ict_steps(params.train, it, total, process)
        ax.plot(ect["t"], ect["dt"], style, color="tab:red", lw=1.1, label=f"ECT at it {it}")
        ax.plot(ict["t"], ict["dt"], style, color="tab:orange", lw=1.1, label=f"iCT at it {it}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"t ({process.name} time)")
    ax.set_ylabel("Δt = t − r")
    ax.set_title("Learned ADCM schedules vs ECT / iCT (ADCM paper Fig. 4)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def report_study(params_path: Path, study: StudyConfig, quick: bool, runs_dir: Path, out_dir: Path) -> str:
    """Aggregate the run records of ``runs_dir`` into the report in ``out_dir``; returns ``results.md``.

    The ve column of the method × process table is the study's own first-seed run of each method
    (ADCM at λ = 0.01).

    Raises:
        FIDError: there is no run record.
    """
    arms, procs = selected_arms(study, quick)
    records = load_records(runs_dir)
    runs = [r for r in records.values() if "evals" in r and r["arm"] in {a.name for a in arms}]
    process_runs = [r for r in records.values() if "evals" in r and r["arm"] in {a.name for a in procs}]
    seed0 = study_scale(study, quick).seeds[0]
    for arm in arms:
        if arm.process == "ve" and (arm.method != "adcm" or arm.lam == 0.01):
            process_runs += [r for r in runs if r["arm"] == arm.name and r["seed"] == seed0]
    ceilings = [r for r in records.values() if str(r.get("arm", "")).startswith("teacher-")]
    if not runs and not process_runs:
        raise FIDError(f"{runs_dir}: no run records (run `adcm study run` or `dvc repro study/dvc.yaml` first)")
    params = arm_params(params_path, study, arms[0], seed0, quick) if arms else load_params(params_path)
    write_report(
        out_dir,
        runs,
        process_runs,
        ceilings,
        [a.name for a in arms],
        list(dict.fromkeys(["ve", *(a.process for a in procs)])),
        params,
        "Equal-budget study" + (" (quick variant)" if quick else ""),
    )
    return (out_dir / "results.md").read_text()
