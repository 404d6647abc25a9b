"""Token-level distillation losses against values worked out here by plain float64 loops."""

import math

import pytest
import torch

from specs.lm import ForwardKL, GeneralizedJSD, ReverseKL
from trainers.lm_losses import (
    IGNORE_INDEX,
    lm_kd_loss,
    lm_topk_kd_loss,
    next_token_labels,
)

B, L, V = 2, 4, 5
LOSSES = [
    ForwardKL(kind="forward_kl", temperature=2.0, alpha=0.7),
    ReverseKL(kind="reverse_kl", temperature=2.0, alpha=0.7),
    GeneralizedJSD(kind="jsd", beta=0.5, temperature=2.0, alpha=0.7),
    GeneralizedJSD(kind="jsd", beta=0.2, temperature=1.5, alpha=0.4),
    GeneralizedJSD(kind="jsd", beta=0.0, temperature=2.0, alpha=0.7),
    GeneralizedJSD(kind="jsd", beta=1.0, temperature=2.0, alpha=0.7),
]
IDS = [f"{x.kind}-{getattr(x, 'beta', '')}" for x in LOSSES]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, V, generator=g) * 2
    teacher = torch.randn(B, L, V, generator=g) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 3] = IGNORE_INDEX  # a sequence's last position
    labels[1, 2:] = IGNORE_INDEX  # padding
    return student, teacher, labels


# ---------------------------------------------------------------- the reference, by hand


def _softmax(row, T):
    z = [x / T for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    s = sum(e)
    return [x / s for x in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _div(p, q, spec):
    """D(teacher p, student q) by definition, on lists of probabilities."""
    beta = getattr(spec, "beta", None)
    if spec.kind == "forward_kl" or beta == 0.0:
        return _kl(p, q)
    if spec.kind == "reverse_kl" or beta == 1.0:
        return _kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _reference(student, teacher_dist, labels, spec):
    """alpha * T^2 * mean D + (1 - alpha) * mean CE over tokens with a label; `teacher_dist`
    maps (b, t, student probabilities) to the teacher's probabilities over the vocabulary."""
    T = spec.temperature
    soft, ce, n = 0.0, 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            s = student[b, t].double().tolist()
            q = _softmax(s, T)
            soft += _div(teacher_dist(b, t, q), q, spec)
            ce -= math.log(_softmax(s, 1.0)[y])
            n += 1
    return spec.alpha * T * T * soft / n + (1 - spec.alpha) * ce / n


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("spec", LOSSES, ids=IDS)
def test_full_vocabulary_loss_matches_hand_computation(spec):
    student, teacher, labels = _inputs()
    loss, parts = lm_kd_loss(student, teacher, labels, spec)
    ref = _reference(student, lambda b, t, q: _softmax(teacher[b, t].double().tolist(),
                                                       spec.temperature), labels, spec)
    # float32 softmaxes and sums of 5 terms against float64: agree to ~1e-6 relative
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert parts["kd"] >= 0 and parts["ce"] > 0


def test_jsd_half_is_symmetric_and_endpoints_are_the_kls():
    student, teacher, labels = _inputs(1)
    jsd = GeneralizedJSD(kind="jsd", beta=0.5, temperature=1.0, alpha=1.0)
    a, _ = lm_kd_loss(student, teacher, labels, jsd)
    b, _ = lm_kd_loss(teacher, student, labels, jsd)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)  # float32 rounding only
    fwd, _ = lm_kd_loss(student, teacher, labels, ForwardKL(kind="forward_kl", alpha=1.0))
    rev, _ = lm_kd_loss(student, teacher, labels, ReverseKL(kind="reverse_kl", alpha=1.0))
    j0, _ = lm_kd_loss(student, teacher, labels, GeneralizedJSD(kind="jsd", beta=0.0, alpha=1.0))
    j1, _ = lm_kd_loss(student, teacher, labels, GeneralizedJSD(kind="jsd", beta=1.0, alpha=1.0))
    assert j0.item() == fwd.item() and j1.item() == rev.item()  # the same code path: bit-equal
    assert fwd.item() != pytest.approx(rev.item(), rel=1e-3)  # and they are different things


@pytest.mark.parametrize("spec", LOSSES[:3], ids=IDS[:3])
def test_tokens_without_a_label_contribute_nothing(spec):
    student, teacher, labels = _inputs()
    student = student.clone().requires_grad_(True)
    loss, _ = lm_kd_loss(student, teacher, labels, spec)
    loss.backward()
    masked = labels == IGNORE_INDEX
    assert torch.count_nonzero(student.grad[masked]) == 0  # exactly no gradient there
    assert torch.count_nonzero(student.grad[~masked]) > 0
    # garbage logits at those positions change nothing: they are multiplied by exact zeros
    s2, t2 = student.detach().clone(), teacher.clone()
    s2[masked] = torch.randn_like(s2[masked]) * 50
    t2[masked] = torch.randn_like(t2[masked]) * 50
    again, _ = lm_kd_loss(s2, t2, labels, spec)
    assert torch.equal(again, loss.detach())


def test_all_padding_gives_zero_not_nan():
    student, teacher, labels = _inputs()
    labels = torch.full_like(labels, IGNORE_INDEX)
    loss, _ = lm_kd_loss(student, teacher, labels, LOSSES[0])
    assert loss.item() == 0.0


def test_next_token_labels_shift_and_mask_padding():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert next_token_labels(ids, mask).tolist() == [[6, 7, 8, -100], [2, -100, -100, -100]]
    assert next_token_labels(ids).tolist() == [[6, 7, 8, -100], [2, 0, 0, -100]]


def test_bf16_logits_are_softmaxed_in_float32():
    student, teacher, labels = _inputs()
    spec = LOSSES[2]
    low, _ = lm_kd_loss(student.bfloat16(), teacher.bfloat16(), labels, spec)
    ref, _ = lm_kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), labels, spec)
    assert low.dtype == torch.float32
    assert torch.equal(low, ref)  # the same float32 arithmetic on the same (rounded) values


# ------------------------------------------------------------------------------ top-k


def _topk(teacher, k, T):
    logp = torch.log_softmax(teacher / T, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("policy", ["renormalize", "tail"])
@pytest.mark.parametrize("spec", LOSSES, ids=IDS)
def test_topk_with_k_equal_to_vocabulary_is_the_full_loss(spec, policy):
    student, teacher, labels = _inputs(2)
    ids, logp = _topk(teacher, V, spec.temperature)
    full, _ = lm_kd_loss(student, teacher, labels, spec)
    student = student.clone().requires_grad_(True)
    sparse, _ = lm_topk_kd_loss(student, ids, logp, labels, spec, policy)
    # the same sums in another order (k ids gathered, plus an empty rest bucket): float32 rounding
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    sparse.backward()
    assert torch.isfinite(student.grad).all()  # the empty rest bucket gives no NaN gradient


def _teacher_renormalized(teacher, k, T):
    def dist(b, t, q):
        p = _softmax(teacher[b, t].double().tolist(), T)
        top = sorted(range(V), key=lambda v: -p[v])[:k]
        z = sum(p[v] for v in top)
        return [p[v] / z if v in top else 0.0 for v in range(V)]
    return dist


def _teacher_tail(teacher, k, T):
    """The full-vocabulary teacher the `tail` policy amounts to: its top-k probabilities, and
    the rest mass r spread over the other tokens in proportion to the student's probabilities."""
    def dist(b, t, q):
        p = _softmax(teacher[b, t].double().tolist(), T)
        top = sorted(range(V), key=lambda v: -p[v])[:k]
        r = 1.0 - sum(p[v] for v in top)
        q_rest = sum(q[v] for v in range(V) if v not in top)
        return [p[v] if v in top else r * q[v] / q_rest for v in range(V)]
    return dist


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("policy,teacher_dist", [
    ("renormalize", _teacher_renormalized), ("tail", _teacher_tail)])
@pytest.mark.parametrize("spec", [s for s in LOSSES if s.kind != "reverse_kl"
                                  and getattr(s, "beta", 0) != 1.0], ids=lambda s: s.kind)
def test_topk_loss_matches_the_full_vocabulary_loss_of_the_policy_teacher(spec, policy,
                                                                           teacher_dist, k):
    """The k + 1 bucket computation equals the divergence over the whole vocabulary against the
    teacher each policy stands for, computed here token by token."""
    student, teacher, labels = _inputs(3)
    ids, logp = _topk(teacher, k, spec.temperature)
    sparse, _ = lm_topk_kd_loss(student, ids, logp, labels, spec, policy)
    ref = _reference(student, teacher_dist(teacher, k, spec.temperature), labels, spec)
    assert sparse.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("spec", LOSSES[:3], ids=IDS[:3])
def test_tail_with_stored_rest_equals_rest_from_the_top_k(spec):
    student, teacher, labels = _inputs(4)
    logp_full = torch.log_softmax(teacher / spec.temperature, dim=-1)
    ids, logp = _topk(teacher, 2, spec.temperature)
    rest = torch.logsumexp(logp_full.scatter(-1, ids, float("-inf")), dim=-1)  # (B, L)
    given, _ = lm_topk_kd_loss(student, ids, logp, labels, spec, "tail", rest_logprob=rest)
    derived, _ = lm_topk_kd_loss(student, ids, logp, labels, spec, "tail")
    assert given.item() == pytest.approx(derived.item(), rel=1e-5)


def test_policies_differ_when_mass_is_missing():
    student, teacher, labels = _inputs(5)
    spec = LOSSES[0]
    ids, logp = _topk(teacher, 2, spec.temperature)
    a, _ = lm_topk_kd_loss(student, ids, logp, labels, spec, "renormalize")
    b, _ = lm_topk_kd_loss(student, ids, logp, labels, spec, "tail")
    assert abs(a.item() - b.item()) > 1e-3
    with pytest.raises(ValueError, match="missing-mass"):
        lm_topk_kd_loss(student, ids, logp, labels, spec, "spread")
