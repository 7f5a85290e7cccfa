"""Dropout masks on the CPU side by side: PyTorch's ``bernoulli_`` against the project's 16-bit-level masks.

    python benchmarks/dropout.py                          # the embedded default (params.yaml), batch 64
    python benchmarks/dropout.py --out reports/bench/dropout-cpu.json

The residual blocks of both backbones drop activations through :func:`adcm.nets.dropout.dropout`; on the
CPU it draws four 16-bit levels per 64-bit word of the global generator where PyTorch draws one
Bernoulli variate per element (docs/performance.md#dropout-masks-on-the-cpu). This times the real
training step (:meth:`adcm.train.loop.Trainer.step`: ECT, and ADCM on a given partition) with each, the
backbones' dropout swapped in place before every step, in interleaved rounds (``bench.interleaved_rounds``);
it reports the median round of each and the median of the per-round ratios, so slow drifts of the machine
hit both alike. Not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from bench import _trainer, describe_device, interleaved_rounds  # this directory's helpers

import adcm.nets.songunet as songunet
from adcm.config import load_params
from adcm.io.datasets import ImageDataset
from adcm.io.files import atomic_write_text
from adcm.io.model_files import TeacherFile
from adcm.nets.dropout import dropout
from adcm.nets.precond import denoiser
from adcm.train.runs import network_kwargs_for


def _pytorch_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return nnf.dropout(x, p=p, training=training)


IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor, float, bool], torch.Tensor]] = {
    "pytorch (bernoulli_)": _pytorch_dropout,
    "adcm (16-bit levels)": dropout,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is kept)")
    ap.add_argument("--iters", type=int, default=3, help="training steps per implementation and round")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/dropout-cpu.json"))
    args = ap.parse_args()
    device = torch.device("cpu")
    sets = [f"train.batch_size={args.batch}", "train.batch_per_step=null", "process=ve", "train.device=cpu"]
    params = load_params(args.params, sets)
    channels = 1 if params.prepare.dataset == "fashion-mnist" else 3
    kwargs = network_kwargs_for(params.teacher.network, params.prepare.resolution, channels, 0)
    res = kwargs["img_resolution"]
    data = ImageDataset(
        np.random.default_rng(0).integers(0, 256, size=(4 * args.batch, channels, res, res), dtype=np.uint8),
        None,
        "bench",
        None,
    )
    torch.manual_seed(0)
    teacher = TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5).state_dict(), {"source": "bench"})
    trainers = {
        m: _trainer(load_params(args.params, [*sets, f"method={m}"]), m, teacher, data, device) for m in ("ect", "adcm")
    }
    ve = params.processes.ve
    pts = torch.logspace(math.log10(ve.t_max), math.log10(ve.eps), 1044, dtype=torch.float64)
    trainers["adcm"].objective.load_state_dict({"kind": "adcm", "seed": 0, "partitions": [(0, pts)]})
    step = {m: 1 for m in trainers}

    def timed(method: str, implementation: Callable[[torch.Tensor, float, bool], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            songunet.dropout = implementation  # type: ignore[assignment]
            trainers[method].step(step[method])
            step[method] += 1

        return run

    fns = {f"{m}|{name}": timed(m, impl) for m in trainers for name, impl in IMPLEMENTATIONS.items()}
    try:
        rounds = interleaved_rounds(fns, args.rounds, args.iters, device)
    finally:
        songunet.dropout = dropout  # type: ignore[assignment]
    seconds = {m: {name: rounds[f"{m}|{name}"] for name in IMPLEMENTATIONS} for m in trainers}
    old, new = IMPLEMENTATIONS
    result: dict[str, object] = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "batch": args.batch,
        "dropout": params.train.dropout,
        "rounds": args.rounds,
        "img_per_s": {
            m: {name: args.batch / statistics.median(v) for name, v in per.items()} for m, per in seconds.items()
        },
        "speedup_median_of_round_ratios": {
            m: statistics.median(a / b for a, b in zip(per[old], per[new], strict=True)) for m, per in seconds.items()
        },
    }
    print(f"{describe_device(device)}, torch {torch.__version__}, batch {args.batch}, dropout {params.train.dropout}")
    print(f"{'training step':<16}{old:>24}{new:>24}{'speed-up':>12}")
    for m in trainers:
        rates = result["img_per_s"][m]  # type: ignore[index]
        ratio = result["speedup_median_of_round_ratios"][m]  # type: ignore[index]
        print(f"{m:<16}{rates[old]:>18.1f} img/s{rates[new]:>18.1f} img/s{ratio:>11.2f}×")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
