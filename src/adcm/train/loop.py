"""The one training loop: teachers and consistency models alike, over an :class:`~adcm.method.objectives.Objective`.

A run is a :class:`RunSpec` — the model, what it optimises, the :class:`LoopSettings` and the
fingerprint of everything that changes its weights — and :func:`train` executes it. One step:

1. ADCM only: rebuild the partition from the current weights when it is due (rank 0, then broadcast).
2. From one generator seeded by (seed, step, the objective's stream) draw the whole global batch's
   data x0 and labels, the objective's per-sample :class:`~adcm.method.objectives.Draw`, and the
   standard noise z — identically on every process.
3. Each process takes its chunks of the global batch (micro-batches of ``batch_per_step``; ``auto``
   chooses it from the free GPU memory at the first step, :func:`~adcm.train.fastpath.auto_micro_batch`);
   dropout is seeded per chunk, so N processes reproduce one. Gradients accumulate over the chunks.
4. One host synchronisation: a non-finite loss or gradient does not move θ; after
   ``max_nonfinite_in_row`` of them in a row the run stops with :class:`~adcm.errors.TrainingError`.
5. Optimizer step; EMA update (the EMA copy is used only for evaluation).

Every ``checkpoint_every_kimg`` the state is written atomically; re-running the same command resumes
from it and ends with bit-identical weights (on the same device kind and thread count). The logs record
the peak memory of the steps since the previous log (``peak_memory_mib``, :func:`~adcm.train.progress.peak_memory_mib`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from adcm.config import OnConfigChange
from adcm.errors import CheckpointError, TrainingError
from adcm.io.images import save_grid
from adcm.method.objectives import Batch, Draw, Objective
from adcm.nets.checkpointing import enable_activation_checkpointing
from adcm.nets.precond import Precond
from adcm.rng import seed_chunk, step_generator
from adcm.train.batches import BatchSource
from adcm.train.distributed import DistInfo
from adcm.train.ema import EMARule, update_ema
from adcm.train.fastpath import FastPath, auto_micro_batch, compile_student
from adcm.train.progress import MetricsLogger, TrainingProgress, peak_memory_mib, reset_peak_memory
from adcm.train.state import resume_state, save_state

__all__ = ["LoopSettings", "Preview", "RunResult", "RunSpec", "StepOutcome", "Trainer", "train"]


@dataclass(frozen=True)
class LoopSettings:
    """How a run trains: length, batch, optimizer, learning rate, EMA, periods, the non-finite policy.

    Attributes:
        label: shown on the progress bar.
        duration_kimg: training length in thousands of images.
        batch_size: images per optimizer step, over all processes.
        batch_per_step: images per forward pass per process (gradient accumulation); None = all; ``auto``:
            the largest that fits in the free memory on CUDA (chosen at the first step), all on the CPU.
        optimizer: ``adam`` or ``radam`` (β₁ 0.9, β₂ ``beta2``, ε 1e-8).
        lr: base learning rate.
        beta2: second-moment decay.
        ema: the EMA rule.
        lr_rampup_kimg: linear warm-up of the learning rate over this many kimg (0 = none).
        lr_schedule: ``constant``; ``rsqrt``: lr/sqrt(max(step/lr_ref_iters, 1)) (EDM2, ECT ImageNet);
            ``cosine``: lr·(1 + cos(π·step/total_steps))/2, from lr at the first step to 0 at the run's end
            (a fraction of the run, so it depends on the duration: a longer run is not the continuation of a
            shorter one).
        lr_ref_iters: steps before the rsqrt decay starts.
        xflip: random horizontal flips of the data.
        log_every_kimg, checkpoint_every_kimg: periods, rounded to whole steps (at least one).
        max_nonfinite_in_row: stop after this many steps in a row with a non-finite loss or gradient.
        fast: the GPU fast-path switches in force.
        activation_checkpointing: recompute the residual blocks' activations in the backward pass
            (:mod:`adcm.nets.checkpointing`).
    """

    label: str
    duration_kimg: float
    batch_size: int
    batch_per_step: int | Literal["auto"] | None
    optimizer: Literal["adam", "radam"]
    lr: float
    beta2: float
    ema: EMARule
    lr_rampup_kimg: float = 0.0
    lr_schedule: Literal["constant", "rsqrt", "cosine"] = "constant"
    lr_ref_iters: int = 1
    xflip: bool = False
    log_every_kimg: float = 1.0
    checkpoint_every_kimg: float = 1.0
    max_nonfinite_in_row: int = 20
    fast: FastPath = field(default_factory=FastPath)
    activation_checkpointing: bool = False

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: ⌈duration / batch⌉ (at least one)."""
        return max(1, math.ceil(self.duration_kimg * 1000 / self.batch_size))

    def period_steps(self, every_kimg: float) -> int:
        """A period in kimg as a whole number of steps (at least one)."""
        return max(1, round(every_kimg * 1000 / self.batch_size))

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (warm-up on the images seen before it, then the schedule)."""
        lr = self.lr
        if self.lr_rampup_kimg > 0:
            lr *= min(step * self.batch_size / (self.lr_rampup_kimg * 1000), 1.0)
        if self.lr_schedule == "rsqrt":
            lr /= math.sqrt(max(step / self.lr_ref_iters, 1.0))
        elif self.lr_schedule == "cosine":
            lr *= 0.5 * (1.0 + math.cos(math.pi * min(step / self.total_steps, 1.0)))
        return lr


@dataclass(frozen=True)
class RunSpec:
    """One training run: the model, what it optimises, how, and the identity of its configuration.

    Attributes:
        net: the model in train mode (its initial weights: a fresh network or the teacher's).
        objective: what each step optimises.
        settings: how it trains.
        seed: every random draw of step k comes from (seed, k) (:mod:`adcm.rng`).
        fingerprint: hash of everything that changes the trained weights (:func:`~adcm.train.state.fingerprint`).
        frozen: names of parameters that get no gradient (EDM's augmentation input, fed zeros).
    """

    net: Precond
    objective: Objective
    settings: LoopSettings
    seed: int
    fingerprint: str
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preview:
    """Sample grids of the EMA model during training (rank 0): ``render(ema)`` gives uint8 images."""

    render: Callable[[nn.Module], np.ndarray]
    every_kimg: float
    directory: Path
    name: str = "grid.png"


def clear_stale_grids(directory: Path, step: int) -> None:
    """Remove the grids along training (``grid-NNNNNN.png``) of steps after ``step`` from ``directory``.

    A run that starts over (step 0) removes every earlier run's grids; a resumed run keeps those it
    drew before the interruption, so that the directory always holds exactly this run's grids (the
    DVC stage persists it across re-runs for that reason). Other files are left alone.
    """
    if not directory.is_dir():
        return
    for path in directory.glob("grid-*.png"):
        number = path.stem.removeprefix("grid-")
        if number.isdigit() and int(number) > step:
            path.unlink()


@dataclass(frozen=True)
class RunResult:
    """What a finished (or paused, ``stop_after_steps``) run produced (``peak_memory_mib``: the largest
    logged peak of this call, :func:`~adcm.train.progress.peak_memory_mib`; ``batch_per_step``: the
    micro-batch used)."""

    ema_state: dict[str, Tensor]
    steps: int
    kimg: float
    train_seconds: float
    final_loss: float
    skipped_steps: int
    resumed_from_kimg: float
    rebuild_seconds: float
    partitions: list[tuple[int, list[float]]]
    peak_memory_mib: float | None = None
    batch_per_step: int | None = None


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step reports: its mean loss (a device tensor), whether it moved θ, its learning
    rate, and the summed Δt = t − r of its samples (discrete consistency; None otherwise)."""

    loss: Tensor
    finite: bool
    lr: float
    dt_sum: Tensor | None
    samples: int


class Trainer:
    """One run's model, EMA, optimizer and objective on a device, and its step (module docstring, steps 1–5).

    :func:`train` loops over :meth:`rebuild` and :meth:`step` and adds checkpoints, logging and the
    non-finite policy; the benchmarks time the same :meth:`step`.
    """

    def __init__(self, spec: RunSpec, data: BatchSource, device: torch.device, dist_info: DistInfo | None = None):
        self.spec, self.data, self.device = spec, data, device
        self.info = info = dist_info or DistInfo()
        cfg = spec.settings
        if cfg.batch_size % info.world_size:
            raise TrainingError(f"batch size {cfg.batch_size} is not divisible by {info.world_size} processes")
        self.local_batch = cfg.batch_size // info.world_size
        #: images per forward pass; None until the first step chooses it (``auto`` on CUDA)
        self.micro: int | None
        if cfg.batch_per_step == "auto":
            self.micro = None if device.type == "cuda" else self.local_batch
        else:
            self.micro = min(cfg.batch_per_step or self.local_batch, self.local_batch)
            if self.local_batch % self.micro:
                raise TrainingError(
                    f"per-process batch {self.local_batch} is not a multiple of batch_per_step {self.micro}"
                )
        self.net = net = spec.net.to(device).train().requires_grad_(True)
        for name, p in net.named_parameters():
            if name in spec.frozen:
                p.requires_grad_(False)
        if cfg.activation_checkpointing and not enable_activation_checkpointing(net):
            raise TrainingError("train.activation_checkpointing: the network has no residual blocks to checkpoint")
        cfg.fast.apply(net)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.objective = spec.objective
        self.trainable = spec.objective.trainable(net).to(device)
        self.optimizer = cfg.fast.optimizer(self.trainable, cfg.optimizer, cfg.lr, cfg.beta2)
        ddp: nn.Module = self.trainable
        if info.world_size > 1:
            ddp = nn.parallel.DistributedDataParallel(
                self.trainable, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.ddp = ddp
        # the student forward only, never a JVP (targets, JVPs and rebuilds use self.net)
        self.student = compile_student(ddp) if cfg.fast.compile else ddp
        self._partition_labels: Tensor | None = None

    @property
    def n_micro(self) -> int:
        """Micro-batches per step and process (1 until ``auto`` has chosen the micro-batch)."""
        return self.local_batch // (self.micro or self.local_batch)

    def state_dict(self) -> dict[str, object]:
        """Network, EMA, optimizer and objective state, and the micro-batch (the counters are the caller's)."""
        return {
            "net": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "batch_per_step": self.micro,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`; a resumed ``auto`` run keeps the micro-batch it chose (dropout is
        seeded per chunk, so the split is part of the run)."""
        self.net.load_state_dict(state["net"])  # type: ignore[arg-type]
        self.ema.load_state_dict(state["ema"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.objective.load_state_dict(state["objective"])  # type: ignore[arg-type]
        chosen = state.get("batch_per_step")
        if self.spec.settings.batch_per_step == "auto" and isinstance(chosen, int) and self.local_batch % chosen == 0:
            self.micro = chosen

    def _probe_peak_bytes(self, batch: Batch, draw: Draw, step: int, m: int) -> int | None:
        """Peak CUDA memory of one forward and backward of the first ``m`` rows (None: out of memory).

        Runs on the unwrapped module (no DDP collectives); the gradients are discarded, θ is not moved.
        """
        device, rows = self.device, slice(0, m)
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            bf16 = self.spec.settings.fast.bf16
            loss = self.objective.loss(
                self.net, self.trainable, batch.chunk(rows), draw.chunk(rows, device), step, bf16
            )
            loss.backward()
            del loss
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    def _choose_micro(self, batch: Batch, draw: Draw, step: int) -> int:
        """``batch_per_step: auto`` on CUDA (:func:`~adcm.train.fastpath.auto_micro_batch`): the budget is
        the free plus this process's reserved memory, less Adam's two moments if not yet allocated; the
        smallest choice over the processes is used by all."""
        device = self.device
        free, _ = torch.cuda.mem_get_info(device)
        budget = free + torch.cuda.memory_reserved(device)
        if not self.optimizer.state:
            budget -= 2 * sum(p.numel() * p.element_size() for p in self.trainable.parameters() if p.requires_grad)
        micro = auto_micro_batch(
            self.local_batch, lambda m: self._probe_peak_bytes(batch, draw, step, m), max(budget, 1)
        )
        if self.info.world_size > 1:
            box = torch.tensor(micro, device=device)
            dist.all_reduce(box, op=dist.ReduceOp.MIN)
            micro = int(box)
        return micro

    def _frozen_fn(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t, self._partition_labels)

    def _draw_x0(self, n: int, gen: torch.Generator) -> Tensor:
        x, labels = self.data.sample(n, gen)
        self._partition_labels = labels
        return x

    def rebuild(self, step: int) -> bool:
        """Rebuild what the objective derives from the current weights, when due before ``step`` (ADCM's
        partition: built on rank 0, then broadcast). Returns whether it did."""
        if not self.objective.needs_rebuild(step):
            return False
        if self.info.is_main:
            self.objective.rebuild(step, self._frozen_fn, self._draw_x0, self.net)
        if self.info.world_size > 1:
            box = [self.objective.state_dict() if self.info.is_main else None]
            dist.broadcast_object_list(box, src=0)
            self.objective.load_state_dict(box[0])  # type: ignore[arg-type]
        return True

    def step(self, step: int) -> StepOutcome:
        """Optimizer step number ``step`` (0-based): draws, micro-batches, the finiteness check, update, EMA."""
        spec, cfg, info, device = self.spec, self.spec.settings, self.info, self.device
        objective, opt = self.objective, self.optimizer
        # The whole global batch is drawn identically on every process; each takes its chunks.
        gen = step_generator(spec.seed, step, stream=objective.rng_stream)
        x0_all, labels_all = self.data.sample(cfg.batch_size, gen)
        draw_all = objective.draw(cfg.batch_size, step, gen)
        z_all = torch.randn(x0_all.shape, generator=gen).to(device)
        batch_all = Batch(x0_all, z_all, labels_all)
        if self.micro is None:
            self.micro = self._choose_micro(batch_all, draw_all, step)
        micro = self.micro
        lr = cfg.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_acc = torch.zeros((), device=device)
        dt_sum: Tensor | None = None
        n_micro = self.local_batch // micro
        for m in range(n_micro):
            chunk = info.rank * n_micro + m
            rows = slice(chunk * micro, (chunk + 1) * micro)
            batch, draw = batch_all.chunk(rows), draw_all.chunk(rows, device)
            sync = contextlib.nullcontext() if m == n_micro - 1 or info.world_size == 1 else self.ddp.no_sync()  # type: ignore[operator]
            seed_chunk(spec.seed, step, chunk)
            with sync:
                loss = objective.loss(self.net, self.student, batch, draw, step, cfg.fast.bf16)
                (loss * micro / self.local_batch).backward()
            loss_acc += loss.detach() * (micro / self.local_batch)
            dts = draw.step_sizes()
            if dts is not None:
                dt_sum = dts.double().sum() if dt_sum is None else dt_sum + dts.double().sum()
        if info.world_size > 1:
            dist.all_reduce(loss_acc)
            loss_acc /= info.world_size
        # The one host synchronisation of a step: a non-finite loss or gradient must not move θ.
        grads = [p.grad for p in self.trainable.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(loss_acc) & torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if finite:
            opt.step()
            update_ema(self.ema, self.net, cfg.ema.beta_at(cfg.batch_size, (step + 1) * cfg.batch_size))
        return StepOutcome(loss_acc, finite, lr, dt_sum, self.local_batch)


def train(
    spec: RunSpec,
    data: BatchSource,
    *,
    checkpoint_path: Path,
    device: torch.device,
    fresh: bool = False,
    on_config_change: OnConfigChange = OnConfigChange.refuse,
    log_dir: Path | None = None,
    preview: Preview | None = None,
    show_progress: bool = True,
    dist_info: DistInfo | None = None,
    stop_after_steps: int | None = None,
    notify: Callable[[str], None] | None = None,
) -> RunResult:
    """Train (or resume) the run ``spec`` on ``data`` (module docstring).

    Args:
        spec: the run.
        data: training mini-batches on ``device``.
        checkpoint_path: resumable state (rank 0 writes it); resumed when it has ``spec``'s fingerprint.
        device: where to train.
        fresh: ignore an existing checkpoint.
        on_config_change: a checkpoint of another configuration is refused or discarded.
        log_dir: dvclive directory (rank 0; None = no logging).
        preview: sample grids along the way (rank 0; None = none).
        show_progress: rich progress bar with an ETA (rank 0).
        dist_info: the ``torchrun`` placement (None = one process).
        stop_after_steps: pause after this many steps in this call (with a checkpoint) — for tests of
            resumption and evaluations along the way; None = train to the end.
        notify: called with a line for the user (a discarded checkpoint).

    Raises:
        CheckpointError: a checkpoint of another configuration (``refuse``), or one that is further
            along than the requested duration.
        TrainingError: the batch does not split over the processes; too many non-finite steps in a row.
    """
    trainer = Trainer(spec, data, device, dist_info)
    info, cfg, objective = trainer.info, spec.settings, spec.objective
    total_steps = cfg.total_steps
    step, skipped, elapsed, last_loss, rebuild_s = 0, 0, 0.0, float("nan"), 0.0
    state = resume_state(
        checkpoint_path,
        spec.fingerprint,
        fresh=fresh,
        on_config_change=on_config_change,
        notify=notify if info.is_main else None,
    )
    if state is not None:
        if int(state["step"]) > total_steps:
            raise CheckpointError(
                f"{checkpoint_path}: the checkpoint is at {int(state['step']) * cfg.batch_size / 1000:g} kimg, "
                f"further than the requested {cfg.duration_kimg:g} kimg; raise the duration, or re-run with "
                "--fresh to start over"
            )
        trainer.load_state_dict(state)
        step, skipped = int(state["step"]), int(state["skipped"])
        elapsed, last_loss, rebuild_s = float(state["seconds"]), float(state["loss"]), float(state["rebuild_seconds"])
    resumed_kimg = step * cfg.batch_size / 1000
    last_loss_t = torch.tensor(last_loss)

    def checkpoint() -> None:
        if info.is_main:
            save_state(
                checkpoint_path,
                {
                    "fingerprint": spec.fingerprint,
                    **trainer.state_dict(),
                    "step": step,
                    "skipped": skipped,
                    "seconds": elapsed,
                    "loss": float(last_loss_t),
                    "rebuild_seconds": rebuild_s,
                },
            )

    logger = MetricsLogger(log_dir if info.is_main else None, resume=state is not None and step > 0)
    if info.is_main and preview is not None:
        clear_stale_grids(preview.directory, step)
    log_every = cfg.period_steps(cfg.log_every_kimg)
    ckpt_every = cfg.period_steps(cfg.checkpoint_every_kimg)
    preview_every = cfg.period_steps(preview.every_kimg) if preview is not None else 0
    losses: list[Tensor] = []
    dt_acc, dt_count = torch.zeros((), dtype=torch.float64, device=device), 0
    bad_in_row = 0
    peak_run: float | None = None
    reset_peak_memory(device)
    start = time.perf_counter() - elapsed
    end_step = total_steps if stop_after_steps is None else min(total_steps, step + stop_after_steps)
    with TrainingProgress(
        cfg.label, total_steps * cfg.batch_size / 1000, enabled=show_progress and info.is_main
    ) as progress:
        progress.resume_at(step * cfg.batch_size / 1000)
        while step < end_step:
            t0 = time.perf_counter()
            if trainer.rebuild(step):
                rebuild_s += time.perf_counter() - t0
                progress.restart_clock()
                if info.is_main and objective.partitions:
                    logger.log(
                        step,
                        {
                            "partition_points": float(objective.partitions[-1][1].numel()),
                            "rebuild_seconds": time.perf_counter() - t0,
                        },
                    )
            outcome = trainer.step(step)
            step += 1
            if outcome.dt_sum is not None:
                dt_acc += outcome.dt_sum
                dt_count += outcome.samples
            if outcome.finite:
                bad_in_row = 0
                losses.append(outcome.loss)
                last_loss_t = outcome.loss
            else:
                skipped += 1
                bad_in_row += 1
                if bad_in_row >= cfg.max_nonfinite_in_row:
                    raise TrainingError(
                        f"{bad_in_row} non-finite losses in a row at step {step}; lower the "
                        "learning rate or check the teacher"
                    )
            elapsed = time.perf_counter() - start
            kimg = step * cfg.batch_size / 1000
            last = step == end_step
            if step % log_every == 0 or last:
                mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
                size = float(objective.partitions[-1][1].numel()) if objective.partitions else float("nan")
                peak = peak_memory_mib(device)
                reset_peak_memory(device)
                fields: dict[str, float | str] = {"loss": mean_loss}
                if size == size:
                    fields["|T|"] = str(int(size))
                if peak is not None:
                    fields["MiB"] = f"{peak:.0f}"
                rate = progress.update(kimg, **fields)
                extra: dict[str, float] = {"partition_points": size} if size == size else {}
                if dt_count:
                    extra["mean_dt"] = float(dt_acc) / dt_count
                if peak is not None:
                    extra["peak_memory_mib"] = peak
                    peak_run = peak if peak_run is None else max(peak_run, peak)
                logger.log(
                    step,
                    {
                        "loss": mean_loss,
                        "img_per_s": rate,
                        "kimg": kimg,
                        "lr": outcome.lr,
                        "skipped_steps": skipped,
                        **extra,
                    },
                )
                losses, dt_count = [], 0
                dt_acc = torch.zeros((), dtype=torch.float64, device=device)
            if info.is_main and preview is not None and (step % preview_every == 0 or step == total_steps):
                image = save_grid(preview.directory / f"grid-{step:06d}.png", preview.render(trainer.ema))
                logger.image(preview.name, image)
            if step % ckpt_every == 0 or last:
                checkpoint()
    logger.close()
    return RunResult(
        ema_state={k: v.detach().cpu() for k, v in trainer.ema.state_dict().items()},
        steps=step,
        kimg=step * cfg.batch_size / 1000,
        train_seconds=elapsed,
        final_loss=float(last_loss_t),
        skipped_steps=skipped,
        resumed_from_kimg=resumed_kimg,
        rebuild_seconds=rebuild_s,
        partitions=[(it, pts.tolist()) for it, pts in objective.partitions],
        peak_memory_mib=peak_run,
        batch_per_step=trainer.micro,
    )
