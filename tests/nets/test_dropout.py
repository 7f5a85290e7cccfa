"""The CPU dropout: drop rate, unbiased scale, replayable masks, gradients, and its use in both backbones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf
from conftest import EDM2_TINY, tiny_params

from adcm.config import parse_params
from adcm.nets.dropout import dropout, effective_p
from adcm.nets.edm2 import EDM2Precond
from adcm.nets.songunet import SongUNet
from adcm.rng import same_rng
from adcm.train.runs import network_kwargs_for


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_drop_rate_and_scale(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last word is only partly used
    y = dropout(torch.ones(n), p, training=True)
    pe = effective_p(p)
    assert abs(pe - p) <= 2**-17
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - pe) < 5 * math.sqrt(pe * (1 - pe) / n)  # 5 binomial standard deviations
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - pe)))


def test_elements_and_lanes_are_independent() -> None:
    """Each of the four 16-bit lanes of a word, and neighbouring elements, drop at the same rate, independently."""
    torch.manual_seed(1)
    n = 400_000
    drop = (dropout(torch.ones(n), 0.5, training=True) == 0).double().view(-1, 4)
    tol = 5 * math.sqrt(0.25 / (n / 4))
    for lane in range(4):
        assert abs(drop[:, lane].mean().item() - 0.5) < tol
    both = (drop[:, 0] * drop[:, 1]).mean().item()  # P(both dropped) = 1/4 when independent
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / (n / 4))


def test_replayed_rng_replays_masks_and_eval_is_identity() -> None:
    x = torch.randn(4, 8, 5, 5)
    with same_rng(torch.device("cpu")) as replay:
        a = dropout(x, 0.2, training=True)
        replay()
        b = dropout(x, 0.2, training=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.2, training=True))  # a fresh draw differs
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.5, training=True)


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 4, 6, 6, requires_grad=True).to(memory_format=torch.channels_last)
    x.retain_grad()
    y = dropout(x, 0.25, training=True)
    y.sum().backward()
    assert x.grad is not None
    scale = 1 / (1 - effective_p(0.25))
    expected = (y != 0).to(x.dtype) * scale
    assert torch.equal(x.grad, expected)


def test_bf16_input_keeps_its_dtype() -> None:
    y = dropout(torch.ones(1000, dtype=torch.bfloat16), 0.1, training=True)
    assert y.dtype == torch.bfloat16
    values = y.unique().float()
    assert values[0] == 0 and len(values) == 2 and abs(values[1].item() - 1 / 0.9) < 1e-2


def test_backbones_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both backbones' residual blocks drop through :func:`dropout`, not PyTorch's CPU ``bernoulli_``."""

    def refuse(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise AssertionError("torch.nn.functional.dropout called on the CPU")

    monkeypatch.setattr(nnf, "dropout", refuse)
    network = parse_params(tiny_params({"teacher.network.dropout": 0.5})).teacher.network
    song = SongUNet(**network_kwargs_for(network, 8, 1, 0)).train()
    x = torch.randn(2, 1, 8, 8)
    assert song(x, torch.ones(2), None).shape == x.shape
    edm2 = EDM2Precond(**{**EDM2_TINY, "dropout": 0.5}).train()  # type: ignore[arg-type]
    assert edm2(x, torch.ones(2)).shape == x.shape
