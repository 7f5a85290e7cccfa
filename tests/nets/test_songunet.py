"""DDPM++ parity with EDM's reference data, JVPs against finite differences, the boundary condition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adcm.nets.precond import VEPrecond, consistency_function, denoiser
from adcm.nets.songunet import GroupNorm, SongUNet
from adcm.nets.widths import bad_group_norm_width, group_norm_widths

DATA = Path(__file__).resolve().parents[1] / "data"


def tiny_reference() -> tuple[dict, dict[str, torch.Tensor], np.lib.npyio.NpzFile]:
    ref = np.load(DATA / "edm-songunet-tiny.npz")
    precond = json.loads(str(ref["kwargs"]))  # EDMPrecond's settings; SongUNet's follow
    kwargs = dict(
        img_resolution=precond["img_resolution"],
        in_channels=precond["img_channels"],
        out_channels=precond["img_channels"],
        label_dim=precond["label_dim"],
        augment_dim=precond["augment_dim"],
        model_channels=precond["model_channels"],
        channel_mult=precond["channel_mult"],
        channel_mult_emb=4,
        num_blocks=precond["num_blocks"],
        attn_resolutions=precond["attn_resolutions"],
        dropout=precond["dropout"],
        label_dropout=0.0,
        embedding_type=precond["embedding_type"],
        channel_mult_noise=precond["channel_mult_noise"],
        encoder_type=precond["encoder_type"],
        decoder_type=precond["decoder_type"],
        resample_filter=precond["resample_filter"],
    )
    state = {k[len("state/") :]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("state/")}
    return kwargs, state, ref


def test_tiny_network_reproduces_edm_output() -> None:
    kwargs, state, ref = tiny_reference()
    net = denoiser(kwargs, sigma_data=0.5)
    net.load_state_dict(state, strict=True)
    net.eval()
    x, sigma, out = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "out"))
    with torch.no_grad():
        ours = net(x, sigma)
    assert ((ours - out).norm() / out.norm()).item() < 1e-5
    # The backbone output F itself, where c_out is not tiny.
    c_skip, c_out, _, _ = (c.reshape(-1, 1, 1, 1) for c in net.coefficients(sigma))
    f_ours, f_ref = ((o - c_skip * x) / c_out for o in (ours, out))
    for i in (1, 2, 3):
        assert ((f_ours[i] - f_ref[i]).norm() / f_ref[i].norm()).item() < 1e-5


def test_tiny_network_output_changes_when_a_weight_changes() -> None:
    """The parity check above can fail: a perturbed weight gives a clearly different output.

    (With the reference's std-0.05 weights and sqrt(0.5) skip scaling, the deep layers move the output
    by only ~1e-6 relative, so the check is sharpest for the layers near the output.)"""
    kwargs, state, ref = tiny_reference()
    name = "model.dec.16x16_aux_norm.weight"
    state[name] = state[name] + 0.05 * torch.randn(state[name].shape, generator=torch.Generator().manual_seed(0))
    net = denoiser(kwargs, sigma_data=0.5)
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours = net.eval()(torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"]))
    out = torch.from_numpy(ref["out"])
    assert ((ours[3] - out[3]).norm() / out[3].norm()).item() > 1e-3


def test_cifar10_config_matches_edm_state_dict_names_and_shapes() -> None:
    expected = json.loads((DATA / "edm-ddpmpp-cifar10-uncond.shapes.json").read_text())
    shapes = expected.get("shapes", expected) if isinstance(expected, dict) else expected
    kwargs = dict(
        img_resolution=32,
        in_channels=3,
        out_channels=3,
        label_dim=0,
        augment_dim=9,
        model_channels=128,
        channel_mult=[2, 2, 2],
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=[16],
        dropout=0.13,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    )
    with torch.device("meta"):
        net = denoiser(kwargs, sigma_data=0.5)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: list(v) for k, v in shapes.items()}
    assert list(ours) == list(theirs) or set(ours) == set(theirs)
    assert ours == theirs
    assert len(ours) == 425
    assert sum(int(np.prod(s)) for s in ours.values()) == 55_733_923


def small_net(dtype: torch.dtype, eps: float = 0.002, label_dim: int = 0) -> VEPrecond:
    kwargs = dict(
        img_resolution=8,
        in_channels=2,
        out_channels=2,
        label_dim=label_dim,
        augment_dim=0,
        model_channels=8,
        channel_mult=[1, 2],
        channel_mult_emb=2,
        num_blocks=1,
        attn_resolutions=[4],
        dropout=0.0,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    )
    torch.manual_seed(0)
    net = consistency_function(kwargs, sigma_data=0.5, eps=eps)
    with torch.no_grad():  # EDM initialises some output layers to zero: randomise so every path matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.to(dtype).eval()


@pytest.mark.parametrize("t_value", [0.01, 0.7, 20.0])
def test_jvp_matches_float64_central_difference(t_value: float) -> None:
    net = small_net(torch.float64)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64) * 0.5
    z = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.full((3,), t_value, dtype=torch.float64)

    def path(s: torch.Tensor) -> torch.Tensor:
        return net(x0 + s[:, None, None, None] * z, s)

    _, v = torch.func.jvp(lambda x, s: net(x, s), (x0 + t_value * z, t), (z, torch.ones_like(t)))
    h = 1e-6 * max(t_value, 1.0)
    fd = (path(t + h) - path(t - h)) / (2 * h)
    assert ((v - fd).norm() / fd.norm()).item() < 1e-6


def test_jvp_float32_close_to_float64() -> None:
    net64, net32 = small_net(torch.float64), small_net(torch.float32)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 3.0], dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.ones_like(t))
    _, v64 = torch.func.jvp(lambda a, b: net64(a, b), (x, t), tangents)
    _, v32 = torch.func.jvp(lambda a, b: net32(a, b), (x.float(), t.float()), tuple(u.float() for u in tangents))
    assert ((v32.double() - v64).norm() / v64.norm()).item() < 1e-4


def test_consistency_function_boundary_is_exact() -> None:
    eps = 0.002
    net = small_net(torch.float32, eps=eps, label_dim=3)
    x = torch.randn(4, 2, 8, 8)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    with torch.no_grad():
        out = net(x, torch.full((4,), eps), labels)
        away = net(x, torch.full((4,), 0.5), labels)
    assert torch.equal(out, x)
    assert not torch.allclose(away, x)


def test_consistency_function_equals_edm_denoiser_far_from_eps() -> None:
    kwargs, state, ref = tiny_reference()
    d, f = denoiser(kwargs, 0.5), consistency_function(kwargs, 0.5, eps=0.002)
    d.load_state_dict(state)
    f.load_state_dict(state)
    x, t = torch.from_numpy(ref["x"]), torch.full((4,), 80.0)
    with torch.no_grad():
        a, b = d.eval()(x, t), f.eval()(x, t)
    assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_class_labels_change_output_and_dropout_is_active_only_in_train() -> None:
    kwargs = dict(
        img_resolution=8,
        in_channels=1,
        out_channels=1,
        label_dim=4,
        augment_dim=0,
        model_channels=8,
        channel_mult=[1, 2],
        channel_mult_emb=2,
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.5,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    )
    torch.manual_seed(0)
    net = SongUNet(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, noise = torch.randn(2, 1, 8, 8), torch.zeros(2)
    a, b = torch.eye(4)[[0, 0]], torch.eye(4)[[1, 1]]
    net.eval()
    with torch.no_grad():
        assert not torch.allclose(net(x, noise, a), net(x, noise, b))
        assert torch.equal(net(x, noise, a), net(x, noise, a))
        net.train()
        assert not torch.equal(net(x, noise, a), net(x, noise, a))


@pytest.mark.parametrize(
    ("model_channels", "channel_mult", "num_blocks", "attn"),
    [(8, (1, 2, 2), 1, (4,)), (16, (1, 2, 3), 2, (8,)), (12, (1, 1), 1, ())],
)
def test_group_norm_widths_match_a_built_network(
    model_channels: int, channel_mult: tuple[int, ...], num_blocks: int, attn: tuple[int, ...]
) -> None:
    kwargs, _, _ = tiny_reference()
    kwargs.update(
        img_resolution=16,
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_blocks=num_blocks,
        attn_resolutions=attn,
    )
    net = SongUNet(**kwargs)
    built = [m.weight.numel() for name, m in net.named_modules() if isinstance(m, GroupNorm) and "norm2" not in name]
    assert group_norm_widths(model_channels, channel_mult, num_blocks) == built
    assert bad_group_norm_width(model_channels, channel_mult, num_blocks) is None


def test_a_width_edms_group_rule_cannot_split_is_refused_when_built() -> None:
    # 48 × [1, 2, 2]: the decoder concatenates 96 + 48 = 144 channels, min(32, 36) = 32 groups do not divide it
    assert bad_group_norm_width(48, (1, 2, 2), 1) == 144
    assert bad_group_norm_width(64, (1, 2, 2), 1) is None
    kwargs, _, _ = tiny_reference()
    kwargs.update(img_resolution=16, model_channels=48, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="144 channels do not split into 32 groups"):
        SongUNet(**kwargs)
