"""The errors of ``adcm``: one base type, :class:`AdcmError`, whose message is one line for the user.

The CLI layer catches :class:`AdcmError` alone, prints ``error: <message>`` and exits with the
error's :attr:`~AdcmError.exit_code`: 2 for input the user must fix (a params key, a file, a
dataset, a checkpoint that does not fit), 1 for a run that failed on its own (training diverged).
Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "AdcmError",
    "CheckpointError",
    "DatasetError",
    "DownloadError",
    "FIDError",
    "ParamsError",
    "PartitionTooLongError",
    "PickleFormatError",
    "TrainingError",
    "UnsafePickleError",
]


class AdcmError(Exception):
    """Base of every error meant for the user (one line; the CLI exits with :attr:`exit_code`)."""

    exit_code: int = 2


class ParamsError(AdcmError, ValueError):
    """A user error in the params file or a ``--set`` override: one line naming the key."""


class DatasetError(AdcmError, ValueError):
    """A dataset that cannot be read, or does not fit what is asked of it."""


class CheckpointError(AdcmError, ValueError):
    """A model file or training checkpoint that is missing, unreadable or does not fit."""


class DownloadError(AdcmError, RuntimeError):
    """A download failed or its checksum did not match; nothing was left behind."""


class FIDError(AdcmError, RuntimeError):
    """Feature statistics or Inception weights that are missing or do not fit."""


class PickleFormatError(AdcmError, ValueError):
    """A pickle that is not a model checkpoint in the expected format (EDM's or EDM2's)."""


class UnsafePickleError(AdcmError, ValueError):
    """A pickle that asks for something outside the importer's allow-list (code execution)."""


class PartitionTooLongError(AdcmError, ValueError):
    """ADCM's adaptive partition would exceed ``max_points`` (λ too small or a degenerate network)."""


class TrainingError(AdcmError, RuntimeError):
    """Training cannot go on (too many non-finite losses in a row, an impossible batch split)."""

    exit_code = 1
