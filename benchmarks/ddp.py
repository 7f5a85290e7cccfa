"""DDP scaling on one machine: `adcm train` in 1 process vs `torchrun --nproc-per-node N`, same global batch.

    python benchmarks/ddp.py                         # ECT, 24 iterations of 64 (--batch), 1 vs 2 gloo procs
    python benchmarks/ddp.py --nproc 4 --device cuda # NCCL on 4 GPUs

Every process count trains the same global batch (train.batch_size, split over the ranks) for the same
iterations from the same teacher; the script prints images/s of each and the largest relative difference
of the final EMA weights against the single process (the DDP path reproduces one process up to float
summation order; `tests/test_consistency.py::test_two_gloo_processes_match_one_process` asserts it).
On CPU the cores are shared out: N processes get cores/N threads each, so the comparison is at equal
hardware. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from adcm.io.files import atomic_write_text
from adcm.io.model_files import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--teacher", type=Path, default=Path("models/teacher.pt"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared/dataset.npz"))
    ap.add_argument("--method", default="ect")
    ap.add_argument("--iters", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64, help="global batch per iteration (split over the ranks)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/ddp.json"))
    args = ap.parse_args()
    if args.batch < 1 or args.batch % args.nproc:
        ap.error(f"--batch {args.batch} must be a positive multiple of --nproc {args.nproc}")
    cores = os.cpu_count() or 1
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.nproc):
            work = Path(tmp) / f"n{n}"
            sets = [
                f"method={args.method}",
                f"train.device={args.device}",
                f"train.duration_kimg={args.iters * args.batch / 1000}",
                f"train.batch_size={args.batch}",
                "train.batch_per_step=null",
                "train.grid_every_kimg=1000",
                "train.checkpoint_every_kimg=1000",
                "train.log_every_kimg=1000",
            ]
            cmd = [
                "-m",
                "adcm",
                "train",
                "--params",
                str(args.params),
                *[a for s in sets for a in ("-S", s)],
                "--data",
                str(args.data),
                "--teacher",
                str(args.teacher),
                "--out",
                str(work / "student.pt"),
                "--metrics",
                str(work / "train.json"),
                "--grid-dir",
                str(work / "grids"),
                "--checkpoint-dir",
                str(work / "ckpt"),
                "--log-dir",
                str(work / "live"),
                "--no-progress",
                "--fresh",
            ]
            if n == 1:
                launcher = [sys.executable]
            else:
                torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
                launcher = [torchrun, "--nproc-per-node", str(n), "--master-port", "29531"]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
            subprocess.run([*launcher, *cmd], check=True, env=env)
            metrics = json.loads((work / "train.json").read_text())
            state = load_teacher(work / "student.pt").state_dict
            results[n] = {
                "img_per_s": metrics["kimg"] * 1000 / metrics["train_seconds"],
                "train_seconds": metrics["train_seconds"],
                "state": state,
                "threads_per_process": max(1, cores // n),
            }
    base = results[1]["state"]
    diff = max(
        float((results[args.nproc]["state"][k] - v).abs().max() / v.abs().max().clamp(min=1e-12))
        for k, v in base.items()
        if torch.is_floating_point(v)
    )
    speedup = results[args.nproc]["img_per_s"] / results[1]["img_per_s"]
    print(f"{args.method}, {args.iters} iterations of {args.batch} images, {cores} cores, device {args.device}")
    for n, r in results.items():
        print(f"  {n} process(es) × {r['threads_per_process']} threads: {r['img_per_s']:8.1f} img/s")
    print(f"  speed-up {speedup:.2f}×; largest relative EMA weight difference vs 1 process: {diff:.2e}")
    atomic_write_text(
        args.out,
        json.dumps(
            {
                "method": args.method,
                "iters": args.iters,
                "batch": args.batch,
                "cores": cores,
                "device": args.device,
                "img_per_s": {str(n): r["img_per_s"] for n, r in results.items()},
                "speedup": speedup,
                "max_rel_weight_diff": diff,
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
