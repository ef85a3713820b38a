"""Per-step negatives: ``PerStepConfig`` + ``PerStepTrainer`` (Setlur et al. 2024, arXiv:2406.14532).

An incorrect response ŷ of the starting (SFT) model is split into steps ŷ_1..ŷ_n; each prefix gets a Monte
Carlo value Q_i (success rate of continuations from it, best-of-K in the paper) and each step an advantage
A_i = Q_i − Q_{i−1} (:mod:`alignkit.steps`). Two ways to learn from them (``mode``):

``first_pit_dpo`` (the paper's per-step DPO, §5)
    one DPO pair per negative: (x, a correct solution y⁺ as chosen, the prefix ŷ_1..ŷ_c through the first
    pit c as rejected), loss −log σ(β·(r(y⁺) − r(ŷ_1..ŷ_c))), r = log πθ − log π_ref, the SFT (starting)
    model as reference (:func:`alignkit.losses.dpo_loss`). The rejected tokens are the prefix's tokens as
    they appear in the full response (no end-of-sequence token is added after a partial response).
    A negative without a pit (no step lowers the value, e.g. all Q = 0) is skipped (``no_pit='skip'``) or
    used whole (``'full'``: plain DPO on that pair).
``advantage_weighted`` (the equivalent advantage-weighted RL objective, §6)
    every token t of a negative response gets the weight w_t = ``advantage_scale``·A_i of its step i
    (and the tokens of the chosen solution the constant ``positive_weight``, if > 0); the loss
    (:func:`alignkit.losses.advantage_weighted_loss`) is
    −(1/T)·Σ_t w_t·log πθ(y_t | x, y_<t) + ``kl_coef``·(1/T)·Σ_t k3_t, T = all response tokens of the
    micro-batch, k3 the per-token KL(πθ ‖ π_ref) estimate; ``kl_coef`` = 0 needs no reference.

Records (``train_dataset`` / ``eval_dataset``):

* per-step records (JSONL path or list of dicts): ``prompt``, ``response`` (text), ``values``
  ([Q_0..Q_n], numbers in [0, 1]), optional ``steps`` (texts that concatenate to ``response``; default:
  ``step_split`` segmentation, which must give n steps), optional ``chosen`` (needed by
  ``first_pit_dpo``). A bad row raises :class:`~alignkit.data.records.RecordError` naming file, row, field.
* problem records (``prompt``, ``answer``, optional ``solution``): the trainer builds per-step records
  itself with the starting model (:func:`alignkit.steps.build_perstep_records`:
  ``rollout_n`` samples per problem, up to ``negatives_per_problem`` distinct incorrect ones, M =
  ``num_rollouts`` × K = ``best_of`` continuations per distinct prefix, the recipe's ``verifier``), before
  training, and caches them as JSONL in ``records_cache_dir`` (default ``OUTPUT_DIR/perstep_records``)
  under a fingerprint of model + weights, problems, sampling and settings: a resumed or repeated run
  does not sample again. The build report (sampling cost) is saved next to them.

Logged: first_pit_dpo: ``loss/dpo`` (+ ``loss/sft``), ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
``steps/rejected_share`` (mean share of the response's steps kept in the rejected prefix);
advantage_weighted: ``loss/aw`` (the weighted NLL), ``kl/ref`` (when ``kl_coef`` > 0),
``advantages/mean`` (mean step advantage over the tokens of negatives), ``advantages/negative_share``
(share of their tokens with a negative weight), ``logps/negative_steps`` and ``logps/positive_steps``
(mean token log-prob where w < 0 and w > 0).
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from alignkit.cache import CacheEntry, cached, json_digest, model_key, read_jsonl, write_jsonl
from alignkit.data.loading import read_json_lines
from alignkit.data.records import RecordError, check_step_values, message_text, validate_record
from alignkit.data.tokenize import prefix_token_ends, tokenize_group, truncate_group
from alignkit.losses import DPO_LOSS_TYPES, advantage_weighted_loss
from alignkit.rollout.setup import RolloutSetup
from alignkit.steps import advantages, build_perstep_records, first_pit, split_steps
from alignkit.trainers.base import AlignConfig, AlignTrainer
from alignkit.trainers.dpo import pair_dpo_loss

logger = logging.getLogger(__name__)

PERSTEP_MODES = ("first_pit_dpo", "advantage_weighted")
NO_PIT = ("skip", "full")
CACHE_VERSION = 2


@dataclass
class PerStepConfig(AlignConfig):
    """Per-step negatives settings; sampling settings are the recipe's ``rollout_*`` / ``verifier`` keys."""

    mode: str = field(default="first_pit_dpo", metadata={"help": f"One of {PERSTEP_MODES}."})
    beta: float = field(default=0.1, metadata={"help": "first_pit_dpo: DPO β."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"first_pit_dpo: one of {DPO_LOSS_TYPES}."})
    sft_weight: float = field(default=0.0, metadata={"help": "first_pit_dpo: weight of an NLL term on the chosen."})
    no_pit: str = field(default="skip", metadata={"help": "first_pit_dpo, negatives without a pit: 'skip' or 'full'."})
    advantage_scale: float = field(default=1.0, metadata={"help": "advantage_weighted: w_t = scale·A_i."})
    positive_weight: float = field(default=0.0, metadata={"help": "advantage_weighted: weight of the chosen's tokens (0: none)."})
    kl_coef: float = field(default=0.05, metadata={"help": "advantage_weighted: weight of the per-token KL to the reference."})
    negatives_per_problem: int = field(default=8, metadata={"help": "Distinct incorrect samples kept per problem."})
    num_rollouts: int = field(default=4, metadata={"help": "M: continuations per prefix for Q_i."})
    best_of: int = field(default=1, metadata={"help": "K: a continuation succeeds if any of K samples does (5 in the paper)."})
    step_split: str = field(default="newline", metadata={"help": "newline, step, sentence or a regex ending steps."})
    records_cache_dir: str | None = field(default=None, metadata={"help": "Built per-step records (default OUTPUT_DIR/perstep_records)."})
    learning_rate: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in PERSTEP_MODES:
            raise ValueError(f"mode must be one of {PERSTEP_MODES}, got {self.mode!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.no_pit not in NO_PIT:
            raise ValueError(f"no_pit must be one of {NO_PIT}, got {self.no_pit!r}")
        if self.negatives_per_problem < 1 or self.num_rollouts < 1 or self.best_of < 1:
            raise ValueError("negatives_per_problem, num_rollouts and best_of must be >= 1")
        if self.kl_coef < 0 or self.positive_weight < 0:
            raise ValueError("kl_coef and positive_weight must be >= 0")
        if self.mode == "first_pit_dpo" and self.reference == "none":
            raise ValueError("first_pit_dpo compares with the reference (SFT) model; reference='none' is not possible")
        if self.mode == "advantage_weighted" and self.kl_coef > 0 and self.reference == "precomputed":
            raise ValueError("advantage_weighted with kl_coef > 0 needs per-token reference log-probs: use "
                             "reference='model' or 'adapter' (or kl_coef=0)")


# ------------------------------------------------------------------------------------ records


def is_perstep_record(record) -> bool:
    return isinstance(record, dict) and "values" in record and "response" in record


def record_steps(record: dict, *, source: str, row: int, split="newline", need_chosen: bool = False) -> list[str]:
    """The step texts of a valid per-step record (``perstep`` kind, :mod:`alignkit.data.records`): its
    ``steps``, else ``split`` segmentation of its response, which must give one step fewer than ``values``.
    Raises :class:`RecordError` (source, row, field)."""
    steps = record.get("steps")
    if steps is None:
        steps = split_steps(record["response"], split)
        check_step_values(record["values"], len(steps), source=source, row=row)
    if need_chosen and record.get("chosen") is None:
        raise RecordError(source, row, "chosen", "first_pit_dpo needs a correct solution as chosen")
    return steps


class PerStepTrainer(AlignTrainer):
    """Per-step negatives; see the module docstring. Extra arguments as for
    :class:`~alignkit.trainers.d2o.D2OTrainer`: ``rollout_args`` (the recipe's ``rollout_*`` / ``verifier``
    keys) or ``rollout_engine`` and ``verifier`` objects, used only when records are built from problems."""

    record_kind = ("perstep", "problems")
    extra_fields = {"token_weights": "token", "is_negative": "response", "rejected_share": "group"}
    uses_rollout_args = True
    args: PerStepConfig

    def __init__(self, model, args: PerStepConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 ref_model=None, peft_config=None, callbacks=None, rollout_args=None, rollout_engine=None,
                 verifier=None, **kwargs):
        self.rollout = RolloutSetup(rollout_args, processing_class, engine=rollout_engine, seed=args.seed,
                                    verifier=verifier)
        self.build_reports: dict[str, dict] = {}
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, ref_model=ref_model, peft_config=peft_config,
                         callbacks=callbacks, **kwargs)

    def needs_reference(self, args: PerStepConfig) -> bool:
        # the advantage-weighted form without a KL term has no reference: no frozen copy
        return not (args.mode == "advantage_weighted" and args.kl_coef == 0)

    # ----------------------------------------------------------------------------------------- data

    def build_split(self, data, name):
        """Per-step records (read once, validated: errors name file, row and field), or problems turned into
        per-step records with the starting model (cached), -> training groups -> tokens (+ reference log-probs)."""
        if hasattr(data, "column_names") and "prompt_ids" in data.column_names:
            return super().build_split(data, name)
        numbered, kind, source = self._numbered_records(data, name)
        if kind == "problems":
            records = self.build_records([row for _, row in numbered], name)
            numbered = list(enumerate(records, start=1))
            source = f"<{name} records built from problems>"
        need_chosen = self.args.mode == "first_pit_dpo"
        checked = [{**row, "steps": record_steps(row, source=source, row=line, split=self.args.step_split,
                                                  need_chosen=need_chosen and kind == "perstep")}
                   for line, row in numbered]
        groups = self.training_groups(checked)
        if not groups:
            raise RecordError(source, None, None,
                              f"no training groups for mode {self.args.mode!r} (no negatives with a first pit / a chosen)")
        return self.with_reference_logps(self._tokenize(groups, name), name)

    def _numbered_records(self, data, name) -> tuple[list[tuple[int, dict]], str, str]:
        """``((row, record) pairs, kind, source)``: the input read once and validated as per-step records or
        problems; for a JSON Lines file the rows are its line numbers."""
        if isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() in (".jsonl", ".ndjson"):
            source = str(data)
            numbered = read_json_lines(data)
            if not numbered:
                raise RecordError(source, None, None, "no records")
            kind = "perstep" if is_perstep_record(numbered[0][1]) else "problems"
            for line, row in numbered:
                validate_record(row, kind, source=source, row=line)
            return numbered, kind, source
        records, kind = self.load_split(data, name)
        source = str(data) if isinstance(data, (str, os.PathLike)) else f"<{name} dataset>"
        return list(enumerate(records.to_list(), start=1)), kind, source

    def training_groups(self, records: list[dict]) -> list[dict]:
        """Groups to tokenize: ``{"prompt", "chosen", "steps", "weights" | "pit"}``."""
        args, out, skipped = self.args, [], 0
        for r in records:
            steps = r["steps"]
            if args.mode == "first_pit_dpo":
                pit = first_pit(r["values"])
                if pit is None:
                    if args.no_pit == "skip":
                        skipped += 1
                        continue
                    pit = len(steps)
                if r.get("chosen") is None:
                    skipped += 1
                    continue
                out.append({"prompt": r["prompt"], "chosen": message_text(r["chosen"]), "steps": steps, "pit": pit})
            else:
                adv = [args.advantage_scale * a for a in advantages(r["values"])]
                chosen = r.get("chosen") if args.positive_weight > 0 else None
                out.append({"prompt": r["prompt"], "chosen": None if chosen is None else message_text(chosen),
                            "steps": steps, "weights": adv})
        if skipped:
            logger.info("per-step: %d of %d records give no %s pair (no first pit or no chosen)", skipped,
                        len(records), args.mode)
        return out

    def _tokenize(self, groups: list[dict], name: str):
        """Token groups: [chosen, rejected prefix through the pit] (first_pit_dpo) or [chosen?, negative] with
        per-token step weights (advantage_weighted); truncated as every group is (:func:`truncate_group`)."""
        tokenizer, args = self.tokenizer, self.args
        source = f"<{name} dataset>"
        rows = []
        for index, g in enumerate(groups):
            response = "".join(g["steps"])
            responses = ([g["chosen"]] if g.get("chosen") is not None else []) + [response]
            full = tokenize_group(tokenizer, g["prompt"], responses, source=source, row=index + 1)
            prompt_ids, response_ids = full["prompt_ids"], full["response_ids"]
            p = len(prompt_ids)
            ends = prefix_token_ends(tokenizer, g["prompt"], g["steps"], prompt_ids + response_ids[-1], p)
            if args.mode == "first_pit_dpo":
                cut = ends[g["pit"] - 1]
                if cut <= 0:
                    continue  # the pit prefix has no token of its own
                response_ids = [response_ids[0], response_ids[1][:cut]]
                extra = {"rejected_share": g["pit"] / len(g["steps"])}
            else:
                step_of = [bisect_right(ends, k) for k in range(len(response_ids[-1]))]
                neg = [float(g["weights"][min(s, len(g["weights"]) - 1)]) for s in step_of]
                weights = ([[float(args.positive_weight)] * len(response_ids[0])] if len(responses) == 2 else []) + [neg]
                extra = {"token_weights": weights, "is_negative": [0.0] * (len(responses) - 1) + [1.0]}
            prompt_ids, response_ids = truncate_group(prompt_ids, response_ids, max_length=args.max_length,
                                                      max_prompt_length=args.max_prompt_length, source=source,
                                                      row=index + 1)
            if "token_weights" in extra:
                extra["token_weights"] = [w[: len(r)] for w, r in zip(extra["token_weights"], response_ids)]
            rows.append({"prompt_ids": prompt_ids, "response_ids": response_ids, **extra})
        if not rows:
            raise RecordError(source, None, None, "no group has tokens to train on")
        return datasets.Dataset.from_list(rows)

    # -------------------------------------------------------------------------------------- building

    def records_cache_key(self, problems: list[dict]) -> dict:
        """What the built records depend on: the starting model (full weights digest), the problems, the
        sampling settings and seed, the backend, the verifier and the building settings."""
        model = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else self.model)
        setup, args = self.rollout, self.args
        return {
            "kind": "perstep_records",
            "version": CACHE_VERSION,
            **model_key(model),
            "problems": json_digest([[p["prompt"], p.get("answer"), p.get("tests")] for p in problems]),
            "count": len(problems),
            "sampling": setup.sampling(0).to_dict(),
            "value_sampling": setup.sampling(1).to_dict(),
            "backend": setup.backend,
            "verifier": setup.verifier_name,
            "samples_per_problem": setup.args.rollout_n,
            "negatives_per_problem": args.negatives_per_problem,
            "num_rollouts": args.num_rollouts,
            "best_of": args.best_of,
            "step_split": args.step_split,
        }

    def build_records(self, problems: list[dict], name: str) -> list[dict]:
        """Per-step records of ``problems`` from the starting model: from the cache, else sampled by the main
        process and cached (:mod:`alignkit.cache`); every process gets the same records."""
        directory = self.args.records_cache_dir or os.path.join(self.args.output_dir, "perstep_records")
        entry = CacheEntry.named(directory, name, self.records_cache_key(problems), ".jsonl")
        report = {}

        def build():
            model = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else self.model)
            records, built = build_perstep_records(
                self.rollout.engine(model), self.rollout.verifier(), problems, tokenizer=self.tokenizer,
                samples_per_problem=self.rollout.args.rollout_n, negatives_per_problem=self.args.negatives_per_problem,
                sampling=self.rollout.sampling(0), value_sampling=self.rollout.sampling(1),
                num_rollouts=self.args.num_rollouts, best_of=self.args.best_of, split=self.args.step_split,
                num_workers=self.rollout.args.verifier_num_workers,
            )
            report.update(built)
            return records

        records = cached(entry, build, read=read_jsonl, write=write_jsonl, extra=lambda: {"report": report},
                         what=f"per-step records ({name})")
        stored = entry.stored()
        self.build_reports[name] = (stored or {}).get("report", report)
        return records

    # ----------------------------------------------------------------------------------------- loss

    def compute_batch_loss(self, model, batch):
        if self.args.mode == "first_pit_dpo":
            return self._dpo_loss(model, batch)
        return self._aw_loss(model, batch)

    def _dpo_loss(self, model, batch):
        a = self.args
        loss, metrics = pair_dpo_loss(self.score(model, batch), self.reference_logps(model, batch), beta=a.beta,
                                      loss_type=a.loss_type, sft_weight=a.sft_weight)
        if "rejected_share" in batch:
            metrics["steps/rejected_share"] = batch["rejected_share"].float().mean()
        return loss, metrics

    def _aw_loss(self, model, batch):
        if "token_weights" not in batch:
            raise RuntimeError("advantage_weighted batches need token_weights")
        policy = self.score(model, batch)
        weights = batch["token_weights"].to(policy.token_logps.device)
        ref_tokens = None
        if self.args.kl_coef:
            ref_tokens = self.reference_scores(model, batch).token_logps
        out = advantage_weighted_loss(policy.token_logps, weights, ref_token_logps=ref_tokens, kl_coef=self.args.kl_coef)
        logps = policy.token_logps.detach()
        negative = batch["is_negative"].to(weights.device)[policy.token_response] > 0
        neg_w = weights[negative]

        def mean(x):
            return x.mean() if x.numel() else torch.zeros((), device=weights.device)

        metrics = {
            "loss/aw": out.weighted_nll,
            "advantages/mean": mean(neg_w),
            "advantages/negative_share": mean((neg_w < 0).float()),
            "logps/negative_steps": mean(logps[weights < 0]),
            "logps/positive_steps": mean(logps[weights > 0]),
        }
        if self.args.kl_coef:
            metrics["kl/ref"] = out.kl
        return out.loss, metrics

