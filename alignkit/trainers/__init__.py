"""Trainers: one module per method, each a ``*Config`` + ``*Trainer`` pair on :mod:`.base`."""

from alignkit.trainers.base import AlignConfig, AlignTrainer
from alignkit.trainers.dpo import DPOConfig, DPOTrainer

__all__ = ["AlignConfig", "AlignTrainer", "DPOConfig", "DPOTrainer"]
