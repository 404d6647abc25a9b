"""Token-level distillation losses for language models.

Shapes: logits are (B, L, V) (batch, sequence, vocabulary), aligned so that position t holds the
distribution over the token at t + 1 (what a causal LM's forward returns); `labels` are (B, L)
next-token ids with -100 where there is no target. The distillation term is averaged over the
tokens whose label is not -100, the same tokens the cross-entropy uses, so padding and each
sequence's last position contribute nothing (`next_token_labels` builds such labels from
`input_ids` and the attention mask).

    loss = alpha * T^2 * mean_tokens D(p_teacher, p_student) + (1 - alpha) * CE(student, labels)

where p = softmax(logits / T) and D is one of (p_t teacher, p_s student, per token):

    forward KL   KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))
    reverse KL   KL(p_s || p_t)
    JSD(beta)    beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = beta p_t + (1 - beta) p_s
                 (Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 1).
                 beta = 0.5 is the symmetric JSD. JSD(beta) itself goes to 0 at both ends; as in
                 GKD (and TRL's implementation of it), beta = 0 is defined as forward KL and
                 beta = 1 as reverse KL, the limits of JSD(beta) / beta and JSD(beta) / (1 - beta).

T^2 keeps the gradient's scale independent of T (Hinton et al. 2015). Softmaxes run in float32
whatever the logits' dtype (bf16 has too few mantissa bits for the small probabilities).

Top-k teacher (cached, or sent by the teacher replicas): per token the teacher's k most probable
ids, their log-probabilities at temperature T, and (optionally) the log of the mass outside them,
`rest`. Both policies compare two distributions over k + 1 buckets: the k teacher ids and one
bucket for every other token. The student's buckets are exact: its log-probabilities at the k ids
and the log of its total probability outside them (a logsumexp over the other V - k logits, not
1 - sum, which would cancel catastrophically when the top-k hold nearly everything).

    renormalize  teacher = (p_1 .. p_k) / sum_i p_i, and 0 in the rest bucket: the teacher is
                 taken to give every token outside its top-k probability 0. This is then the
                 exact full-vocabulary divergence against that renormalized teacher (for forward
                 KL: sum_i p^_i (log p^_i - log q_i) over the k ids), and it pushes the student's
                 mass outside the top-k to 0. Reverse KL is infinite under this policy (the
                 student gives the rest some mass, the teacher none); specs/lm.py refuses it.
    tail         teacher = (p_1 .. p_k, r) with r the teacher's probability outside its top-k
                 (`rest`; when not given, 1 - sum_i p_i, which is only as exact as the given
                 probabilities: the token cache stores `rest`; 0 when k = V), renormalized over
                 the k + 1 buckets to absorb rounding in stored values. This equals the full-vocabulary divergence
                 against a teacher whose rest mass r is spread over the other tokens in
                 proportion to the student's own probabilities there (then log p/q is constant
                 over the rest and the rest's terms sum to one bucket's), and it is a lower bound
                 on the divergence against any teacher with those top-k probabilities (the
                 data-processing inequality).

With k = V both equal the full loss. Logs are clamped at LOG_FLOOR so that an empty bucket
(probability exactly 0, log = -inf) gives 0 * finite = 0 instead of NaN, in values and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from specs.lm import ForwardKL, GeneralizedJSD, ReverseKL

IGNORE_INDEX = -100
# below any float32 log-probability that is not -inf (exp underflows to 0 below about -104),
# so clamping changes only empty buckets, whose terms are then 0 * (finite) = 0
LOG_FLOOR = -1.0e4

TokenLoss = ForwardKL | ReverseKL | GeneralizedJSD


def next_token_labels(input_ids: torch.Tensor,  # (B, L) int
                      attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
                      ) -> torch.Tensor:
    """(B, L) int64 labels for logits at positions 0..L-1: labels[:, t] = input_ids[:, t + 1],
    -100 at the last position and wherever the target token is padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        target_is_real = torch.zeros_like(labels, dtype=torch.bool)
        target_is_real[:, :-1] = attention_mask[:, 1:].bool()
        labels = labels.masked_fill(~target_is_real, IGNORE_INDEX)
    return labels


def divergence(log_p_teacher: torch.Tensor,  # (..., n) log-probabilities, float32
               log_p_student: torch.Tensor,  # (..., n)
               loss: TokenLoss) -> torch.Tensor:
    """Per-position divergence (...,) between two categorical distributions given as
    log-probabilities over the same n outcomes (the vocabulary, or top-k buckets)."""
    lt = log_p_teacher.clamp_min(LOG_FLOOR)
    ls = log_p_student.clamp_min(LOG_FLOOR)
    beta = loss.beta if isinstance(loss, GeneralizedJSD) else None
    if isinstance(loss, ForwardKL) or beta == 0.0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if isinstance(loss, ReverseKL) or beta == 1.0:
        return (ls.exp() * (ls - lt)).sum(-1)
    # log m = log(beta p_t + (1 - beta) p_s), computed in log space
    log_m = torch.logsumexp(
        torch.stack([lt + math.log(beta), ls + math.log(1.0 - beta)]), dim=0
    ).clamp_min(LOG_FLOOR)
    kl_t = (lt.exp() * (lt - log_m)).sum(-1)
    kl_s = (ls.exp() * (ls - log_m)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def _masked_mean(per_token: torch.Tensor,  # (B, L)
                 labels: torch.Tensor) -> torch.Tensor:  # (B, L)
    keep = labels != IGNORE_INDEX
    count = keep.sum()
    # no target at all (an all-padding batch): 0 with a gradient path, not 0 / 0
    return (per_token * keep).sum() / count.clamp_min(1)


def _mix(student_logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor,
         loss: TokenLoss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    s = student_logits.float()
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    ce = ce / (labels != IGNORE_INDEX).sum().clamp_min(1)
    soft = soft * loss.temperature**2
    total = loss.alpha * soft + (1.0 - loss.alpha) * ce
    return total, {"kd": soft.detach(), "ce": ce.detach()}


def lm_kd_loss(student_logits: torch.Tensor,  # (B, L, V), any float dtype
               teacher_logits: torch.Tensor,  # (B, L, V)
               labels: torch.Tensor,  # (B, L) int64, -100 = no target
               loss: TokenLoss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full-vocabulary token distillation (see the module docstring). Returns the loss and its
    parts (the T^2-scaled divergence `kd` and `ce`, detached) for logging."""
    T = loss.temperature
    log_ps = F.log_softmax(student_logits.float() / T, dim=-1)  # (B, L, V)
    log_pt = F.log_softmax(teacher_logits.float() / T, dim=-1)  # (B, L, V)
    per_token = divergence(log_pt, log_ps, loss)  # (B, L)
    return _mix(student_logits, labels, _masked_mean(per_token, labels), loss)


def topk_buckets(student_logits: torch.Tensor,  # (B, L, V)
                 topk_ids: torch.Tensor,  # (B, L, k) int
                 topk_logprobs: torch.Tensor,  # (B, L, k) teacher log-probs at T
                 rest_logprob: torch.Tensor | None,  # (B, L) log teacher mass outside, or None
                 temperature: float,
                 missing_mass: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities over the k + 1 buckets (B, L, k + 1) each, the last
    bucket being every token outside the teacher's top-k (see the module docstring)."""
    ids = topk_ids.long()
    log_ps_full = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, L, V)
    log_ps_top = log_ps_full.gather(-1, ids)  # (B, L, k)
    # the student's mass outside the teacher's ids, exactly: logsumexp over the other logits.
    # The ids' places are filled with LOG_FLOOR, not -inf: exp(LOG_FLOOR) is exactly 0 in
    # float32, so the sum is unchanged, and with k = V the result is a finite "empty" bucket
    # whose gradient is 0 (a logsumexp over all -inf has a NaN gradient)
    outside = log_ps_full.scatter(-1, ids, LOG_FLOOR)  # (B, L, V)
    log_ps_rest = torch.logsumexp(outside, dim=-1, keepdim=True)  # (B, L, 1)
    log_ps = torch.cat([log_ps_top, log_ps_rest], dim=-1)  # (B, L, k + 1)

    lt_top = topk_logprobs.float()  # (B, L, k)
    if missing_mass == "renormalize":
        lt_top = lt_top - torch.logsumexp(lt_top, dim=-1, keepdim=True)
        lt_rest = torch.full_like(lt_top[..., :1], float("-inf"))
        log_pt = torch.cat([lt_top, lt_rest], dim=-1)
    elif missing_mass == "tail":
        if ids.shape[-1] == student_logits.shape[-1]:
            # the top-k is the whole vocabulary: nothing is missing, whatever rounding says (a
            # residue of 1e-8 against the student's empty bucket would weigh in as 1e-8 * 1e4)
            rest_logprob = torch.full_like(lt_top[..., 0], float("-inf"))
        elif rest_logprob is None:
            # 1 - sum p_i, in float64 to soften the cancellation; 0 (-inf) if rounding made it < 0
            mass = 1.0 - lt_top.double().exp().sum(-1)
            rest_logprob = torch.where(mass > 0, mass.clamp_min(1e-300).log(),
                                       torch.full_like(mass, float("-inf"))).float()
        log_pt = torch.cat([lt_top, rest_logprob.float()[..., None]], dim=-1)
        log_pt = log_pt - torch.logsumexp(log_pt, dim=-1, keepdim=True)  # absorb rounding
    else:
        raise ValueError(f"unknown missing-mass policy {missing_mass!r}")
    return log_pt, log_ps


def lm_topk_kd_loss(student_logits: torch.Tensor,  # (B, L, V)
                    topk_ids: torch.Tensor,  # (B, L, k) int
                    topk_logprobs: torch.Tensor,  # (B, L, k) teacher log-probs at temperature T
                    labels: torch.Tensor,  # (B, L) int64, -100 = no target
                    loss: TokenLoss,
                    missing_mass: str,
                    rest_logprob: torch.Tensor | None = None,  # (B, L)
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token distillation against a top-k teacher (cached or sent by the replicas); the missing
    probability mass is handled by `missing_mass` (`renormalize` or `tail`, see the module
    docstring). The teacher's log-probabilities must be at `loss.temperature`."""
    log_pt, log_ps = topk_buckets(student_logits, topk_ids, topk_logprobs, rest_logprob,
                                  loss.temperature, missing_mass)
    per_token = divergence(log_pt, log_ps, loss)  # (B, L)
    return _mix(student_logits, labels, _masked_mean(per_token, labels), loss)
