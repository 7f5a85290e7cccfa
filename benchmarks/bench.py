"""Side-by-side throughput benchmarks (one process, same network, same batch): a table and a JSON file.

    python benchmarks/bench.py                      # the embedded default's teacher network, batch 64
    python benchmarks/bench.py --network cifar10 --batch 128 --device cuda

Measures one training step (images/s) for diffusion training (EDM loss), ECT, iCT and ADCM (the
partition rebuild amortised over `--rebuild-every` iterations), one ADCM partition rebuild (|T| from
`--points` JVPs), sampling (1 step, 2 steps, Heun 35 NFE) and FID feature extraction. Ratios
(ADCM/ECT time, CT/diffusion time) come from the same run. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adcm.config import load_params
from adcm.consistency import consistency_batch_loss, make_discretization, set_dropout
from adcm.discretization import consistency_velocity
from adcm.losses import edm_loss
from adcm.precond import consistency_function, denoiser
from adcm.processes import VEProcess
from adcm.samplers import consistency_sample, heun_sample, karras_sigmas
from adcm.teacher import network_kwargs_for

CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=128,
               channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.2,
               label_dropout=0.0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
               decoder_type="standard", resample_filter=[1, 1])


def timed(fn: Callable[[], None], iters: int, device: torch.device, warmup: int = 1) -> float:
    """Mean seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--network", choices=["default", "cifar10"], default="default")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--points", type=int, default=20, help="JVPs timed for the rebuild rate")
    ap.add_argument("--partition-points", type=int, default=1050, help="|T| assumed for the amortised rebuild")
    ap.add_argument("--rebuild-every", type=int, default=25000, help="iterations between rebuilds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fid", action="store_true", help="also time Inception feature extraction")
    ap.add_argument("--out", type=Path, default=Path("reports/bench.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    params = load_params(args.params)
    cfg = params.train
    if args.network == "cifar10":
        kwargs = CIFAR10
    else:
        kwargs = network_kwargs_for(params.teacher.network, params.prepare.resolution, 1, 0)
    shape = (args.batch, kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    torch.manual_seed(0)
    net = consistency_function(kwargs, 0.5, cfg.eps).to(device).train()
    set_dropout(net, cfg.dropout)
    den = denoiser(kwargs, 0.5).to(device).train()
    params_count = sum(p.numel() for p in net.parameters())
    opt = torch.optim.RAdam(net.parameters(), lr=1e-5)
    opt_d = torch.optim.Adam(den.parameters(), lr=1e-5)
    process = VEProcess(eps=cfg.eps, t_max=cfg.t_max)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    results: dict[str, float] = {}

    def diffusion_step() -> None:
        opt_d.zero_grad(set_to_none=True)
        edm_loss(den, x0, None, -1.2, 1.2, 0.5, gen).mean().backward()
        opt_d.step()

    def ct_step(method: str) -> Callable[[], None]:
        disc = make_discretization(method, params.lam, cfg, 100000, 0)
        if method == "adcm":  # a fixed geometric partition of the expected size stands in for a built one
            pts = torch.logspace(math.log10(cfg.t_max), math.log10(cfg.eps), args.partition_points,
                                 dtype=torch.float64)
            disc.load_state_dict({"kind": "adcm", "seed": 0, "partitions": [(0, pts)]})

        def step() -> None:
            pairs = disc.sample(args.batch, 1, gen)
            z = torch.randn(shape, generator=gen).to(device)
            w = None if pairs.weight is None else pairs.weight.to(device)
            opt.zero_grad(set_to_none=True)
            consistency_batch_loss(net, net, process, x0, z, pairs.t.to(device), pairs.r.to(device), w, None,
                                   c=0.03).backward()
            opt.step()
        return step

    results["diffusion_step_s"] = timed(diffusion_step, args.iters, device)
    for method in ("ect", "ict", "adcm"):
        results[f"{method}_step_s"] = timed(ct_step(method), args.iters, device)

    frozen = consistency_function(kwargs, 0.5, cfg.eps).to(device).eval()
    frozen.load_state_dict(net.state_dict())
    t_vec = torch.full((args.batch,), 1.0, device=device)
    z = torch.randn(shape, generator=gen).to(device)
    jvp_s = timed(lambda: consistency_velocity(frozen, x0 + z, t_vec, z), args.points, device)
    results["jvp_s"] = jvp_s
    results["rebuild_s"] = jvp_s * args.partition_points
    results["adcm_amortised_step_s"] = results["adcm_step_s"] + results["rebuild_s"] / args.rebuild_every

    with torch.no_grad():
        results["sample_1step_s"] = timed(lambda: consistency_sample(frozen, z, cfg.t_max, [], []), args.iters,
                                          device)
        results["sample_2step_s"] = timed(lambda: consistency_sample(frozen, z, cfg.t_max, [0.42], [z]),
                                          args.iters, device)
        sig = karras_sigmas(18, cfg.eps, cfg.t_max, 7.0).to(device)
        d_eval = den.eval()
        results["sample_heun35_s"] = timed(lambda: heun_sample(d_eval, z, sig), 1, device, warmup=0)
    if args.fid:
        from adcm.fid import build_extractor, image_features, resolve_inception_weights

        ext = build_extractor(resolve_inception_weights(None)[0], device)
        imgs = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8).numpy()
        results["fid_16_images_s"] = timed(lambda: image_features(imgs, ext, 16, device), 1, device)

    b = args.batch
    table = [
        ("diffusion step (EDM loss)", b / results["diffusion_step_s"]),
        ("ECT step", b / results["ect_step_s"]),
        ("iCT step", b / results["ict_step_s"]),
        ("ADCM step", b / results["adcm_step_s"]),
        (f"ADCM step + rebuild/{args.rebuild_every}", b / results["adcm_amortised_step_s"]),
        ("sampling, 1 step", b / results["sample_1step_s"]),
        ("sampling, 2 steps", b / results["sample_2step_s"]),
        ("sampling, Heun 35 NFE (teacher)", b / results["sample_heun35_s"]),
    ]
    if args.fid:
        table.append(("FID features (Inception)", 16 / results["fid_16_images_s"]))
    ratios = {
        "adcm_over_ect_time": results["adcm_amortised_step_s"] / results["ect_step_s"],
        "ct_over_diffusion_time": results["ect_step_s"] / results["diffusion_step_s"],
        "jvps_per_s": 1 / jvp_s,
        "rebuild_s": results["rebuild_s"],
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"network {args.network} ({params_count / 1e6:.2f}M parameters), batch {b}, device {device_name}, "
          f"{torch.get_num_threads()} threads")
    for name, rate in table:
        print(f"  {name:<40} {rate:10.1f} img/s")
    print(f"  ADCM/ECT time {ratios['adcm_over_ect_time']:.3f}   CT/diffusion time "
          f"{ratios['ct_over_diffusion_time']:.3f}   rebuild {ratios['rebuild_s']:.1f} s "
          f"({args.partition_points} JVPs at batch {b}, {ratios['jvps_per_s']:.2f} JVP/s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"network": args.network, "parameters": params_count, "batch": b,
                                    "device": device_name, "threads": torch.get_num_threads(),
                                    "img_per_s": dict(table), "ratios": ratios, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
