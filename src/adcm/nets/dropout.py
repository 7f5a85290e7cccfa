"""Dropout whose masks are cheap to draw on the CPU.

``torch.nn.functional.dropout`` draws each mask element with its own call of the CPU generator
(``bernoulli_``); in the embedded default's consistency-training step, whose target and student
forwards draw the same masks twice (the RNG is replayed, docs/method.md#discrete-consistency-training),
that was 14 % of the step's time on the 2-core CPU. :func:`dropout` instead fills a tensor of 64-bit
words from the global generator — four 16-bit uniform integers per draw — and keeps an element when
its integer is at least k − 32768, with k = round(p·65536): every element is dropped independently
with probability p' = k / 65536 (|p' − p| ≤ 2^-17, e.g. 0.1000061 for p = 0.1) and the kept ones are
scaled by 1 / (1 − p'), so E[dropout(x)] = x exactly, as for PyTorch's. The masks are a function of
the global generator's state, so replaying it (:func:`adcm.rng.same_rng`, activation checkpointing)
replays them. On other devices — CUDA's fused kernel is already cheap — this is
``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

__all__ = ["LEVELS", "dropout", "effective_p"]

LEVELS = 65536
"""The CPU masks' resolution: p is rounded to a multiple of 1/65536."""


def effective_p(p: float) -> float:
    """The drop probability :func:`dropout` applies on the CPU: p rounded to a multiple of 1/65536."""
    return round(p * LEVELS) / LEVELS


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Zero each element of ``x`` with probability ``p`` and scale the rest by 1/(1 − p), in training only.

    Args:
        x: any tensor; on the CPU the mask is drawn from the global generator in 16-bit levels
            (module docstring), elsewhere by ``torch.nn.functional.dropout``.
        p: drop probability in [0, 1].
        training: ``False`` returns ``x`` unchanged.

    Returns:
        A new tensor (``x`` itself when nothing is dropped).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    k = round(p * LEVELS)
    if x.device.type != "cpu" or k in (0, LEVELS):
        return nnf.dropout(x, p=p, training=True)
    n = x.numel()
    # 64 random bits per word over the whole int64 range; each word gives four uniform 16-bit integers.
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    levels = words.view(torch.int16)[:n].view(x.shape)
    keep = levels >= k - LEVELS // 2  # P(keep) = (LEVELS − k) / LEVELS
    return x * keep * (LEVELS / (LEVELS - k))
