"""kd_loss against an independent float64 reading of the formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdsweep.core.distill import kd_loss


def reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, T: float) -> torch.Tensor:
    """(1-a)*CE(y, s) + a*T^2*KL(p_t || p_s), written out with explicit log-sum-exps in float64."""
    s, t = s.double(), t.double()

    def log_softmax(z: torch.Tensor) -> torch.Tensor:
        m = z.max(dim=1, keepdim=True).values
        return z - m - (z - m).exp().sum(dim=1, keepdim=True).log()

    ce = -log_softmax(s)[torch.arange(len(y)), y].mean()
    log_ps, log_pt = log_softmax(s / T), log_softmax(t / T)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return (1 - alpha) * ce + alpha * T * T * kl


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g) * 3
    t = torch.randn(16, 10, generator=g) * 5
    y = torch.randint(0, 10, (16,), generator=g)
    return s, t, y


@pytest.mark.parametrize("alpha,T", [(0.0, 4.0), (0.1, 4.0), (0.5, 1.0), (0.9, 10.0), (1.0, 20.0)])
def test_matches_independent_formula(batch, alpha, T):
    s, t, y = batch
    got = kd_loss(s, t, y, alpha, T)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(reference(s, t, y, alpha, T).item(), rel=1e-5, abs=1e-6)


def test_alpha_zero_is_exactly_cross_entropy(batch):
    s, t, y = batch
    assert torch.equal(kd_loss(s, t, y, 0.0, 10.0), F.cross_entropy(s, y))
    # The teacher does not matter at alpha 0, even a non-finite one.
    assert torch.equal(kd_loss(s, t * math.nan, y, 0, 10.0), F.cross_entropy(s, y))


def test_alpha_one_is_exactly_scaled_kl(batch):
    s, t, y = batch
    T = 4.0
    kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
    assert torch.equal(kd_loss(s, t, y, 1.0, T), kl * T**2)
    # Labels play no part at alpha 1.
    assert torch.equal(kd_loss(s, t, y, 1.0, T), kd_loss(s, t, (y + 1) % 10, 1.0, T))


def test_soft_term_vanishes_when_student_equals_teacher(batch):
    s, _, y = batch
    assert kd_loss(s, s.clone(), y, 1.0, 10.0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("alpha,T", [(0.3, 2.0), (0.9, 10.0)])
def test_student_gradient_matches_formula(batch, alpha, T):
    s, t, y = batch
    s1 = s.clone().requires_grad_()
    kd_loss(s1, t, y, alpha, T).backward()
    s2 = s.double().requires_grad_()
    reference(s2, t, y, alpha, T).backward()
    torch.testing.assert_close(s1.grad, s2.grad.float(), rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient(batch):
    s, t, y = batch
    t = t.clone().requires_grad_()
    s = s.clone().requires_grad_()
    kd_loss(s, t, y, 0.5, 4.0).backward()
    assert t.grad is None and s.grad is not None


def test_bf16_logits_give_float32_loss(batch):
    s, t, y = batch
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = kd_loss(s16, t16, y, 0.9, 10.0)
    assert got.dtype == torch.float32
    # Computed from the bf16 values but in float32: matches the float64 formula on those values.
    assert got.item() == pytest.approx(reference(s16, t16, y, 0.9, 10.0).item(), rel=1e-5)
    assert kd_loss(s16, t16, y, 0.0, 10.0).dtype == torch.float32


def test_label_smoothing_reaches_the_hard_term(batch):
    s, t, y = batch
    assert torch.equal(kd_loss(s, t, y, 0.0, 4.0, label_smoothing=0.1), F.cross_entropy(s, y, label_smoothing=0.1))


@pytest.mark.parametrize("alpha,T", [(-0.1, 4.0), (1.1, 4.0), (math.nan, 4.0), (0.5, 0.0), (0.5, -1.0), (0.5, math.inf)])
def test_bad_alpha_or_temperature_raise(batch, alpha, T):
    s, t, y = batch
    with pytest.raises(ValueError, match="alpha|temperature"):
        kd_loss(s, t, y, alpha, T)


def test_bad_shapes_raise(batch):
    s, t, y = batch
    with pytest.raises(ValueError, match="logits"):
        kd_loss(s, t[:, :5], y, 0.5, 4.0)
    with pytest.raises(ValueError, match="targets"):
        kd_loss(s, t, y[:3], 0.5, 4.0)
