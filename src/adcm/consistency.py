"""Consistency training (algorithm.md §3, §4): one loop for ADCM, ECT, iCT and sCT, on any forward process.

One discrete iteration (§3, steps 1–4): a :class:`~adcm.discretization.Discretization` yields per
sample a pair (t, r < t) and a weight; x_t and x_r share the noise z; the student f_θ(x_t, t) is
pulled towards the stop-gradient target f_θ⁻(x_r, r) (θ⁻ = the current weights, not an EMA; at r ≤ ε
the target is x_r itself) with the per-sample loss w·d_c(student, target) — for ADCM w = 1/d_c(target,
x0), detached (paper Eq. 11). Student and target share the dropout mask. The EMA copy is used only
for evaluation.

The unified view of the ADCM paper shows in :func:`make_objective`: λ → ∞ gives Δt = t − ε
(diffusion training), λ = 0 gives Δt → 0 — continuous time, which is sCT (:mod:`adcm.sct`, the same
loop with a JVP in place of the target forward); ECT and iCT are hand-made Δt(t) in between.

Processes: the discrete methods run on the teacher's own process (VE, flow matching, TrigFlow), their
schedules expressed through the noise-to-signal ratio; sCT always trains in TrigFlow, converting a VE
or FM teacher exactly (:class:`~adcm.precond.TrigFlowPrecond`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from adcm.checkpoint import CheckpointError, TeacherFile, fingerprint, load_state, save_state
from adcm.config import Method, ProcessesConfig, ProcessName, TrainConfig
from adcm.data import ImageDataset
from adcm.discretization import (
    ADCMDiscretization,
    ConsistencyFn,
    DataSampler,
    Discretization,
    ECTDiscretization,
    ICTDiscretization,
)
from adcm.images import save_grid, to_uint8
from adcm.losses import consistency_loss, ict_huber_c
from adcm.precond import Precond, TrigFlowPrecond
from adcm.processes import ForwardProcess, TrigFlowProcess, make_process
from adcm.samplers import PerSampleNoise, consistency_sample
from adcm.sct import LogVarianceHead, SCTModule, sample_sct_times, sct_batch_loss, warmup_ratio
from adcm.training import (
    ImageSampler,
    MetricsLogger,
    TrainingProgress,
    ema_beta,
    same_rng,
    seed_chunk,
    step_generator,
    update_ema,
)

__all__ = [
    "ConsistencyRun",
    "ContinuousObjective",
    "DiscreteObjective",
    "DistInfo",
    "FastPath",
    "TrainingError",
    "checkpoint_matches",
    "consistency_batch_loss",
    "huber_c_for",
    "init_distributed",
    "make_discretization",
    "make_objective",
    "one_step_grid",
    "student_process",
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
    process: ProcessName
    source: ProcessName
    eps: float
    t_max: float


def student_process(method: Method, process: ProcessName, ranges: ProcessesConfig, sigma_data: float) -> ForwardProcess:
    """The forward process the consistency model of ``method`` trains and samples in.

    The discrete methods use ``process`` on its range from ``ranges``. sCT always works in TrigFlow,
    on the same noise-to-signal range as ``process`` (t = arctan(ρ/σ_d) of its ε and t_max); its ε
    is then only the lower end of the time proposal — sCT's boundary is t = 0.
    """
    rng = ranges.range_of(process)
    own = make_process(process, rng.eps, rng.t_max, sigma_data)
    if method != "sct" or process == "trigflow":
        return own
    rho_lo, rho_hi = own.rho_range
    return TrigFlowProcess(sigma_data=sigma_data, eps=math.atan(rho_lo / sigma_data),
                           t_max=math.atan(rho_hi / sigma_data))


def huber_c_for(method: Method, cfg: TrainConfig, data_dim: int) -> float:
    """The pseudo-Huber c of a discrete ``method`` (iCT's null → 0.00054·sqrt(d))."""
    if method == "adcm":
        return cfg.adcm.huber_c
    if method == "ect":
        return cfg.ect.huber_c
    if method == "ict":
        return ict_huber_c(data_dim) if cfg.ict.huber_c is None else cfg.ict.huber_c
    raise ValueError(f"{method} has no pseudo-Huber constant")


def make_discretization(method: Method, lam: float, cfg: TrainConfig, total_iters: int, seed: int,
                        process: ForwardProcess) -> Discretization:
    """The discretization of ``method``; ADCM's λ spans diffusion (λ → ∞) to continuous time (λ = 0)."""
    if method == "adcm":
        a = cfg.adcm
        return ADCMDiscretization(process, lam, a.rebuild_every_iters, a.partition_batch_size,
                                  max_points=a.max_points, interval_sampling=a.interval_sampling,
                                  p_mean=a.p_mean, p_std=a.p_std, seed=seed)
    if method == "ect":
        e = cfg.ect
        return ECTDiscretization(process, e.stage_iters, p_mean=e.p_mean, p_std=e.p_std, k=e.k, b=e.b, q=e.q)
    if method == "ict":
        i = cfg.ict
        return ICTDiscretization(process, total_iters, s0=i.s0, s1=i.s1, rho=i.rho, p_mean=i.p_mean,
                                 p_std=i.p_std)
    raise ValueError(f"{method} is not a discrete method")


def _fingerprint(method: str, lam: float, cfg: TrainConfig, seed: int, teacher_id: str, data_id: str,
                 world_size: int, process: ForwardProcess) -> str:
    relevant = dataclasses.asdict(cfg)
    for key in ("device", "grid_every_kimg", "checkpoint_every_kimg", "log_every_kimg", "duration_kimg",
                "max_nonfinite_in_row"):
        relevant.pop(key)
    # Only the chosen method's group matters; iCT's curriculum depends on the total length.
    for other in ("adcm", "ect", "ict", "sct"):
        if other != method:
            relevant.pop(other)
    if method == "ict":
        relevant["duration_kimg"] = cfg.duration_kimg
    return fingerprint({"method": method, "lambda": lam if method == "adcm" else None, "train": relevant,
                        "seed": seed, "teacher": teacher_id, "data": data_id, "world_size": world_size,
                        "process": [process.name, process.eps, process.t_max]})


def checkpoint_matches(path: Path, method: Method, lam: float, cfg: TrainConfig, *, seed: int, teacher_id: str,
                       data_id: str, process: ForwardProcess, world_size: int = 1) -> bool:
    """Whether the checkpoint at ``path`` was written under this configuration."""
    fp = _fingerprint(method, lam, cfg, seed, teacher_id, data_id, world_size, process)
    return load_state(path).get("fingerprint") == fp


def set_dropout(net: nn.Module, p: float) -> None:
    """Set the dropout probability of every residual block of a DDPM++ network."""
    for module in net.modules():
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p


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
    process: ForwardProcess,
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
    with same_rng(device) as replay:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            target = net(x_r, r, labels).float()
        target = torch.where(at_data, x_r, target)
        replay()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = student(x_t, t, labels).float()
    return consistency_loss(out, target, x0, weight, c).mean()


class DiscreteObjective:
    """ECT, iCT or ADCM: a :class:`~adcm.discretization.Discretization` gives (t, r, weight) per sample;
    the loss is :func:`consistency_batch_loss` (algorithm.md §3)."""

    def __init__(self, disc: Discretization, process: ForwardProcess, huber_c: float):
        self.disc = disc
        self.process = process
        self.huber_c = huber_c

    def trainable(self, net: Precond) -> nn.Module:
        """The module the optimizer and DDP see: the consistency function itself."""
        return net

    def needs_rebuild(self, iteration: int) -> bool:
        """Whether the discretization must be rebuilt before step ``iteration`` (ADCM)."""
        return self.disc.needs_rebuild(iteration)

    def rebuild(self, iteration: int, fn: ConsistencyFn, sample_x0: DataSampler, network: nn.Module) -> None:
        """Rebuild the discretization from the current network (ADCM's partition)."""
        self.disc.rebuild(iteration, fn, sample_x0, network=network)

    def draw(self, batch_size: int, iteration: int, generator: torch.Generator) -> dict[str, Tensor | None]:
        """The whole global batch's (t, r, weight)."""
        pairs = self.disc.sample(batch_size, iteration, generator)
        return {"t": pairs.t, "r": pairs.r, "weight": pairs.weight}

    def loss(self, net: Precond, student: nn.Module, x0: Tensor, z: Tensor, draws: dict[str, Tensor | None],
             labels: Tensor | None, iteration: int, bf16: bool) -> Tensor:
        """Mean loss of one micro-batch (``draws`` already sliced and on the device)."""
        del iteration
        t, r = draws["t"], draws["r"]
        assert t is not None and r is not None
        return consistency_batch_loss(net, student, self.process, x0, z, t, r, draws["weight"], labels,
                                      c=self.huber_c, bf16=bf16)

    @property
    def partitions(self) -> list[tuple[int, Tensor]]:
        """ADCM's partitions (empty for ECT/iCT)."""
        return self.disc.partitions if isinstance(self.disc, ADCMDiscretization) else []

    def state_dict(self) -> dict[str, Any]:
        return self.disc.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.disc.load_state_dict(state)


class ContinuousObjective:
    """sCT (algorithm.md §4; :mod:`adcm.sct`): t from the proposal, one JVP per step, adaptive weighting."""

    def __init__(self, cfg: TrainConfig, process: TrigFlowProcess):
        self.cfg = cfg.sct
        self.process = process
        self.head = LogVarianceHead(self.cfg.weight_channels) if self.cfg.adaptive_weight else None
        self.module: SCTModule | None = None

    def trainable(self, net: Precond) -> nn.Module:
        """The TrigFlow model and the log-variance head in one module (what the optimizer and DDP see)."""
        if not isinstance(net, TrigFlowPrecond):
            raise TypeError("sCT needs a TrigFlow model")
        self.module = SCTModule(net, self.head)
        return self.module

    def needs_rebuild(self, iteration: int) -> bool:
        del iteration
        return False

    def rebuild(self, iteration: int, fn: ConsistencyFn, sample_x0: DataSampler, network: nn.Module) -> None:
        raise RuntimeError("sCT has nothing to rebuild")

    def draw(self, batch_size: int, iteration: int, generator: torch.Generator) -> dict[str, Tensor | None]:
        del iteration
        return {"t": sample_sct_times(batch_size, self.cfg.p_mean, self.cfg.p_std, self.process, generator)}

    def loss(self, net: Precond, student: nn.Module, x0: Tensor, z: Tensor, draws: dict[str, Tensor | None],
             labels: Tensor | None, iteration: int, bf16: bool) -> Tensor:
        assert isinstance(net, TrigFlowPrecond) and draws["t"] is not None
        return sct_batch_loss(net, student, x0, z, draws["t"], labels,
                              ratio=warmup_ratio(iteration, self.cfg.warmup_iters),
                              tangent_norm_c=self.cfg.tangent_norm_c, bf16=bf16)

    @property
    def partitions(self) -> list[tuple[int, Tensor]]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sct", "head": None if self.head is None else self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sct":
            raise ValueError(f"state_dict is for {state.get('kind')!r}, not 'sct'")
        if self.head is not None:
            self.head.load_state_dict(state["head"])


Objective = DiscreteObjective | ContinuousObjective


def make_objective(method: Method, lam: float, cfg: TrainConfig, total_iters: int, seed: int,
                   process: ForwardProcess, data_dim: int) -> Objective:
    """What one training step optimises: a discretization (ADCM, ECT, iCT) or sCT's continuous-time loss."""
    if method == "sct":
        if not isinstance(process, TrigFlowProcess):
            raise ValueError("sCT trains in TrigFlow (see student_process)")
        return ContinuousObjective(cfg, process)
    disc = make_discretization(method, lam, cfg, total_iters, seed, process)
    return DiscreteObjective(disc, process, huber_c_for(method, cfg, data_dim))


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
    process: ForwardProcess,
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
        teacher: the diffusion teacher; the student is its ε-shifted consistency function in
            ``process`` (algorithm.md §2; a TrigFlow conversion for sCT), dropout ``cfg.dropout``.
        cfg: the ``train`` params group.
        data: prepared images and labels.
        method: ``adcm``, ``ect``, ``ict`` or ``sct``.
        lam: ADCM's λ (Eq. 10); ignored by the others.
        seed: global seed; step k draws from generators seeded by (seed, k, rank).
        process: the student's forward process and range (:func:`student_process`).
        teacher_id, data_id: identities (hashes) of the teacher and data, part of the fingerprint.
        checkpoint_path: resumable state (rank 0 writes it).
        device: where to train.
        fresh: ignore an existing checkpoint.
        log_dir: dvclive directory (rank 0 only; None = no logging).
        grid_dir: where the periodic 1-step sample grids go (None = none).
        show_progress: rich progress bar (rank 0 only).
        dist_info: the ``torchrun`` placement (None = single process).
        stop_after_iters: stop (with a checkpoint) after this many iterations in this call — for
            tests of resumption and for evaluations along the way; None = train to ``cfg.duration_kimg``.

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
    fp = _fingerprint(method, lam, cfg, seed, teacher_id, data_id, info.world_size, process)

    kwargs = dict(teacher.network_kwargs, dropout=cfg.dropout)
    # sCT's boundary is t = 0 (sCM's f(x, 0) = x); the discrete methods use the process's ε.
    eps = 0.0 if method == "sct" else process.eps
    net = teacher.consistency_function(eps, process.name)  # type: ignore[arg-type]
    set_dropout(net, cfg.dropout)
    net = net.to(device).train().requires_grad_(True)
    for name, p in net.named_parameters():  # EDM's augmentation input is fed zeros: no gradient, no DDP hang
        if name.startswith("model.map_augment"):
            p.requires_grad_(False)
    fast = FastPath.for_device(cfg, device)
    fast.apply(net)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    objective = make_objective(method, lam, cfg, total_iters, seed, process, int(np.prod(data.images.shape[1:])))
    trainable = objective.trainable(net).to(device)
    opt = fast.optimizer(trainable, cfg)

    step, skipped, elapsed, last_loss, rebuild_s = 0, 0, 0.0, float("nan"), 0.0
    resumed = False
    if checkpoint_path.exists() and not fresh:
        state = load_state(checkpoint_path)
        if state.get("fingerprint") != fp:
            raise CheckpointError(
                f"{checkpoint_path}: checkpoint from a different configuration (method, process, lambda, train.*, "
                "seed, teacher or data changed); re-run with --fresh to start over")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["discretization"])
        step, skipped = int(state["step"]), int(state["skipped"])
        elapsed, last_loss, rebuild_s = float(state["seconds"]), float(state["loss"]), float(state["rebuild_s"])
        resumed = True
    resumed_kimg = step * cfg.batch_size / 1000

    ddp: nn.Module = trainable
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda"
                                                  else None)
    student = torch.compile(ddp) if fast.compile else ddp  # the student forward only: never around a JVP

    def checkpoint() -> None:
        if info.is_main:
            save_state(checkpoint_path, {
                "fingerprint": fp, "net": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "discretization": objective.state_dict(), "step": step,
                "skipped": skipped, "seconds": elapsed, "loss": float(last_loss_t), "rebuild_s": rebuild_s,
                "method": method, "lambda": lam, "network_kwargs": kwargs, "process": process.name,
            })

    sampler = ImageSampler(data.images, data.labels, kwargs["label_dim"], False, device)
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
    discrete = isinstance(objective, DiscreteObjective)

    def frozen_fn(x: Tensor, t: Tensor) -> Tensor:
        return net(x, t, _partition_labels)

    _partition_labels: Tensor | None = None

    with TrainingProgress(f"train {method}/{process.name}", total_iters * cfg.batch_size / 1000,
                          enabled=show_progress and info.is_main) as progress:
        progress.update(step * cfg.batch_size / 1000)
        while step < end_iter:
            if objective.needs_rebuild(step):
                t0 = time.perf_counter()
                if info.is_main:
                    def sample_x0(n: int, gen: torch.Generator) -> Tensor:
                        nonlocal _partition_labels
                        x, lab = sampler.sample(n, gen)
                        _partition_labels = lab
                        return x

                    objective.rebuild(step, frozen_fn, sample_x0, network=net)
                if info.world_size > 1:
                    box = [objective.state_dict() if info.is_main else None]
                    dist.broadcast_object_list(box, src=0)
                    objective.load_state_dict(box[0])
                rebuild_s += time.perf_counter() - t0
                progress.restart_clock()
                if info.is_main and objective.partitions:
                    logger.log(step, {"partition_points": float(objective.partitions[-1][1].numel()),
                                      "rebuild_seconds": time.perf_counter() - t0})
            # The whole global batch is drawn identically on every process; each takes its chunks.
            gen = step_generator(seed, step, stream=1)
            x0_all, labels_all = sampler.sample(cfg.batch_size, gen)
            draws_all = objective.draw(cfg.batch_size, step, gen)
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
                draws = {k: None if v is None else v[sl].to(device) for k, v in draws_all.items()}
                sync = contextlib.nullcontext() if m == n_micro - 1 or info.world_size == 1 else ddp.no_sync()
                seed_chunk(seed, step, chunk)
                with sync:
                    loss = objective.loss(net, student, x0, z, draws, labels, step, fast.bf16)
                    (loss * micro / local_batch).backward()
                loss_acc += loss.detach() * (micro / local_batch)
                if discrete:
                    dt_acc += (draws["t"] - draws["r"]).double().sum()  # type: ignore[operator]
                    dt_count += micro
            if info.world_size > 1:
                dist.all_reduce(loss_acc)
                loss_acc /= info.world_size
            step += 1
            # The one host synchronisation of a step: a non-finite loss or gradient must not move θ.
            grads = [p.grad for p in trainable.parameters() if p.grad is not None]
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
                size = float(objective.partitions[-1][1].numel()) if objective.partitions else float("nan")
                rate = progress.update(kimg, loss=mean_loss, **({"|T|": int(size)} if size == size else {}))
                extra: dict[str, float] = {"partition_points": size} if size == size else {}
                if discrete:
                    extra["mean_dt"] = float(dt_acc) / max(dt_count, 1)
                logger.log(step, {"loss": mean_loss, "img_per_s": rate, "kimg": kimg, "lr": lr,
                                  "skipped_steps": skipped, **extra})
                losses, dt_count = [], 0
                dt_acc = torch.zeros((), dtype=torch.float64, device=device)
            if info.is_main and grid_dir is not None and (step % per["grid"] == 0 or step == total_iters):
                images = one_step_grid(ema, grid_seeds, kwargs, process, device)
                image = save_grid(grid_dir / f"grid-{step:06d}.png", images, 8)
                logger.image("grid_1step.png", image)
            if step % per["checkpoint"] == 0 or last:
                checkpoint()
    logger.close()
    partitions = [(it, pts.tolist()) for it, pts in objective.partitions]
    return ConsistencyRun(
        ema_state={k: v.detach().cpu() for k, v in ema.state_dict().items()}, network_kwargs=kwargs,
        partitions=partitions, kimg=step * cfg.batch_size / 1000, steps=step, train_seconds=elapsed,
        final_loss=float(last_loss_t), skipped_steps=skipped, resumed_from_kimg=resumed_kimg, rebuild_seconds=rebuild_s,
        process=process.name, source=teacher.backbone_process, eps=eps,  # type: ignore[arg-type]
        t_max=process.t_max)


@torch.no_grad()
def one_step_grid(fn: Precond, seeds: list[int], kwargs: dict[str, Any], process: ForwardProcess,
                  device: torch.device) -> np.ndarray:
    """1-step samples x = f(x_T, T) (uint8), sample i from seed i (labels drawn uniformly)."""
    noise = PerSampleNoise(seeds, device)
    shape = (kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    latents = noise.randn(shape)
    labels = None
    if kwargs["label_dim"]:
        labels = nn.functional.one_hot(noise.randint(kwargs["label_dim"]), kwargs["label_dim"]).float()
    was = fn.training
    fn.eval()
    out = consistency_sample(lambda x, t: fn(x, t, labels), latents, process, [], [])
    fn.train(was)
    return to_uint8(out)
