"""The GPU fast path: bf16 autocast, channels_last, TF32, fused/foreach optimizers, ``torch.compile``.

Each switch is a params key (``train.bf16`` …) and applies on CUDA; on the CPU everything is off
(fp32, default kernels) unless ``force_cpu`` asks for the numerically neutral ones (channels_last,
foreach), as the equivalence test does. bf16 covers the gradient-carrying forwards only: JVPs and
the loss stay fp32. ``torch.compile`` wraps the student forward only, never a JVP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["FastPath"]


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
        """The switches of ``requested`` that apply on ``device``."""
        if device.type == "cuda":
            return requested
        if force_cpu:
            return cls(channels_last=requested.channels_last, fused_optimizer=requested.fused_optimizer)
        return cls()

    def apply(self, net: nn.Module) -> None:
        """Set the process-wide TF32 flags and the network's memory format."""
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.channels_last:
            net.to(memory_format=torch.channels_last)

    def optimizer(
        self, module: nn.Module, kind: Literal["adam", "radam"], lr: float, beta2: float
    ) -> torch.optim.Optimizer:
        """RAdam or Adam (β₁ 0.9, β₂ ``beta2``, ε 1e-8) over the trainable parameters of ``module``;
        fused Adam / foreach RAdam kernels on the fast path."""
        params = [p for p in module.parameters() if p.requires_grad]
        extra: dict[str, Any] = {}
        if self.fused_optimizer:
            extra = {"fused": True} if kind == "adam" else {"foreach": True}
        opt_cls = torch.optim.RAdam if kind == "radam" else torch.optim.Adam
        return opt_cls(params, lr=lr, betas=(0.9, beta2), eps=1e-8, **extra)
