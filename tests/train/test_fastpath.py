"""The GPU fast path exercised on the CPU (docs/performance.md#the-gpu-fast-path): bf16 autocast through the
CUDA code path tracks fp32 training, the JVPs and the loss stay fp32, ``torch.compile`` of the student matches
eager training and is never applied around a JVP, fused Adam equals plain Adam.

Measured on the project's CPU (16 steps of 16 images, tiny DDPM++, RAdam lr 1e-3, one thread; the test
re-measures and prints them): the bf16 run's losses differ from fp32's by ≤ 7e-5 of the mean |loss| (ECT, ADCM)
and 6e-3 (sCT, whose loss is near zero), and its weight update θ₁₆ − θ₀ differs from fp32's by 1.5–3.9 % of
its norm. The tolerances below are ≈ 4–10× these.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import pytest
import torch
from conftest import TRAIN_TINY, synthetic_dataset, tiny_params
from torch import Tensor, nn

from adcm.config import Params, parse_params
from adcm.io.model_files import TeacherFile
from adcm.nets.precond import denoiser
from adcm.train.batches import BatchSource
from adcm.train.fastpath import FastPath
from adcm.train.loop import Trainer
from adcm.train.runs import network_kwargs_for, student_spec

CPU = torch.device("cpu")
STEPS = 16
#: |loss_bf16 − loss_fp32| per step, relative to the mean |loss| of the fp32 run
LOSS_TOL = {"ect": 1e-3, "adcm": 1e-3, "sct": 3e-2}
#: ‖(θ_bf16 − θ₀) − (θ_fp32 − θ₀)‖ / ‖θ_fp32 − θ₀‖ after STEPS steps
UPDATE_TOL = 0.15


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(method: str, steps: int = STEPS, **overrides: object) -> Params:
    return parse_params(
        tiny_params(
            {
                **TRAIN_TINY,
                "method": method,
                "seed": 1,
                "train.duration_kimg": steps * 0.016,
                "train.batch_per_step": None,
                **overrides,
            }
        )
    )


def _teacher(params: Params) -> TeacherFile:
    kwargs = network_kwargs_for(params.teacher.network, 8, 1, 3)
    torch.manual_seed(0)
    net = denoiser(kwargs, 0.5, "ve")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return TeacherFile(kwargs, 0.5, net.state_dict(), {"source": "test"})


def _trainer(params: Params, fast: FastPath) -> Trainer:
    data = synthetic_dataset()
    spec = student_spec(params, _teacher(params), data, teacher_id="t", data_id="d", world_size=1, device=CPU)
    spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, fast=fast))
    return Trainer(spec, BatchSource(data.images, data.labels, 0, False, CPU), CPU)


def _run(trainer: Trainer, steps: int) -> tuple[Tensor, dict[str, Tensor]]:
    losses = []
    for k in range(steps):
        trainer.rebuild(k)
        outcome = trainer.step(k)
        assert outcome.finite
        losses.append(float(outcome.loss))
    return torch.tensor(losses), {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


def _update_difference(a: dict[str, Tensor], b: dict[str, Tensor], init: dict[str, Tensor]) -> float:
    """‖(a − init) − (b − init)‖ / ‖b − init‖ over every floating-point tensor."""
    names = [k for k in b if b[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in names]).norm()
    update = torch.cat([(b[k] - init[k]).flatten() for k in names]).norm()
    return float(diff / update)


def test_force_cpu_keeps_every_switch_the_cpu_has() -> None:
    requested = FastPath(bf16=True, channels_last=True, tf32=True, fused_optimizer=True, compile=True)
    assert FastPath.for_device(requested, CPU) == FastPath()
    assert FastPath.for_device(requested, CPU, force_cpu=True) == dataclasses.replace(requested, tf32=False)
    assert FastPath.for_device(requested, torch.device("cuda")) == requested


@pytest.mark.parametrize("method", ["ect", "sct", "adcm"])
def test_bf16_training_tracks_fp32(method: str) -> None:
    """STEPS steps in fp32 and in CPU bf16 autocast (the CUDA code path) from the same start: the losses and
    the weight update agree within LOSS_TOL / UPDATE_TOL, and bf16 was really in effect (they are not equal)."""
    params = _params(method)
    fp32 = _trainer(params, FastPath())
    init = {k: v.detach().clone() for k, v in fp32.net.state_dict().items()}
    loss32, w32 = _run(fp32, STEPS)
    bf16 = _trainer(params, FastPath.for_device(FastPath(bf16=True), CPU, force_cpu=True))
    assert bf16.spec.settings.fast.bf16
    loss16, w16 = _run(bf16, STEPS)
    loss_dev = float((loss16 - loss32).abs().max() / loss32.abs().mean())
    update_dev = _update_difference(w16, w32, init)
    print(f"{method}: max |Δloss|/mean|loss| = {loss_dev:.3g}, update difference = {update_dev:.3g}")
    assert loss_dev <= LOSS_TOL[method]
    assert update_dev <= UPDATE_TOL
    assert update_dev > 1e-4, "the bf16 run equals the fp32 run: autocast was not in effect"


def _conv_dtypes(net: nn.Module) -> tuple[list[torch.dtype], list[bool]]:
    """Output dtypes of the network's first convolution, and whether each call was under forward-mode AD."""
    import torch.autograd.forward_ad as fwad

    dtypes: list[torch.dtype] = []
    dual: list[bool] = []
    conv = next(m for m in net.modules() if type(m).__name__ == "Conv2d" and getattr(m, "weight", None) is not None)

    def hook(_module: nn.Module, _inputs: object, out: Tensor) -> None:
        dtypes.append(out.dtype)
        dual.append(fwad.unpack_dual(out).tangent is not None)

    conv.register_forward_hook(hook)
    return dtypes, dual


@pytest.mark.parametrize("method", ["ect", "sct"])
def test_bf16_covers_the_forwards_and_never_the_jvp_or_the_loss(method: str) -> None:
    """With bf16 the gradient-carrying forward (and ECT's target forward) run in bf16 on the CPU; sCT's JVP
    runs in fp32, and the loss is fp32."""
    trainer = _trainer(_params(method, steps=1), FastPath.for_device(FastPath(bf16=True), CPU, force_cpu=True))
    dtypes, dual = _conv_dtypes(trainer.net)
    outcome = trainer.step(0)
    assert outcome.loss.dtype == torch.float32
    if method == "ect":
        assert dtypes == [torch.bfloat16, torch.bfloat16]  # target, student
    else:
        assert dual == [True, False]  # the JVP, then the student forward
        assert dtypes == [torch.float32, torch.bfloat16]


def test_fused_adam_matches_plain_adam_on_the_cpu() -> None:
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(32, 8)
    for fast, net in zip((FastPath(), FastPath(fused_optimizer=True)), nets, strict=True):
        opt = fast.optimizer(net, "adam", 1e-2, 0.99)
        assert opt.defaults.get("fused") is (True if fast.fused_optimizer else None)
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _compiled_matches_eager(method: str) -> None:
    """Three steps with the student compiled equal three eager steps (dropout on: the compiled student must draw
    the eager target's masks); the JVPs (sCT's tangent, ADCM's partition) never run under compilation."""
    import adcm.method.adcm
    import adcm.method.sct

    params = _params(method, steps=3)
    eager_loss, eager_w = _run(_trainer(params, FastPath()), 3)
    jvp_calls: list[bool] = []
    real = {mod: mod.jvp for mod in (adcm.method.adcm, adcm.method.sct)}

    def spy(real_jvp, *args, **kwargs):  # type: ignore[no-untyped-def]
        jvp_calls.append(torch.compiler.is_compiling())
        return real_jvp(*args, **kwargs)

    for mod, fn in real.items():
        mod.jvp = functools.partial(spy, fn)  # type: ignore[attr-defined]
    try:
        trainer = _trainer(params, FastPath.for_device(FastPath(compile=True), CPU, force_cpu=True))
        assert trainer.student is not trainer.ddp and not hasattr(trainer.net, "_orig_mod")
        compiled_loss, compiled_w = _run(trainer, 3)
    finally:
        for mod, fn in real.items():
            mod.jvp = fn  # type: ignore[attr-defined]
    if method != "ect":
        assert jvp_calls and not any(jvp_calls), "a JVP ran inside compiled code"
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-6)
    for name, value in eager_w.items():
        torch.testing.assert_close(compiled_w[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["ect", "sct"])
def test_compiled_student_traces_and_matches_eager(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Dynamo + AOTAutograd (``backend="aot_eager"``: the graph capture of the real compile, without inductor's
    C++ code generation, so it runs in seconds)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    _compiled_matches_eager(method)


@pytest.mark.slow
def test_inductor_compiled_student_matches_eager() -> None:
    """The real ``torch.compile`` (inductor, C++ through gcc) on the CPU. A cold inductor cache makes this one
    slow (≈ 1–2 min on the 2-core machine, seconds once cached); skipped where inductor cannot compile."""
    try:
        _compiled_matches_eager("adcm")
    except Exception as exc:  # only the compiler's own failures are skipped
        from torch._dynamo.exc import BackendCompilerFailed

        if isinstance(exc, BackendCompilerFailed) or "InductorError" in type(exc).__name__:
            pytest.skip(f"inductor cannot compile here: {str(exc).splitlines()[0][:200]}")
        raise
