"""The study's report, recomputed from the run records alone (docs/study.md#the-report).

:func:`summarise` turns the records into numbers: per arm the mean and 95 % t-interval over seeds of every
metric at the budget (1-step and 2-step KID/FID, κ at every t_mid), the curves along training, the plateau
check of the 1-step KID, the paired differences of the study file (arm − baseline, seed by seed: the same
training and sample seeds), how κ tracks the 2-step metric, and the learned Δt(t) against ECT's and iCT's
(the ADCM paper's Fig. 4). :func:`write_report` writes them as ``summary.json`` and ``summary.md`` with the
figures; nothing is taken from anywhere but the records (and, for ECT's and iCT's schedules, the params).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from adcm.config import StudyConfig, TrainConfig
from adcm.errors import FIDError
from adcm.eval.schedule import ect_steps, ict_steps
from adcm.io.files import atomic_path, atomic_write_text, write_json
from adcm.processes import make_process
from adcm.study.plan import ParamsLoader, arm_params, arm_seeds, selected_arms, study_scale
from adcm.study.runner import RUN_FORMAT, read_record, set_name

__all__ = [
    "FIG4_TIMES",
    "StudyRecords",
    "compare_records",
    "load_records",
    "paired_interval",
    "report_study",
    "summarise",
    "t_interval",
    "write_report",
]

FIG4_TIMES = (0.01, 0.1, 1.0, 10.0, 50.0)
"""Times (VE σ) where the report compares the learned Δt(t) with ECT's and iCT's."""

PLOTS = (
    "curves_1step.png",
    "curves_2step.png",
    "kappa_vs_kimg.png",
    "kappa_vs_2step.png",
    "tmid_sweep.png",
    "differences.png",
    "schedules.png",
)


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % Student-t interval of ``values`` (mean ± t₀.₉₇₅,ₙ₋₁·s/√n; no interval for one value)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "values": []}
    mean = float(np.mean(vals))
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "values": vals}
    half = float(stats.t.ppf(0.975, n - 1)) * float(np.std(vals, ddof=1)) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "values": vals}


def paired_interval(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """:func:`t_interval` of the seed-by-seed differences a − b over the seeds both have, with those seeds."""
    seeds = sorted(set(a) & set(b))
    return {**t_interval([a[s] - b[s] for s in seeds]), "seeds": seeds}


@dataclass(frozen=True)
class StudyRecords:
    """The records of a study directory: the data floor, the teacher, and every run (None where absent)."""

    floor: dict[str, Any] | None
    teacher: dict[str, Any] | None
    runs: list[dict[str, Any]]


def load_records(runs_dir: Path) -> StudyRecords:
    """``floor.json``, ``teacher.json`` and every ``<arm>/<seed>/record.json`` of ``runs_dir``."""
    runs_dir = Path(runs_dir)
    runs = []
    for path in sorted(runs_dir.glob("*/*/record.json")):
        record = read_record(path)
        if record is not None and record.get("format") == RUN_FORMAT:
            runs.append(record)
    return StudyRecords(read_record(runs_dir / "floor.json"), read_record(runs_dir / "teacher.json"), runs)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def _key(sigma: float) -> str:
    return f"{sigma:g}"


def metric_names(t_mids: Sequence[float]) -> list[str]:
    """Every metric of an evaluation: ``1step.kid``, ``1step.fid``, ``2step@σ.kid``/``.fid``, ``kappa@σ``."""
    names = ["1step.kid", "1step.fid"]
    for t in t_mids:
        names += [f"{set_name(t)}.kid", f"{set_name(t)}.fid"]
    return names + [f"kappa@{_key(t)}" for t in t_mids]


def entry_metrics(entry: dict[str, Any], part: str, t_mids: Sequence[float]) -> dict[str, float]:
    """The metrics of one evaluation (``part``: ``curve``, or ``final`` falling back to ``curve``), flat."""
    sets = entry.get(part) or entry["curve"]
    out: dict[str, float] = {}
    for t in (None, *t_mids):
        if set_name(t) in sets:
            out[f"{set_name(t)}.kid"] = sets[set_name(t)]["kid"]
            out[f"{set_name(t)}.fid"] = sets[set_name(t)]["fid"]
    for t in t_mids:
        if _key(t) in entry.get("kappa", {}):
            out[f"kappa@{_key(t)}"] = entry["kappa"][_key(t)]["kappa"]
    return out


def _final_entry(record: dict[str, Any]) -> dict[str, Any] | None:
    ends = [e for e in record["evals"] if e["step"] == record["total_steps"]]
    return ends[0] if ends else None


def _interp(x: Sequence[float], y: Sequence[float], at: float) -> float:
    return float(np.interp(at, np.asarray(x, dtype=float), np.asarray(y, dtype=float)))


def plateau_share(start: float, curve: Sequence[tuple[float, float]], window: float) -> float | None:
    """Share of the whole gain start − K(1) that falls in the last ``window`` of the run: (K(1 − w) − K(1))/(start −
    K(1)), K the metric (lower is better) interpolated linearly in the fraction of the run, ``curve`` its
    (fraction, value) points after the start (fraction 0). None when there was no gain at all."""
    xs = [0.0, *(f for f, _ in curve)]
    ys = [start, *(v for _, v in curve)]
    end = ys[-1]
    gain = start - end
    if not gain > 0:
        return None
    return (_interp(xs, ys, 1.0 - window) - end) / gain


def _schedule_ratios(record: dict[str, Any], cfg: TrainConfig, times: Sequence[float]) -> dict[str, Any] | None:
    """Learned Δt over ECT's and iCT's at ``times``, for the last partition of an ADCM run (paper Fig. 4)."""
    if not record.get("partitions"):
        return None
    sp = record["schedule_process"]
    process = make_process(sp["name"], sp["eps"], sp["t_max"])
    iteration, points = record["partitions"][-1]
    t = np.asarray(points[:-1], dtype=float)
    dt = -np.diff(np.asarray(points, dtype=float))

    def log_at(ts: Any, dts: Any, at: float) -> float:
        order = np.argsort(ts)
        return float(np.interp(math.log(at), np.log(np.asarray(ts)[order]), np.log(np.asarray(dts)[order])))

    total = int(record["total_steps"])
    rows = []
    for at in times:
        if not (t.min() <= at <= t.max()):
            continue
        learned = log_at(t, dt, at)
        row: dict[str, Any] = {"t": at, "dt": math.exp(learned)}
        for name, it in (("built", iteration), ("end", total - 1)):
            ect, ict = ect_steps(cfg, it, total, process), ict_steps(cfg, it, total, process)
            row[f"ect_{name}"] = math.exp(learned - log_at(ect["t"], ect["dt"], at))
            row[f"ict_{name}"] = math.exp(learned - log_at(ict["t"], ict["dt"], at))
        rows.append(row)
    return {"seed": record["seed"], "iteration": iteration, "points": len(points), "rows": rows}


def _correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": len(x), "pearson": None, "spearman": None, "spearman_p": None}
    spear = stats.spearmanr(x, y)
    return {
        "n": len(x),
        "pearson": float(stats.pearsonr(x, y)[0]),
        "spearman": float(spear.statistic),
        "spearman_p": float(spear.pvalue),
    }


def summarise(
    records: StudyRecords,
    study: StudyConfig,
    quick: bool,
    train_config: Callable[[str, int], TrainConfig] | None = None,
) -> dict[str, Any]:
    """Everything the report states, computed from ``records`` (module docstring).

    Args:
        records: the study's records.
        study: the study file (arms, seeds, differences, plateau check).
        quick: its quick scale.
        train_config: the ``train`` params of an (arm, seed) run, for ECT's and iCT's schedules in the Fig. 4
            comparison (None: no comparison).
    """
    scale = study_scale(study, quick)
    t_mids = list(scale.t_mids)
    names = metric_names(t_mids)
    arms = selected_arms(study, quick)
    by_arm: dict[str, list[dict[str, Any]]] = {a.name: [] for a in arms}
    for r in records.runs:
        if r["arm"] in by_arm:
            by_arm[r["arm"]].append(r)
    start = None
    if records.teacher is not None:
        start = entry_metrics(records.teacher["consistency"], "curve", t_mids)
    out: dict[str, Any] = {"scale": "quick" if quick else "full", "t_mids": t_mids, "arms": {}, "differences": []}
    expected = done = 0
    final_values: dict[str, dict[str, dict[int, float]]] = {}
    for arm in arms:
        seeds = arm_seeds(study, arm, quick)
        all_runs = sorted((r for r in by_arm[arm.name] if r["seed"] in seeds), key=lambda r: r["seed"])
        steps_per_run = len(scale.eval_fractions)
        expected += steps_per_run * len(seeds)
        done += sum(len(r["evals"]) if r.get("failed") is None else steps_per_run for r in all_runs)
        # A failed run counts as done but enters no mean; the plateau check reads complete runs only, so that
        # every point of its seed-mean curve comes from the same seeds.
        runs = [r for r in all_runs if r.get("failed") is None]
        complete = [r for r in runs if _final_entry(r) is not None]
        finals = {r["seed"]: e for r in runs if (e := _final_entry(r)) is not None}
        vals = {
            name: {s: m[name] for s, e in finals.items() if name in (m := entry_metrics(e, "final", t_mids))}
            for name in names
        }
        final_values[arm.name] = vals
        curve = []
        for step in sorted({e["step"] for r in runs for e in r["evals"]}):
            entries = {r["seed"]: e for r in runs for e in r["evals"] if e["step"] == step}
            metrics = {s: entry_metrics(e, "curve", t_mids) for s, e in entries.items()}
            curve.append(
                {
                    "step": step,
                    "fraction": next(iter(entries.values()))["fraction"],
                    "kimg": float(np.mean([e["kimg"] for e in entries.values()])),
                    "seeds": sorted(entries),
                    "metrics": {n: t_interval([m[n] for m in metrics.values() if n in m]) for n in names},
                    "per_seed": {str(s): m for s, m in metrics.items()},
                }
            )
        plateau: dict[str, Any] = {"window": scale.plateau_window, "tolerance": scale.plateau_tolerance}
        if start is not None and complete:
            mean_curve = [
                (
                    float(np.mean([r["evals"][i]["fraction"] for r in complete])),
                    float(np.mean([r["evals"][i]["curve"]["1step"]["kid"] for r in complete])),
                )
                for i in range(len(complete[0]["evals"]))
            ]
            share = plateau_share(start["1step.kid"], mean_curve, scale.plateau_window)
            per_seed = {
                str(r["seed"]): plateau_share(
                    start["1step.kid"],
                    [(e["fraction"], e["curve"]["1step"]["kid"]) for e in r["evals"]],
                    scale.plateau_window,
                )
                for r in complete
            }
            plateau.update(
                share=share,
                # the spread of the per-seed shares: every source of noise (images, reference subsets, training)
                share_over_seeds=t_interval([v for v in per_seed.values() if v is not None]),
                seeds=[r["seed"] for r in complete],
                per_seed=per_seed,
                plateaued=share is not None and share < scale.plateau_tolerance,
            )
        ends = list(finals.values())
        fig4 = None
        if train_config is not None and arm.method == "adcm":
            for r in runs:
                if r.get("partitions") and _final_entry(r) is not None:
                    fig4 = _schedule_ratios(r, train_config(arm.name, r["seed"]), FIG4_TIMES)
                    break
        out["arms"][arm.name] = {
            "method": arm.method,
            "lambda": arm.lam,
            "lambda_schedule": next((r.get("lambda_schedule") for r in runs), None),
            "seeds_planned": seeds,
            "seeds_final": sorted(finals),
            "failed": {str(r["seed"]): r["failed"] for r in all_runs if r.get("failed") is not None},
            "final": {n: t_interval(list(vals[n].values())) for n in names},
            "train_seconds": t_interval([e["train_seconds"] for e in ends]),
            "rebuild_seconds": t_interval([e["rebuild_seconds"] for e in ends]),
            "partition_points": [e["partition_points"] for e in ends if e.get("partition_points") is not None],
            "curve": curve,
            "plateau": plateau,
            "fig4": fig4,
        }
    for diff in study.differences or ():
        if diff.arm not in final_values or diff.baseline not in final_values:
            continue
        a, b = final_values[diff.arm], final_values[diff.baseline]
        out["differences"].append(
            {"arm": diff.arm, "baseline": diff.baseline, "metrics": {n: paired_interval(a[n], b[n]) for n in names}}
        )
    # κ against the 2-step metric: every (arm, seed, evaluation point), and the arms' means at the budget.
    tracking = {}
    for t in t_mids:
        k, q, g, k_arm, q_arm = [], [], [], [], []
        for arm in arms:
            for c in out["arms"][arm.name]["curve"]:
                for m in c["per_seed"].values():
                    if f"kappa@{_key(t)}" in m and f"{set_name(t)}.kid" in m:
                        k.append(m[f"kappa@{_key(t)}"])
                        q.append(m[f"{set_name(t)}.kid"])
                        g.append(m[f"{set_name(t)}.kid"] - m["1step.kid"])
            fin = out["arms"][arm.name]["final"]
            if fin[f"kappa@{_key(t)}"]["n"] and fin[f"{set_name(t)}.kid"]["n"]:
                k_arm.append(fin[f"kappa@{_key(t)}"]["mean"])
                q_arm.append(fin[f"{set_name(t)}.kid"]["mean"])
        tracking[_key(t)] = {
            "points": _correlation(k, q),
            "points_gain": _correlation(k, g),
            "arms_at_budget": _correlation(k_arm, q_arm),
        }
    out["kappa_tracking"] = tracking
    # ECT's and iCT's steps at the end of the run, beside the learned partitions (the Fig. 4 plot)
    out["schedule_references"] = None
    if train_config is not None:
        ref_run = next((r for r in records.runs if r.get("partitions")), None)
        if ref_run is not None:
            sp = ref_run["schedule_process"]
            process = make_process(sp["name"], sp["eps"], sp["t_max"])
            cfg, total = train_config(ref_run["arm"], ref_run["seed"]), int(ref_run["total_steps"])
            ect, ict = ect_steps(cfg, total - 1, total, process), ict_steps(cfg, total - 1, total, process)
            out["schedule_references"] = {
                "iteration": total - 1,
                "ect": {"t": ect["t"], "dt": ect["dt"]},
                "ict": {"t": ict["t"], "dt": ict["dt"]},
            }
    failed = sum(len(a["failed"]) for a in out["arms"].values())
    out["status"] = {
        "evaluations_done": done,
        "evaluations_planned": expected,
        "complete": done == expected,
        "failed_runs": failed,
    }
    if records.floor is not None:
        out["floor"] = {part: records.floor[part]["kid"] for part in ("curve", "final")} | {
            f"{part}_fid": records.floor[part]["fid"] for part in ("curve", "final")
        }
    if records.teacher is not None:
        out["teacher"] = {
            "heun_nfe": records.teacher["heun_nfe"],
            "heun": {part: records.teacher["heun_metrics"][part] for part in ("curve", "final")},
            "start_curve": start,
            "start_final": entry_metrics(records.teacher["consistency"], "final", t_mids),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _ci(iv: dict[str, Any], digits: int = 2, signed: bool = False) -> str:
    if not iv or iv["n"] == 0:
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if iv["lo"] is None:
        return f"{fmt.format(iv['mean'])} (n = 1)"
    return f"{fmt.format(iv['mean'])} [{fmt.format(iv['lo'])}, {fmt.format(iv['hi'])}]"


def _markdown(summary: dict[str, Any], records: StudyRecords, title: str) -> str:
    t_mids = summary["t_mids"]
    arms = summary["arms"]
    run0 = records.runs[0] if records.runs else None
    status = summary["status"]
    lines = [f"# {title}", ""]
    lines.append(
        f"Recomputed from the run records. {status['evaluations_done']} of {status['evaluations_planned']} "
        f"evaluation points are in the records{'' if status['complete'] else ' — the study is INCOMPLETE'}"
        + (
            f"; {status['failed_runs']} runs FAILED (below; their remaining points count as done)."
            if status["failed_runs"]
            else "."
        )
    )
    if run0 is not None:
        ev = run0["evaluation"]
        fractions = ", ".join(f"{f:.0%}" for f in run0["eval_fractions"])
        lines += [
            "",
            f"Budget {run0['budget_kimg']:g} kimg ({run0['total_steps']} steps of {run0['batch_size']}); every "
            f"schedule proportional to it. Evaluation of the EMA at {fractions} of the run: KID ×10³ and FID of "
            f"N = {ev['curve_images']} images along the run and N = "
            f"{ev['final_images']} at the budget (sample seeds 0 … N−1, the same for every arm), against "
            f"{ev['scorer']['reference_count']} training images; κ on {ev['kappa_images']} held-out images. "
            "Mean [95 % t-interval] over the seeds; paired differences are taken seed by seed.",
        ]
    lines += ["", "## 1 step at the budget", ""]
    lines.append("| arm | seeds | KID ×10³ | FID | \\|T\\| at the end | train s | gain in the last window (plateau?) |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, a in arms.items():
        p = a["plateau"]
        share = p.get("share")
        plateau = (
            "—"
            if "plateaued" not in p
            else ("no gain" if share is None else f"{share:.0%} ({'yes' if p['plateaued'] else 'NO'})")
        )
        spread = p.get("share_over_seeds")
        if spread and spread["lo"] is not None:
            plateau += f"; seeds [{spread['lo']:.0%}, {spread['hi']:.0%}]"
        pts = a["partition_points"]
        lines.append(
            f"| {name} | {len(a['seeds_final'])}/{len(a['seeds_planned'])} | {_ci(a['final']['1step.kid'], 3)} | "
            f"{_ci(a['final']['1step.fid'])} | {', '.join(map(str, pts)) if pts else '—'} | "
            f"{_ci(a['train_seconds'], 0)} | {plateau} |"
        )
    if "teacher" in summary:
        te = summary["teacher"]
        lines.append(
            f"| teacher, Heun {te['heun_nfe']} NFE | — | {te['heun']['final']['kid']:.3f} | "
            f"{te['heun']['final']['fid']:.2f} | | | |"
        )
        sf = te["start_final"]
        lines.append(
            f"| teacher's consistency function (every arm's start) | — | {sf['1step.kid']:.3f} | {sf['1step.fid']:.2f} "
            "| | | |"
        )
    if "floor" in summary:
        fl = summary["floor"]
        lines.append(f"| data floor (held-out real images) | — | {fl['final']:.3f} | {fl['final_fid']:.2f} | | | |")
    window = next(iter(arms.values()))["plateau"]["window"] if arms else 0
    lines += [
        "",
        f"Plateau check: the share of the 1-step KID's gain since the start (the teacher's consistency function) "
        f"that came in the last {window:.0%} of the run (curve N; the seed-mean curve of the complete runs, with the "
        "95 % t-interval of the per-seed shares where there are two or more); 'yes' below the tolerance "
        f"({next(iter(arms.values()))['plateau']['tolerance']:.0%}). With one seed it is a point estimate from "
        "curve-N KIDs, each of which moves by several units between neighbouring evaluation points."
        if arms
        else "",
    ]
    for metric, label, digits in (("kid", "KID ×10³", 3), ("fid", "FID", 2)):
        lines += ["", f"## 2 steps at the budget: {label} over t_mid", ""]
        lines.append("| arm | " + " | ".join(f"t_mid = {t:g}" for t in t_mids) + " |")
        lines.append("|---" * (len(t_mids) + 1) + "|")
        for name, a in arms.items():
            cells = [_ci(a["final"][f"{set_name(t)}.{metric}"], digits) for t in t_mids]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "teacher" in summary:
            sf = summary["teacher"]["start_final"]
            lines.append(
                "| teacher's consistency function | "
                + " | ".join(f"{sf[f'{set_name(t)}.{metric}']:.{digits}f}" for t in t_mids)
                + " |"
            )
    lines += ["", "## Noise pass-through κ(t_mid) at the budget", ""]
    lines.append("| arm | " + " | ".join(f"κ({t:g})" for t in t_mids) + " |")
    lines.append("|---" * (len(t_mids) + 1) + "|")
    for name, a in arms.items():
        lines.append(f"| {name} | " + " | ".join(_ci(a["final"][f"kappa@{t:g}"], 3) for t in t_mids) + " |")
    if "teacher" in summary:
        sc = summary["teacher"]["start_curve"]
        lines.append(
            "| teacher's consistency function | " + " | ".join(f"{sc[f'kappa@{t:g}']:.3f}" for t in t_mids) + " |"
        )
    if summary["differences"]:
        lines += ["", "## Paired differences at the budget (arm − baseline; negative KID/FID: the arm is better)", ""]
        cols = ["1step.kid", "1step.fid", *(f"{set_name(t)}.kid" for t in t_mids)]
        heads = ["1-step KID ×10³", "1-step FID", *(f"2-step KID ×10³ @ {t:g}" for t in t_mids)]
        lines.append("| arm − baseline | seeds | " + " | ".join(heads) + " |")
        lines.append("|---" * (len(cols) + 2) + "|")
        for d in summary["differences"]:
            seeds = d["metrics"]["1step.kid"]["seeds"]
            cells = [_ci(d["metrics"][c], 3 if c.endswith("kid") else 2, signed=True) for c in cols]
            lines.append(f"| {d['arm']} − {d['baseline']} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", "## Does κ track the 2-step metric?", ""]
    lines.append(
        "Spearman rank correlation of κ(t_mid) with the 2-step KID at that t_mid and with the 2-step gain "
        "(2-step − 1-step KID), over every arm × seed × evaluation point (curve N; points of one run are not "
        "independent), and over the arms' means at the budget."
    )
    lines += ["", "| t_mid | points: ρ(κ, 2-step KID) | points: ρ(κ, 2-step − 1-step) | arms at the budget: ρ |"]
    lines.append("|---|---|---|---|")

    def corr(c: dict[str, Any]) -> str:
        return "—" if c["spearman"] is None else f"{c['spearman']:+.2f} (n = {c['n']})"

    for t, c in summary["kappa_tracking"].items():
        lines.append(f"| {t} | {corr(c['points'])} | {corr(c['points_gain'])} | {corr(c['arms_at_budget'])} |")
    lines += [
        "",
        "## 2 steps along the run: 2-step − 1-step KID ×10³ (curve N, mean over seeds; negative: 2 steps help)",
        "",
        "At the first evaluation point, the one nearest the middle of the run, and the last one recorded (the budget's "
        "values at the final N are in the tables above).",
        "",
    ]
    lines.append("| arm | t_mid | " + " | ".join(["first point", "middle", "last point"]) + " |")
    lines.append("|---|---|---|---|---|")
    for name, a in arms.items():
        curve = a["curve"]
        if not curve:
            continue
        middle = min(curve, key=lambda c: abs(c["fraction"] - 0.5))
        picks = [curve[0], middle, curve[-1]]
        for t in t_mids:
            cells = []
            for c in picks:
                gains = [
                    m[f"{set_name(t)}.kid"] - m["1step.kid"]
                    for m in c["per_seed"].values()
                    if f"{set_name(t)}.kid" in m
                ]
                cells.append(f"{np.mean(gains):+.3f} ({c['fraction']:.0%})" if gains else "—")
            lines.append(f"| {name} | {t:g} | " + " | ".join(cells) + " |")
    fig4 = {n: a["fig4"] for n, a in arms.items() if a.get("fig4")}
    if fig4:
        lines += ["", "## The learned Δt(t) against ECT's and iCT's (paper Fig. 4)", ""]
        lines.append(
            "Δt_ADCM/Δt_ECT and Δt_ADCM/Δt_iCT at t (first seed, last partition), against ECT/iCT at the iteration "
            "the partition was built and at the end of the run: < 1 finer, > 1 coarser. The paper's picture: finer "
            "at small t, coarser at large t."
        )
        lines += ["", "| arm (\\|T\\|) | t | Δt | /ECT (built) | /ECT (end) | /iCT (built) | /iCT (end) |"]
        lines.append("|---|---|---|---|---|---|---|")
        for name, f in fig4.items():
            for row in f["rows"]:
                lines.append(
                    f"| {name} ({f['points']}) | {row['t']:g} | {row['dt']:.3g} | {row['ect_built']:.3g} | "
                    f"{row['ect_end']:.3g} | {row['ict_built']:.3g} | {row['ict_end']:.3g} |"
                )
    failed = {n: a["failed"] for n, a in arms.items() if a["failed"]}
    if failed:
        lines += ["", "## Failed runs", ""]
        for name, seeds in failed.items():
            for seed, f in seeds.items():
                lines.append(f"- {name} seed {seed}: before step {f['step']}: {f['error']}")
    lines += ["", "## Figures", ""]
    lines += [f"![{p}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    plt = _plt()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _colour(i: int) -> Any:
    return _plt().get_cmap("tab10")(i % 10)


def _plot_curves(
    ax: Any,
    summary: dict[str, Any],
    metric: str,
    start: float | None,
    floor: float | None,
    ceiling: tuple[str, float] | None = None,
) -> None:
    for i, (name, a) in enumerate(summary["arms"].items()):
        pts = [c for c in a["curve"] if c["metrics"][metric]["n"]]
        if not pts:
            continue
        x = [0.0, *(c["kimg"] for c in pts)] if start is not None else [c["kimg"] for c in pts]
        y = [c["metrics"][metric]["mean"] for c in pts]
        lo = [min(c["metrics"][metric]["values"]) for c in pts]
        hi = [max(c["metrics"][metric]["values"]) for c in pts]
        if start is not None:
            y, lo, hi = [start, *y], [start, *lo], [start, *hi]
        ax.plot(x, y, "o-", color=_colour(i), label=name, lw=1.4, ms=3)
        ax.fill_between(x, lo, hi, color=_colour(i), alpha=0.12)
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", lw=1, label="data floor")
    if ceiling is not None:
        ax.axhline(ceiling[1], color="0.4", ls="-.", lw=1, label=ceiling[0])
    ax.set_xlabel("training kimg")
    ax.grid(True, alpha=0.3)


def _plots(out_dir: Path, summary: dict[str, Any], records: StudyRecords) -> None:
    plt = _plt()
    t_mids = summary["t_mids"]
    start = summary.get("teacher", {}).get("start_curve")
    floor = summary.get("floor")
    # 1-step curves: KID and FID
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    teacher = summary.get("teacher")
    for ax, metric, label, fl in (
        (axes[0], "1step.kid", "1-step KID ×10³", floor and floor["curve"]),
        (axes[1], "1step.fid", "1-step FID", floor and floor["curve_fid"]),
    ):
        heun = None
        if teacher is not None:
            heun = (f"teacher, Heun {teacher['heun_nfe']} NFE", teacher["heun"]["curve"][metric.split(".")[1]])
        _plot_curves(ax, summary, metric, start and start.get(metric), fl, heun)
        ax.set_ylabel(label)
        ax.set_title(f"{label} along training (curve N; band: seed range; kimg 0: the teacher)", fontsize=9)
    axes[0].legend(fontsize=7)
    _save(fig, out_dir / "curves_1step.png")
    # 2-step curves and κ curves, one panel per t_mid
    for name, metric_of, label in (
        ("curves_2step.png", lambda t: f"{set_name(t)}.kid", "2-step KID ×10³"),
        ("kappa_vs_kimg.png", lambda t: f"kappa@{t:g}", "κ"),
    ):
        fig, axes = plt.subplots(1, len(t_mids), figsize=(4.2 * len(t_mids), 4), dpi=110, squeeze=False)
        for ax, t in zip(axes[0], t_mids, strict=True):
            metric = metric_of(t)
            fl = floor["curve"] if (floor and metric.endswith("kid")) else None
            _plot_curves(ax, summary, metric, start and start.get(metric), fl)
            ax.set_title(f"{label}, t_mid = {t:g}", fontsize=9)
            ax.set_ylabel(label)
        axes[0][0].legend(fontsize=7)
        _save(fig, out_dir / name)
    # κ vs the 2-step KID, every arm × seed × point
    fig, axes = plt.subplots(1, len(t_mids), figsize=(4.2 * len(t_mids), 4), dpi=110, squeeze=False)
    for ax, t in zip(axes[0], t_mids, strict=True):
        for i, (name, a) in enumerate(summary["arms"].items()):
            xs, ys, fr = [], [], []
            for c in a["curve"]:
                for m in c["per_seed"].values():
                    if f"kappa@{t:g}" in m:
                        xs.append(m[f"kappa@{t:g}"])
                        ys.append(m[f"{set_name(t)}.kid"])
                        fr.append(c["fraction"])
            ax.scatter(xs, ys, s=[8 + 30 * f for f in fr], color=_colour(i), alpha=0.6, label=name)
        if start is not None:
            ax.scatter(
                [start[f"kappa@{t:g}"]], [start[f"{set_name(t)}.kid"]], marker="*", s=120, color="k", label="teacher"
            )
        ax.set_xlabel(f"κ({t:g})")
        ax.set_ylabel(f"2-step KID ×10³ at t_mid = {t:g}")
        ax.grid(True, alpha=0.3)
        ax.set_title("κ vs 2-step KID (size: fraction of the run)", fontsize=9)
    axes[0][0].legend(fontsize=6)
    _save(fig, out_dir / "kappa_vs_2step.png")
    # the t_mid sweep at the budget
    fig, ax = plt.subplots(figsize=(6.6, 4.4), dpi=110)
    for i, (name, a) in enumerate(summary["arms"].items()):
        ivs = [a["final"][f"{set_name(t)}.kid"] for t in t_mids]
        keep = [(t, iv) for t, iv in zip(t_mids, ivs, strict=True) if iv["n"]]
        if not keep:
            continue
        y = [iv["mean"] for _, iv in keep]
        err = [
            [iv["mean"] - (iv["lo"] if iv["lo"] is not None else iv["mean"]) for _, iv in keep],
            [(iv["hi"] if iv["hi"] is not None else iv["mean"]) - iv["mean"] for _, iv in keep],
        ]
        ax.errorbar([t for t, _ in keep], y, yerr=err, fmt="o-", color=_colour(i), label=name, capsize=3, lw=1.2)
        one = a["final"]["1step.kid"]
        if one["n"]:
            ax.axhline(one["mean"], color=_colour(i), ls="--", lw=0.8)
    if start is not None and summary.get("teacher", {}).get("start_final"):
        sf = summary["teacher"]["start_final"]
        ax.plot(t_mids, [sf[f"{set_name(t)}.kid"] for t in t_mids], "k*:", label="teacher's consistency fn")
    ax.set_xscale("log")
    ax.set_xlabel("t_mid (VE σ)")
    ax.set_ylabel("2-step KID ×10³ at the budget")
    ax.set_title("t_mid sweep (mean, 95 % t-interval; dashed: each arm's 1 step)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out_dir / "tmid_sweep.png")
    # paired differences
    diffs = summary["differences"]
    cols = ["1step.kid", *(f"{set_name(t)}.kid" for t in t_mids)]
    fig, axes = plt.subplots(
        1, len(cols), figsize=(3.6 * len(cols), 0.5 + 0.45 * max(1, len(diffs))), dpi=110, squeeze=False
    )
    for ax, col in zip(axes[0], cols, strict=True):
        for j, d in enumerate(diffs):
            iv = d["metrics"][col]
            if not iv["n"]:
                continue
            lo = iv["lo"] if iv["lo"] is not None else iv["mean"]
            hi = iv["hi"] if iv["hi"] is not None else iv["mean"]
            ax.plot([lo, hi], [j, j], "-", color="tab:blue", lw=2)
            ax.plot([iv["mean"]], [j], "o", color="tab:blue")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(diffs)))
        ax.set_yticklabels([f"{d['arm']} − {d['baseline']}" for d in diffs] if col == cols[0] else [], fontsize=7)
        ax.set_title(col.replace(".kid", " KID ×10³"), fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    _save(fig, out_dir / "differences.png")
    _plot_schedules(out_dir / "schedules.png", records, summary.get("schedule_references"))


def _plot_schedules(path: Path, records: StudyRecords, references: dict[str, Any] | None) -> None:
    """Every ADCM arm's partitions (first seed) as Δt(t), log–log, with ECT's and iCT's at the end of the run
    (the paper's Fig. 4)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=110)
    seen = set()
    for r in sorted(records.runs, key=lambda r: (r["arm"], r["seed"])):
        if r["arm"] in seen or not r.get("partitions"):
            continue
        seen.add(r["arm"])
        for k, (it, pts) in enumerate(r["partitions"]):
            dts = [a - b for a, b in itertools.pairwise(pts)]
            ax.plot(
                pts[:-1],
                dts,
                "-" if k == len(r["partitions"]) - 1 else ":",
                lw=1.2 if k else 0.8,
                color=_colour(len(seen) - 1),
                label=f"{r['arm']} it {it} (|T|={len(pts)})",
            )
    if references is not None:
        for name, style in (("ect", "--"), ("ict", "-.")):
            ref = references[name]
            ax.plot(
                ref["t"], ref["dt"], style, color="k", lw=1, label=f"{name.upper()} at it {references['iteration']}"
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t (VE σ)")
    ax.set_ylabel("Δt = t − r")
    ax.set_title("ADCM partitions (first seed; solid: the last one) vs ECT / iCT at the end", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    if seen or references is not None:
        ax.legend(fontsize=5.5, loc="upper left")
    _save(fig, path)


def write_report(out_dir: Path, summary: dict[str, Any], records: StudyRecords, title: str) -> str:
    """``summary.json``, ``summary.md`` and the figures (:data:`PLOTS`) in ``out_dir``; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _markdown(summary, records, title)
    write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", text)
    _plots(out_dir, summary, records)
    return text


def report_study(load: ParamsLoader, study: StudyConfig, quick: bool, runs_dir: Path, out_dir: Path) -> str:
    """Recompute the report of ``runs_dir`` into ``out_dir`` (:func:`summarise`, :func:`write_report`).

    Raises:
        FIDError: there is no run record.
    """
    records = load_records(runs_dir)
    if not records.runs:
        raise FIDError(f"{runs_dir}: no run records (run `adcm study all` or `dvc repro study/dvc.yaml` first)")
    arms = {a.name: a for a in study.arms}

    def train_config(arm: str, seed: int) -> TrainConfig:
        return arm_params(load, study, arms[arm], seed, quick).train

    summary = summarise(records, study, quick, train_config)
    title = study.title + (" (quick variant)" if quick else "")
    return write_report(out_dir, summary, records, title)


_NOT_SETTINGS = frozenset(
    {
        "evals",
        "pieces",
        "partitions",
        "wall_seconds",
        "params",
        "teacher_network",
        "migrations",
        "schedule_process",
        "failed",
        "code",
    }
)


def compare_records(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two records of one run side by side — e.g. a study's record and a re-run of it from scratch elsewhere.

    Returns ``settings_differ`` (identity keys whose values differ: a re-run of the same run has none), and for every
    evaluation step both records have: the loss of that step in each and every metric (:func:`entry_metrics`, curve
    N, and at the budget the final N under ``final``) as ``[a, b]``; ``identical``: the same settings, steps and values
    (bit-exact, as on the same CPU model and torch build).
    """
    keys = sorted((set(a) | set(b)) - _NOT_SETTINGS)
    differ = [k for k in keys if a.get(k) != b.get(k)]
    t_mids = list(a.get("evaluation", {}).get("t_mids", ()))
    by_step_b = {e["step"]: e for e in b["evals"]}
    steps = []
    for ea in a["evals"]:
        eb = by_step_b.get(ea["step"])
        if eb is None:
            continue
        cb = entry_metrics(eb, "curve", t_mids)
        row: dict[str, Any] = {
            "step": ea["step"],
            "loss": [ea.get("final_loss"), eb.get("final_loss")],
            "metrics": {n: [v, cb.get(n)] for n, v in entry_metrics(ea, "curve", t_mids).items()},
        }
        if ea.get("final") and eb.get("final"):
            fb = entry_metrics(eb, "final", t_mids)
            row["final"] = {n: [v, fb.get(n)] for n, v in entry_metrics(ea, "final", t_mids).items()}
        steps.append(row)
    same_steps = [e["step"] for e in a["evals"]] == [e["step"] for e in b["evals"]]
    identical = (
        not differ
        and same_steps
        and all(
            r["loss"][0] == r["loss"][1]
            and all(x == y for x, y in r["metrics"].values())
            and all(x == y for x, y in r.get("final", {}).values())
            for r in steps
        )
    )
    return {"settings_differ": differ, "steps": steps, "identical": identical}
