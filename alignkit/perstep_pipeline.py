"""The per-step negatives pipeline's baselines, as functions (Setlur et al. 2024, arXiv:2406.14532).

* :func:`alignkit.steps.build_perstep_records` (re-exported here) builds the per-step records from problems;
* :func:`train_sft`, :func:`sample_verified`, :func:`greedy_accuracy`: the paper's baselines, SFT on
  positives and RFT (SFT on the model's own verified-correct samples, :func:`alignkit.trainers.sft.rft_records`),
  and the evaluation (greedy decoding, verifier on held-out problems). ``benchmarks/perstep_scaling.py``
  puts them together.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alignkit.negatives import RolloutStats, sample_rollouts, verify_rollouts
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.hf import HFEngine
from alignkit.steps import build_perstep_records  # noqa: F401  (re-exported: the pipeline's first stage)
from alignkit.trainers.sft import finetune, rft_records, sft_records
from alignkit.verifiers import get_verifier

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ baselines


def sample_verified(model, tokenizer, problems: Sequence[dict], n: int, sampling: SamplingConfig, verifier, *,
                    batch_size: int = 256) -> list[dict]:
    """``n`` samples per problem from ``model`` (hf engine), verified: rollout rows with verdicts."""
    engine = HFEngine(model, tokenizer, batch_size=batch_size, progress=False)
    return verify_rollouts(sample_rollouts(engine, problems, n, sampling, keep_token_data=False), verifier)


def greedy_accuracy(model, tokenizer, problems: Sequence[dict], verifier=None, *, max_new_tokens: int = 64,
                    batch_size: int = 256) -> float:
    """Share of ``problems`` whose greedy completion the verifier (default ``math``) accepts."""
    verifier = verifier or get_verifier("math")
    rows = sample_verified(model, tokenizer, problems, 1, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                           verifier, batch_size=batch_size)
    return RolloutStats.of(rows).accuracy


def train_sft(model, tokenizer, records: Sequence[dict], output_dir: str, *, max_steps: int, batch_size: int = 32,
              learning_rate: float = 3e-3, warmup_steps: int = 20, seed: int = 0, **config):
    """SFT of ``model`` on (prompt, response) records (cosine schedule, :func:`alignkit.trainers.sft.finetune`);
    returns the trained model."""
    finetune(model, tokenizer, records, output_dir, max_steps=max_steps, batch_size=batch_size,
             learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=warmup_steps, seed=seed,
             use_cpu=True, logging_steps=50, **config)
    return model


def rft_finetune(model, tokenizer, problems: Sequence[dict], output_dir: str, *, samples_per_problem: int = 4,
                 sampling: SamplingConfig | None = None, verifier=None, include_gold: bool = True, max_steps: int = 150,
                 learning_rate: float = 5e-4, **train_kwargs):
    """Rejection-sampling fine-tuning (the paper's RFT baseline): sample ``samples_per_problem`` answers per
    problem from ``model``, keep the distinct verified-correct ones (plus the gold solutions if
    ``include_gold``) and fine-tune ``model`` on them. Returns ``(model, number of self-generated records)``."""
    verifier = verifier or get_verifier("math")
    sampling = sampling or SamplingConfig(temperature=1.0, max_new_tokens=64, seed=0)
    rows = sample_verified(model, tokenizer, problems, samples_per_problem, sampling, verifier)
    self_generated = rft_records(rows)
    records = (sft_records(problems) if include_gold else []) + self_generated
    model = train_sft(model, tokenizer, records, output_dir, max_steps=max_steps, learning_rate=learning_rate,
                      **train_kwargs)
    return model, len(self_generated)
