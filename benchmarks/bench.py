"""Side-by-side throughput benchmarks: one process, one network, one batch, interleaved rounds; a table and JSON.

    python benchmarks/bench.py                      # the embedded default's network (params.yaml), batch 64
    python benchmarks/bench.py --fid                # also Inception feature extraction
    python benchmarks/bench.py --network cifar10 --batch 128 --device cuda   # the paper's DDPM++ (55.7M)

Measured, each as images/s of one real optimizer step of the training loop
(:meth:`adcm.train.loop.Trainer.step`: draws, forward, backward, optimizer, EMA):
diffusion training (EDM loss), ECT, iCT, ADCM (its rebuilds amortised over the run as params.yaml schedules
them — the whole-run ADCM/ECT time ratio — and at the paper's 25k iterations) and sCT (one JVP per step).
Also one ADCM partition rebuild (the batched builder's, timed; Algorithm 1's estimated as |T| JVPs at the
partition batch size), sampling (1 step, 2 steps, the teacher's Heun 35 NFE) and FID features.

Every configuration is timed in each of ``--rounds`` rounds, in turn, and the median round is kept, so
slow drifts of the machine (thermal, other load) hit all of them alike; ratios (ADCM/ECT, CT/diffusion)
come from the same run. On CUDA the GPU path of ``params.yaml`` applies (bf16 autocast, channels_last,
TF32, fused/foreach optimizer). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from adcm.config import Params, load_params
from adcm.io.datasets import ImageDataset
from adcm.io.files import atomic_write_text
from adcm.io.model_files import TeacherFile
from adcm.method.adcm import adcm_step, build_partition_batched
from adcm.method.discretization import fraction_of_run, period_index
from adcm.nets.precond import denoiser
from adcm.processes import VEProcess, coordinates
from adcm.sampling.generate import ConsistencySampler, HeunSampler, generate
from adcm.train.batches import BatchSource
from adcm.train.loop import Trainer
from adcm.train.runs import network_kwargs_for, student_spec, teacher_spec

CIFAR10 = dict(
    img_resolution=32,
    in_channels=3,
    out_channels=3,
    label_dim=0,
    augment_dim=9,
    model_channels=128,
    channel_mult=[2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.2,
    label_dropout=0.0,
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
)
PAPER_REBUILD_EVERY = 25_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's and the number of threads, for a benchmark's table and JSON."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, iters: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function over ``rounds`` rounds of ``iters`` calls, taken in turn."""
    times = interleaved_rounds(fns, rounds, iters, device)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_rounds(
    fns: dict[str, Callable[[], None]], rounds: int, iters: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``rounds`` rounds of ``iters`` calls, taken in turn (after one
    warm-up call each), so that ratios can be paired round by round."""
    for fn in fns.values():  # warm-up (allocators, kernel selection, first-call overheads)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / iters)
    return times


def _trainer(
    params: Params, method: str | None, teacher: TeacherFile, data: ImageDataset, device: torch.device
) -> Trainer:
    """The real training step of ``method`` (None: the teacher's diffusion step) on ``data``."""
    batches = BatchSource(data.images, data.labels, 0, False, device)
    if method is None:  # the teacher's run settings, on the benchmarked network
        spec = dataclasses.replace(teacher_spec(params, data, "bench"), net=teacher.denoiser())
    else:
        spec = student_spec(params, teacher, data, teacher_id="bench", data_id="bench", world_size=1, device=device)
    return Trainer(spec, batches, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--network", choices=["default", "cifar10"], default="default")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is kept)")
    ap.add_argument("--iters", type=int, default=3, help="steps per configuration and round")
    ap.add_argument("--jvps", type=int, default=20, help="JVPs timed for the rebuild rate")
    ap.add_argument(
        "--partition-points",
        type=int,
        default=1044,
        help="|T| of a rebuild (1044: measured on the embedded default at λ = 0.01)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fid", action="store_true", help="also time Inception feature extraction")
    ap.add_argument("--out", type=Path, default=Path("reports/bench/bench.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    sets = [
        f"train.batch_size={args.batch}",
        "train.batch_per_step=null",
        f"teacher.batch_size={args.batch}",
        "teacher.batch_per_step=null",
        "process=ve",
    ]
    params = load_params(args.params, sets)
    cfg = params.train
    ve = VEProcess(eps=params.processes.ve.eps, t_max=params.processes.ve.t_max)
    if args.network == "cifar10":
        kwargs = dict(CIFAR10)
    else:
        channels = 1 if params.prepare.dataset == "fashion-mnist" else 3
        kwargs = network_kwargs_for(params.teacher.network, params.prepare.resolution, channels, 0)
    shape = (args.batch, kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    rng = np.random.default_rng(0)
    data = ImageDataset(
        rng.integers(0, 256, size=(max(4 * args.batch, 256), *shape[1:]), dtype=np.uint8), None, "bench", None
    )
    torch.manual_seed(0)
    teacher = TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5).state_dict(), {"source": "bench"})
    trainers = {"diffusion": _trainer(params, None, teacher, data, device)}
    for method in ("ect", "ict", "adcm", "sct"):
        trainers[method] = _trainer(
            load_params(args.params, [*sets, f"method={method}"]), method, teacher, data, device
        )
    # A geometric partition of the measured size stands in for a built one (its rebuild is timed below).
    pts = torch.logspace(math.log10(ve.t_max), math.log10(ve.eps), args.partition_points, dtype=torch.float64)
    trainers["adcm"].objective.load_state_dict({"kind": "adcm", "seed": 0, "partitions": [(0, pts)]})
    fast = trainers["ect"].spec.settings.fast
    params_count = sum(p.numel() for p in trainers["ect"].net.parameters())
    counter = {name: 1 for name in trainers}

    def stepper(name: str) -> Callable[[], None]:
        def run() -> None:
            trainers[name].step(counter[name])
            counter[name] += 1

        return run

    steps = interleaved({name: stepper(name) for name in trainers}, args.rounds, args.iters, device)

    # One partition rebuild with this params.yaml's builder, dropout off. Batched: the real rebuild (its cost is
    # partition_times × partition_batch_size JVP rows whatever λ). Sequential (Algorithm 1): |T| evaluations of
    # Eq. 10, one JVP each at the partition batch size, timed per JVP and multiplied by --partition-points.
    pb = cfg.adcm.partition_batch_size
    frozen = teacher.consistency_function(ve.eps).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    xp = torch.rand((pb, *shape[1:]), generator=gen).to(device) * 2 - 1
    zp = torch.randn((pb, *shape[1:]), generator=gen).to(device)
    jvp_s = interleaved({"jvp": lambda: adcm_step(frozen, xp, zp, 1.0, params.lam, ve)}, 1, args.jvps, device)["jvp"]
    sequential_rebuild_s = jvp_s * (args.partition_points - 1)

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        return (torch.rand((n, *shape[1:]), generator=g) * 2 - 1).to(device)

    def batched_rebuild() -> None:
        build_partition_batched(
            frozen,
            draw,
            torch.Generator().manual_seed(0),
            process=ve,
            lam=params.lam,
            batch_size=pb,
            num_times=cfg.adcm.partition_times,
            max_points=cfg.adcm.max_points,
        )

    batched_rebuild_s = interleaved({"rebuild": batched_rebuild}, 1, 2, device)["rebuild"]
    rebuild_s = batched_rebuild_s if cfg.adcm.partition == "batched" else sequential_rebuild_s
    total_iters = max(1, math.ceil(cfg.duration_kimg * 1000 / cfg.batch_size))
    run_period = fraction_of_run(cfg.adcm.rebuild_fraction, total_iters)  # this params.yaml's rebuild period
    rebuilds_per_run = period_index(total_iters - 1, run_period) + 1  # at iterations 0, period, 2·period, …
    amortised = {
        "params": steps["adcm"] + rebuild_s * rebuilds_per_run / total_iters,
        "paper": steps["adcm"] + rebuild_s / PAPER_REBUILD_EVERY,
    }

    d_eval = teacher.denoiser().to(device)
    seeds = list(range(args.batch))

    def sample(net: torch.nn.Module, sampler: ConsistencySampler | HeunSampler) -> Callable[[], None]:
        return lambda: generate(net, sampler, seeds, shape=shape[1:], batch_size=args.batch, device=device)

    sampling = interleaved(
        {
            "1step": sample(frozen, ConsistencySampler(ve)),
            "2step": sample(frozen, ConsistencySampler(ve, (0.42,))),
            "heun35": sample(d_eval, HeunSampler(coordinates("ve"), 18, ve.eps, ve.t_max)),
        },
        max(1, args.rounds // 2),
        1,
        device,
    )
    fid_rate = None
    if args.fid:
        from adcm.eval.fid import build_extractor, image_features, resolve_inception_weights

        ext = build_extractor(resolve_inception_weights(None)[0], device)
        imgs = torch.randint(0, 256, (32, kwargs["in_channels"], 32, 32), dtype=torch.uint8).numpy()
        fid_rate = 32 / interleaved({"fid": lambda: image_features(imgs, ext, 32, device)}, 3, 1, device)["fid"]

    b = args.batch
    table = [
        ("diffusion step (EDM loss)", b / steps["diffusion"]),
        ("ECT step", b / steps["ect"]),
        ("iCT step", b / steps["ict"]),
        ("ADCM step (partition given)", b / steps["adcm"]),
        (
            f"ADCM step + {rebuilds_per_run} {cfg.adcm.partition} rebuilds per {total_iters} it (params.yaml)",
            b / amortised["params"],
        ),
        (f"ADCM step + rebuild every {PAPER_REBUILD_EVERY} it (paper)", b / amortised["paper"]),
        ("sCT step (JVP + forward + backward)", b / steps["sct"]),
        ("sampling, 1 step", b / sampling["1step"]),
        ("sampling, 2 steps", b / sampling["2step"]),
        ("sampling, Heun 35 NFE (teacher)", b / sampling["heun35"]),
    ]
    if fid_rate is not None:
        table.append(("FID features (Inception, 299×299)", fid_rate))
    ratios = {
        "adcm_over_ect_time_paper_period": amortised["paper"] / steps["ect"],
        "adcm_over_ect_time_params_period": amortised["params"] / steps["ect"],
        "adcm_step_over_ect_step_time": steps["adcm"] / steps["ect"],
        "ct_over_diffusion_time": steps["ect"] / steps["diffusion"],
        "sct_over_ect_time": steps["sct"] / steps["ect"],
        "jvps_per_s": 1 / jvp_s,
        "rebuild_s": rebuild_s,
        "rebuild_s_batched": batched_rebuild_s,
        "rebuild_s_sequential_estimate": sequential_rebuild_s,
    }
    device_name = describe_device(device)
    print(
        f"network {args.network} ({params_count / 1e6:.2f}M parameters), batch {b}, {device_name}; "
        f"median of {args.rounds} interleaved rounds × {args.iters} steps"
    )
    for name, rate in table:
        print(f"  {name:<52} {rate:10.1f} img/s")
    print(
        f"  ADCM/ECT time: {ratios['adcm_over_ect_time_paper_period']:.3f} (rebuild every {PAPER_REBUILD_EVERY}), "
        f"{ratios['adcm_over_ect_time_params_period']:.3f} (this run: {rebuilds_per_run} rebuilds); step alone "
        f"{ratios['adcm_step_over_ect_step_time']:.3f}"
    )
    print(
        f"  CT/diffusion time {ratios['ct_over_diffusion_time']:.3f}   sCT/ECT time {ratios['sct_over_ect_time']:.3f}"
    )
    print(
        f"  partition rebuild: batched {batched_rebuild_s:.1f} s ({cfg.adcm.partition_times} times × {pb}); "
        f"sequential ≈ {sequential_rebuild_s:.1f} s for |T| = {args.partition_points} "
        f"({ratios['jvps_per_s']:.2f} JVP/s at batch {pb})"
    )
    atomic_write_text(
        args.out,
        json.dumps(
            {
                "network": args.network,
                "parameters": params_count,
                "batch": b,
                "device": device_name,
                "threads": torch.get_num_threads(),
                "fast_path": dataclasses.asdict(fast),
                "rounds": args.rounds,
                "iters": args.iters,
                "partition_points": args.partition_points,
                "partition_batch": pb,
                "img_per_s": dict(table),
                "ratios": ratios,
                "seconds": {
                    **{f"{k}_step": v for k, v in steps.items()},
                    **{f"sample_{k}": v for k, v in sampling.items()},
                    "jvp": jvp_s,
                },
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
