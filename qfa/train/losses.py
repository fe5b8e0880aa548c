"""Per-subnet training loss: label-smoothed cross-entropy plus knowledge distillation (spec 5)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def soft_cross_entropy(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over the batch of ``-sum_k softmax(t/T)_k * log_softmax(s/T)_k``, times ``T^2``.

    The ``T^2`` factor (Hinton et al.) keeps the gradient scale independent of ``T``; at the
    published ``T = 1`` this is the Once-for-All soft-target cross-entropy. Computed in float32.
    """
    if logits.shape != teacher_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} differ")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(q * log_p).sum(dim=1).mean() * (temperature * temperature)


class DistillationLoss(nn.Module):
    """``CE(label_smoothing) + kd_ratio * soft_CE(teacher, T)``; without teacher logits, CE only."""

    def __init__(self, label_smoothing: float = 0.1, kd_ratio: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if kd_ratio < 0:
            raise ValueError(f"kd_ratio must be >= 0, got {kd_ratio}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.label_smoothing, self.kd_ratio, self.temperature = label_smoothing, kd_ratio, temperature

    def forward(self, logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        if teacher_logits is not None and self.kd_ratio > 0:
            loss = loss + self.kd_ratio * soft_cross_entropy(logits, teacher_logits, self.temperature)
        return loss

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, kd_ratio={self.kd_ratio}, temperature={self.temperature}"
