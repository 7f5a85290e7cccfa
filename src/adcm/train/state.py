"""Resumable training state: the configuration fingerprint, the checkpoint file, and the restart policy.

A checkpoint is a plain ``torch.save`` dict (network, EMA, optimizer, objective state, counters),
written atomically and read with ``weights_only=True``. It carries the fingerprint of everything
that changes the trained weights (params, seed, teacher and data hashes, number of processes); a run
resumes only from a checkpoint of the same fingerprint — "to resume, run the same command again".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from adcm.config import OnConfigChange
from adcm.errors import CheckpointError
from adcm.io.files import save_torch

__all__ = ["OnConfigChange", "fingerprint", "load_state", "resume_state", "save_state"]

#: The entries every training checkpoint holds.
STATE_KEYS = (
    "fingerprint",
    "net",
    "ema",
    "optimizer",
    "objective",
    "step",
    "skipped",
    "seconds",
    "loss",
    "rebuild_seconds",
)


def fingerprint(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (dataclasses must be converted with asdict first)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state dict to ``path`` atomically."""
    save_torch(path, state)


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state written by :func:`save_state` (``weights_only=True``).

    Raises:
        CheckpointError: missing, unreadable, or missing one of the entries a checkpoint holds; the
            message says how to start over.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, unpickling refused, ...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a training checkpoint ({first}); re-run with --fresh to start over"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint; re-run with --fresh to start over")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: training checkpoint without the entry {missing[0]!r}; re-run with --fresh to start over"
        )
    return state


def resume_state(
    path: Path, fingerprint_: str, *, fresh: bool, on_config_change: OnConfigChange, notify: Any = None
) -> dict[str, Any] | None:
    """The checkpoint to resume from, or ``None`` to start from scratch.

    Args:
        path: the checkpoint file (may be absent).
        fingerprint_: the fingerprint of the run about to start.
        fresh: ignore any checkpoint.
        on_config_change: a checkpoint of another fingerprint is refused (``refuse``: a
            :class:`CheckpointError` saying how to start over) or discarded (``restart``).
        notify: called with one line when a checkpoint is discarded.
    """
    if fresh or not Path(path).exists():
        return None
    state = load_state(path)
    if state["fingerprint"] == fingerprint_:
        return state
    if on_config_change is OnConfigChange.restart:
        if notify is not None:
            notify(f"{path}: written under other params; starting over (--on-config-change restart)")
        return None
    raise CheckpointError(
        f"{path}: checkpoint from a different configuration (params, seed, teacher or data "
        "changed); re-run with --fresh to start over, or restore the params it was made with"
    )
