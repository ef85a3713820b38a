"""The per-step negatives pipeline and its baselines, as functions (Setlur et al. 2024, arXiv:2406.14532).

* :func:`build_perstep_records`: problems -> on-policy samples (rollout engine) -> verdicts (verifier) ->
  the distinct incorrect samples (up to ``negatives_per_problem`` per problem) -> their Monte Carlo step
  values (:mod:`alignkit.steps`, one batched generate call) -> per-step records::

      {"prompt", "response", "steps": [...], "values": [Q_0..Q_n], "first_pit": c or None,
       "chosen": a correct solution or None, "chosen_source": "policy" | "solution" | None, ...problem fields}

  ``chosen`` is a distinct on-policy correct sample of the same problem (cycled over the negatives), else
  the gold ``solution``. These are the records :class:`~alignkit.trainers.perstep.PerStepTrainer` reads.
* :func:`train_sft`, :func:`sample_verified`, :func:`greedy_accuracy`: the paper's baselines, SFT on
  positives and RFT (SFT on the model's own verified-correct samples, :func:`alignkit.trainers.sft.rft_records`),
  and the evaluation (greedy decoding, verifier on held-out problems). ``benchmarks/perstep_scaling.py``
  puts them together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from alignkit.negatives import RolloutStats, distinct_completions, sample_rollouts, verify_rollouts
from alignkit.rollout.base import RolloutEngine, SamplingConfig
from alignkit.steps import StepValueCost, estimate_step_values, first_pit

logger = logging.getLogger(__name__)

_DROP = ("completions", "prompt", "response", "steps", "values", "first_pit", "chosen", "chosen_source")


def build_perstep_records(
    engine: RolloutEngine,
    verifier,
    problems: Sequence[dict],
    *,
    tokenizer,
    samples_per_problem: int = 8,
    negatives_per_problem: int = 8,
    sampling: SamplingConfig | None = None,
    value_sampling: SamplingConfig | None = None,
    num_rollouts: int = 4,
    best_of: int = 1,
    split="newline",
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Per-step records for ``problems`` (see the module docstring) and a report
    ``{"rollouts": RolloutStats dict, "step_values": StepValueCost dict, "records": count, ...}``."""
    start = time.perf_counter()
    rows = verify_rollouts(sample_rollouts(engine, problems, samples_per_problem, sampling, keep_token_data=False),
                           verifier, num_workers=num_workers)
    stats = RolloutStats.of(rows, seconds=time.perf_counter() - start)
    logger.info("per-step records: on-policy samples\n%s", stats.format())
    negatives, owners, chosen = [], [], []
    for row in rows:
        distinct = distinct_completions(row["completions"])
        right = [c["text"] for c in distinct if c["correct"]]
        wrong = [c["text"] for c in distinct if not c["correct"]][:negatives_per_problem]
        for k, text in enumerate(wrong):
            negatives.append(text)
            owners.append(row)
            if right:
                chosen.append((right[k % len(right)], "policy"))
            elif isinstance(row.get("solution"), str) and row["solution"].strip():
                chosen.append((row["solution"], "solution"))
            else:
                chosen.append((None, None))
    values, cost = estimate_step_values(
        engine, verifier, owners, negatives, tokenizer=tokenizer, num_rollouts=num_rollouts, best_of=best_of,
        sampling=value_sampling or sampling, split=split, final_values=[0.0] * len(negatives),
        num_workers=num_workers, progress=progress,
    ) if negatives else ([], StepValueCost())
    records = []
    for row, text, sv, (chosen_text, source) in zip(owners, negatives, values, chosen):
        base = {k: v for k, v in row.items() if k not in _DROP}
        records.append({**base, "prompt": row["prompt"], "response": text, "steps": sv.steps, "values": sv.values,
                        "first_pit": first_pit(sv.values), "chosen": chosen_text, "chosen_source": source})
    pits = sum(r["first_pit"] is not None for r in records)
    report = {
        "rollouts": stats.to_dict(),
        "step_values": cost.to_dict(),
        "records": len(records),
        "with_pit": pits,
        "with_chosen": sum(r["chosen"] is not None for r in records),
        "seconds": time.perf_counter() - start,
    }
    logger.info("per-step records: %d negatives (%d with a first pit) from %d problems; %s", len(records), pits,
                len(problems), cost.format())
    return records, report


# ------------------------------------------------------------------------------------ baselines


def sample_verified(model, tokenizer, problems: Sequence[dict], n: int, sampling: SamplingConfig, verifier, *,
                    batch_size: int = 256) -> list[dict]:
    """``n`` samples per problem from ``model`` (hf engine), verified: rollout rows with verdicts."""
    from alignkit.rollout.hf import HFEngine

    engine = HFEngine(model, tokenizer, batch_size=batch_size, progress=False)
    return verify_rollouts(sample_rollouts(engine, problems, n, sampling, keep_token_data=False), verifier)


def greedy_accuracy(model, tokenizer, problems: Sequence[dict], verifier=None, *, max_new_tokens: int = 64,
                    batch_size: int = 256) -> float:
    """Share of ``problems`` whose greedy completion the verifier (default ``math``) accepts."""
    from alignkit.verifiers import get_verifier

    verifier = verifier or get_verifier("math")
    rows = sample_verified(model, tokenizer, problems, 1, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                           verifier, batch_size=batch_size)
    return RolloutStats.of(rows).accuracy


def train_sft(model, tokenizer, records: Sequence[dict], output_dir: str, *, max_steps: int, batch_size: int = 32,
              learning_rate: float = 3e-3, warmup_steps: int = 20, seed: int = 0, **config):
    """SFT of ``model`` on (prompt, response) records (cosine schedule); returns the trained model."""
    from alignkit.trainers.sft import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
                     learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=warmup_steps, seed=seed,
                     save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=50,
                     max_length=256, **config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=list(records), processing_class=tokenizer)
    trainer.train()
    return trainer.model


def rft_finetune(model, tokenizer, problems: Sequence[dict], output_dir: str, *, samples_per_problem: int = 4,
                 sampling: SamplingConfig | None = None, verifier=None, include_gold: bool = True, max_steps: int = 150,
                 learning_rate: float = 5e-4, **train_kwargs):
    """Rejection-sampling fine-tuning (the paper's RFT baseline): sample ``samples_per_problem`` answers per
    problem from ``model``, keep the distinct verified-correct ones (plus the gold solutions if
    ``include_gold``) and fine-tune ``model`` on them. Returns ``(model, number of self-generated records)``."""
    from alignkit.trainers.sft import rft_records, sft_records
    from alignkit.verifiers import get_verifier

    verifier = verifier or get_verifier("math")
    sampling = sampling or SamplingConfig(temperature=1.0, max_new_tokens=64, seed=0)
    rows = sample_verified(model, tokenizer, problems, samples_per_problem, sampling, verifier)
    self_generated = rft_records(rows)
    records = (sft_records(problems) if include_gold else []) + self_generated
    model = train_sft(model, tokenizer, records, output_dir, max_steps=max_steps, learning_rate=learning_rate,
                      **train_kwargs)
    return model, len(self_generated)
