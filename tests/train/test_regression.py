"""The one training loop reproduces, bit for bit, what the separate consistency loop and sampler computed before
the redesign (regression data recorded from that code on tiny configurations: tests/data/golden-training.json).

Every discrete and continuous method on every process must end with the same EMA weights (per-tensor sums and
sums of squares, float64) and the same final loss; every sampler must give the same uint8 images. A changed
random stream, draw order or loss would move these by orders of magnitude more than the tolerance.

The data were recorded with PyTorch's dropout; the backbones now draw their CPU masks with
:func:`adcm.nets.dropout.dropout` (tested on its own in tests/nets/test_dropout.py), so these tests put
PyTorch's back and check everything else — the loop, its random streams, draws and losses — bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from conftest import TRAIN_TINY as SHARED_TINY
from conftest import synthetic_dataset, tiny_params

from adcm.config import parse_params
from adcm.io.model_files import TeacherFile
from adcm.nets import edm2, songunet
from adcm.nets.precond import denoiser
from adcm.processes import coordinates, make_process
from adcm.sampling.generate import ConsistencySampler, HeunSampler, generate
from adcm.train.batches import BatchSource
from adcm.train.loop import train
from adcm.train.runs import network_kwargs_for, student_spec

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "data" / "golden-training.json").read_text())
CPU = torch.device("cpu")
TRAIN_TINY = {**SHARED_TINY, "seed": 1}


def _pytorch_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return nnf.dropout(x, p=p, training=training)


@pytest.fixture(autouse=True)
def _recorded_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dropout the regression data were recorded with (PyTorch's, one Bernoulli draw per element)."""
    monkeypatch.setattr(songunet, "dropout", _pytorch_dropout)
    monkeypatch.setattr(edm2, "dropout", _pytorch_dropout)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the regression data were recorded with one thread
    yield
    torch.set_num_threads(threads)


def _teacher(process: str) -> TeacherFile:
    params = parse_params(tiny_params(TRAIN_TINY))
    kwargs = network_kwargs_for(params.teacher.network, 8, 1, 3)
    torch.manual_seed(0)
    net = denoiser(kwargs, 0.5, process)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return TeacherFile(kwargs, 0.5, net.state_dict(), {"source": "test"}, process=process)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", sorted(GOLDEN["consistency"]))
def test_consistency_training_matches_the_recorded_run(tmp_path: Path, key: str) -> None:
    method, process = key.split("-")
    ref = GOLDEN["consistency"][key]
    params = parse_params(tiny_params({**TRAIN_TINY, "method": method, "process": process}))
    data = synthetic_dataset()
    spec = student_spec(params, _teacher(process), data, teacher_id="t", data_id="d", world_size=1, device=CPU)
    run = train(
        spec,
        BatchSource(data.images, data.labels, 0, False, CPU),
        checkpoint_path=tmp_path / "s.pt",
        device=CPU,
        show_progress=False,
    )
    assert run.final_loss == pytest.approx(ref["loss"], rel=1e-5)
    assert [it for it, _ in run.partitions] == [it for it, _ in ref["partitions"]]
    for (_, points), (_, expected) in zip(run.partitions, ref["partitions"], strict=True):
        assert points == pytest.approx(expected, rel=1e-6)
    assert sorted(run.ema_state) == sorted(ref["ema"])
    for name, (total, squares) in ref["ema"].items():
        value = run.ema_state[name].double()
        assert float(value.sum()) == pytest.approx(total, rel=1e-5, abs=1e-6), name
        assert float(value.pow(2).sum()) == pytest.approx(squares, rel=1e-5, abs=1e-6), name


def test_samplers_match_the_recorded_images() -> None:
    teacher = _teacher("ve")
    process = make_process("ve", 0.002, 80.0)
    cases = {
        "1step": (ConsistencySampler(process), teacher.consistency_function(0.002)),
        "2step": (ConsistencySampler(process, (0.42,)), teacher.consistency_function(0.002)),
        "teacher": (HeunSampler(coordinates("ve"), 4, 0.002, 80.0, 7.0), teacher.denoiser()),
    }
    for name, (sampler, net) in cases.items():
        images = generate(net, sampler, list(range(5)), shape=(1, 8, 8), batch_size=2, device=CPU)
        np.testing.assert_array_equal(images, np.asarray(GOLDEN["generate"][name], dtype=np.uint8), err_msg=name)
