"""Tests for adcm.method.losses: pseudo-Huber distance, consistency loss (ECT/iCT and ADCM Eq. 11), EDM loss."""

from __future__ import annotations

import math

import pytest
import torch

from adcm.method.losses import consistency_loss, edm_loss, ict_huber_c, noise_levels, pseudo_huber

F64 = torch.float64


def test_pseudo_huber_by_hand() -> None:
    a = torch.zeros(2, 1, 2, 2, dtype=F64)
    b = torch.tensor([[[[3.0, 0.0], [0.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]], dtype=F64)
    # ‖a − b‖ over all pixels of each sample: 5 and 2
    torch.testing.assert_close(pseudo_huber(a, b, 0.0), torch.tensor([5.0, 2.0], dtype=F64))
    c = 0.03
    expected = torch.tensor([math.sqrt(25 + c * c) - c, math.sqrt(4 + c * c) - c], dtype=F64)
    torch.testing.assert_close(pseudo_huber(a, b, c), expected, rtol=1e-14, atol=0)
    # tiny differences: ≈ ‖a − b‖²/(2c), no cancellation
    tiny = torch.full((1, 4), 1e-9, dtype=F64)
    assert pseudo_huber(tiny, torch.zeros_like(tiny), 0.1).item() == pytest.approx(4e-18 / 0.2, rel=1e-9)
    assert pseudo_huber(a, a, 0.5).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        pseudo_huber(a, b, -1.0)


def test_pseudo_huber_zero_gradient_at_zero_distance() -> None:
    for c in (0.0, 0.03):
        a = torch.ones(3, 5, dtype=F64, requires_grad=True)
        pseudo_huber(a, torch.ones(3, 5, dtype=F64), c).sum().backward()
        assert torch.equal(a.grad, torch.zeros_like(a))


def test_ict_huber_c() -> None:
    assert ict_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))
    with pytest.raises(ValueError):
        ict_huber_c(0)


def _tensors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(4, 3, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    target = torch.randn(4, 3, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    x0 = torch.randn(4, 3, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    return student, target, x0


@pytest.mark.parametrize("c", [0.0, 0.03])
def test_adcm_loss_eq11_weight_carries_no_gradient(c: float) -> None:
    student, target, x0 = _tensors()
    loss = consistency_loss(student, target, x0, None, c)
    assert loss.shape == (4,)
    num = pseudo_huber(student.detach(), target.detach(), c)
    den = pseudo_huber(target.detach(), x0.detach(), c)
    torch.testing.assert_close(loss.detach(), num / den, rtol=1e-14, atol=0)
    loss.mean().backward()
    # gradient wrt the student = gradient of w·d_c(student, target) with w a constant
    student2 = student.detach().clone().requires_grad_(True)
    w = (1.0 / den).detach()
    (w * pseudo_huber(student2, target.detach(), c)).mean().backward()
    torch.testing.assert_close(student.grad, student2.grad, rtol=1e-13, atol=0)
    # nothing flows into the (stop-gradient) target or the data
    assert target.grad is None and x0.grad is None


def test_adcm_loss_floor_for_c0() -> None:
    student, _, x0 = _tensors(1)
    target = x0.detach().clone()  # r ≤ ε with c = 0: d_c(target, x0) = 0 → floored at 1e-8
    loss = consistency_loss(student, target, x0, None, 0.0)
    expected = pseudo_huber(student.detach(), target, 0.0) / 1e-8
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-14, atol=0)
    assert bool(torch.isfinite(loss).all())
    loss_f = consistency_loss(student, target, x0, None, 0.0, floor=0.5)
    torch.testing.assert_close(loss_f.detach(), expected * 1e-8 / 0.5, rtol=1e-14, atol=0)
    with pytest.raises(ValueError):
        consistency_loss(student, target, x0, None, 0.0, floor=0.0)


def test_fixed_weight_loss() -> None:
    student, target, x0 = _tensors(2)
    weight = torch.tensor([1.0, 2.0, 0.5, 10.0], dtype=torch.float32, requires_grad=True)
    loss = consistency_loss(student, target, x0, weight, 0.0)
    expected = weight.detach().double() * pseudo_huber(student.detach(), target.detach(), 0.0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
    loss.sum().backward()
    assert student.grad is not None
    assert target.grad is None and x0.grad is None and weight.grad is None


def test_edm_loss_weighting_and_shape() -> None:
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    p_mean, p_std, sd = -1.2, 1.2, 0.5
    calls = {}

    def denoiser(y, sigma, labels, augment_labels=None):
        calls["y"], calls["sigma"], calls["aug"] = y, sigma, augment_labels
        return torch.zeros_like(y)  # D = 0 → squared error = x0²

    gen = torch.Generator().manual_seed(5)
    sigma_drawn = noise_levels(6, p_mean, p_std, gen, dtype=F64)
    z = torch.randn(x0.shape, generator=gen, dtype=F64)
    loss = edm_loss(denoiser, x0, z, sigma_drawn, None, sd)
    assert loss.shape == (6,)
    # the noise levels are EDM's log-normal: σ = exp(P_mean + P_std·n), n from the generator first
    n = torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=F64)
    sigma = torch.exp(p_mean + p_std * n)
    torch.testing.assert_close(sigma_drawn, sigma)
    torch.testing.assert_close(calls["sigma"], sigma)
    torch.testing.assert_close(calls["y"], x0 + sigma.view(-1, 1, 1, 1) * z)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(loss, weight * x0.flatten(1).pow(2).mean(1))
    aug = torch.ones(6, 9, dtype=F64)
    edm_loss(denoiser, x0, z, sigma, None, sd, augment_labels=aug)
    assert calls["aug"] is aug
