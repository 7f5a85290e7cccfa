"""ADCM's partition: the sequential builder (paper Algorithm 1) against the batched one, side by side.

    python benchmarks/partition.py --teacher models/teacher.pt --data data/prepared/dataset.npz

For each λ, both builders run on the same teacher (its ε-shifted consistency function, dropout off),
interleaved, and the script reports: wall time of one rebuild and the speed-up; |T| of each and their
ratio; the median ratio of the batched to the sequential Δt(t) over t ∈ [ε, 10] (matched by
interpolating the sequential step in ln t); and the noise of each builder's Δt at t > 10 — the
relative spread (std/mean) of Δt at fixed t over ``--repeats`` builds with different seeds. JSON to
``--out``. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from adcm.io.datasets import load_prepared
from adcm.io.files import atomic_write_text
from adcm.io.model_files import load_teacher
from adcm.method.adcm import build_partition, build_partition_batched
from adcm.processes import VEProcess
from adcm.train.batches import BatchSource


def _dt_at(points: torch.Tensor, t: np.ndarray) -> np.ndarray:
    """Δt of the partition interpolated in ln t at the times ``t``."""
    pts = points.numpy()
    tt, dt = pts[:-1][::-1], (pts[:-1] - pts[1:])[::-1]
    return np.exp(np.interp(np.log(t), np.log(tt), np.log(dt)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("models/teacher.pt"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared/dataset.npz"))
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    ap.add_argument("--sequential-batch", type=int, default=8, help="samples per point, sequential (Algorithm 1)")
    ap.add_argument("--batched-batch", type=int, default=64, help="samples per grid time, batched")
    ap.add_argument(
        "--times", type=int, nargs="+", default=[8, 16], help="grid times of the batched builder (one build per value)"
    )
    ap.add_argument("--chunk", type=int, default=64, help="JVP rows per call, batched")
    ap.add_argument("--repeats", type=int, default=3, help="builds per builder (seeds 0…) for the spread at t > 10")
    ap.add_argument("--max-points", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=Path("reports/bench/partition.json"))
    args = ap.parse_args()
    teacher = load_teacher(args.teacher)
    proc = VEProcess()
    fn = teacher.consistency_function(proc.eps).eval()
    data = load_prepared(args.data)
    batches = BatchSource(data.images, data.labels, 0, False, torch.device("cpu"))

    def draw(n: int, gen: torch.Generator) -> torch.Tensor:
        return batches.sample(n, gen)[0]

    results = []
    probe = np.exp(np.linspace(math.log(proc.eps * 1.01), math.log(10.0), 200))
    high = np.exp(np.linspace(math.log(10.0), math.log(proc.t_max * 0.99), 40))
    for lam in args.lambdas:
        names = ["sequential"] + [f"batched-{n}" for n in args.times]
        builds: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for seed in range(args.repeats):
            for name in names:  # interleaved: drifts of the machine hit all alike
                gen = torch.Generator().manual_seed(seed)
                t0 = time.perf_counter()
                if name == "sequential":
                    pts = build_partition(
                        fn,
                        draw,
                        gen,
                        process=proc,
                        lam=lam,
                        batch_size=args.sequential_batch,
                        max_points=args.max_points,
                    )
                else:
                    pts = build_partition_batched(
                        fn,
                        draw,
                        gen,
                        process=proc,
                        lam=lam,
                        batch_size=args.batched_batch,
                        num_times=int(name.split("-")[1]),
                        chunk_size=args.chunk,
                        max_points=args.max_points,
                    )
                seconds[name].append(time.perf_counter() - t0)
                builds[name].append(pts)
        seq = builds["sequential"][0]

        def spread(name: str, builds: dict[str, list[torch.Tensor]] = builds) -> float:
            dts = np.stack([_dt_at(p, high) for p in builds[name]])
            return float(np.median(dts.std(0) / dts.mean(0)))

        row: dict[str, object] = {
            "lambda": lam,
            "seconds_sequential": float(np.median(seconds["sequential"])),
            "seconds_sequential_each": seconds["sequential"],
            "points_sequential": [int(p.numel()) for p in builds["sequential"]],
            "dt_spread_t_gt_10_sequential": spread("sequential"),
            "batched": [],
        }
        line = f"λ = {lam:g}: sequential {row['seconds_sequential']:.1f} s (|T| {row['points_sequential']})"
        for n in args.times:
            name = f"batched-{n}"
            bat = builds[name][0]
            ratio = _dt_at(bat, probe) / _dt_at(seq, probe)
            entry = {
                "times": n,
                "jvp_rows": n * args.batched_batch,
                "seconds": float(np.median(seconds[name])),
                "seconds_each": seconds[name],
                "points": [int(p.numel()) for p in builds[name]],
                "median_dt_ratio_t_le_10": float(np.median(ratio)),
                "dt_ratio_p10_p90_t_le_10": [float(np.percentile(ratio, 10)), float(np.percentile(ratio, 90))],
                "dt_spread_t_gt_10": spread(name),
            }
            entry["speedup"] = row["seconds_sequential"] / entry["seconds"]  # type: ignore[operator]
            entry["points_ratio"] = entry["points"][0] / row["points_sequential"][0]  # type: ignore[index]
            row["batched"].append(entry)  # type: ignore[attr-defined]
            line += (
                f"; batched×{n} {entry['seconds']:.2f} s (|T| {entry['points']}): {entry['speedup']:.1f}× faster, "
                f"|T| ratio {entry['points_ratio']:.3f}, median Δt ratio (t ≤ 10) "
                f"{entry['median_dt_ratio_t_le_10']:.3f}, spread at t > 10 "
                f"{row['dt_spread_t_gt_10_sequential']:.2f} → {entry['dt_spread_t_gt_10']:.2f}"
            )
        results.append(row)
        print(line, flush=True)
    atomic_write_text(
        args.out,
        json.dumps(
            {
                "teacher": str(args.teacher),
                "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                "sequential_batch": args.sequential_batch,
                "batched_batch": args.batched_batch,
                "times": list(args.times),
                "chunk": args.chunk,
                "repeats": args.repeats,
                "results": results,
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
