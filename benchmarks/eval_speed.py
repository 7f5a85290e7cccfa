"""Evaluation throughput side by side: Inception features and the teacher's sampler, by batch size and memory format.

    python benchmarks/eval_speed.py                  # the embedded default (params.yaml), on the CPU
    python benchmarks/eval_speed.py --out reports/bench/eval-cpu.json

The evaluation stages (``fid_reference``, ``sample``, ``score``) spend their time in two networks run
without gradients: clean-fid's Inception (2,600 images of 299×299 in the embedded default: the 1,000
reference images and four sets of 400) and the teacher's Heun sampler (400 images × 35 NFE). On a CPU
their speed depends on the images per forward pass (cache reuse) and on the memory format of the
convolutions, neither of which changes the numbers (features within 1e-5, images per seed; see
docs/performance.md#evaluation-throughput). Every configuration is timed once per round, in turn, and
the median round kept, so the ratios come from the same run. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench import describe_device, interleaved  # this directory's side-by-side timing

from adcm.config import load_params
from adcm.eval.fid import build_extractor, image_features, resolve_inception_weights
from adcm.io.files import atomic_write_text
from adcm.nets.precond import denoiser
from adcm.processes import coordinates
from adcm.sampling.generate import HeunSampler, generate
from adcm.train.runs import network_kwargs_for


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is kept)")
    ap.add_argument("--fid-images", type=int, default=50, help="images per Inception measurement")
    ap.add_argument("--fid-batches", type=_ints, default=[5, 10, 25, 50], help="Inception batch sizes")
    ap.add_argument("--sample-images", type=int, default=100, help="images per sampler measurement")
    ap.add_argument("--sample-batches", type=_ints, default=[10, 25, 50, 100], help="sampler batch sizes")
    ap.add_argument(
        "--teacher-steps", type=int, default=4, help="Heun steps (7 NFE; the rate is reported per network evaluation)"
    )
    ap.add_argument("--out", type=Path, default=Path("reports/bench/eval.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    params = load_params(args.params, [])
    channels = 1 if params.prepare.dataset == "fashion-mnist" else 3
    resolution = params.prepare.resolution
    rng = np.random.default_rng(0)

    # Inception: the score stage's path (image_features: clean resize, then the network), gray images as there.
    weights, identity = resolve_inception_weights(
        Path(params.score.inception_path) if params.score.inception_path else None
    )
    extractors = {cl: build_extractor(weights, device, channels_last=cl) for cl in (False, True)}
    imgs = rng.integers(0, 256, size=(args.fid_images, channels, resolution, resolution), dtype=np.uint8)

    def features(batch: int, cl: bool) -> Callable[[], None]:
        def run() -> None:
            image_features(imgs, extractors[cl], batch, device)

        return run

    fid_fns = {
        f"batch {b}, {'channels_last' if cl else 'contiguous'}": features(b, cl)
        for b in args.fid_batches
        for cl in (False, True)
    }
    fid_s = interleaved(fid_fns, args.rounds, 1, device)

    # The teacher's Heun sampler on the teacher's architecture (weights do not change the speed).
    kwargs = network_kwargs_for(params.teacher.network, resolution, channels, 0)
    torch.manual_seed(0)
    net = denoiser(kwargs, params.teacher.sigma_data)
    steps = args.teacher_steps
    nfe = 2 * steps - 1
    ve = params.processes.ve
    heun = HeunSampler(coordinates("ve"), steps, ve.eps, ve.t_max)
    seeds = list(range(args.sample_images))

    def sample(batch: int) -> Callable[[], None]:
        def run() -> None:
            generate(net, heun, seeds, shape=(channels, resolution, resolution), batch_size=batch, device=device)

        return run

    sample_s = interleaved({f"batch {b}": sample(b) for b in args.sample_batches}, args.rounds, 1, device)

    device_name = describe_device(device)
    fid_rate = {name: args.fid_images / s for name, s in fid_s.items()}
    sample_rate = {name: args.sample_images * nfe / s for name, s in sample_s.items()}
    print(f"{device_name}; median of {args.rounds} interleaved rounds")
    print(f"Inception features ({identity}), {args.fid_images} images of {channels}×{resolution}²:")
    for name, rate in fid_rate.items():
        print(f"  {name:<32} {rate:8.2f} img/s")
    print(f"teacher's Heun sampler ({nfe} NFE), {args.sample_images} images, network evaluations × images per s:")
    for name, rate in sample_rate.items():
        print(f"  {name:<32} {rate:8.1f} NFE·img/s")
    atomic_write_text(
        args.out,
        json.dumps(
            {
                "device": device_name,
                "threads": torch.get_num_threads(),
                "rounds": args.rounds,
                "inception": identity,
                "fid_images": args.fid_images,
                "fid_img_per_s": fid_rate,
                "sample_images": args.sample_images,
                "teacher_nfe": nfe,
                "sample_nfe_img_per_s": sample_rate,
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    main()
