"""Channel arithmetic of DDPM++ (SongUNet), without torch: which widths its group normalisations see.

The params check uses it to refuse a network EDM's group rule cannot build before any work starts
(``adcm.config``), and ``GroupNorm`` takes its group count from here; ``tests/nets/test_songunet.py`` checks it
against a built network.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bad_group_norm_width", "group_count", "group_norm_widths"]


def group_count(num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's number of groups for ``num_channels`` channels: min(num_groups, num_channels // min_channels_per_group)."""
    return min(num_groups, num_channels // min_channels_per_group)


def group_norm_widths(model_channels: int, channel_mult: Sequence[int], num_blocks: int) -> list[int]:
    """The channel count of every GroupNorm in a DDPM++ SongUNet with these settings, in build order.

    Each residual block normalises its input and its output, the decoder its concatenation of the
    previous output with an encoder skip (so widths of two levels add up), the last level its output.
    EDM's rule splits C channels into min(32, C // 4) groups, so every width must be divisible by that
    count: model_channels = 48 with channel_mult [1, 2, 2] fails on the decoder's 96 + 48 = 144.
    """
    widths: list[int] = []
    skips: list[int] = []
    cout = model_channels
    for level, mult in enumerate(channel_mult):
        if level > 0:
            widths += [cout, cout]  # the downsampling block
        skips.append(cout)
        for _ in range(num_blocks):
            cin, cout = cout, model_channels * mult
            widths += [cin, cout]
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        repeats = 2 if level == len(channel_mult) - 1 else 1  # the two middle blocks, else the upsampling one
        widths += [cout, cout] * repeats
        for _ in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            widths += [cin, cout]
    widths.append(cout)
    return widths


def bad_group_norm_width(model_channels: int, channel_mult: Sequence[int], num_blocks: int) -> int | None:
    """The first GroupNorm width (see ``group_norm_widths``) EDM's group rule cannot split, or None."""
    for width in group_norm_widths(model_channels, channel_mult, num_blocks):
        groups = group_count(width)
        if groups < 1 or width % groups:
            return width
    return None
