"""EDM2's network inside this project's wrappers: the denoiser, f(x, ε) = x, JVPs, and consistency training steps.

Decision under test (docs/method.md, "EDM2: forced weight normalisation in the gradient forward only"):
a training-mode forward normalises the stored weights only while autograd records, so a consistency step
normalises them exactly once (in the student forward), and targets and JVPs leave them alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adcm.errors import CheckpointError
from adcm.io.model_files import StudentFile, TeacherFile, load_student, load_teacher, save_student, save_teacher
from adcm.method.objectives import Batch, consistency_batch_loss
from adcm.method.sct import SCTModule, sct_batch_loss
from adcm.nets.edm2 import EDM2Backbone, EDM2Precond, MPConv
from adcm.nets.jvp import jvp
from adcm.nets.precond import Precond, VEPrecond, consistency_function, denoiser, make_precond
from adcm.processes import make_process

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference() -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """EDM2's tiny reference network: its settings (EDM2Backbone's = EDM2Precond's here), weights, npz."""
    ref = np.load(DATA / "edm2-tiny.npz")
    config = json.loads(str(ref["config_json"]))
    state = {k[len("state/") :]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("state/")}
    return config, state, ref


def wrapped(eps: float, process: str = "ve", source: str | None = None) -> Precond:
    config, state, _ = reference()
    net = make_precond(config, 0.5, process=process, source=source, eps=eps, network="edm2")  # type: ignore[arg-type]
    net.load_state_dict({f"model.{k}": v for k, v in state.items()}, strict=True)
    return net


def mpconv_versions(net: torch.nn.Module) -> dict[str, int]:
    """The autograd version counter of every MPConv weight (each forced normalisation bumps it by one)."""
    return {name: m.weight._version for name, m in net.named_modules() if isinstance(m, MPConv)}


def bumps(net: torch.nn.Module, before: dict[str, int]) -> set[int]:
    """How often each MPConv weight of the U-Net was overwritten since ``before`` (the logvar head: never)."""
    now = mpconv_versions(net)
    assert now["model.logvar_linear"] == before["model.logvar_linear"]  # consistency training never evaluates it
    return {now[k] - before[k] for k in now if k != "model.logvar_linear"}


def test_ve_wrapper_at_eps_zero_is_edm2s_denoiser() -> None:
    config, state, ref = reference()
    net = wrapped(0.0).eval()
    assert isinstance(net, VEPrecond) and isinstance(net.model, EDM2Backbone) and net.label_dim == 10
    official = EDM2Precond(**config)
    official.load_state_dict(state, strict=True)
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "class_labels"))
    with torch.no_grad():
        got = net(x, sigma, labels)
        assert (got - official.eval()(x, sigma, labels)).abs().max().item() < 1e-6  # measured 0
        assert (got - torch.from_numpy(ref["D_x"])).abs().max().item() < 1e-5  # EDM2's own output
        assert (net(x, sigma) - official(x, sigma)).abs().max().item() < 1e-6  # None = all-zero labels
    assert denoiser(config, 0.5, network="edm2").state_dict().keys() == net.state_dict().keys()


@pytest.mark.parametrize(("process", "source", "eps"), [("ve", None, 0.002), ("trigflow", "ve", 0.0)])
def test_boundary_condition_is_exact(process: str, source: str | None, eps: float) -> None:
    net = wrapped(eps, process, source)
    _, _, ref = reference()
    x, labels = torch.from_numpy(ref["x"]), torch.from_numpy(ref["class_labels"])
    for mode in (True, False):
        net.train(mode)
        with torch.no_grad():
            assert torch.equal(net(x, torch.full((4,), eps), labels), x)


def test_jvp_matches_a_float64_finite_difference() -> None:
    """ADCM's v = ∂_x f·dx/dt + ∂_t f through the whole ε-shifted EDM2 model, in training mode."""
    net = wrapped(0.002).double().train()
    _, _, ref = reference()
    labels = torch.from_numpy(ref["class_labels"]).double()
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)
    x = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64) * t.reshape(-1, 1, 1, 1)
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    before, versions = {k: v.clone() for k, v in net.state_dict().items()}, mpconv_versions(net)

    def f(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return net(x_, t_, labels)

    out, tangent = jvp(f, (x, t), (dx, torch.ones_like(t)))
    with torch.no_grad():
        h = 1e-6 * t.reshape(-1, 1, 1, 1)
        fd = (f(x + h * dx, t + h.flatten()) - f(x - h * dx, t - h.flatten())) / (2 * h)
    rel = ((tangent - fd).flatten(1).norm(dim=1) / fd.flatten(1).norm(dim=1)).max().item()
    assert rel < 1e-6, rel  # measured 3.5e-10
    assert mpconv_versions(net) == versions  # no forced normalisation under no_grad
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        assert torch.equal(out, f(x, t))


def _batch(ref: Any) -> Batch:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 16, 16, generator=gen).clamp(-1, 1)
    return Batch(x0, torch.randn(x0.shape, generator=gen), torch.from_numpy(ref["class_labels"]))


def test_consistency_step_normalises_the_weights_once() -> None:
    net = wrapped(0.002).train()
    _, _, ref = reference()
    process = make_process("ve", 0.002, 80.0, 0.5)
    t, r = torch.tensor([0.1, 0.5, 3.0, 60.0]), torch.tensor([0.05, 0.4, 2.5, 50.0])
    versions = mpconv_versions(net)
    loss = consistency_batch_loss(net, net, process, _batch(ref), t, r, None, c=0.0)  # target first, then student
    assert bumps(net, versions) == {1}
    loss.backward()
    model = net.model
    assert isinstance(model, EDM2Backbone)
    for m in model.unet.modules():
        if isinstance(m, MPConv):  # unit-RMS rows after the forced normalisation
            rms = m.weight.detach().flatten(1).pow(2).mean(1).sqrt()
            assert (rms - 1).abs().max().item() < 1e-3
    assert model.logvar_linear.weight.grad is None  # the uncertainty head takes no part
    assert model.unet.out_gain.grad is not None and model.unet.enc["16x16_conv"].weight.grad is not None
    # An extra no_grad forward after the student forward (a target computed later) keeps the graph valid.
    net.zero_grad()
    out = net(_batch(ref).x0, t, _batch(ref).labels)
    with torch.no_grad():
        net(_batch(ref).x0, r, _batch(ref).labels)
    out.square().mean().backward()


def test_sct_step_through_the_trigflow_head_of_edm2() -> None:
    net = wrapped(0.0, "trigflow", "ve").train()
    _, _, ref = reference()
    batch = _batch(ref)
    versions = mpconv_versions(net)
    student = SCTModule(net, None)  # type: ignore[arg-type]
    loss = sct_batch_loss(
        net,  # type: ignore[arg-type]
        student,
        batch.x0,
        batch.z,
        torch.tensor([0.1, 0.5, 1.0, 1.5]),
        batch.labels,
        ratio=0.5,
        tangent_norm_c=0.1,
    )
    assert bumps(net, versions) == {1}  # the JVP (no_grad) did not normalise, the student forward did
    loss.backward()
    assert torch.isfinite(loss) and net.model.unet.out_gain.grad is not None  # type: ignore[union-attr]


def test_model_files_record_the_network_kind(tmp_path: Path) -> None:
    config, state, _ = reference()
    weights = {f"model.{k}": v for k, v in state.items()}
    save_teacher(tmp_path / "t.pt", TeacherFile(config, 0.5, weights, {"source": "test"}, network="edm2"))
    teacher = load_teacher(tmp_path / "t.pt")
    assert teacher.network == "edm2" and teacher.image_shape == (3, 16, 16) and teacher.label_dim == 10
    f = teacher.consistency_function(0.002)
    assert isinstance(f.model, EDM2Backbone)
    # a record's description of the backbone: the parameter count of the built network, counted without building it
    described = teacher.describe_network()
    assert described["kind"] == "edm2" and described["parameters"] == sum(p.numel() for p in f.parameters())
    student = StudentFile(config, 0.5, f.state_dict(), "ve", "ve", "ect", None, 0.002, 0.002, 80.0, network="edm2")
    save_student(tmp_path / "s.pt", student)
    assert load_student(tmp_path / "s.pt").consistency_function().model.__class__ is EDM2Backbone
    # Files without the entry hold a DDPM++; an unknown kind is one line.
    payload = torch.load(tmp_path / "t.pt", weights_only=True)
    torch.save({**payload, "network": "dit"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"entry 'network' is 'dit', not one of \['ddpmpp', 'edm2'\]"):
        load_teacher(tmp_path / "bad.pt")
    del payload["network"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_teacher(tmp_path / "old.pt").network == "ddpmpp"


def test_consistency_function_helper_builds_edm2() -> None:
    config, _, _ = reference()
    with torch.device("meta"):
        f = consistency_function(config, 0.5, 0.002, network="edm2")
    assert isinstance(f.model, EDM2Backbone) and f.eps == 0.002
