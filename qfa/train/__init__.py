"""Supernet training: the sandwich + random-subnet step with distillation, its optimiser and schedule,
checkpoints that resume exactly, and data-parallel training under ``torchrun``.

Entry points: :class:`Trainer` (used by ``qfa train``) and the helpers it is built from.
"""

from .ckpt import CheckpointError, load_training_state, save_atomic
from .losses import DistillationLoss, soft_cross_entropy
from .optim import build_optimizer, phased_warmup_cosine, warmup_cosine_schedule

__all__ = [
    "CheckpointError",
    "DistillationLoss",
    "build_optimizer",
    "load_training_state",
    "phased_warmup_cosine",
    "save_atomic",
    "soft_cross_entropy",
    "warmup_cosine_schedule",
]
