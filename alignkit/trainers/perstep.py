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
  itself with the starting model (:func:`alignkit.perstep_pipeline.build_perstep_records`:
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

import hashlib
import json
import logging
import math
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from alignkit.data.loading import read_json_lines
from alignkit.data.records import (
    RecordError,
    _check_prompt,
    _check_response,
    message_text,
)
from alignkit.data.tokenize import (
    _common_prefix_length,
    _ids,
    _with_response,
    tokenize_group,
)
from alignkit.losses import DPO_LOSS_TYPES, advantage_weighted_loss
from alignkit.steps import advantages, first_pit, split_steps
from alignkit.trainers.base import AlignConfig, AlignTrainer
from alignkit.trainers.dpo import pair_dpo_loss

logger = logging.getLogger(__name__)

PERSTEP_MODES = ("first_pit_dpo", "advantage_weighted")
NO_PIT = ("skip", "full")
CACHE_VERSION = 1


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


def validate_perstep_record(record, *, source: str, row: int, split="newline", need_chosen: bool = False) -> list[str]:
    """Check one per-step record; return its step texts. Raises :class:`RecordError` (source, row, field)."""
    if not isinstance(record, dict):
        raise RecordError(source, row, None, f"expected a JSON object, got {type(record).__name__}")
    for name in ("prompt", "response", "values"):
        if record.get(name) is None:
            raise RecordError(source, row, name, "missing required field")
    _check_prompt(record["prompt"], source, row, "prompt")
    response = record["response"]
    if not isinstance(response, str) or not response.strip():
        raise RecordError(source, row, "response", "expected non-empty text")
    steps = record.get("steps")
    if steps is None:
        steps = split_steps(response, split)
    else:
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise RecordError(source, row, "steps", "expected a non-empty list of texts")
        if "".join(steps) != response:
            raise RecordError(source, row, "steps", "the steps do not concatenate to the response")
    values = record["values"]
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RecordError(source, row, "values", "expected a list of numbers [Q_0, ..., Q_n]")
    if len(values) != len(steps) + 1:
        raise RecordError(source, row, "values", f"expected {len(steps) + 1} values (Q_0..Q_n for {len(steps)} steps), "
                                                 f"got {len(values)}")
    for i, v in enumerate(values):
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise RecordError(source, row, f"values[{i}]", f"expected a success rate in [0, 1], got {v}")
    chosen = record.get("chosen")
    if chosen is not None:
        _check_response(chosen, source, row, "chosen")
    elif need_chosen:
        raise RecordError(source, row, "chosen", "first_pit_dpo needs a correct solution as chosen")
    return steps


def is_perstep_record(record) -> bool:
    return isinstance(record, dict) and "values" in record and "response" in record


class _Pending(list):
    """Records waiting for the trainer to exist: ``kind`` is 'perstep' or 'problems'."""

    def __init__(self, rows, kind: str, source: str):
        super().__init__(rows)
        self.kind, self.source = kind, source


def _load_rows(dataset, name: str) -> tuple[list, str]:
    """(rows, source) of a path, list or ``datasets.Dataset``."""
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        if path.suffix.lower() == ".json" and path.exists() and path.read_text(encoding="utf-8").lstrip()[:1] == "[":
            return json.loads(path.read_text(encoding="utf-8")), str(dataset)
        if path.suffix.lower() in (".jsonl", ".json") and path.exists():
            from alignkit.data.loading import read_json_lines

            return [r for _, r in read_json_lines(path)], str(dataset)
        from alignkit.data.loading import load_records

        return load_records(str(dataset), "problems").to_list(), str(dataset)
    if hasattr(dataset, "to_list"):
        return dataset.to_list(), f"<{name} dataset>"
    return list(dataset), f"<{name} dataset>"


def _line_numbers(dataset, rows: list) -> list[int]:
    """1-based row numbers; a JSONL path gives its line numbers (blank lines skipped)."""
    if isinstance(dataset, (str, os.PathLike)) and Path(dataset).suffix.lower() in (".jsonl", ".json") and \
            Path(dataset).read_text(encoding="utf-8").lstrip()[:1] != "[":
        from alignkit.data.loading import read_json_lines

        return [n for n, _ in read_json_lines(dataset)]
    return list(range(1, len(rows) + 1))


def step_token_ends(tokenizer, prompt, steps: list[str], full_ids: list[int], prompt_len: int) -> list[int]:
    """For each step, the end (exclusive) of its tokens in response coordinates, the last one being
    ``len(full_ids) − prompt_len`` (the end-of-sequence / end-of-turn tokens belong to the last step).
    A step boundary is where the tokens of ``prompt + steps[:i]`` stop agreeing with the full sequence, so
    a token merged across a boundary goes to the later step."""
    ends, acc = [], ""
    total = len(full_ids) - prompt_len
    for s in steps[:-1]:
        acc += s
        part = _ids(tokenizer, _with_response(prompt, acc, ""))
        end = _common_prefix_length(part, full_ids) - prompt_len
        ends.append(min(max(end, ends[-1] if ends else 0, 0), total))
    ends.append(total)
    return ends


class PerStepTrainer(AlignTrainer):
    """Per-step negatives; see the module docstring. Extra arguments as for
    :class:`~alignkit.trainers.d2o.D2OTrainer`: ``rollout_args`` (the recipe's ``rollout_*`` / ``verifier``
    keys) or ``rollout_engine`` and ``verifier`` objects, used only when records are built from problems."""

    record_kind = "problems"
    uses_rollout_args = True
    args: PerStepConfig

    def __init__(self, model, args: PerStepConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 ref_model=None, peft_config=None, callbacks=None, rollout_args=None, rollout_engine=None,
                 verifier=None, **kwargs):
        from alignkit.rollout.arguments import RolloutArguments

        self.rollout_args = rollout_args if rollout_args is not None else RolloutArguments()
        self._engine, self._verifier = rollout_engine, verifier
        self.build_reports: dict[str, dict] = {}
        # the advantage-weighted form without a KL term has no reference: no frozen copy
        self.uses_reference = not (args.mode == "advantage_weighted" and args.kl_coef == 0)
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, ref_model=ref_model, peft_config=peft_config,
                         callbacks=callbacks, **kwargs)
        if isinstance(self.train_dataset, _Pending):
            self.train_dataset = self._groups(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: self._groups(v, f"eval-{k}") if isinstance(v, _Pending) else v
                                 for k, v in self.eval_dataset.items()}
        elif isinstance(self.eval_dataset, _Pending):
            self.eval_dataset = self._groups(self.eval_dataset, "eval")

    def group_responses(self, record):  # groups are built by _groups
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- data

    def prepare_dataset(self, dataset, args, name):
        """Validate now (errors name file, row and field); build and tokenize once the trainer exists."""
        if hasattr(dataset, "column_names") and "prompt_ids" in dataset.column_names:
            return dataset
        rows, source = _load_rows(dataset, name)
        if not rows:
            raise RecordError(source, None, None, "no records")
        if is_perstep_record(rows[0]):
            numbers = _line_numbers(dataset, rows)
            need_chosen = args.mode == "first_pit_dpo"
            checked = []
            for row_no, row in zip(numbers, rows):
                steps = validate_perstep_record(row, source=source, row=row_no, split=args.step_split,
                                                need_chosen=need_chosen)
                checked.append({**row, "steps": steps})
            return _Pending(checked, "perstep", source)
        from alignkit.data.loading import load_records

        load_records(rows, "problems")  # validates (RecordError names the row and field)
        return _Pending(rows, "problems", source)

    def _groups(self, pending: _Pending, name: str):
        records = pending if pending.kind == "perstep" else self.build_records(list(pending), name)
        groups = self.training_groups(records)
        if not groups:
            raise RecordError(pending.source, None, None,
                              f"no training groups for mode {self.args.mode!r} (no negatives with a first pit / a chosen)")
        return self._tokenize(groups, name)

    def training_groups(self, records: list[dict]) -> list[dict]:
        """Groups to tokenize: ``{"prompt", "responses", "steps", "weights" | "pit"}``."""
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
        tokenizer, args = self.tokenizer, self.args
        source = f"<{name} dataset>"
        rows = []
        for index, g in enumerate(groups):
            response = "".join(g["steps"])
            responses = ([g["chosen"]] if g.get("chosen") is not None else []) + [response]
            full = tokenize_group(tokenizer, g["prompt"], responses, source=source, row=index + 1)
            prompt_ids, response_ids = full["prompt_ids"], full["response_ids"]
            p = len(prompt_ids)
            ends = step_token_ends(tokenizer, g["prompt"], g["steps"], prompt_ids + response_ids[-1], p)
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
                extra = {"token_weights": weights,
                         "is_negative": [0.0] * (len(responses) - 1) + [1.0]}
            # truncation as tokenize_group does it
            if args.max_prompt_length is not None and len(prompt_ids) > args.max_prompt_length:
                prompt_ids = prompt_ids[-args.max_prompt_length:]
            if args.max_length is not None:
                room = args.max_length - len(prompt_ids)
                if room <= 0:
                    raise RecordError(source, index + 1, "prompt", f"prompt has {len(prompt_ids)} tokens and leaves no "
                                                                   f"room for the response within max_length={args.max_length}")
                response_ids = [r[:room] for r in response_ids]
                if "token_weights" in extra:
                    extra["token_weights"] = [w[:room] for w in extra["token_weights"]]
            rows.append({"prompt_ids": prompt_ids, "response_ids": response_ids, **extra})
        if not rows:
            raise RecordError(source, None, None, "no group has tokens to train on")
        return datasets.Dataset.from_list(rows)

    # -------------------------------------------------------------------------------------- building

    def _records_fingerprint(self, problems: list[dict], name: str) -> tuple[str, dict]:
        from alignkit.reference_samples import (
            model_identity,
            prompt_key,
            weights_digest,
        )

        model = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else self.model)
        ra, args = self.rollout_args, self.args
        key = {
            "version": CACHE_VERSION,
            "model": model_identity(model),
            "weights": weights_digest(model),
            "problems": hashlib.sha256("\n".join(prompt_key(p["prompt"]) + "\t" + json.dumps(p.get("answer"))
                                                 for p in problems).encode()).hexdigest()[:16],
            "count": len(problems),
            "sampling": ra.sampling(seed=self._seed()).to_dict(),
            "backend": ra.rollout_backend,
            "verifier": ra.verifier,
            "samples_per_problem": ra.rollout_n,
            "negatives_per_problem": args.negatives_per_problem,
            "num_rollouts": args.num_rollouts,
            "best_of": args.best_of,
            "step_split": args.step_split,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20], key

    def _seed(self) -> int:
        return self.args.seed if self.rollout_args.rollout_seed is None else self.rollout_args.rollout_seed

    def build_records(self, problems: list[dict], name: str) -> list[dict]:
        """Per-step records of ``problems`` from the starting model: from the cache, else sampled (main
        process) and cached; every process gets the same records."""
        from alignkit.negatives import write_jsonl
        from alignkit.perstep_pipeline import build_perstep_records
        from alignkit.reference_samples import on_main_process

        fingerprint, key = self._records_fingerprint(problems, name)
        directory = Path(self.args.records_cache_dir or os.path.join(self.args.output_dir, "perstep_records"))
        path = directory / f"{name}-{fingerprint}.jsonl"

        def load_or_build():
            if path.exists():
                logger.info("per-step %s: records from %s", name, path)
                return [row for _, row in read_json_lines(path)]
            model = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else self.model)
            engine = self._engine if self._engine is not None else self.rollout_args.engine(model, self.tokenizer)
            if self._engine is not None:
                engine.sync_weights(model)
            verifier = self._verifier or self.rollout_args.make_verifier()
            sampling = self.rollout_args.sampling(seed=self._seed())
            value_sampling = self.rollout_args.sampling(seed=self._seed() + 1)
            records, report = build_perstep_records(
                engine, verifier, problems, tokenizer=self.tokenizer, samples_per_problem=self.rollout_args.rollout_n,
                negatives_per_problem=self.args.negatives_per_problem, sampling=sampling, value_sampling=value_sampling,
                num_rollouts=self.args.num_rollouts, best_of=self.args.best_of, split=self.args.step_split,
                num_workers=self.rollout_args.verifier_num_workers,
            )
            write_jsonl(records, path)
            path.with_suffix(".json").write_text(json.dumps({"key": key, "report": report}, indent=2))
            return records

        records = on_main_process(load_or_build)
        report_path = path.with_suffix(".json")
        if report_path.exists():
            self.build_reports[name] = json.loads(report_path.read_text()).get("report", {})
        self.accelerator.wait_for_everyone()
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

