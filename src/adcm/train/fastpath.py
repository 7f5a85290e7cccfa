"""The GPU fast path and the memory knobs of training (docs/performance.md#the-gpu-fast-path).

Fast-path switches, each a params key (``train.bf16`` …), applied on CUDA:

* ``bf16``: bf16 autocast (``torch.autocast(device.type, torch.bfloat16)``) of the gradient-carrying
  forwards and of the discrete methods' target forward; the JVPs (sCT's tangent, ADCM's partition)
  and the loss stay fp32 (:mod:`adcm.method.objectives`).
* ``channels_last``: the network's memory format.
* ``tf32``: TF32 matmuls and convolutions (``false`` leaves PyTorch's defaults).
* ``fused_optimizer``: fused Adam, foreach RAdam.
* ``compile``: ``torch.compile`` of the student forward only (:func:`compile_student`), never around
  a JVP: the target forward, the JVPs and the partition builds run on the uncompiled network.

On the CPU every switch is off (fp32, default kernels) unless ``force_cpu`` asks for them: then bf16,
channels_last, fused/foreach and compile run through the very same code as on CUDA (TF32 does not
exist on the CPU). The tests and ``benchmarks/device_check.py --smoke`` use this to exercise the GPU
path on a machine without one.

Memory knobs: ``train.batch_per_step: auto`` (:func:`auto_micro_batch`: the largest micro-batch whose
step fits in the free GPU memory; the whole batch on the CPU) and ``train.activation_checkpointing``
(:mod:`adcm.nets.checkpointing`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adcm.errors import TrainingError

__all__ = ["FastPath", "auto_micro_batch", "compile_student", "divisors"]


@dataclass(frozen=True)
class FastPath:
    """Which fast-path switches are on for this run (module docstring)."""

    bf16: bool = False
    channels_last: bool = False
    tf32: bool = False
    fused_optimizer: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, requested: FastPath, device: torch.device, force_cpu: bool = False) -> FastPath:
        """The switches of ``requested`` that apply on ``device``.

        On CUDA all of them; on the CPU none, or with ``force_cpu`` every one the CPU has (all but TF32),
        run through the same code path as on CUDA.
        """
        if device.type == "cuda":
            return requested
        if force_cpu:
            return cls(
                bf16=requested.bf16,
                channels_last=requested.channels_last,
                fused_optimizer=requested.fused_optimizer,
                compile=requested.compile,
            )
        return cls()

    def apply(self, net: nn.Module) -> None:
        """Set the process-wide TF32 flags (when :attr:`tf32`; otherwise PyTorch's defaults are left: TF32
        convolutions, fp32 matmuls) and the network's memory format."""
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.channels_last:
            net.to(memory_format=torch.channels_last)

    def optimizer(
        self, module: nn.Module, kind: Literal["adam", "radam"], lr: float, beta2: float
    ) -> torch.optim.Optimizer:
        """RAdam or Adam (β₁ 0.9, β₂ ``beta2``, ε 1e-8) over the trainable parameters of ``module``;
        fused Adam (CUDA and CPU kernels) / foreach RAdam (PyTorch has no fused RAdam) on the fast path."""
        params = [p for p in module.parameters() if p.requires_grad]
        extra: dict[str, Any] = {}
        if self.fused_optimizer:
            extra = {"fused": True} if kind == "adam" else {"foreach": True}
        opt_cls = torch.optim.RAdam if kind == "radam" else torch.optim.Adam
        return opt_cls(params, lr=lr, betas=(0.9, beta2), eps=1e-8, **extra)


def compile_student(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` for the student forward, with inductor's random numbers taken from the
    eager generators (``fallback_random``).

    **Decision**: the discrete methods' target runs eagerly and the student compiled, and the two must
    draw the same dropout masks from the replayed global RNG (docs/method.md#discrete-consistency-training);
    inductor's own (Philox) random numbers would give the student other masks. Eager random kernels cost
    a little speed; dropout-free networks are unaffected.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    compiled: nn.Module = torch.compile(module)  # type: ignore[assignment]
    return compiled


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    if n < 1:
        raise ValueError(f"need a positive integer, got {n}")
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_micro_batch(
    local_batch: int,
    peak_bytes: Callable[[int], int | None],
    budget_bytes: int,
    *,
    headroom: float = 0.9,
) -> int:
    """``train.batch_per_step: auto`` on CUDA: the largest divisor m of ``local_batch`` whose step fits.

    ``peak_bytes(m)`` measures the peak memory of one forward and backward at micro-batch m (None: it
    ran out of memory). Two probes at small sizes (≈ local_batch/4 and /2) fit peak(m) = fixed + m·per
    image; the largest divisor whose estimate is within ``headroom``·``budget_bytes`` is then probed
    itself, and halved (the next divisor ≤ m/2) while it does not fit.

    Raises:
        TrainingError: not even one image per step fits.
    """
    if local_batch < 1 or budget_bytes <= 0 or not 0 < headroom <= 1:
        raise ValueError(
            f"need local_batch ≥ 1, budget > 0 and headroom in (0, 1]; got {local_batch}, {budget_bytes}, {headroom}"
        )
    limit = headroom * budget_bytes
    divs = divisors(local_batch)

    def below(m: int) -> int | None:
        """The largest divisor ≤ m, or None."""
        smaller = [d for d in divs if d <= m]
        return smaller[-1] if smaller else None

    def fits(m: int) -> int | None:
        peak = peak_bytes(m)
        return peak if peak is not None and peak <= limit else None

    # The small probe, halved until it fits.
    small: int | None = below(max(1, local_batch // 4))
    small_peak = None
    while small is not None:
        small_peak = fits(small)
        if small_peak is not None:
            break
        small = below(small // 2)
    if small is None or small_peak is None:
        raise TrainingError(
            f"train.batch_per_step: auto: not even one image per step fits in {budget_bytes / 2**20:.0f} MiB"
        )
    big = below(max(small + 1, local_batch // 2))
    if big is None or big <= small:
        big = small
    big_peak = fits(big) if big != small else small_peak
    if big_peak is None:  # the answer lies between the two probes
        known, estimate = small, big - 1
    else:
        known = big
        per_image = (big_peak - small_peak) / (big - small) if big > small else small_peak / small
        per_image = max(per_image, 1.0)
        estimate = max(known, int((limit - (big_peak - per_image * big)) // per_image))
    candidate = below(min(estimate, local_batch)) or known
    while candidate > known:
        if fits(candidate) is not None:
            return candidate
        candidate = below(candidate // 2) or known
    return known
