"""Random training mini-batches from the prepared uint8 images: on the training device, or read from the file.

A dataset of at most :data:`RESIDENT_BYTES` (Fashion-MNIST: 61 MB, CIFAR-10: 157 MB) is copied to the
training device once and batches are gathered there, as fast as it gets. A larger one (ImageNet
64×64: 15.7 GB) stays in its memory-mapped file (:func:`adcm.io.datasets.load_prepared`) and each
batch's rows are read from it (:class:`adcm.io.datasets.ImageReader`), so the process's memory does
not grow with the dataset (docs/pipeline.md#memory). Both paths draw the same random numbers and give
the same batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from adcm.io.datasets import ImageReader

__all__ = ["RESIDENT_BYTES", "BatchSource"]

RESIDENT_BYTES = 256 << 20
"""Datasets up to this many bytes of images are held on the training device; larger ones are streamed."""


class BatchSource:
    """Random mini-batches from a uint8 (N, C, H, W) array, scaled to [-1, 1], delivered on ``device``.

    ``resident_bytes``: the largest image array copied to ``device`` whole (default
    :data:`RESIDENT_BYTES`); a larger one is read batch by batch (from its file when memory-mapped).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        num_classes: int,
        xflip: bool,
        device: torch.device,
        *,
        resident_bytes: int = RESIDENT_BYTES,
    ):
        self.num_images = int(images.shape[0])
        self.resident = images.nbytes <= resident_bytes
        self.reader: ImageReader | None = None
        self.images: Tensor | None = None
        if self.resident:  # a memory map is copied with file reads: none of its pages stays resident too
            with ImageReader(images) as reader:
                pixels = reader.block(0, self.num_images) if reader.mapped else np.ascontiguousarray(images)
            self.images = torch.from_numpy(pixels).to(device)
        else:
            self.reader = ImageReader(images)
        self.labels = None if labels is None or num_classes == 0 else torch.from_numpy(labels).to(device)
        self.num_classes = num_classes
        self.xflip = xflip
        self.device = device

    def __len__(self) -> int:
        return self.num_images

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(x0 in [-1, 1] float32 (B, C, H, W), one-hot labels (B, K) or None)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        if self.images is not None:
            pixels = self.images[idx.to(self.device)]
        else:
            assert self.reader is not None
            pixels = torch.from_numpy(self.reader.take(idx.numpy())).to(self.device)
        x = pixels.to(torch.float32) / 127.5 - 1
        if self.xflip:
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
        onehot = None
        if self.labels is not None:
            onehot = nn.functional.one_hot(self.labels[idx.to(self.device)].long(), self.num_classes).float()
        return x, onehot
