"""Trainers: one module per method, each a ``*Config`` + ``*Trainer`` pair on :mod:`.base`."""

from alignkit.trainers.base import AlignConfig, AlignTrainer
from alignkit.trainers.d2o import D2OConfig, D2OTrainer
from alignkit.trainers.dpo import DPOConfig, DPOTrainer
from alignkit.trainers.npo import NPOConfig, NPOTrainer
from alignkit.trainers.perstep import PerStepConfig, PerStepTrainer
from alignkit.trainers.sft import SFTConfig, SFTTrainer

__all__ = ["AlignConfig", "AlignTrainer", "D2OConfig", "D2OTrainer", "DPOConfig", "DPOTrainer", "NPOConfig", "NPOTrainer", "PerStepConfig", "PerStepTrainer", "SFTConfig", "SFTTrainer"]
