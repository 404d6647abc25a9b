"""The KD loss against a value computed by hand (plain math, no torch)."""

import math

import pytest
import torch

from trainers.kd_loss import kd_loss


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computation():
    s, t, y, T, alpha = [1.0, 2.0, 3.0], [3.0, 1.0, 0.5], 0, 2.0, 0.7
    p_t = _softmax([v / T for v in t])
    p_s = _softmax([v / T for v in s])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    ce = -math.log(_softmax(s)[y])
    expected = alpha * T * T * kl + (1 - alpha) * ce

    loss, parts = kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(T * T * kl, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_kd_loss_is_a_batch_mean():
    s = torch.randn(5, 10)
    t = torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    whole, _ = kd_loss(s, t, y, 3.0, 0.5)
    rows = [kd_loss(s[i : i + 1], t[i : i + 1], y[i : i + 1], 3.0, 0.5)[0] for i in range(5)]
    assert whole.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_identical_logits_leave_only_the_hard_term():
    s = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    loss, parts = kd_loss(s, s.clone(), y, 4.0, 0.9)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * parts["ce"].item(), rel=1e-5)


def test_bf16_logits_are_softmaxed_in_float32():
    s = (torch.randn(8, 10) * 30).bfloat16().requires_grad_()
    t = (torch.randn(8, 10) * 30).bfloat16()
    loss, _ = kd_loss(s, t, torch.randint(0, 10, (8,)), 1.0, 0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad.float()).all()
