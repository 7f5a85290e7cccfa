"""EDM2 network parity with the official code's reference data: names/shapes, outputs, activations, JVPs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwad

from adcm.nets.edm2 import EDM2Precond, MPConv, edm2_img64_config, normalize

DATA = Path(__file__).resolve().parent.parent / "data"

PARAMS = {"xs": 124_710_949, "s": 280_209_381, "m": 497_803_173}
TOTALS = {"xs": 124_711_461, "s": 280_210_021, "m": 497_803_941}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These networks are tiny: one thread is ~100x faster than several contending ones on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_reference(name: str) -> tuple[EDM2Precond, Any]:
    """The tiny reference network (eval mode, float32) and its npz file."""
    ref = np.load(DATA / name)
    net = EDM2Precond(**json.loads(str(ref["config_json"])))
    state = {k[len("state/") :]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("state/")}
    net.load_state_dict(state, strict=True)
    return net.eval(), ref


def inputs(ref: Any, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(ref[k]).to(dtype) for k in ("x", "sigma", "class_labels"))  # type: ignore[return-value]


def max_err(a: torch.Tensor, b: np.ndarray) -> float:
    return (a.detach() - torch.from_numpy(b).to(a.dtype)).abs().max().item()


@pytest.mark.parametrize("size", ["xs", "s", "m"])
def test_names_and_shapes_match_the_official_network(size: str) -> None:
    manifest = json.loads((DATA / f"edm2-img64-{size}.shapes.json").read_text())
    config = edm2_img64_config(size)  # type: ignore[arg-type]
    assert config == manifest["config"]
    with torch.device("meta"):
        net = EDM2Precond(**config)
    ours = [[name, list(t.shape)] for name, t in net.state_dict().items()]
    assert ours == manifest["entries"]
    assert [name for name, _ in net.named_buffers()] == manifest["buffer_entries"]
    assert sum(p.numel() for p in net.parameters()) == PARAMS[size] == manifest["num_parameters"]
    assert sum(t.numel() for t in net.state_dict().values()) == TOTALS[size] == manifest["total_numbers"]


def test_unknown_preset_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown EDM2"):
        edm2_img64_config("l")  # type: ignore[arg-type]


def test_conditional_tiny_network_reproduces_edm2() -> None:
    net, ref = load_reference("edm2-tiny.npz")
    x, sigma, labels = inputs(ref)
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        d_x, logvar = net(x, sigma, labels, return_logvar=True, activations=acts)
    assert d_x.dtype == torch.float32
    assert max_err(d_x, ref["D_x"]) < 1e-5  # measured 6e-8
    assert max_err(logvar, ref["logvar"]) < 1e-5  # measured 0
    assert max_err(acts["unet_out"], ref["act/unet_out"]) < 1e-6  # measured 9e-8
    keys = [k[len("act/") :] for k in ref.files if k.startswith("act/")]
    assert len(keys) == 18
    for key in keys:
        assert max_err(acts[key], ref[f"act/{key}"]) < 1e-4, key  # measured ≤ 1.8e-6


def test_unconditional_tiny_network_reproduces_edm2() -> None:
    net, ref = load_reference("edm2-tiny-uncond.npz")
    assert net.unet.emb_label is None
    x, sigma, labels = inputs(ref)
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        d_x, logvar = net(x, sigma, labels, return_logvar=True, activations=acts)
        d_none = net(x, sigma)  # labels are ignored when label_dim == 0
    assert max_err(d_x, ref["D_x"]) < 1e-5
    assert max_err(logvar, ref["logvar"]) < 1e-5
    assert max_err(acts["emb"], ref["act/emb"]) < 1e-5
    assert max_err(acts["unet_out"], ref["act/unet_out"]) < 1e-6
    assert torch.equal(d_none, d_x)


@pytest.mark.parametrize("name", ["edm2-tiny.npz", "edm2-tiny-uncond.npz"])
def test_float64_network_reproduces_the_float64_reference(name: str) -> None:
    net, ref = load_reference(name)
    net.double()
    x, sigma, labels = inputs(ref, torch.float64)
    with torch.no_grad():
        d_x, logvar = net(x, sigma, labels, return_logvar=True)
    assert d_x.dtype == torch.float64
    assert max_err(d_x, ref["D_x_f64"]) < 1e-10  # measured 1e-16
    assert max_err(logvar, ref["logvar_f64"]) < 1e-10


def test_forced_weight_normalisation_in_training_mode() -> None:
    net, ref = load_reference("edm2-tiny.npz")
    x, sigma, labels = inputs(ref)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    first, _ = net(x, sigma, labels, return_logvar=True)  # a gradient-recording forward normalises the weights
    assert max_err(first, ref["D_x"]) < 1e-5  # the official first training-mode output differs from eval by 2.2e-6
    changed = 0.0
    for name, p in net.named_parameters():
        if name.endswith(".weight"):
            assert (p - normalize(p)).abs().max().item() < 1e-3, name  # stored weights are unit-RMS per row
            changed = max(changed, (p - before[name]).abs().max().item())
        else:  # gains are plain parameters
            assert torch.equal(p, before[name]), name
    assert changed > 0.5  # the reference weights move by up to 1.6
    for name, b in net.named_buffers():
        assert torch.equal(b, before[name]), name
    with torch.no_grad():
        second = net(x, sigma, labels)
        net.eval()
        evaluated = net(x, sigma, labels)
    assert torch.equal(second, evaluated)


def test_forced_normalisation_only_in_gradient_forwards() -> None:
    """Decision (docs/method.md): a training-mode forward under no_grad (a target, a JVP) leaves the weights alone."""
    net, ref = load_reference("edm2-tiny.npz")
    x, sigma, labels = inputs(ref)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    versions = [p._version for p in net.parameters()]
    net.train()
    with torch.no_grad():
        target = net(x, sigma, labels)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert [p._version for p in net.parameters()] == versions
    assert max_err(target, ref["D_x"]) < 1e-5
    out = net(x, sigma, labels)  # the gradient forward normalises (the weights move by up to 1.6)
    assert max((p - before[k]).abs().max().item() for k, p in net.named_parameters()) > 0.5
    with torch.no_grad():
        again = net(x, sigma, labels)  # after the gradient forward: the graph stays valid
    out.sum().backward()
    assert (again - out.detach()).abs().max().item() < 1e-6


def test_forced_normalisation_can_be_switched_off_for_extra_forwards() -> None:
    net, ref = load_reference("edm2-tiny.npz")
    x, sigma, labels = inputs(ref)
    net.train()
    out = net(x, sigma, labels)
    net(x, sigma, labels)  # a second gradient forward overwrites the weights the first graph saved
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
    out = net(x, sigma, labels)
    net.set_forced_weight_normalization(False)
    assert not any(m.force_normalization for m in net.modules() if isinstance(m, MPConv))
    again = net(x, sigma, labels)
    (out.sum() + again.sum()).backward()
    assert (again - out).abs().max().item() < 1e-6


def test_jvp_matches_central_finite_differences() -> None:
    net, ref = load_reference("edm2-tiny.npz")
    net.double()
    x, sigma, labels = inputs(ref, torch.float64)
    gen = torch.Generator().manual_seed(0)
    tx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ts = sigma * torch.randn(sigma.shape, generator=gen, dtype=torch.float64)

    def fn(x_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        d_x, logvar = net(x_, s_, labels, return_logvar=True)
        return torch.cat([d_x.flatten(1), logvar.flatten(1)], dim=1)

    with torch.no_grad():
        h = 1e-6
        fd = (fn(x + h * tx, sigma + h * ts) - fn(x - h * tx, sigma - h * ts)) / (2 * h)
        for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-5)):  # measured 3e-11, 6e-8
            net.to(dtype)
            with fwad.dual_level():
                out = fn(fwad.make_dual(x.to(dtype), tx.to(dtype)), fwad.make_dual(sigma.to(dtype), ts.to(dtype)))
                _, tangent = fwad.unpack_dual(out)
            assert tangent is not None
            rel = ((tangent.double() - fd).norm() / fd.norm()).item()
            assert rel < tol, (dtype, rel)


def test_class_labels_change_the_output() -> None:
    net, ref = load_reference("edm2-tiny.npz")
    x, sigma, labels = inputs(ref)
    with torch.no_grad():
        d_x = net(x, sigma, labels)
        d_rolled = net(x, sigma, labels.roll(1, dims=1))
        d_none = net(x, sigma)  # None = all-zero labels
    assert (d_x - d_rolled).abs().max().item() > 1e-3  # about 5e-3
    assert (d_x - d_none).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="class-conditional"):
        net.unet(x, sigma.log() / 4)


def test_scalar_sigma_is_broadcast_and_augment_labels_are_refused() -> None:
    net, ref = load_reference("edm2-tiny.npz")
    x, sigma, labels = inputs(ref)
    with torch.no_grad():
        batch = net(x, torch.full_like(sigma, 2.0), labels)
        scalar = net(x, 2.0, labels)
    assert torch.equal(batch, scalar)
    with pytest.raises(ValueError, match="augment"):
        net.unet(x, sigma.log() / 4, labels, augment_labels=torch.zeros(4, 9))
