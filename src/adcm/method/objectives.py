r"""What one training step optimises: the :class:`Objective` interface and its three cases.

The one training loop (:func:`adcm.train.loop.train`) draws, for every step and from one generator,
the global batch's data x0 (and labels), the objective's per-sample draws (:class:`Draw`), and
standard noise z — in that order — and asks the objective for the loss of each micro-batch. Three
objectives cover every model this project trains; they are the three regimes of ADCM's unified
view (paper §3), where the step Δt between the student's time t and the target's time r sets the
method:

* :class:`DiffusionObjective` — the teacher, Δt = t − ε (λ → ∞): the target is the data itself.
  EDM's denoising loss (VE), the flow-matching velocity loss or the TrigFlow diffusion loss.
* :class:`DiscreteConsistencyObjective` — ADCM, ECT, iCT: a
  :class:`~adcm.method.discretization.Discretization` gives (t, r, weight) per sample; the loss is
  w·d_c(f_θ(x_t, t), f_θ⁻(x_r, r)) (docs/method.md#discrete-consistency-training; ADCM's adaptive
  weight is paper Eq. 11).
* :class:`ContinuousConsistencyObjective` — sCT, Δt → 0 (λ = 0): one JVP per step in place of the
  target forward (sCM Algorithm 1; :mod:`adcm.method.sct`).

Every objective owns a random stream (:attr:`Objective.rng_stream`): a teacher and a student trained
with the same seed draw independent numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adcm.method.adcm import ADCMDiscretization
from adcm.method.discretization import ConsistencyFn, DataDraw, Discretization
from adcm.method.losses import DiffusionOutput, consistency_loss, diffusion_loss, noise_levels
from adcm.method.sct import LogVarianceHead, SCTModule, sample_sct_times, sct_batch_loss, warmup_ratio
from adcm.nets.precond import Precond, TrigFlowPrecond
from adcm.processes import ForwardProcess, TrigFlowProcess, broadcast_time
from adcm.rng import same_rng

__all__ = [
    "Batch",
    "ContinuousConsistencyObjective",
    "DiffusionObjective",
    "DiscreteConsistencyObjective",
    "Draw",
    "Objective",
    "consistency_batch_loss",
    "teacher_ode_step",
]


@dataclass(frozen=True)
class Batch:
    """One (micro-)batch of training data: x0 in [-1, 1], standard noise z of the same shape, labels."""

    x0: Tensor
    z: Tensor
    labels: Tensor | None

    def __len__(self) -> int:
        return self.x0.shape[0]

    def chunk(self, rows: slice) -> Batch:
        """Rows ``rows`` of the batch."""
        return Batch(self.x0[rows], self.z[rows], None if self.labels is None else self.labels[rows])


@dataclass(frozen=True)
class Draw:
    """An objective's per-sample random draws for one step (besides x0, z and labels).

    Attributes:
        t: (B,) the student's time: the noise-to-signal ratio σ for a diffusion teacher, the process
            time for the consistency objectives (sCT: TrigFlow time).
        r: (B,) the target's time r < t (discrete consistency), else ``None``.
        weight: (B,) fixed per-sample weight (ECT, iCT: 1/(ρ_t − ρ_r)), or ``None`` (ADCM's adaptive
            weight, computed in the loss; the other objectives have none).
    """

    t: Tensor
    r: Tensor | None = None
    weight: Tensor | None = None

    def chunk(self, rows: slice, device: torch.device) -> Draw:
        """Rows ``rows`` of every field, moved to ``device``."""

        def part(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[rows].to(device)

        t = part(self.t)
        assert t is not None
        return Draw(t, part(self.r), part(self.weight))

    def step_sizes(self) -> Tensor | None:
        """Δt = t − r per sample (discrete consistency), else ``None``."""
        return None if self.r is None else self.t - self.r


class Objective(ABC):
    """What a training step optimises (module docstring)."""

    #: Which per-step random stream the objective's runs draw from (0: teachers, 1: students).
    rng_stream: ClassVar[int]

    def trainable(self, net: Precond) -> nn.Module:
        """The module the optimizer and DDP see (its ``forward`` is what :meth:`loss` calls as ``student``)."""
        return net

    def needs_rebuild(self, step: int) -> bool:
        """Whether :meth:`rebuild` must run before step ``step`` (ADCM's partition)."""
        del step
        return False

    def rebuild(self, step: int, fn: ConsistencyFn, draw_x0: DataDraw, network: nn.Module) -> None:  # noqa: B027
        """Rebuild what depends on the current weights (ADCM's partition); nothing for the others."""

    @abstractmethod
    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> Draw:
        """The whole global batch's per-sample draws for step ``step``, from ``generator``."""

    @abstractmethod
    def loss(self, net: Precond, student: nn.Module, batch: Batch, draw: Draw, step: int, bf16: bool) -> Tensor:
        """Mean loss of one micro-batch, ready for ``backward``.

        Args:
            net: the model being trained (unwrapped: targets and JVPs run on it, never through DDP).
            student: :meth:`trainable`'s module, possibly wrapped by DDP or ``torch.compile``: the
                forward that carries gradients.
            batch: the micro-batch (on the device).
            draw: its rows of :meth:`draw` (on the device).
            step: the training step.
            bf16: autocast the gradient-carrying forward(s) to bf16 (CUDA fast path).
        """

    @property
    def partitions(self) -> list[tuple[int, Tensor]]:
        """ADCM's partitions built so far, ``(step, points)``; empty for every other objective."""
        return []

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (``weights_only``-safe)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class DiffusionObjective(Objective):
    """The teacher's diffusion loss (:func:`~adcm.method.losses.diffusion_loss`) with ln σ ~ N(P_mean, P_std²)."""

    rng_stream = 0

    def __init__(self, p_mean: float, p_std: float):
        if p_std <= 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std

    def trainable(self, net: Precond) -> nn.Module:
        """:class:`~adcm.method.losses.DiffusionOutput` of ``net``: D, v or F_T as one ``forward``."""
        return DiffusionOutput(net)

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> Draw:
        """σ per sample (:func:`~adcm.method.losses.noise_levels`)."""
        del step
        return Draw(noise_levels(batch_size, self.p_mean, self.p_std, generator))

    def loss(self, net: Precond, student: nn.Module, batch: Batch, draw: Draw, step: int, bf16: bool) -> Tensor:
        del step
        device = batch.x0.device
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            per_sample = diffusion_loss(net, batch.x0, batch.z, draw.t, batch.labels, output=student)
        return per_sample.float().mean()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "diffusion"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "diffusion":
            raise ValueError(f"state_dict is for {state.get('kind')!r}, not 'diffusion'")


@torch.no_grad()
def teacher_ode_step(
    teacher: nn.Module, process: ForwardProcess, x_t: Tensor, t: Tensor, r: Tensor, labels: Tensor | None
) -> Tensor:
    """One Euler step of the teacher's probability-flow ODE from (x_t, t) to time r (consistency distillation).

    With the teacher's x0-prediction x̂0 = D(x_t, t) and the noise it implies ẑ = (x_t − α(t)·x̂0)/β(t),
    the ODE's velocity is dx/dt = α'(t)·x̂0 + β'(t)·ẑ (VE: (x_t − x̂0)/t, EDM's ODE), and
    x_r = x_t + (r − t)·dx/dt. With an oracle teacher (x̂0 = x0) this is consistency training's
    x_r = α(r)·x0 + β(r)·z — exactly for VE and FM (x_t linear in t), to first order for TrigFlow:
    distillation replaces the one-sample estimate of the velocity by the teacher's posterior mean
    (docs/method.md#consistency-distillation).

    Args:
        teacher: x0-prediction D(x, t, labels) of the teacher in ``process`` (ε = 0, eval mode).
        process: the forward process of the student.
        x_t: (B, C, H, W) points at time t.
        t: (B,) start times; r: (B,) end times, r < t.
        labels: class labels or None.
    """
    x0_hat = teacher(x_t, t, labels).to(x_t.dtype)
    tb = broadcast_time(t, x_t)
    z_hat = (x_t - process.alpha(tb) * x0_hat) / process.beta(tb)
    return x_t + broadcast_time(r - t, x_t) * process.dx_dt(x0_hat, z_hat, t)


def consistency_batch_loss(
    net: nn.Module,
    student: nn.Module,
    process: ForwardProcess,
    batch: Batch,
    t: Tensor,
    r: Tensor,
    weight: Tensor | None,
    *,
    c: float,
    bf16: bool = False,
    teacher: nn.Module | None = None,
) -> Tensor:
    """Mean discrete consistency loss of one mini-batch (docs/method.md#discrete-consistency-training).

    x_t and x_r share the noise z (consistency training), or with ``teacher`` x_r is one Euler step
    of the teacher's ODE from x_t (:func:`teacher_ode_step`, consistency distillation); the target
    f_θ⁻(x_r, r) runs under no_grad with the current weights (``net``), replaced by x_r where r ≤ ε;
    the student f_θ(x_t, t) runs through ``student`` (``net`` or its DDP wrapper) with the same
    dropout masks (the RNG is replayed). ``weight`` None means ADCM's adaptive 1/d_c(target, x0)
    (paper Eq. 11). bf16 autocast (CUDA) covers the forwards only; the loss is computed in fp32.
    """
    x0, z, labels = batch.x0, batch.z, batch.labels
    device = x0.device
    x_t = process.x_t(x0, z, t)
    if teacher is None:
        x_r = process.x_t(x0, z, r)
    else:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            x_r = teacher_ode_step(teacher, process, x_t, t, r, labels).float()
    at_data = (r <= torch.tensor(process.eps, dtype=r.dtype, device=r.device)).view(-1, *([1] * (x0.ndim - 1)))
    with same_rng(device) as replay:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            target = net(x_r, r, labels).float()
        target = torch.where(at_data, x_r, target)
        replay()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = student(x_t, t, labels).float()
    return consistency_loss(out, target, x0, weight, c).mean()


class DiscreteConsistencyObjective(Objective):
    """ECT, iCT or ADCM: ``disc`` gives (t, r, weight) per sample; the loss is :func:`consistency_batch_loss`."""

    rng_stream = 1

    def __init__(self, disc: Discretization, process: ForwardProcess, huber_c: float, teacher: nn.Module | None = None):
        """``teacher``: the frozen x0-prediction of the teacher in ``process``, on the training device,
        for consistency distillation (:func:`teacher_ode_step`); None = consistency training."""
        self.disc = disc
        self.process = process
        self.huber_c = huber_c
        self.teacher = teacher if teacher is None else teacher.eval().requires_grad_(False)

    def needs_rebuild(self, step: int) -> bool:
        return self.disc.needs_rebuild(step)

    def rebuild(self, step: int, fn: ConsistencyFn, draw_x0: DataDraw, network: nn.Module) -> None:
        self.disc.rebuild(step, fn, draw_x0, network=network)

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> Draw:
        pairs = self.disc.sample(batch_size, step, generator)
        return Draw(pairs.t, pairs.r, pairs.weight)

    def loss(self, net: Precond, student: nn.Module, batch: Batch, draw: Draw, step: int, bf16: bool) -> Tensor:
        del step
        assert draw.r is not None
        return consistency_batch_loss(
            net,
            student,
            self.process,
            batch,
            draw.t,
            draw.r,
            draw.weight,
            c=self.huber_c,
            bf16=bf16,
            teacher=self.teacher,
        )

    @property
    def partitions(self) -> list[tuple[int, Tensor]]:
        return self.disc.partitions if isinstance(self.disc, ADCMDiscretization) else []

    def state_dict(self) -> dict[str, Any]:
        return self.disc.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.disc.load_state_dict(state)


class ContinuousConsistencyObjective(Objective):
    """sCT (sCM Algorithm 1; :mod:`adcm.method.sct`): t from the proposal, one JVP per step, adaptive weighting."""

    rng_stream = 1

    def __init__(
        self,
        process: TrigFlowProcess,
        *,
        p_mean: float,
        p_std: float,
        tangent_norm_c: float,
        warmup_iters: int,
        weight_channels: int | None,
    ):
        self.process = process
        self.p_mean, self.p_std = p_mean, p_std
        self.tangent_norm_c = tangent_norm_c
        self.warmup_iters = warmup_iters
        self.head = LogVarianceHead(weight_channels) if weight_channels is not None else None

    def trainable(self, net: Precond) -> nn.Module:
        """The TrigFlow model and the log-variance head in one module (what the optimizer and DDP see)."""
        if not isinstance(net, TrigFlowPrecond):
            raise TypeError("sCT needs a TrigFlow model")
        return SCTModule(net, self.head)

    def draw(self, batch_size: int, step: int, generator: torch.Generator) -> Draw:
        del step
        return Draw(sample_sct_times(batch_size, self.p_mean, self.p_std, self.process, generator))

    def loss(self, net: Precond, student: nn.Module, batch: Batch, draw: Draw, step: int, bf16: bool) -> Tensor:
        assert isinstance(net, TrigFlowPrecond)
        return sct_batch_loss(
            net,
            student,
            batch.x0,
            batch.z,
            draw.t,
            batch.labels,
            ratio=warmup_ratio(step, self.warmup_iters),
            tangent_norm_c=self.tangent_norm_c,
            bf16=bf16,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sct", "head": None if self.head is None else self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sct":
            raise ValueError(f"state_dict is for {state.get('kind')!r}, not 'sct'")
        if self.head is not None:
            self.head.load_state_dict(state["head"])
