"""Hinton knowledge-distillation loss, in the assignment's convention (alpha on the soft term)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Batch-mean distillation loss (Hinton, Vinyals & Dean 2015)::

        L = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

    `alpha` weights the SOFT (teacher) term, as in the assignment: alpha = 0 is plain
    cross-entropy, alpha = 1 pure distillation. torchdistill's `KDLoss` puts its alpha on the
    hard term instead (theirs = 1 - ours; its CIFAR-10 sample alpha 0.9, T 4 is ours 0.1, T 4).
    T^2 keeps the soft term's gradients, which shrink as 1/T^2, on the scale of the hard term's.

    Args:
        student_logits: (B, C) raw student outputs; gradients flow into them.
        teacher_logits: (B, C) raw teacher outputs (not softened); detached, the teacher is frozen.
        targets: (B,) class indices.
        alpha: weight of the soft term, in [0, 1].
        temperature: T > 0, applied to both distributions of the soft term only.
        label_smoothing: passed to the hard term's `F.cross_entropy`.

    Returns a float32 scalar for float32 or lower-precision logits (bf16/fp16 softmax at T = 10
    loses the small probabilities the soft term is about), float64 for float64 logits. alpha == 0 returns exactly
    `F.cross_entropy(s, y)` and alpha == 1 exactly `T^2 * KL`: the other term is not computed.
    The value's scale depends on T (KL, not soft cross-entropy, so it is 0 when the student
    matches the teacher); rank trials on validation accuracy, never on this loss.
    """
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}.")
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be (batch, classes), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"targets must be ({student_logits.shape[0]},) class indices, got {tuple(targets.shape)}."
        )

    student = at_least_float32(student_logits)
    if alpha == 0.0:
        return F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    teacher = teacher_logits.detach().to(student.dtype)
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",  # 'mean' would also divide by the number of classes
        log_target=True,
    ) * (temperature**2)
    if alpha == 1.0:
        return soft
    hard = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    return (1.0 - alpha) * hard + alpha * soft


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or as it is when it is float64 (how tests measure float32 rounding)."""
    return x if x.dtype == torch.float64 else x.float()
