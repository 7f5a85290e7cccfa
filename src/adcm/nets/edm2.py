"""EDM2's magnitude-preserving U-Net and its preconditioning, written from the paper's description.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2,
arXiv 2312.02696), configuration G: every layer preserves the expected magnitude of its activations
(§2, configs B–G; details in Appendix B). This module is an independent implementation; parameter and buffer names,
shapes and their ``state_dict`` order are one to one with the official ``Precond`` network, so a
converted EDM2 checkpoint loads with ``strict=True``.

Building blocks (paper §2, cited by the paper's configuration letters, and Appendix B):

* :func:`normalize`: x / (ε + ‖x‖/√n) over the fan-in (ε = 1e-4); with ``dim=1`` it is pixel norm.
* :func:`mp_silu`: SiLU(x)/0.596, unit magnitude for unit-variance inputs (config G).
* :func:`mp_sum`: lerp(a, b, t)/√((1−t)² + t²), the magnitude-preserving weighted sum (config G).
* :func:`mp_cat`: concatenation with per-part scales so both halves keep balance t (config G).
* :class:`MPFourier`: √2·cos(c·f + φ) with fixed random f ~ 2π·N(0, 1), φ ~ 2π·U(0, 1) (config G).
* :class:`MPConv`: convolution / linear layer with weight normalisation and gain 1/√fan_in, and *forced*
  weight normalisation in training mode (configs D and E: the stored weight is overwritten with its normalised
  version before every gradient-recording training-mode forward, then normalised again on the way into the
  layer).
* :class:`Block`: the residual block (the paper's architecture figure in Appendix B): flavours ``enc``
  (skip conv + pixel norm before the residual branch) and ``dec`` (skip conv after), 2× resampling,
  embedding-modulated residual branch, optional self-attention with pixel-normalised q, k, v, output
  clipping.
* :class:`EDM2UNet`: the backbone F(x, c_noise, class_labels) with a constant-one input channel,
  magnitude-preserving skip concatenation and a learned output gain (configs C and G).
* :class:`EDM2Precond`: EDM's preconditioning D(x, σ) = c_skip·x + c_out·F(c_in·x, ln(σ)/4), plus the
  uncertainty head ln u(σ) used by the loss weighting (config B: ``return_logvar``).
* :class:`EDM2Backbone`: the same modules (same state-dict names) as the raw backbone F(x, c_noise, labels)
  that this project's ε-shifted wrappers (:mod:`adcm.nets.precond`) put around a network.

Everything is computed in float32 (``use_fp16`` is accepted and ignored); when the parameters are
float64 (``net.double()``) the whole computation runs in float64. Attention is plain ``einsum`` +
``softmax`` (no fused kernel) so forward-mode JVPs (``torch.autograd.forward_ad``) run through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from adcm.nets.dropout import dropout

__all__ = [
    "Block",
    "EDM2Backbone",
    "EDM2Precond",
    "EDM2UNet",
    "MPConv",
    "MPFourier",
    "edm2_img64_config",
    "mp_cat",
    "mp_silu",
    "mp_sum",
    "normalize",
    "resample",
]

# The official img64 presets (the paper's ImageNet-64 models XS / S / M, as its training script builds
# them): everything else is left at the defaults of EDM2Precond / EDM2UNet / Block below.
_IMG64_MODEL_CHANNELS: dict[str, int] = {"xs": 128, "s": 192, "m": 256}
_IMG64_DROPOUT: dict[str, float] = {"xs": 0.0, "s": 0.0, "m": 0.1}


def edm2_img64_config(size: Literal["xs", "s", "m"]) -> dict[str, Any]:
    """Constructor arguments of EDM2's ImageNet-64 model ``size`` (paper §4 results), for :class:`EDM2Precond`.

    Returns the exact keyword arguments the official training script passes (``img_resolution``,
    ``img_channels``, ``label_dim``, ``model_channels``, ``dropout``, ``use_fp16``); every other
    argument keeps its default. XS / S / M have 124.7M / 280.2M / 497.8M parameters.
    """
    if size not in _IMG64_MODEL_CHANNELS:
        raise ValueError(f"unknown EDM2 img64 size {size!r} (expected one of {sorted(_IMG64_MODEL_CHANNELS)})")
    return {
        "img_resolution": 64,
        "img_channels": 3,
        "label_dim": 1000,
        "model_channels": _IMG64_MODEL_CHANNELS[size],
        "dropout": _IMG64_DROPOUT[size],
        "use_fp16": True,
    }


# ----------------------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives (paper §2, configs D–G, and Appendix B).


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else (fp16/bf16 are never used here)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize(x: Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> Tensor:
    """x / (ε + ‖x‖/√n): unit RMS over ``dim`` (default: all but the first axis, i.e. a weight's fan-in).

    ``n`` is the number of elements reduced over, so a weight row becomes a unit-RMS vector (paper config D,
    with the ε that keeps zero rows finite); ``dim=1`` on activations is pixel norm (config F).
    """
    dims = list(range(1, x.ndim)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    norm = torch.linalg.vector_norm(x.to(_compute_dtype(x)), dim=dims, keepdim=True)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU: SiLU(x)/0.596 (0.596 = E[SiLU(z)²]^½ for z ~ N(0, 1); paper config G)."""
    return nnf.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving weighted sum ((1−t)·a + t·b)/√((1−t)² + t²) (paper config G)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation along ``dim`` with balance t (paper config G).

    The parts are scaled by (1−t)·C/√N_a and t·C/√N_b, C = √((N_a + N_b)/((1−t)² + t²)), so a
    following weight-normalised layer sees a unit-magnitude input in which b contributes with weight t
    whatever the channel counts N_a, N_b.
    """
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    w_a = c / math.sqrt(n_a) * (1 - t)
    w_b = c / math.sqrt(n_b) * t
    return torch.cat([w_a * a, w_b * b], dim=dim)


def resample(x: Tensor, f: Sequence[float] = (1, 1), mode: Literal["keep", "down", "up"] = "keep") -> Tensor:
    """2× down- or up-sampling with the separable, sum-normalised FIR filter ``f`` (paper Appendix B).

    With the default f = [1, 1], down-sampling is 2×2 average pooling and up-sampling is
    nearest-neighbour repetition; ``keep`` returns ``x`` unchanged.
    """
    if mode == "keep":
        return x
    taps = torch.as_tensor(list(f), dtype=x.dtype, device=x.device)
    kernel = torch.outer(taps, taps)
    kernel = (kernel / kernel.sum())[None, None]
    channels = x.shape[1]
    pad = (len(f) - 1) // 2
    if mode == "down":
        return nnf.conv2d(x, kernel.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))
    if mode == "up":
        return nnf.conv_transpose2d(
            x, (kernel * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,)
        )
    raise ValueError(f"unknown resample mode {mode!r}")


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features √2·cos(c·f + φ) of a scalar per sample (paper config G).

    ``freqs`` (2π·bandwidth·N(0, 1)) and ``phases`` (2π·U(0, 1)) are fixed at construction and stored as
    persistent buffers; the √2 makes each feature unit-RMS over the random phase.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))
        self.freqs: Tensor
        self.phases: Tensor

    def forward(self, x: Tensor) -> Tensor:
        """Features of shape (N, num_channels) for the scalars ``x`` of shape (N,)."""
        dt = _compute_dtype(x)
        y = torch.outer(x.to(dt), self.freqs.to(dt)) + self.phases.to(dt)
        return (torch.cos(y) * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Weight-normalised convolution (kernel (k, k)) or linear layer (kernel ()) (paper config D).

    The effective weight is normalize(w)·gain/√fan_in, so a unit-RMS input gives a unit-RMS output
    (times ``gain``). In the gradient-carrying training forward the stored weight is first overwritten,
    without gradient, with its normalised version ("forced weight normalisation"), which keeps the raw
    weights at unit norm and makes the effective learning rate decay with the global one (config E).

    **Decision** (docs/method.md, "EDM2: forced weight normalisation in the gradient forward only"): the
    overwrite happens only in training mode *and* while autograd records (``torch.is_grad_enabled()``).
    Extra training-mode forwards under ``no_grad`` (a consistency target, a JVP, Eq. 10's statistics)
    use the stored weights as they are and leave them untouched; in EDM2's own training the only
    training-mode forward is the gradient one, so nothing changes there.

    Note: the in-place overwrite bumps the weight's autograd version counter, so (as in the official
    network) a second gradient-recording training-mode forward before ``backward`` of the first makes
    that backward fail. Setting ``force_normalization = False`` (see
    :meth:`EDM2Precond.set_forced_weight_normalization`) skips the overwrite altogether: the layer's
    output is then unchanged up to O(1e-4·|‖w‖/√fan_in − 1|).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.force_normalization = True
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        """Apply the layer; ``gain`` (a float or a learned scalar) multiplies the effective weight."""
        dt = _compute_dtype(x)
        if self.training and self.force_normalization and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(dt)))
        w = normalize(self.weight.to(dt))
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return nnf.conv2d(x, w, padding=(w.shape[-1] // 2,))


# ----------------------------------------------------------------------------------------------------------------
# Residual block and U-Net (paper §2 and the architecture figure of Appendix B).


class Block(nn.Module):
    """One magnitude-preserving U-Net block (paper config G, architecture figure in Appendix B).

    ``enc`` flavour: x ← resample(x); x ← conv_skip(x) if the width changes; x ← pixel_norm(x). ``dec``
    flavour: x ← resample(x), and conv_skip is applied to x after the residual branch. Residual branch:
    y = conv_res0(mp_silu(x)); y ← mp_silu(y·(1 + emb_linear(emb, gain=emb_gain))); dropout;
    y ← conv_res1(y); x ← mp_sum(x, y, res_balance). Attention (if any): qkv = attn_qkv(x) viewed as
    (N, heads, head_dim, 3, H·W), q, k, v pixel-normalised over head_dim, softmax(qᵀk/√head_dim),
    x ← mp_sum(x, attn_proj(v·w), attn_balance). Finally x is clipped to ±clip_act.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: Literal["enc", "dec"] = "enc",
        resample_mode: Literal["keep", "down", "up"] = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        if flavor not in ("enc", "dec"):
            raise ValueError(f"unknown block flavor {flavor!r}")
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # Registration order fixes the state_dict order of the official network.
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """The block's output for input ``x`` (N, C_in, H, W) and embedding ``emb`` (N, C_emb)."""
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = dropout(y, self.dropout, self.training)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads != 0:
            assert self.attn_qkv is not None and self.attn_proj is not None
            qkv = self.attn_qkv(x)
            # Channel layout of the official network: (heads, head_dim, 3) with q/k/v innermost.
            qkv = qkv.reshape(qkv.shape[0], self.num_heads, -1, 3, qkv.shape[2] * qkv.shape[3])
            q, k, v = normalize(qkv, dim=2).unbind(3)
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            y = self.attn_proj(y.reshape(x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """EDM2's magnitude-preserving U-Net backbone F(x, c_noise, class_labels) (paper §2, config G).

    Args:
        img_resolution: input resolution H = W.
        img_channels: image channels (input and output).
        label_dim: number of classes (0 = unconditional: no ``emb_label`` and labels are ignored).
        model_channels: base width.
        channel_mult: width multiplier per resolution level.
        channel_mult_noise: Fourier-embedding width multiplier (default: ``channel_mult[0]``).
        channel_mult_emb: embedding width multiplier (default: ``max(channel_mult)``).
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions whose blocks have self-attention.
        label_balance: balance t of mp_sum(noise embedding, label embedding).
        concat_balance: balance t of mp_cat(x, skip) in the decoder.
        resample_filter, channels_per_head, dropout, res_balance, attn_balance, clip_act: see :class:`Block`.

    Blocks live in the ModuleDicts ``enc`` (``{res}x{res}_conv``, ``_down``, ``_block{i}``) and ``dec``
    (``_in0``/``_in1`` at the lowest resolution, ``_up``, ``_block{i}``), in execution order.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        block_kwargs: dict[str, Any] = dict(
            resample_filter=resample_filter,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )

        # Embedding (paper configs B and G).
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        # Encoder: the image plus a constant-one channel (config C) goes through a 3×3 conv at full resolution.
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs
                )
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=res in attn_resolutions, **block_kwargs
                )

        # Decoder: every encoder output is a skip connection, consumed in reverse order by the `block` entries.
        self.dec = nn.ModuleDict()
        skips = [_out_channels(block) for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=res in attn_resolutions, **block_kwargs
                )
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def embedding(self, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The per-sample block embedding mp_silu(mp_sum(noise emb, label emb, label_balance)), (N, C_emb).

        The one-hot labels are scaled by √label_dim so that the label embedding has unit magnitude.
        """
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(f"this network is class-conditional (label_dim={self.label_dim}): pass class_labels")
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        return mp_silu(emb)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        *,
        activations: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """F(x, c_noise, labels) for ``x`` (N, C, H, W), ``noise_labels`` (N,), one-hot ``class_labels``.

        Args:
            x: the (preconditioned) input.
            noise_labels: c_noise per sample.
            class_labels: (N, label_dim) one-hot or soft labels; ignored when ``label_dim == 0``.
            augment_labels: accepted for interface compatibility with the other backbones; must be None.
            activations: if given, filled with ``emb``, ``enc.<key>``, ``dec.<key>`` (every block's output)
                and ``unet_out`` (for debugging and parity tests).
        """
        if augment_labels is not None:
            raise ValueError("the EDM2 network has no augmentation conditioning (augment_labels must be None)")
        emb = self.embedding(noise_labels, class_labels)
        if activations is not None:
            activations["emb"] = emb

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips: list[Tensor] = []
        for name, block in self.enc.items():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)
            skips.append(x)
            if activations is not None:
                activations[f"enc.{name}"] = x
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
            if activations is not None:
                activations[f"dec.{name}"] = x
        x = self.out_conv(x, gain=self.out_gain)
        if activations is not None:
            activations["unet_out"] = x
        return x


def _out_channels(layer: nn.Module) -> int:
    """Output width of an encoder entry (an MPConv or a Block)."""
    out = layer.out_channels
    assert isinstance(out, int)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Preconditioning (EDM's Table 1 with σ_d = 0.5) and the uncertainty head (paper config B).


class EDM2Precond(nn.Module):
    """EDM2's denoiser D(x, σ) = c_skip·x + c_out·F(c_in·x, ln(σ)/4, labels), with the log-variance head.

    c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²) (EDM's Table 1). The
    uncertainty ln u(σ) = logvar_linear(logvar_fourier(c_noise)) (paper config B: the learned
    loss weighting) is returned with ``return_logvar=True``.

    Args:
        img_resolution, img_channels, label_dim: data shape and number of classes (0 = unconditional).
        use_fp16: accepted for compatibility with the official configs; computation is always float32
            (float64 when the parameters are float64).
        sigma_data: σ_d.
        logvar_channels: width of the log-variance head's Fourier features.
        **unet_kwargs: the remaining :class:`EDM2UNet` arguments (``model_channels``, ``channel_mult``,
            ``num_blocks``, ``attn_resolutions``, ``channels_per_head``, ``dropout``, …).

    State-dict names are ``unet.…``, ``logvar_fourier.{freqs,phases}`` and ``logvar_linear.weight``.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool = True,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        **unet_kwargs: Any,
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = float(sigma_data)
        self.unet = EDM2UNet(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs
        )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 if the network has been converted with ``.double()``, else float32."""
        return torch.float64 if self.unet.out_gain.dtype == torch.float64 else torch.float32

    def set_forced_weight_normalization(self, enabled: bool) -> None:
        """Switch the training-mode overwrite of the stored weights (see :class:`MPConv`) on or off.

        Forwards under ``no_grad`` never overwrite the weights (see :class:`MPConv`); off is for extra
        gradient-recording training-mode forwards within one step, which would otherwise invalidate the
        first forward's autograd graph (the weights were already normalised by the step's first forward).
        """
        for module in self.modules():
            if isinstance(module, MPConv):
                module.force_normalization = enabled

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for ``sigma`` of shape (N,) (EDM's Table 1, c_noise = ln(σ)/4)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
        *,
        activations: dict[str, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """D(x, σ) (and ln u(σ) of shape (N, 1, 1, 1) with ``return_logvar``).

        Args:
            x: noisy images (N, C, H, W).
            sigma: noise levels (N,) or a scalar (broadcast over the batch).
            class_labels: one-hot labels (N, label_dim); None means all zeros (unconditional sampling of a
                conditional model); ignored when ``label_dim == 0``.
            force_fp32: accepted for compatibility (computation is float32 anyway).
            return_logvar: also return the uncertainty head's output.
            activations: passed to :meth:`EDM2UNet.forward`.
        """
        del force_fp32
        dt = self.compute_dtype
        x = x.to(dt)
        sigma = torch.as_tensor(sigma, dtype=dt, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        labels: Tensor | None
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:
            labels = torch.zeros([1, self.label_dim], dtype=dt, device=x.device)
        else:
            labels = class_labels.to(dt).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in (c_skip, c_out, c_in))
        f_x = self.unet(c_in * x, c_noise, labels, activations=activations)
        d_x = c_skip * x + c_out * f_x.to(dt)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return d_x, logvar
        return d_x


# ----------------------------------------------------------------------------------------------------------------
# The network as a backbone of this project's wrappers (adcm.nets.precond).


class EDM2Backbone(nn.Module):
    """EDM2's network as the raw backbone F(x, c_noise, class_labels) of :mod:`adcm.nets.precond`'s wrappers.

    It holds exactly the modules of :class:`EDM2Precond` (``unet``, ``logvar_fourier``, ``logvar_linear``)
    under the same names, so an :class:`EDM2Precond` state dict loads into it strictly and the reverse.
    The preconditioning is left to the wrapper: EDM2's D(x, σ) is EDM's (Table 1, c_noise = ln(σ)/4), which
    is exactly the VE wrapper with ε = 0, and the ε-shifted wrapper of a consistency model
    (docs/method.md#preconditioning-and-the-boundary-condition) uses the same F.

    The uncertainty head ln u(σ) (:meth:`logvar`, paper config B) is carried along unchanged: it weights
    EDM2's diffusion loss and has no role in consistency training, which never evaluates it.

    Args: those of :class:`EDM2Precond` except ``sigma_data`` (the wrapper's σ_d); ``use_fp16`` is
    accepted and ignored.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool = True,
        logvar_channels: int = 128,
        **unet_kwargs: Any,
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.unet = EDM2UNet(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs
        )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def set_forced_weight_normalization(self, enabled: bool) -> None:
        """As :meth:`EDM2Precond.set_forced_weight_normalization`."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.force_normalization = enabled

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """F(x, c_noise, labels) (:meth:`EDM2UNet.forward`), computed in float32 (float64 for float64 ``x``).

        ``class_labels`` None on a conditional network means all-zero labels (as :class:`EDM2Precond`);
        they are ignored when ``label_dim == 0``. ``augment_labels`` must be None.
        """
        dt = _compute_dtype(x)
        labels: Tensor | None
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:
            labels = torch.zeros([1, self.label_dim], dtype=dt, device=x.device)
        else:
            labels = class_labels.to(dt).reshape(-1, self.label_dim)
        return self.unet(x, noise_labels.to(dt).reshape(-1), labels, augment_labels)

    def logvar(self, noise_labels: Tensor) -> Tensor:
        """The uncertainty head ln u(σ) at c_noise = ln(σ)/4, shape (N, 1, 1, 1) (not used by consistency training)."""
        return self.logvar_linear(self.logvar_fourier(noise_labels)).reshape(-1, 1, 1, 1)
