"""DDPM++ backbone (the "SongUNet" of EDM), written from the architecture description.

Parameter names and shapes match EDM's ``SongUNet`` state dict one to one, so a converted EDM
checkpoint loads with ``strict=True`` (see :mod:`adcm.io.edm_pickle`). Only the DDPM++ variant is
implemented: positional noise embedding, ``standard`` encoder and decoder. The backbone computes
F(x, c_noise); the preconditioning that turns it into a denoiser or a consistency function lives in
:mod:`adcm.nets.precond`.

Attention is written as plain ``einsum`` + ``softmax`` (no fused SDPA kernel) so that
``torch.func.jvp`` works through the whole network (docs/method.md#jacobian-vector-products).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from adcm.nets.dropout import dropout
from adcm.nets.widths import group_count

__all__ = ["Conv2d", "GroupNorm", "Linear", "PositionalEmbedding", "SongUNet", "UNetBlock", "pixel_norm"]


def _xavier_uniform_(tensor: Tensor, fan_in: int, fan_out: int, gain: float) -> None:
    """Fill ``tensor`` with U(-a, a), a = gain·sqrt(6 / (fan_in + fan_out))."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


class Linear(nn.Module):
    """Fully connected layer with a ``weight`` of shape (out, in) and an optional ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        _xavier_uniform_(self.weight, in_features, out_features, init_weight)

    def forward(self, x: Tensor) -> Tensor:
        return nnf.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """2-D convolution with optional 2× up/down-sampling by a separable FIR ``resample_filter``.

    With the default filter [1, 1], down-sampling is 2×2 average pooling and up-sampling is
    nearest-neighbour; the resampling is applied before the (optional) convolution. ``kernel=0``
    gives a pure resampling layer without weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        init_weight: float = 1.0,
    ):
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            _xavier_uniform_(self.weight, in_channels * kernel * kernel, out_channels * kernel * kernel, init_weight)
            if bias:
                self.bias = nn.Parameter(torch.zeros(out_channels))
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", filt if (up or down) else None)

    def forward(self, x: Tensor) -> Tensor:
        filt = cast(Tensor | None, self.resample_filter)
        if filt is not None:
            filt = filt.to(x.dtype)
            pad = (filt.shape[-1] - 1) // 2
            depthwise = filt.expand(self.in_channels, 1, *filt.shape[-2:])
            if self.up:
                x = nnf.conv_transpose2d(x, depthwise * 4, groups=self.in_channels, stride=2, padding=pad)
            else:
                x = nnf.conv2d(x, depthwise, groups=self.in_channels, stride=2, padding=pad)
        if self.weight is not None:
            x = nnf.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, channels // 4) groups (EDM's rule), affine parameters."""

    def __init__(self, num_channels: int, eps: float = 1e-5, num_groups: int = 32, min_channels_per_group: int = 4):
        super().__init__()
        self.num_groups = group_count(num_channels, num_groups, min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {self.num_groups} groups")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return nnf.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar per sample.

    Frequencies f_j = (1/max_positions)^(j / (C/2 − 1)) with ``endpoint=True`` (DDPM++), output
    [cos(x·f), sin(x·f)] of width ``num_channels``.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** freqs
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Pixel normalisation over the channel dim: x / sqrt(mean_c(x²) + eps) (Karras et al. 2018)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


class UNetBlock(nn.Module):
    """Residual block of DDPM++: GN–SiLU–conv, additive embedding, GN–SiLU–dropout–conv, skip.

    With ``adaptive_double_norm`` (sCM's *adaptive double normalisation*, Lu & Song 2024, §4.1) the
    embedding gives a scale s and a shift b per channel instead, each pixel-normalised:
    GN(x)·pnorm(s) + pnorm(b); ``affine`` then has 2·out_channels outputs (not EDM-compatible).
    Optionally followed by single-head self-attention. Both residual sums are scaled by
    ``skip_scale`` (sqrt(0.5) in DDPM++). Up/down-sampling happens in ``conv0`` and in the 1×1
    ``skip`` projection.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-6,
        resample_filter: Sequence[int] = (1, 1),
        adaptive_double_norm: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.adaptive_double_norm = adaptive_double_norm
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        zero, attn = 1e-5, math.sqrt(0.2)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_double_norm else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=zero)
        self.skip: Conv2d | None = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=attn)
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        residual = x
        x = self.conv0(nnf.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_double_norm:  # sCM §4.1: norm(x)·pnorm(s(t)) + pnorm(b(t))
            scale, shift = params.chunk(2, dim=1)
            x = nnf.silu(torch.addcmul(pixel_norm(shift), self.norm1(x), pixel_norm(scale)))
        else:  # DDPM++: the embedding is added before the normalisation
            x = nnf.silu(self.norm1(x + params))
        x = self.conv1(dropout(x, self.dropout, self.training))
        x = (x + (self.skip(residual) if self.skip is not None else residual)) * self.skip_scale
        if self.num_heads:
            batch, channels, height, width = x.shape
            heads = self.num_heads
            # qkv channels are laid out as (head, channel, {q,k,v}) — EDM's layout.
            q, k, v = self.qkv(self.norm2(x)).reshape(batch * heads, channels // heads, 3, -1).unbind(2)
            scale = 1.0 / math.sqrt(k.shape[1])
            weights = torch.einsum("ncq,nck->nqk", q, k * scale).softmax(dim=2)
            out = torch.einsum("nqk,nck->ncq", weights, v).reshape(batch, channels, height, width)
            x = (self.proj(out) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """DDPM++ U-Net of Song et al. (2021) in EDM's layout; outputs F(x, c_noise).

    Args mirror EDM's ``SongUNet`` so that a checkpoint's recorded constructor settings can be
    passed straight in. Only ``embedding_type='positional'`` and the ``standard`` encoder/decoder
    (DDPM++) are supported.

    Args:
        img_resolution: Image height = width (a multiple of 2^(len(channel_mult) − 1)).
        in_channels: Input image channels.
        out_channels: Output image channels.
        label_dim: Number of class labels (0 = unconditional).
        augment_dim: Width of the augmentation-label input (0 = none; EDM CIFAR-10 uses 9).
        model_channels: Base channel count.
        channel_mult: Channel multiplier per resolution level.
        channel_mult_emb: Embedding width as a multiple of ``model_channels``.
        num_blocks: Residual blocks per level in the encoder (decoder has one more).
        attn_resolutions: Resolutions at which blocks carry self-attention.
        dropout: Dropout probability inside residual blocks.
        label_dropout: Probability of dropping the class label during training.
        embedding_type: Must be ``"positional"``.
        channel_mult_noise: Noise-embedding width as a multiple of ``model_channels``.
        encoder_type: Must be ``"standard"``.
        decoder_type: Must be ``"standard"``.
        resample_filter: FIR taps for up/down-sampling.
        adaptive_double_norm: sCM's adaptive double normalisation in every block (see
            :class:`UNetBlock`); not part of EDM's checkpoints (default off).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int,
        augment_dim: int,
        model_channels: int,
        channel_mult: Sequence[int],
        channel_mult_emb: int,
        num_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        label_dropout: float,
        embedding_type: str,
        channel_mult_noise: int,
        encoder_type: str,
        decoder_type: str,
        resample_filter: Sequence[int],
        adaptive_double_norm: bool = False,
    ):
        if embedding_type != "positional" or encoder_type != "standard" or decoder_type != "standard":
            raise ValueError(
                "only DDPM++ is implemented: embedding_type='positional', encoder_type='standard', "
                f"decoder_type='standard' (got {embedding_type!r}, {encoder_type!r}, {decoder_type!r})"
            )
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block: dict[str, Any] = {
            "emb_channels": emb_channels,
            "num_heads": 1,
            "dropout": dropout,
            "skip_scale": math.sqrt(0.5),
            "eps": 1e-6,
            "resample_filter": tuple(resample_filter),
            "adaptive_double_norm": bool(adaptive_double_norm),
        }

        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips: list[int] = [cast(Any, m).out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, init_weight=1e-5)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """Evaluate F.

        Args:
            x: (B, in_channels, R, R) preconditioned input c_in·x.
            noise_labels: (B,) c_noise values.
            class_labels: (B, label_dim) one-hot labels, or None.
            augment_labels: (B, augment_dim) augmentation labels, or None (= zeros).
        """
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos] order
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"this network is class-conditional (label_dim={self.label_dim}): pass class_labels")
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = nnf.silu(self.map_layer0(emb))
        emb = nnf.silu(self.map_layer1(emb))

        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)

        out: Tensor | None = None
        hidden = x
        for name, layer in self.dec.items():
            if name.endswith("_aux_norm"):
                hidden = layer(x)
            elif name.endswith("_aux_conv"):
                out = layer(nnf.silu(hidden))
            else:
                if x.shape[1] != layer.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        assert out is not None
        return out
