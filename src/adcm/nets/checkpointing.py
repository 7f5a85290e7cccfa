"""Activation checkpointing of residual blocks: the ``train.activation_checkpointing`` memory knob.

:func:`enable_activation_checkpointing` makes every residual block of a network — DDPM++'s
:class:`~adcm.nets.songunet.UNetBlock`, EDM2's :class:`~adcm.nets.edm2.Block`, or any block types
given — keep only its inputs during the forward pass and recompute its activations in the backward
pass (``torch.utils.checkpoint``, non-reentrant). Memory for activations then grows with the number of
blocks' *inputs* instead of all their intermediate tensors, for about one extra forward of compute.

How: each block's class is swapped for a subclass (made once per class) whose ``forward`` checkpoints
the original one. Parameter names, ``state_dict``, ``isinstance`` and ``copy.deepcopy`` (the EMA copy)
are unchanged, and the network files need no change.

When it applies: a block in training mode with gradients enabled and no forward-mode (dual) tensor
among its inputs. So evaluation, sampling, the no-grad target forward and every JVP (sCT's tangent,
ADCM's partition; they run under ``no_grad`` on dual tensors) run the plain forward; the
gradient-carrying student forward is checkpointed — which is how it composes with sCT.

Exactness: the recomputation replays the RNG (dropout masks; ``preserve_rng_state``) and the autocast
state, so the gradients equal those without checkpointing (tested). A module that rewrites its own
weights in a training-mode forward — EDM2's forced weight normalisation, flagged by a
``force_normalization`` attribute — does so in the first forward only, not again in the recomputation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adcm.nets.edm2 import Block as EDM2Block
from adcm.nets.songunet import UNetBlock

__all__ = ["DEFAULT_BLOCKS", "checkpointed_blocks", "enable_activation_checkpointing"]

#: The residual blocks of the networks this project builds (DDPM++ and EDM2).
DEFAULT_BLOCKS: tuple[type[nn.Module], ...] = (UNetBlock, EDM2Block)

_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _is_dual(value: Any) -> bool:
    return isinstance(value, Tensor) and fwad.unpack_dual(value).tangent is not None


@contextlib.contextmanager
def _no_weight_rewrites(module: nn.Module) -> Iterator[None]:
    """Switch off the in-forward weight rewrites (``force_normalization``) of ``module``'s layers."""
    changed = [m for m in module.modules() if getattr(m, "force_normalization", False) is True]
    for m in changed:
        setattr(m, "force_normalization", False)  # noqa: B010
    try:
        yield
    finally:
        for m in changed:
            setattr(m, "force_normalization", True)  # noqa: B010


def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``cls`` whose forward is checkpointed in training (module docstring)."""
    if getattr(cls, "_adcm_checkpointed", False):
        return cls
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    base_forward = cls.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()) or any(_is_dual(v) for v in (*args, *kwargs.values())):
            return base_forward(self, *args, **kwargs)
        calls = 0

        def run(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return base_forward(self, *a, **k)
            with _no_weight_rewrites(self):  # the recomputation
                return base_forward(self, *a, **k)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    sub = type(
        f"Checkpointed{cls.__name__}",
        (cls,),
        {
            "forward": forward,
            "_adcm_checkpointed": True,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} with activation checkpointing in training (adcm.nets.checkpointing).",
        },
    )
    _SUBCLASSES[cls] = sub
    return sub


def enable_activation_checkpointing(net: nn.Module, block_types: Sequence[type[nn.Module]] = DEFAULT_BLOCKS) -> int:
    """Checkpoint every block of ``net`` that is an instance of ``block_types`` (module docstring).

    Idempotent. Returns the number of checkpointed blocks (0: the network has none of these blocks).
    """
    types = tuple(block_types)
    count = 0
    for module in net.modules():
        if isinstance(module, types):
            module.__class__ = _checkpointed_class(type(module))
            count += 1
    return count


def checkpointed_blocks(net: nn.Module) -> int:
    """How many blocks of ``net`` are checkpointed."""
    return sum(1 for m in net.modules() if getattr(type(m), "_adcm_checkpointed", False))
