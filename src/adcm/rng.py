"""Per-step random streams: every random draw of a run is a pure function of (seed, step, stream).

The data indices, flips, per-sample draws and noise of step k come from a CPU generator seeded by
(seed, k, stream) (:func:`step_generator`); dropout draws from the global generator, seeded per
micro-batch chunk by (seed, k, chunk) (:func:`seed_chunk`), so the masks do not depend on which
process runs a chunk. A run resumed from a checkpoint therefore ends with exactly the same weights
as an uninterrupted one, and N DDP processes reproduce one process with the same global batch and
chunk size (on the same device kind and thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["mix_seed", "same_rng", "seed_chunk", "step_generator"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SHA-256 of their decimal text): independent streams per tuple."""
    digest = hashlib.sha256(":".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for step ``step`` of a run with ``seed``; also re-seeds the global RNG."""
    torch.manual_seed(mix_seed(seed, step, stream, 1))
    return torch.Generator().manual_seed(mix_seed(seed, step, stream, 0))


def seed_chunk(seed: int, step: int, chunk: int) -> None:
    """Seed the global RNG (dropout) for chunk ``chunk`` of step ``step``'s global batch."""
    torch.manual_seed(mix_seed(seed, step, chunk, 2))


@contextlib.contextmanager
def same_rng(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields ``replay()``: resets the global RNG (CPU and, on CUDA, the device) to its state at entry.

    The target forward (or JVP) runs first, then ``replay()``, then the student forward: both draw
    the same dropout masks (docs/method.md#discrete-consistency-training).
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    yield replay
