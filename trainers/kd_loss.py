"""Knowledge-distillation losses (Hinton et al. 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,  # (B, C), any float dtype (bf16 under mixed precision)
    teacher_logits: torch.Tensor,  # (B, C)
    labels: torch.Tensor,  # (B,) int64
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    Softmaxes run in float32 whatever the logits' dtype: bf16 has 8 bits of mantissa, too few for
    the small probabilities that carry the teacher's "dark knowledge". T^2 keeps the soft term's
    gradient scale independent of T. The KL is averaged over the batch (`batchmean`), which is the
    true KL per sample. Returns the loss and its parts (detached) for logging.
    """
    s = student_logits.float()
    t = teacher_logits.float()
    log_p_student = F.log_softmax(s / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)  # (B, C)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    soft = kl * temperature**2
    hard = F.cross_entropy(s, labels)
    loss = alpha * soft + (1.0 - alpha) * hard
    return loss, {"kd": soft.detach(), "ce": hard.detach()}
