"""The equal-budget study: every arm trained from one shared teacher, FID at several points of the budget.

An *arm* is a consistency-training configuration (ADCM with some λ, ECT, iCT, sCT; a forward
process). :func:`run_arm` trains it for one seed in chunks ending at each evaluation point — resuming
from its checkpoint, so an evaluation point is only a pause of one uninterrupted run — and measures
the 1-step and 2-step FID of the EMA weights there with a fixed set of sample seeds and one shared
set of reference statistics (equal N for every arm). :func:`teacher_ceiling` measures the teacher's
Heun FID with the same N. :func:`summarise` aggregates seeds (mean, ± half the range) and
:func:`write_report` writes the table, the FID-vs-kimg plot and the learned-schedule figure.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adcm.checkpoint import TeacherFile
from adcm.config import Params
from adcm.consistency import student_process, train_consistency
from adcm.data import ImageDataset
from adcm.fid import Extractor, feature_stats, frechet_distance, image_features
from adcm.generate import generate
from adcm.io import atomic_path, atomic_write_text
from adcm.processes import coordinates
from adcm.schedule import ect_steps, ict_steps

__all__ = ["EvalSetup", "run_arm", "summarise", "teacher_ceiling", "write_report"]


@dataclass(frozen=True)
class EvalSetup:
    """What every FID of the study shares: the feature extractor, reference statistics and sample seeds."""

    extractor: Extractor
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    reference_count: int
    extractor_id: str
    seeds: list[int]
    batch_size: int
    device: torch.device

    def fid(self, images: np.ndarray) -> float:
        """FID of uint8 (N, C, H, W) images against the reference statistics."""
        feats = image_features(images, self.extractor, self.batch_size, self.device)
        return frechet_distance(*feature_stats(feats), self.ref_mu, self.ref_sigma)


def _label_probs(teacher: TeacherFile, data: ImageDataset) -> torch.Tensor | None:
    dim = teacher.network_kwargs["label_dim"]
    if not dim or data.labels is None:
        return None
    counts = torch.bincount(torch.from_numpy(data.labels), minlength=dim).double()
    return counts / counts.sum()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def run_arm(
    params: Params,
    teacher: TeacherFile,
    data: ImageDataset,
    *,
    arm: str,
    eval_kimg: Sequence[float],
    setup: EvalSetup,
    teacher_id: str,
    data_id: str,
    checkpoint_path: Path,
    out: Path,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one arm for one seed (``params`` already carries method, λ, process, seed and budget) and
    write ``out`` (JSON) after every evaluation point; an existing ``out`` of the same configuration is
    continued, so a re-run after an interruption only does what is missing.

    Returns:
        The run record: configuration, ``evals`` (kimg, steps, fid_1step, fid_2step, seconds), the
        ADCM partitions, training and rebuild seconds.
    """
    cfg = params.train
    process = student_process(params.method, params.process, params.processes, teacher.sigma_data)
    config = {"arm": arm, "method": params.method, "lambda": params.lam if params.method == "adcm" else None,
              "process": params.process, "student_process": process.name, "seed": params.seed,
              "budget_kimg": cfg.duration_kimg, "batch_size": cfg.batch_size, "fid_images": len(setup.seeds),
              "reference_count": setup.reference_count, "extractor": setup.extractor_id,
              "teacher_sha256": teacher_id, "data_sha256": data_id}
    record: dict[str, Any] = {**config, "evals": []}
    if out.is_file():
        previous = json.loads(out.read_text())
        if {k: previous.get(k) for k in config} == config:
            record = previous
    done = {round(e["kimg"], 6) for e in record["evals"]}
    t_mid_sigma = getattr(params.sample.t_mid, params.method)
    t_mid = float(process.time_from_noise_to_signal(torch.tensor(t_mid_sigma, dtype=torch.float64)))
    shape = tuple(teacher.network_kwargs[k] for k in ("in_channels", "img_resolution", "img_resolution"))
    probs = _label_probs(teacher, data)
    for kimg in sorted(eval_kimg):
        if round(kimg, 6) in done:
            continue
        target = max(1, math.ceil(kimg * 1000 / cfg.batch_size))
        state_step = 0
        if checkpoint_path.is_file():
            state_step = int(torch.load(checkpoint_path, map_location="cpu", weights_only=True)["step"])
        run = train_consistency(teacher, cfg, data, method=params.method, lam=params.lam, seed=params.seed,
                                process=process, teacher_id=teacher_id, data_id=data_id,
                                checkpoint_path=checkpoint_path, device=device, show_progress=False,
                                stop_after_iters=max(0, target - state_step))
        student = TeacherFile(run.network_kwargs, teacher.sigma_data, run.ema_state, {}, process=run.process,
                              source=run.source)
        net = student.consistency_function(run.eps).to(device).eval()
        started = time.perf_counter()
        fids = {}
        for sampler in ("1step", "2step"):
            images = generate(net, sampler, setup.seeds, shape=shape, batch_size=setup.batch_size, device=device,
                              label_probs=probs, process=process, t_mid=t_mid, teacher_steps=2,
                              sigma_min=process.eps, sigma_max=process.t_max)
            fids[f"fid_{sampler}"] = round(setup.fid(images), 4)
        record["evals"].append({"kimg": run.kimg, "steps": run.steps, **fids,
                                "train_seconds": round(run.train_seconds, 1),
                                "rebuild_seconds": round(run.rebuild_seconds, 1),
                                "eval_seconds": round(time.perf_counter() - started, 1)})
        record["evals"].sort(key=lambda e: e["kimg"])
        record["partitions"] = [[it, pts] for it, pts in run.partitions]
        record["schedule_process"] = {"name": process.name, "eps": process.eps, "t_max": process.t_max}
        _write_json(out, record)
        log(f"{arm} seed {params.seed}: {run.kimg:g} kimg  FID 1-step {fids['fid_1step']:.2f}  "
            f"2-step {fids['fid_2step']:.2f}")
    return record


def teacher_ceiling(teacher: TeacherFile, data: ImageDataset, params: Params, setup: EvalSetup, out: Path,
                    device: torch.device) -> dict[str, Any]:
    """The teacher's FID with EDM's Heun sampler (``sample.teacher_steps`` levels, 35 NFE by default)."""
    net = teacher.denoiser().to(device)
    shape = tuple(teacher.network_kwargs[k] for k in ("in_channels", "img_resolution", "img_resolution"))
    s = params.teacher.sampler
    images = generate(net, "teacher", setup.seeds, shape=shape, batch_size=setup.batch_size, device=device,
                      label_probs=_label_probs(teacher, data), process=coordinates(teacher.process, teacher.sigma_data),
                      t_mid=0.0, teacher_steps=params.sample.teacher_steps, sigma_min=s.sigma_min,
                      sigma_max=s.sigma_max, rho=s.rho)
    record = {"arm": f"teacher-{teacher.process}", "process": teacher.process,
              "nfe": 2 * params.sample.teacher_steps - 1, "fid": round(setup.fid(images), 4),
              "fid_images": len(setup.seeds), "reference_count": setup.reference_count, "extractor": setup.extractor_id}
    _write_json(out, record)
    return record


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arm, kimg): mean and ± half-range of the 1-/2-step FID over the seeds, and the seeds."""
    rows = []
    key = lambda r: r["arm"]  # noqa: E731
    for arm, group in itertools.groupby(sorted(runs, key=key), key=key):
        group = list(group)
        points = sorted({round(e["kimg"], 6) for r in group for e in r["evals"]})
        for kimg in points:
            row: dict[str, Any] = {"arm": arm, "method": group[0]["method"], "lambda": group[0]["lambda"],
                                   "process": group[0]["process"], "kimg": kimg}
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


def write_report(out_dir: Path, runs: list[dict[str, Any]], process_runs: list[dict[str, Any]],
                 ceilings: list[dict[str, Any]], arm_order: Sequence[str], process_order: Sequence[str],
                 params: Params, title: str) -> dict[str, Any]:
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
        lines += [f"FID (clean-fid, N = {n} generated images vs {ref} training images; mean ± half-range over the "
                  f"seeds). Budget {runs[0]['budget_kimg']:g} kimg, batch {runs[0]['batch_size']}.", "",
                  "| arm | kimg | seeds | 1-step FID | 2-step FID | train s (mean) |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['arm']} | {r['kimg']:g} | {len(r['seeds'])} | {_fmt(r, 'fid_1step')} | "
                         f"{_fmt(r, 'fid_2step')} | {r['train_seconds']:.0f} |")
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
                cells.append(f"{hit[0]['evals'][-1]['fid_1step']:.2f} / {hit[0]['evals'][-1]['fid_2step']:.2f}"
                             if hit else "—")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("| teacher (Heun) | " + " | ".join(f"{ceiling[p]['fid']:.2f}" if p in ceiling else "—"
                                                        for p in process_order) + " |")
        lines.append("")
    summary = {"rows": rows, "final": final, "ceilings": ceilings, "process_runs": [
        {k: r[k] for k in ("arm", "method", "lambda", "process", "seed", "budget_kimg", "fid_images")}
        | {"final": r["evals"][-1] if r["evals"] else None} for r in process_runs]}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.md", "\n".join(lines))
    _write_json(out_dir / "results.json", summary)
    _plot_fid(out_dir / "fid_vs_kimg.png", rows, arm_ceiling, arm_order)
    _plot_schedules(out_dir / "schedules.png", runs, params)
    return summary


def _plot_fid(path: Path, rows: list[dict[str, Any]], ceiling: dict[str, dict[str, Any]],
              arm_order: Sequence[str]) -> None:
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
    adcm_runs = sorted((r for r in runs if r["method"] == "adcm" and r.get("partitions")),
                       key=lambda r: (r["lambda"], r["seed"]))
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
            ax.plot(ts, dts, "-" if k == 0 else "-.", lw=1.4,
                    label=f"ADCM λ={r['lambda']:g} (|T|={len(pts)}, built at it {it})")
    total = max(1, math.ceil(params.train.duration_kimg * 1000 / params.train.batch_size))
    process = process or make_process(params.process, params.processes.range_of(params.process).eps,
                                      params.processes.range_of(params.process).t_max)
    for it, style in ((0, "--"), (total - 1, ":")):
        ect = ect_steps(params.train, it, process)
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
