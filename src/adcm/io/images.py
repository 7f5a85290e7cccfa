"""Converting samples to 8-bit images and writing sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from adcm.io.files import atomic_path

__all__ = ["grid_image", "save_grid", "to_uint8"]


def to_uint8(x: Tensor) -> np.ndarray:
    """Samples in [-1, 1] (B, C, H, W) → uint8 (B, C, H, W), rounding as EDM does."""
    return (x.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu().numpy()


def grid_image(images: np.ndarray, rows: int | None = None) -> Image.Image:
    """Tile uint8 (N, C, H, W) images into one PIL image with ``rows`` rows (default ≈ square)."""
    n, c, h, w = images.shape
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[r * h : (r + 1) * h, q * w : (q + 1) * w] = images[i].transpose(1, 2, 0)
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")


def save_grid(path: Path, images: np.ndarray, rows: int | None = None) -> Image.Image:
    """Write the grid of ``images`` as a PNG at ``path`` atomically; returns the image."""
    image = grid_image(images, rows)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image
