"""Peak resident memory of `adcm prepare` and of a short training run, as the dataset grows; JSON out.

    python benchmarks/memory.py                                 # 10k, 25k and 50k synthetic 64×64 images
    python benchmarks/memory.py --sizes 2000 --resolution 32    # quicker
    python benchmarks/memory.py --out reports/memory.json

For each size N a synthetic ImageNet-style tree (``class_k/i.jpg``, 10 classes, JPEGs of odd sizes between
48 and 100 pixels a side) is written to a temporary directory; then, each in its own subprocess (run under
``nice -n 10`` with ``OMP_NUM_THREADS=1``):

* ``adcm prepare`` (``prepare.dataset: folder``, ``prepare.resolution``): ADM's centre crop of every image,
  streamed into ``dataset.npz``;
* ``adcm teacher -S teacher.source=train`` for a few iterations of a tiny DDPM++ on the prepared file
  (batches drawn by :class:`adcm.train.batches.BatchSource`: held in memory up to
  :data:`~adcm.train.batches.RESIDENT_BYTES`, read from the memory-mapped file above that), ending with
  its sample grid;
* for reference, a process that only imports what the training imports (torch etc.).

The peak resident set of each child is ``ru_maxrss`` of that child (``os.wait4``). The parent imports
nothing heavy: a child started with ``vfork`` starts its peak at the parent's resident set. Run the
script itself at normal priority (it lowers its children's; a second ``nice`` would push them to 19,
where a busy machine starves them). Not a test: nothing is asserted; docs/performance.md#memory has the
measured numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10
SIZES = [(48, 48), (64, 64), (72, 96), (96, 72), (100, 67), (67, 100), (80, 80), (99, 57)]

TINY_TRAINING = {
    "teacher.source": "train",
    "teacher.device": "cpu",
    "teacher.network.model_channels": 8,
    "teacher.network.channel_mult": "[1, 2]",
    "teacher.network.channel_mult_emb": 2,
    "teacher.network.num_blocks": 1,
    "teacher.network.attn_resolutions": "[4]",  # no attention at these sizes (a non-empty list is required)
    "teacher.network.class_conditional": "false",
    "teacher.batch_size": 16,
    "teacher.batch_per_step": "null",
    "teacher.lr_rampup_kimg": 0.016,
    "teacher.ema_halflife_kimg": 0.05,
    "teacher.checkpoint_every_kimg": 1000,
    "teacher.log_every_kimg": 0.016,
    "teacher.sampler.num_steps": 2,
    "teacher.sampler.grid_rows": 2,
}


def generate(directory: Path, count: int, seed: int) -> None:
    """Write ``count`` JPEGs of smooth random content and varied sizes into ``CLASSES`` class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(CLASSES):
        (directory / f"class_{k:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        image.save(directory / f"class_{i % CLASSES:02d}" / f"{i:06d}.jpg", quality=90)


def run_measured(args: list[str], cwd: Path, log: Path) -> dict[str, float]:
    """Run ``args`` (nice 10, one thread) and return its wall time and peak resident set (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(["nice", "-n", "10", *args], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(args[:4])} … failed ({proc.returncode}):\n{tail}")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1)}


def measure(size: int, resolution: int, iterations: int, work: Path, params: Path) -> dict[str, object]:
    tree, out = work / "tree", work / "prepared"
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--generate", str(tree), str(size)], check=True, env=env)
    generated = time.perf_counter() - started
    adcm = [sys.executable, "-m", "adcm"]
    overrides = ["prepare.dataset=folder", f"prepare.source={tree}", f"prepare.resolution={resolution}"]
    prepare = run_measured(
        [*adcm, "prepare", "--params", str(params), *_set(overrides), "--out-dir", str(out)], work, work / "prepare.log"
    )
    data = out / "dataset.npz"
    meta = json.loads((out / "dataset.json").read_text())
    kimg = iterations * int(TINY_TRAINING["teacher.batch_size"]) / 1000
    train_overrides = [f"{k}={v}" for k, v in {**TINY_TRAINING, "teacher.duration_kimg": kimg}.items()]
    train = run_measured(
        [
            *adcm,
            "teacher",
            "--params",
            str(params),
            *_set(train_overrides),
            "--data",
            str(data),
            "--out",
            str(work / "teacher.pt"),
            "--grid",
            str(work / "grid.png"),
            "--metrics",
            str(work / "teacher.json"),
            "--checkpoint-dir",
            str(work / "ckpt"),
            "--log-dir",
            str(work / "live"),
            "--no-progress",
        ],
        work,
        work / "train.log",
    )
    from_file = data.stat().st_size > resident_bytes()
    result: dict[str, object] = {
        "images": size,
        "prepared_bytes": data.stat().st_size,
        "count": meta["count"],
        "classes": meta["num_classes"],
        "generate_seconds": round(generated, 1),
        "prepare": prepare,
        "train": {
            **train,
            "iterations": iterations,
            "batches": "read from the file" if from_file else "held in memory",
        },
    }
    shutil.rmtree(tree)
    shutil.rmtree(out)
    return result


def _set(overrides: list[str]) -> list[str]:
    return [part for item in overrides for part in ("-S", item)]


def resident_bytes() -> int:
    """:data:`adcm.train.batches.RESIDENT_BYTES`, read in a child (the parent stays small)."""
    code = "from adcm.train.batches import RESIDENT_BYTES; print(RESIDENT_BYTES)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 25_000, 50_000], help="images per run")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=4, help="training iterations (batch 16)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="base params (overridden with -S)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--generate", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]), seed=0)
        return
    results: dict[str, object] = {
        "resolution": args.resolution,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "resident_bytes": resident_bytes(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="adcm-memory-") as tmp:
        work = Path(tmp)
        baseline = run_measured(
            [sys.executable, "-c", "import adcm.stages.cli, adcm.train.runs"], work, work / "import.log"
        )
        results["import_only"] = baseline
        for size in args.sizes:
            run_dir = work / f"n{size}"
            run_dir.mkdir()
            run = measure(size, args.resolution, args.iterations, run_dir, args.params.resolve())
            results["runs"].append(run)  # type: ignore[attr-defined]
            print(json.dumps(run), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
