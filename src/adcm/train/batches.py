"""Random training mini-batches from the prepared uint8 images, kept on the training device."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["BatchSource"]


class BatchSource:
    """Random mini-batches from a uint8 (N, C, H, W) array, scaled to [-1, 1], kept on ``device``."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray | None, num_classes: int, xflip: bool, device: torch.device
    ):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = None if labels is None or num_classes == 0 else torch.from_numpy(labels).to(device)
        self.num_classes = num_classes
        self.xflip = xflip
        self.device = device

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(x0 in [-1, 1] float32 (B, C, H, W), one-hot labels (B, K) or None)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = self.images[idx.to(self.device)].to(torch.float32) / 127.5 - 1
        if self.xflip:
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
        onehot = None
        if self.labels is not None:
            onehot = nn.functional.one_hot(self.labels[idx.to(self.device)].long(), self.num_classes).float()
        return x, onehot
