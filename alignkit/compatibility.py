"""The MUSCLE-style compatibility term: keep an updated model close to the OLD model where the old one was right.

MUSCLE (Echterhoff et al. 2024, "MUSCLE: A Model Update Strategy for Compatible LLM Evolution",
arXiv:2407.09435, EMNLP Findings 2024) reduces *negative flips* of a model update (items the old model
got right and the new one gets wrong; metrics in :mod:`alignkit.evaluation.flips`) by distilling the old
model into the new one with a mask: only where the old model is right. alignkit's form, added to any
trainer's loss with weight λ (``AlignConfig.compat_weight``; 0 = off):

    L = L_method + λ · (1/|T|) · Σ_{t ∈ T} KL( π_old(·|x, y_<t) ‖ πθ(·|x, y_<t) )

    KL(p ‖ q) = Σ_v p(v)·(log p(v) − log q(v))   (full next-token distributions over the vocabulary)

where T are the response tokens of a *compatibility mini-batch*: SFT records (``prompt``, ``response``) of
items the old model got right, typically the old model's own verified-correct greedy answers
(:func:`compat_records`). The mask is the record selection (item level). ``compat_mask="token"``
additionally keeps only tokens where the old model's greedy next token is the response token (a
token-level reading of MUSCLE's masking; with the old model's own greedy answers as records the two agree).

The old model π_old is the starting model: the trainer's live reference when it has one (a LoRA policy
with the adapter off, or the frozen reference copy); otherwise (SFT, SimNPO, GA, ``reference='none'`` or
``'precomputed'``) the base with the adapter off for a LoRA policy, else a frozen copy made only when
λ > 0 (``'precomputed'`` keeps the copy it already makes for the reference pass).

It is a plug-in: :class:`CompatibilityTerm` is an auxiliary loss term
(:class:`alignkit.trainers.base.AuxiliaryLoss`) that any trainer takes as ``aux_losses=[term]``; the recipe
layer builds it from the recipe keys ``compat_*`` (:class:`CompatArguments`), the Python API passes it
explicitly.

Batches: one compatibility mini-batch of ``compat_batch_size`` records per micro-batch of training,
drawn from a *compat stream* (seeded permutations of the compat set laid end to end,
:func:`alignkit.data.forget_retain.retain_stream_index`) at a position that is a pure function of
(global step, micro-step, process rank): a run resumed from a checkpoint draws exactly the batches of an
uninterrupted run, and the processes of a distributed run draw disjoint slices. The term is computed in
training only (evaluation losses are the method's), and logged as ``loss/compat``.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from alignkit.data.collate import GroupCollator
from alignkit.data.forget_retain import retain_stream_index
from alignkit.data.loading import load_records
from alignkit.data.tokenize import tokenize_group
from alignkit.losses import token_kl_divergence
from alignkit.negatives import distinct_completions, sample_rollouts, verify_rollouts
from alignkit.rollout.base import SamplingConfig
from alignkit.scoring import ResponseScores, score_responses
from alignkit.trainers.base import is_peft_model

logger = logging.getLogger(__name__)

COMPAT_MASKS = ("all", "token")


# ----------------------------------------------------------------------------------------- the loss


def compatibility_loss(policy_logits: torch.Tensor, old_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the (masked) tokens of KL(π_old ‖ πθ) of the next-token distributions.

    ``policy_logits`` and ``old_logits`` are [N, V] (one row per scored response token); ``mask`` [N] bool
    selects the tokens that count (all when ``None``). No token selected gives 0 (with a gradient path).
    """
    kl = token_kl_divergence(policy_logits, old_logits)
    if mask is None:
        return kl.mean() if kl.numel() else kl.sum()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def old_correct_token_mask(old_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] bool: the old model's greedy next token equals the response token (``compat_mask='token'``)."""
    return old_logits.argmax(-1) == targets


# ----------------------------------------------------------------------------------------- batches


def compat_stream_positions(micro_index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Positions in the compat stream of micro-batch ``micro_index`` (global step · accumulation + micro-step)
    on process ``rank``: each micro-batch takes ``batch_size · world_size`` consecutive positions, the
    process its own slice."""
    start = (micro_index * world_size + rank) * batch_size
    return list(range(start, start + batch_size))


def compat_batch_indices(micro_index: int, batch_size: int, num_records: int, seed: int, rank: int = 0,
                         world_size: int = 1) -> list[int]:
    """Record indices of a compat mini-batch: a pure function of its arguments (resume-safe)."""
    if num_records < 1:
        raise ValueError("the compatibility set is empty")
    return [retain_stream_index(p, num_records, seed)
            for p in compat_stream_positions(micro_index, batch_size, rank, world_size)]


class CompatStream:
    """The compatibility set of a trainer, tokenized, and its deterministic mini-batches."""

    def __init__(self, dataset, collator: GroupCollator, batch_size: int, seed: int):
        if len(dataset) == 0:
            raise ValueError("compat_data has no records")
        if batch_size < 1:
            raise ValueError(f"compat_batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def indices(self, micro_index: int, rank: int = 0, world_size: int = 1) -> list[int]:
        return compat_batch_indices(micro_index, self.batch_size, len(self.dataset), self.seed, rank, world_size)

    def batch(self, micro_index: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        return self.collator([self.dataset[i] for i in self.indices(micro_index, rank, world_size)])


# ----------------------------------------------------------------------------------------- the plug-in


@dataclass
class CompatArguments:
    """The recipe keys of the compatibility term (parsed next to the method's config; 0 = off)."""

    compat_weight: float = field(
        default=0.0, metadata={"help": "λ of the compatibility term λ·KL(π_old ‖ πθ) on compat_data tokens; 0 = off."}
    )
    compat_data: str | None = field(
        default=None,
        metadata={"help": "SFT records (prompt, response) the old model got right: JSONL/Parquet path or dataset "
                          "source (read with the recipe's data settings)."},
    )
    compat_batch_size: int | None = field(
        default=None, metadata={"help": "Compat records per micro-batch and process (default per_device_train_batch_size)."}
    )
    compat_mask: str = field(
        default="all",
        metadata={"help": "all: every response token of a compat record; token: only tokens the old model predicts "
                          "greedily."},
    )

    def __post_init__(self):
        check_compat_settings(self.compat_weight, self.compat_mask, self.compat_batch_size)

    def term(self, records) -> CompatibilityTerm | None:
        """The term for ``records`` (the loaded ``compat_data``), or ``None`` when λ = 0."""
        if not self.compat_weight:
            if records is not None:
                logger.warning("compat data given but compat_weight is 0: no compatibility term")
            return None
        if records is None:
            raise ValueError("compat_weight > 0 needs compatibility records: set compat_data")
        return CompatibilityTerm(records, weight=self.compat_weight, batch_size=self.compat_batch_size,
                                 mask=self.compat_mask)


def tokenize_sft(records, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
                 num_proc: int | None = None):
    """``sft`` records (a list, a dataset or a path; validated) as one-response groups."""
    source = str(records) if isinstance(records, (str, os.PathLike)) else "<compat dataset>"
    dataset = load_records(records, "sft")

    def tokenize(record, index):
        return tokenize_group(tokenizer, record["prompt"], [record["response"]], max_length=max_length,
                              max_prompt_length=max_prompt_length, source=source, row=index + 1)

    return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc="Tokenizing compat")


def check_compat_settings(weight: float, mask: str, batch_size: int | None) -> None:
    if not weight >= 0:
        raise ValueError(f"compat_weight must be >= 0, got {weight}")
    if mask not in COMPAT_MASKS:
        raise ValueError(f"compat_mask must be one of {COMPAT_MASKS}, got {mask!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"compat_batch_size must be >= 1, got {batch_size}")


class CompatibilityTerm:
    """λ · :func:`compatibility_loss` on a compat mini-batch per training micro-batch: an auxiliary loss term
    (:class:`alignkit.trainers.base.AuxiliaryLoss`) logged as ``loss/compat``.

    Args:
        records: SFT records (``prompt``, ``response``) the old model got right (a list, a dataset or a path).
        weight: λ > 0.
        batch_size: compat records per micro-batch and process (default: the trainer's per-device batch size).
        mask: ``all`` or ``token`` (see the module docstring).

    After :meth:`setup`: ``source`` says where π_old comes from (``reference``: the trainer's live reference;
    ``adapter``: the LoRA policy with its adapter off; ``copy``: a frozen copy of the starting model,
    ``old_model``), ``stream`` is the tokenized :class:`CompatStream`.
    """

    name = "compat"

    def __init__(self, records, *, weight: float = 1.0, batch_size: int | None = None, mask: str = "all"):
        check_compat_settings(weight, mask, batch_size)
        if not weight:
            raise ValueError("a compatibility term needs compat_weight > 0 (leave it out for none)")
        self.records = records
        self.weight = float(weight)
        self.batch_size = batch_size
        self.mask = mask
        self.source: str | None = None
        self.old_model = None
        self.stream: CompatStream | None = None
        self._step = (-1, -1)  # (global step, micro-step) of the last compat batch

    def setup(self, trainer) -> None:
        """Resolve π_old (no copy when the trainer has a live reference or a LoRA policy) and tokenize the set."""
        args = trainer.args
        if trainer.reference_mode in ("adapter", "model"):
            self.source = "reference"
        elif is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
            self.source = "adapter"
        else:
            self.source = "copy"
            if trainer.reference_mode == "precomputed" and trainer.ref_model is not None:
                self.old_model = trainer.ref_model  # the copy made for the reference pass: no second one
            else:
                start = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval().requires_grad_(False)
                self.old_model = trainer.prepare_frozen_model(start)
        groups = tokenize_sft(self.records, trainer.tokenizer, max_length=args.max_length,
                              max_prompt_length=args.max_prompt_length, num_proc=args.dataset_num_proc)
        seed = args.data_seed if args.data_seed is not None else args.seed
        collator = GroupCollator(trainer.tokenizer.pad_token_id, args.score_layout)
        self.stream = CompatStream(groups, collator, self.batch_size or args.per_device_train_batch_size, seed)

    def micro_index(self, trainer) -> int:
        """The index of the current training micro-batch: global step · accumulation + micro-step. The
        micro-step counts the compat batches drawn at the same global step, from 0 (a resumed run starts at a
        step boundary, so it counts exactly like an uninterrupted one)."""
        step = trainer.state.global_step
        last_step, micro = self._step
        micro = micro + 1 if step == last_step else 0
        self._step = (step, micro)
        return step * trainer.args.gradient_accumulation_steps + micro

    def old_scores(self, trainer, model, batch: dict) -> ResponseScores:
        """π_old's scores of a compat batch, with logits (no gradient)."""
        with torch.no_grad():
            if self.source == "reference":
                return trainer.reference_scores(model, batch, keep_logits=True)
            if self.source == "adapter":
                with trainer.accelerator.unwrap_model(model).disable_adapter():
                    return score_responses(model, batch, keep_logits=True)
            return score_responses(self.old_model, batch, keep_logits=True)

    def __call__(self, trainer, model) -> torch.Tensor:
        """The term of this micro-batch: mean over compat response tokens of KL(π_old ‖ πθ)."""
        accelerator = trainer.accelerator
        batch = self.stream.batch(self.micro_index(trainer), accelerator.process_index, accelerator.num_processes)
        batch = trainer._prepare_inputs(batch)
        policy = score_responses(model, batch, keep_logits=True)
        old = self.old_scores(trainer, model, batch)
        mask = old_correct_token_mask(old.logits, batch["score_targets"]) if self.mask == "token" else None
        return compatibility_loss(policy.logits, old.logits, mask)


# ----------------------------------------------------------------------------------------- records


def compat_records(
    engine,
    verifier,
    problems: Sequence[dict],
    *,
    sampling=None,
    n: int = 1,
    response: str = "self",
    per_prompt: int = 1,
    return_rows: bool = False,
):
    """Compatibility records of the OLD model: run it on ``problems`` through ``engine`` (a
    :class:`~alignkit.rollout.base.RolloutEngine` holding the old model), verify with ``verifier``, keep
    the items it got right.

    ``response='self'``: the record's response is the old model's own verified-correct completion (up to
    ``per_prompt`` distinct ones per item); ``'gold'``: the item's gold ``solution`` (one per item).
    ``sampling`` defaults to greedy decoding (256 new tokens) with ``n=1``. Returns the SFT records
    (``prompt``, ``response``, plus ``answer`` when the problem has one), and the verified rollout rows
    too with ``return_rows=True``.
    """
    if response not in ("self", "gold"):
        raise ValueError(f"response must be one of ('self', 'gold'), got {response!r}")
    sampling = sampling or SamplingConfig(temperature=0.0, max_new_tokens=256, seed=0)
    rows = verify_rollouts(sample_rollouts(engine, list(problems), n, sampling, keep_token_data=False), verifier)
    records = []
    for row in rows:
        right = [c["text"] for c in distinct_completions(c for c in row["completions"] if c.get("correct"))]
        if not right:
            continue
        extra = {"answer": row["answer"]} if "answer" in row else {}
        if response == "gold":
            if not row.get("solution"):
                raise ValueError("response='gold' needs a 'solution' in every problem the old model got right")
            records.append({"prompt": row["prompt"], "response": row["solution"], **extra})
            continue
        for text in right[:per_prompt]:
            records.append({"prompt": row["prompt"], "response": text, **extra})
    logger.info("compatibility records: the old model got %d of %d items right",
                sum(any(c.get("correct") for c in r["completions"]) for r in rows), len(rows))
    return (records, rows) if return_rows else records
