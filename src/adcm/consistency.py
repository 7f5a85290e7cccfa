"""Discrete consistency training (algorithm.md §3): one loop for ADCM, ECT and iCT.

One iteration (§3, steps 1–4): a :class:`~adcm.discretization.Discretization` yields per sample a
pair (t, r < t) and a weight; x_t and x_r share the noise z; the student f_θ(x_t, t) is pulled
towards the stop-gradient target f_θ⁻(x_r, r) (θ⁻ = the current weights, not an EMA; at r ≤ ε the
target is x_r itself) with the per-sample loss w·d_c(student, target) — for ADCM w = 1/d_c(target,
x0), detached (paper Eq. 11). Student and target share the dropout mask. The EMA copy is used only
for evaluation.

The unified view of the ADCM paper shows in :func:`make_discretization`: λ → ∞ gives Δt = t − ε
(diffusion training), λ = 0 gives Δt → 0 (continuous time); ECT and iCT are hand-made Δt(t).

Resumption is bit-exact on the CPU: every random draw of step k comes from generators seeded by
(seed, k, rank), ADCM rebuilds from (seed, iteration), and the checkpoint holds the network, EMA,
optimizer, discretization state and counters.

Several processes (``torchrun``): PyTorch DDP over gloo (CPU) or NCCL (CUDA). The global batch is
split over the ranks; the partition is built on rank 0 and broadcast; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from adcm.checkpoint import CheckpointError, TeacherFile, fingerprint, load_state, save_state
from adcm.config import Method, TrainConfig
from adcm.data import ImageDataset
from adcm.discretization import (
    ADCMDiscretization,
    Discretization,
    ECTDiscretization,
    ICTDiscretization,
)
from adcm.images import save_grid, to_uint8
from adcm.losses import consistency_loss, ict_huber_c
from adcm.precond import VEPrecond
from adcm.processes import VEProcess
from adcm.samplers import PerSampleNoise, consistency_sample
from adcm.training import (
    ImageSampler,
    MetricsLogger,
    TrainingProgress,
    ema_beta,
    seed_chunk,
    step_generator,
    update_ema,
)

__all__ = [
    "ConsistencyRun",
    "DistInfo",
    "FastPath",
    "TrainingError",
    "checkpoint_matches",
    "consistency_batch_loss",
    "huber_c_for",
    "init_distributed",
    "make_discretization",
    "one_step_grid",
    "train_consistency",
]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` set up (env WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


@dataclass(frozen=True)
class ConsistencyRun:
    """What a finished consistency training produced."""

    ema_state: dict[str, Tensor]
    network_kwargs: dict[str, Any]
    partitions: list[tuple[int, list[float]]]
    kimg: float
    steps: int
    train_seconds: float
    final_loss: float
    skipped_steps: int
    resumed_from_kimg: float
    rebuild_seconds: float


def huber_c_for(method: Method, cfg: TrainConfig, data_dim: int) -> float:
    """The pseudo-Huber c of ``method`` (iCT's null → 0.00054·sqrt(d))."""
    if method == "adcm":
        return cfg.adcm.huber_c
    if method == "ect":
        return cfg.ect.huber_c
    return ict_huber_c(data_dim) if cfg.ict.huber_c is None else cfg.ict.huber_c


def make_discretization(method: Method, lam: float, cfg: TrainConfig, total_iters: int, seed: int) -> Discretization:
    """The discretization of ``method``; ADCM's λ spans diffusion (λ → ∞) to continuous time (λ = 0)."""
    process = VEProcess(eps=cfg.eps, t_max=cfg.t_max)
    if method == "adcm":
        a = cfg.adcm
        return ADCMDiscretization(process, lam, a.rebuild_every_iters, a.partition_batch_size,
                                  max_points=a.max_points, interval_sampling=a.interval_sampling,
                                  p_mean=a.p_mean, p_std=a.p_std, seed=seed)
    if method == "ect":
        e = cfg.ect
        return ECTDiscretization(process, e.stage_iters, p_mean=e.p_mean, p_std=e.p_std, k=e.k, b=e.b, q=e.q)
    i = cfg.ict
    return ICTDiscretization(process, total_iters, s0=i.s0, s1=i.s1, rho=i.rho, p_mean=i.p_mean, p_std=i.p_std)


def _fingerprint(method: str, lam: float, cfg: TrainConfig, seed: int, teacher_id: str, data_id: str,
                 world_size: int) -> str:
    relevant = dataclasses.asdict(cfg)
    for key in ("device", "grid_every_kimg", "checkpoint_every_kimg", "log_every_kimg", "duration_kimg",
                "max_nonfinite_in_row"):
        relevant.pop(key)
    # Only the chosen method's group matters; iCT's curriculum depends on the total length.
    for other in ("adcm", "ect", "ict"):
        if other != method:
            relevant.pop(other)
    if method == "ict":
        relevant["duration_kimg"] = cfg.duration_kimg
    return fingerprint({"method": method, "lambda": lam if method == "adcm" else None, "train": relevant,
                        "seed": seed, "teacher": teacher_id, "data": data_id, "world_size": world_size})


def checkpoint_matches(path: Path, method: Method, lam: float, cfg: TrainConfig, *, seed: int, teacher_id: str,
                       data_id: str, world_size: int = 1) -> bool:
    """Whether the checkpoint at ``path`` was written under this configuration."""
    fp = _fingerprint(method, lam, cfg, seed, teacher_id, data_id, world_size)
    return load_state(path).get("fingerprint") == fp


def set_dropout(net: nn.Module, p: float) -> None:
    """Set the dropout probability of every residual block of a DDPM++ network."""
    for module in net.modules():
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p


@contextlib.contextmanager
def _same_rng(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields ``replay()``: resets the global RNG (CPU and, on CUDA, the device) to its state at entry.

    The target forward runs first, then ``replay()``, then the student forward: both draw the same
    dropout masks (algorithm.md §3 step 2).
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    yield replay


@dataclass(frozen=True)
class FastPath:
    """The GPU path's switches (issue: performance), each a ``train`` params key, active on CUDA only.

    bf16 autocast of the two forwards (JVPs and the loss stay fp32), channels_last memory format,
    TF32 matmuls/convolutions, fused (Adam) or foreach (RAdam) optimizer kernels, and an optional
    ``torch.compile`` of the student forward. On the CPU everything is off (fp32, default kernels)
    unless ``force_cpu`` asks for the numerically-neutral ones (channels_last, foreach), as the
    equivalence test does.
    """

    bf16: bool = False
    channels_last: bool = False
    tf32: bool = False
    fused_optimizer: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, cfg: TrainConfig, device: torch.device, force_cpu: bool = False) -> FastPath:
        """The switches that apply on ``device``."""
        if device.type == "cuda":
            return cls(cfg.bf16, cfg.channels_last, cfg.tf32, cfg.fused_optimizer, cfg.compile)
        if force_cpu:
            return cls(False, cfg.channels_last, False, cfg.fused_optimizer, False)
        return cls()

    def apply(self, net: nn.Module) -> None:
        """Set the process-wide TF32 flags and the network's memory format."""
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.channels_last:
            net.to(memory_format=torch.channels_last)

    def optimizer(self, net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        """RAdam or Adam (β₁ 0.9, β₂ ``cfg.beta2``); fused Adam / foreach RAdam on the fast path."""
        params = [p for p in net.parameters() if p.requires_grad]
        extra: dict[str, Any] = {}
        if self.fused_optimizer:
            extra = {"fused": True} if cfg.optimizer == "adam" else {"foreach": True}
        opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
        return opt_cls(params, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, **extra)


def consistency_batch_loss(
    net: nn.Module,
    student: nn.Module,
    process: VEProcess,
    x0: Tensor,
    z: Tensor,
    t: Tensor,
    r: Tensor,
    weight: Tensor | None,
    labels: Tensor | None,
    *,
    c: float,
    bf16: bool = False,
) -> Tensor:
    """Mean consistency loss of one mini-batch (algorithm.md §3 steps 1–3), ready for ``backward``.

    x_t and x_r share the noise z; the target f_θ⁻(x_r, r) runs under no_grad with the current
    weights (``net``), replaced by x_r where r ≤ ε; the student f_θ(x_t, t) runs through ``student``
    (``net`` or its DDP wrapper) with the same dropout masks (the RNG is replayed). ``weight`` None
    means ADCM's adaptive 1/d_c(target, x0) (paper Eq. 11). bf16 autocast (CUDA) covers the two
    forwards only; the loss is computed in fp32.
    """
    device = x0.device
    x_t = process.x_t(x0, z, t)
    x_r = process.x_t(x0, z, r)
    at_data = (r <= torch.tensor(process.eps, dtype=r.dtype, device=r.device)).view(-1, *([1] * (x0.ndim - 1)))
    with _same_rng(device) as replay:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            target = net(x_r, r, labels).float()
        target = torch.where(at_data, x_r, target)
        replay()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = student(x_t, t, labels).float()
    return consistency_loss(out, target, x0, weight, c).mean()


def _lr_at(cfg: TrainConfig, iteration: int) -> float:
    if cfg.lr_schedule == "rsqrt":
        return cfg.lr / math.sqrt(max(iteration / cfg.lr_ref_iters, 1.0))
    return cfg.lr


def train_consistency(
    teacher: TeacherFile,
    cfg: TrainConfig,
    data: ImageDataset,
    *,
    method: Method,
    lam: float,
    seed: int,
    teacher_id: str,
    data_id: str,
    checkpoint_path: Path,
    device: torch.device,
    fresh: bool = False,
    log_dir: Path | None = None,
    grid_dir: Path | None = None,
    show_progress: bool = True,
    dist_info: DistInfo | None = None,
    stop_after_iters: int | None = None,
) -> ConsistencyRun:
    """Consistency-train a model initialised from ``teacher`` (resuming from ``checkpoint_path``).

    Args:
        teacher: the diffusion teacher; the student is the ε-shifted consistency function with its
            weights (algorithm.md §2), dropout set to ``cfg.dropout``.
        cfg: the ``train`` params group.
        data: prepared images and labels.
        method: ``adcm``, ``ect`` or ``ict``.
        lam: ADCM's λ (Eq. 10); ignored by ECT/iCT.
        seed: global seed; step k draws from generators seeded by (seed, k, rank).
        teacher_id, data_id: identities (hashes) of the teacher and data, part of the fingerprint.
        checkpoint_path: resumable state (rank 0 writes it).
        device: where to train.
        fresh: ignore an existing checkpoint.
        log_dir: dvclive directory (rank 0 only; None = no logging).
        grid_dir: where the periodic 1-step sample grids go (None = none).
        show_progress: rich progress bar (rank 0 only).
        dist_info: the ``torchrun`` placement (None = single process).
        stop_after_iters: stop (with a checkpoint) after this many iterations in this call — for
            tests of resumption; None = train to ``cfg.duration_kimg``.

    Raises:
        CheckpointError: checkpoint from another configuration and not ``fresh``.
        TrainingError: ``cfg.max_nonfinite_in_row`` non-finite losses in a row.
    """
    info = dist_info or DistInfo()
    if cfg.batch_size % info.world_size:
        raise TrainingError(f"train.batch_size {cfg.batch_size} is not divisible by {info.world_size} processes")
    local_batch = cfg.batch_size // info.world_size
    micro = min(cfg.batch_per_step or local_batch, local_batch)
    if local_batch % micro:
        raise TrainingError(f"per-process batch {local_batch} is not a multiple of train.batch_per_step {micro}")
    total_iters = max(1, math.ceil(cfg.duration_kimg * 1000 / cfg.batch_size))
    fp = _fingerprint(method, lam, cfg, seed, teacher_id, data_id, info.world_size)

    kwargs = dict(teacher.network_kwargs, dropout=cfg.dropout)
    net = teacher.consistency_function(cfg.eps)
    set_dropout(net, cfg.dropout)
    net = net.to(device).train().requires_grad_(True)
    for name, p in net.named_parameters():  # EDM's augmentation input is fed zeros: no gradient, no DDP hang
        if name.startswith("model.map_augment"):
            p.requires_grad_(False)
    fast = FastPath.for_device(cfg, device)
    fast.apply(net)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = fast.optimizer(net, cfg)
    disc = make_discretization(method, lam, cfg, total_iters, seed)
    c = huber_c_for(method, cfg, int(np.prod(data.images.shape[1:])))

    step, skipped, elapsed, last_loss, rebuild_s = 0, 0, 0.0, float("nan"), 0.0
    resumed = False
    if checkpoint_path.exists() and not fresh:
        state = load_state(checkpoint_path)
        if state.get("fingerprint") != fp:
            raise CheckpointError(
                f"{checkpoint_path}: checkpoint from a different configuration (method, lambda, train.*, "
                "seed, teacher or data changed); re-run with --fresh to start over")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        disc.load_state_dict(state["discretization"])
        step, skipped = int(state["step"]), int(state["skipped"])
        elapsed, last_loss, rebuild_s = float(state["seconds"]), float(state["loss"]), float(state["rebuild_s"])
        resumed = True
    resumed_kimg = step * cfg.batch_size / 1000

    ddp: nn.Module = net
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    student = torch.compile(ddp) if fast.compile else ddp  # the student forward only: never around a JVP

    def checkpoint() -> None:
        if info.is_main:
            save_state(checkpoint_path, {
                "fingerprint": fp, "net": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "discretization": disc.state_dict(), "step": step,
                "skipped": skipped, "seconds": elapsed, "loss": float(last_loss_t), "rebuild_s": rebuild_s,
                "method": method, "lambda": lam, "network_kwargs": kwargs,
            })

    sampler = ImageSampler(data.images, data.labels, kwargs["label_dim"], False, device)
    process = VEProcess(eps=cfg.eps, t_max=cfg.t_max)
    logger = MetricsLogger(log_dir if info.is_main else None, resume=resumed and step > 0)
    per = {name: max(1, round(getattr(cfg, f"{name}_every_kimg") * 1000 / cfg.batch_size))
           for name in ("log", "checkpoint", "grid")}
    grid_seeds = list(range(64))
    losses: list[Tensor] = []
    dt_acc, dt_count = torch.zeros((), dtype=torch.float64, device=device), 0
    last_loss_t = torch.tensor(last_loss)
    bad_in_row = 0
    start = time.perf_counter() - elapsed
    end_iter = total_iters if stop_after_iters is None else min(total_iters, step + stop_after_iters)

    def frozen_fn(x: Tensor, t: Tensor) -> Tensor:
        return net(x, t, _partition_labels)

    _partition_labels: Tensor | None = None

    with TrainingProgress(f"train {method}", total_iters * cfg.batch_size / 1000,
                          enabled=show_progress and info.is_main) as progress:
        progress.update(step * cfg.batch_size / 1000)
        while step < end_iter:
            if disc.needs_rebuild(step):
                t0 = time.perf_counter()
                if info.is_main:
                    def sample_x0(n: int, gen: torch.Generator) -> Tensor:
                        nonlocal _partition_labels
                        x, lab = sampler.sample(n, gen)
                        _partition_labels = lab
                        return x

                    disc.rebuild(step, frozen_fn, sample_x0, network=net)
                if info.world_size > 1:
                    box = [disc.state_dict() if info.is_main else None]
                    dist.broadcast_object_list(box, src=0)
                    disc.load_state_dict(box[0])
                rebuild_s += time.perf_counter() - t0
                progress.restart_clock()
                if info.is_main and isinstance(disc, ADCMDiscretization):
                    logger.log(step, {"partition_points": float(disc.points.numel()),
                                      "rebuild_seconds": time.perf_counter() - t0})
            # The whole global batch is drawn identically on every process; each takes its chunks.
            gen = step_generator(seed, step, stream=1)
            x0_all, labels_all = sampler.sample(cfg.batch_size, gen)
            pairs_all = disc.sample(cfg.batch_size, step, gen)
            z_all = torch.randn(x0_all.shape, generator=gen).to(device)
            lr = _lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss_acc = torch.zeros((), device=device)
            n_micro = local_batch // micro
            for m in range(n_micro):
                chunk = info.rank * n_micro + m
                sl = slice(chunk * micro, (chunk + 1) * micro)
                x0, z = x0_all[sl], z_all[sl]
                labels = None if labels_all is None else labels_all[sl]
                t, r = pairs_all.t[sl].to(device), pairs_all.r[sl].to(device)
                weight = None if pairs_all.weight is None else pairs_all.weight[sl].to(device)
                sync = contextlib.nullcontext() if m == n_micro - 1 or info.world_size == 1 else ddp.no_sync()
                seed_chunk(seed, step, chunk)
                with sync:
                    loss = consistency_batch_loss(net, student, process, x0, z, t, r, weight, labels, c=c,
                                                  bf16=fast.bf16)
                    (loss * micro / local_batch).backward()
                loss_acc += loss.detach() * (micro / local_batch)
                dt_acc += (t - r).double().sum()
                dt_count += micro
            if info.world_size > 1:
                dist.all_reduce(loss_acc)
                loss_acc /= info.world_size
            step += 1
            # The one host synchronisation of a step: a non-finite loss or gradient must not move θ.
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            finite = torch.isfinite(loss_acc) & torch.isfinite(torch.nn.utils.get_total_norm(grads))
            if bool(finite):
                opt.step()
                beta = cfg.ema_beta if cfg.ema_beta is not None else ema_beta(
                    cfg.batch_size, step * cfg.batch_size, cfg.ema_halflife_kimg or 0.0, None)
                update_ema(ema, net, beta)
                bad_in_row = 0
                losses.append(loss_acc)
                last_loss_t = loss_acc
            else:
                skipped += 1
                bad_in_row += 1
                if bad_in_row >= cfg.max_nonfinite_in_row:
                    raise TrainingError(f"{bad_in_row} non-finite losses in a row at iteration {step}; "
                                        "lower train.lr or check the teacher")
            elapsed = time.perf_counter() - start
            kimg = step * cfg.batch_size / 1000
            last = step == end_iter
            if step % per["log"] == 0 or last:
                mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
                mean_dt = float(dt_acc) / max(dt_count, 1)
                size = float(disc.points.numel()) if isinstance(disc, ADCMDiscretization) else float("nan")
                rate = progress.update(kimg, loss=mean_loss, **({"|T|": int(size)} if size == size else {}))
                logger.log(step, {"loss": mean_loss, "mean_dt": mean_dt, "img_per_s": rate,
                                  "kimg": kimg, "lr": lr, "skipped_steps": skipped,
                                  **({"partition_points": size} if size == size else {})})
                losses, dt_count = [], 0
                dt_acc = torch.zeros((), dtype=torch.float64, device=device)
            if info.is_main and grid_dir is not None and (step % per["grid"] == 0 or step == total_iters):
                images = one_step_grid(ema, grid_seeds, kwargs, cfg.t_max, device)
                image = save_grid(grid_dir / f"grid-{step:06d}.png", images, 8)
                logger.image("grid_1step.png", image)
            if step % per["checkpoint"] == 0 or last:
                checkpoint()
    logger.close()
    partitions = [(it, pts.tolist()) for it, pts in disc.partitions] if isinstance(disc, ADCMDiscretization) else []
    return ConsistencyRun(
        ema_state={k: v.detach().cpu() for k, v in ema.state_dict().items()}, network_kwargs=kwargs,
        partitions=partitions, kimg=step * cfg.batch_size / 1000, steps=step, train_seconds=elapsed,
        final_loss=float(last_loss_t), skipped_steps=skipped, resumed_from_kimg=resumed_kimg, rebuild_seconds=rebuild_s)


@torch.no_grad()
def one_step_grid(fn: VEPrecond, seeds: list[int], kwargs: dict[str, Any], t_max: float,
                  device: torch.device) -> np.ndarray:
    """1-step samples x = f(T·z, T) (uint8), sample i from seed i (labels drawn uniformly)."""
    noise = PerSampleNoise(seeds, device)
    shape = (kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    latents = noise.randn(shape)
    labels = None
    if kwargs["label_dim"]:
        labels = nn.functional.one_hot(noise.randint(kwargs["label_dim"]), kwargs["label_dim"]).float()
    was = fn.training
    fn.eval()
    out = consistency_sample(lambda x, t: fn(x, t, labels), latents, t_max, [], [])
    fn.train(was)
    return to_uint8(out)
