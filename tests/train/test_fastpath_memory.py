"""The memory knobs (docs/performance.md#memory-knobs): activation checkpointing gives the gradients of the plain
network (DDPM++, EDM2, the sCT JVP path) while saving fewer activations; ``batch_per_step: auto`` (probing with
a fake memory function; the whole batch on the CPU); the peak memory in the logs and the metrics."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import EDM2_TINY, TRAIN_TINY, synthetic_dataset, tiny_params
from torch import Tensor, nn
from typer.testing import CliRunner

from adcm.config import ParamsError, parse_params
from adcm.errors import TrainingError
from adcm.io.datasets import write_prepared
from adcm.io.model_files import TeacherFile, save_teacher
from adcm.method.objectives import Batch, consistency_batch_loss
from adcm.method.sct import LogVarianceHead, SCTModule, sct_batch_loss
from adcm.nets.checkpointing import checkpointed_blocks, enable_activation_checkpointing
from adcm.nets.edm2 import EDM2Precond
from adcm.nets.precond import TrigFlowPrecond, consistency_function, denoiser
from adcm.processes import VEProcess
from adcm.stages.cli import app
from adcm.train.batches import BatchSource
from adcm.train.fastpath import auto_micro_batch
from adcm.train.loop import Trainer, train
from adcm.train.runs import network_kwargs_for, run_student, student_spec

CPU = torch.device("cpu")
VE = VEProcess(eps=0.002, t_max=80.0)
DDPMPP = dict(
    img_resolution=8,
    in_channels=1,
    out_channels=1,
    label_dim=0,
    augment_dim=0,
    model_channels=8,
    channel_mult=[1, 2],
    channel_mult_emb=2,
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.2,
    label_dropout=0.0,
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    z = torch.randn(6, 1, 8, 8, generator=gen)
    t = torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0, 60.0])
    return x0, z, t


def _discrete_loss(net: nn.Module) -> Tensor:
    x0, z, t = _inputs()
    return consistency_batch_loss(net, net, VE, Batch(x0, z, None), t, t * 0.8, None, c=0.03)


def _sct_loss(net: nn.Module) -> Tensor:
    assert isinstance(net, TrigFlowPrecond)
    x0, z, _ = _inputs()
    t = torch.tensor([0.05, 0.2, 0.6, 1.0, 1.3, 1.5])
    torch.manual_seed(1)
    head = LogVarianceHead(8)
    return sct_batch_loss(net, SCTModule(net, head), x0, z, t, None, ratio=1.0, tangent_norm_c=0.1)


def _ddpmpp() -> nn.Module:
    torch.manual_seed(0)
    return consistency_function(DDPMPP, 0.5, 0.002)


def _trigflow() -> nn.Module:
    torch.manual_seed(0)
    return TrigFlowPrecond(denoiser(DDPMPP, 0.5).model, 0.5, 0.0, source="ve")


def _edm2() -> nn.Module:
    torch.manual_seed(0)
    return EDM2Precond(**EDM2_TINY)  # type: ignore[arg-type]


def _saved_bytes_and_grads(net: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> tuple[int, dict[str, Tensor]]:
    """Bytes autograd saved for the backward pass during the forward, and the gradients."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    net.train()
    torch.manual_seed(3)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(net)
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("build", "loss_fn"),
    [(_ddpmpp, _discrete_loss), (_trigflow, _sct_loss), (_edm2, _discrete_loss)],
    ids=["ddpmpp-ect", "ddpmpp-sct-jvp", "edm2-ect"],
)
def test_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(
    build: Callable[[], nn.Module], loss_fn: Callable[[nn.Module], Tensor]
) -> None:
    """Dropout on (its masks are replayed in the recomputation); for EDM2 the forced weight normalisation
    rewrites the stored weights once per forward, not again in the recomputation (weights equal after)."""
    plain = build()
    ckpt = copy.deepcopy(plain)
    assert enable_activation_checkpointing(ckpt) > 0
    assert enable_activation_checkpointing(ckpt) == checkpointed_blocks(ckpt)  # idempotent
    saved_plain, grads_plain = _saved_bytes_and_grads(plain, loss_fn)
    saved_ckpt, grads_ckpt = _saved_bytes_and_grads(ckpt, loss_fn)
    assert saved_ckpt < 0.6 * saved_plain, (saved_ckpt, saved_plain)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_checkpointing_keeps_names_copies_and_evaluation() -> None:
    net = _ddpmpp()
    names = list(net.state_dict())
    enable_activation_checkpointing(net)
    assert list(net.state_dict()) == names
    ema = copy.deepcopy(net).eval()
    assert checkpointed_blocks(ema) == checkpointed_blocks(net) > 0
    x0, _, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ema(x0, t), _ddpmpp().eval()(x0, t), rtol=0, atol=0)
    assert enable_activation_checkpointing(nn.Sequential(nn.Linear(2, 2))) == 0


def _tiny_params(**overrides: object):
    return parse_params(tiny_params({**TRAIN_TINY, "method": "ect", "seed": 1, **overrides}))


def _teacher() -> TeacherFile:
    params = _tiny_params()
    kwargs = network_kwargs_for(params.teacher.network, 8, 1, 3)
    torch.manual_seed(0)
    return TeacherFile(kwargs, 0.5, denoiser(kwargs, 0.5).state_dict(), {"source": "test"})


def _trainer(params, **settings: object) -> Trainer:  # type: ignore[no-untyped-def]
    data = synthetic_dataset()
    spec = student_spec(params, _teacher(), data, teacher_id="t", data_id="d", world_size=1, device=CPU)
    spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, **settings))
    return Trainer(spec, BatchSource(data.images, data.labels, 0, False, CPU), CPU)


def test_training_steps_with_checkpointing_equal_plain_steps() -> None:
    params = _tiny_params()
    results = []
    for flag in (False, True):
        trainer = _trainer(params, activation_checkpointing=flag)
        assert (checkpointed_blocks(trainer.net) > 0) is flag
        losses = [float(trainer.step(k).loss) for k in range(2)]
        results.append((losses, trainer.net.state_dict()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, rtol=1e-5, atol=1e-7, msg=name)


# --- batch_per_step: auto -------------------------------------------------------------------------------


def _fake_memory(fixed: int, per_image: int, capacity: int, extra: Callable[[int], int] = lambda m: 0):
    """A fake peak_bytes: fixed + m·per_image (+ extra(m)), None (out of memory) above ``capacity``."""
    calls: list[int] = []

    def peak(m: int) -> int | None:
        calls.append(m)
        value = fixed + m * per_image + extra(m)
        return None if value > capacity else value

    return peak, calls


def test_auto_micro_batch_picks_the_largest_divisor_that_fits() -> None:
    peak, calls = _fake_memory(1000, 100, capacity=10**9)
    # headroom 0.9 of 5000 = 4500 → fixed + 100·m ≤ 4500 → m ≤ 35; divisors of 64: 32
    assert auto_micro_batch(64, peak, 5000) == 32
    assert calls == [16, 32]
    peak, _ = _fake_memory(1000, 100, capacity=10**9)
    assert auto_micro_batch(64, peak, 10**6) == 64
    assert auto_micro_batch(1, _fake_memory(1000, 100, 10**9)[0], 10**6) == 1


def test_auto_micro_batch_halves_when_the_estimate_runs_out_of_memory() -> None:
    # memory jumps above 64 images (another kernel, a workspace): the linear fit of the probes at 32 and 64
    # says 128 fits, the probe at 128 runs out of memory, 64 is known to fit
    peak, calls = _fake_memory(1000, 10, capacity=5000, extra=lambda m: 10**5 if m > 64 else 0)
    assert auto_micro_batch(128, peak, 10**4) == 64
    assert calls == [32, 64, 128]
    # the jump is above 24: the larger probe (64) fails, so 32 (between the probes) is tried, then 16 is kept
    peak, calls = _fake_memory(1000, 10, capacity=5000, extra=lambda m: 10**5 if m > 24 else 0)
    assert auto_micro_batch(128, peak, 10**4) == 16
    assert calls == [32, 16, 64, 32]
    # the small probe itself exceeds the budget (0.9 × 600): halved until it fits
    peak, calls = _fake_memory(100, 100, capacity=10**9)
    assert auto_micro_batch(64, peak, 600) == 4
    assert calls[:3] == [16, 8, 4]


def test_auto_micro_batch_refuses_when_nothing_fits() -> None:
    with pytest.raises(TrainingError, match="batch_per_step: auto"):
        auto_micro_batch(8, lambda m: None, 10**6)


def test_auto_is_the_whole_batch_on_the_cpu_and_a_resumed_choice_is_kept() -> None:
    params = _tiny_params(**{"train.batch_per_step": "auto"})
    assert params.train.batch_per_step == "auto"
    trainer = _trainer(params)
    assert trainer.micro == trainer.local_batch == 16 and trainer.n_micro == 1
    state = trainer.state_dict()
    assert state["batch_per_step"] == 16
    trainer.load_state_dict({**state, "batch_per_step": 8})
    assert trainer.micro == 8 and trainer.n_micro == 2
    assert trainer.step(0).finite


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("big", "train.batch_per_step: expected an integer > 0 or one of 'auto' or null, got 'big'"),
        (0, "train.batch_per_step: expected an integer > 0 or one of 'auto' or null, got 0"),
        (5, "train.batch_per_step: expected a divisor of train.batch_size (16), got 5"),
    ],
)
def test_batch_per_step_is_validated(value: object, message: str) -> None:
    with pytest.raises(ParamsError, match="^params.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
        _tiny_params(**{"train.batch_per_step": value})


def test_train_help_documents_the_memory_knobs() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "train.activation_checkpointing" in text
    assert "auto = the largest divisor" in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_micro_batch_on_cuda() -> None:
    """On a GPU ``auto`` probes real steps; the tiny batch fits whole."""
    data = synthetic_dataset()
    cuda = torch.device("cuda")
    params = _tiny_params(**{"train.batch_per_step": "auto", "train.device": "cuda"})
    spec = student_spec(params, _teacher(), data, teacher_id="t", data_id="d", world_size=1, device=cuda)
    trainer = Trainer(spec, BatchSource(data.images, data.labels, 0, False, cuda), cuda)
    assert trainer.micro is None
    assert trainer.step(0).finite
    assert trainer.micro == 16


# --- peak memory in the logs and the metrics ---------------------------------------------------------------


def test_peak_memory_is_logged_and_in_the_metrics(tmp_path: Path) -> None:
    params = _tiny_params()
    data = synthetic_dataset()
    spec = student_spec(params, _teacher(), data, teacher_id="t", data_id="d", world_size=1, device=CPU)
    run = train(
        spec,
        BatchSource(data.images, data.labels, 0, False, CPU),
        checkpoint_path=tmp_path / "state.pt",
        device=CPU,
        log_dir=tmp_path / "live",
        show_progress=False,
        stop_after_steps=2,
    )
    assert run.peak_memory_mib is not None and run.peak_memory_mib > 10
    assert run.batch_per_step == 8
    logged = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert logged["peak_memory_mib"] == pytest.approx(run.peak_memory_mib)
    assert (tmp_path / "live" / "plots" / "metrics" / "peak_memory_mib.tsv").is_file()

    # and run_student's summary (→ metrics/train.json)
    write_prepared(data, tmp_path / "dataset.npz", tmp_path / "dataset.json")
    save_teacher(tmp_path / "teacher.pt", _teacher())
    _, summary = run_student(
        params,
        tmp_path / "teacher.pt",
        tmp_path / "dataset.npz",
        checkpoint_path=tmp_path / "student-state.pt",
        device=CPU,
        show_progress=False,
    )
    assert summary["peak_memory_mib"] > 10 and summary["batch_per_step"] == 8
