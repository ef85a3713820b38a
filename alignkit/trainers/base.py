"""The shared trainer core: ``AlignConfig`` and ``AlignTrainer`` on ``transformers.Trainer``.

A method is a thin subclass that declares

* its record kind (``record_kind``: a kind of :mod:`alignkit.data.records`, a
  :class:`~alignkit.data.records.Schema` of its own, or a tuple of them when it reads several: the first one
  a dataset's rows match is used) and how a record becomes a response group (``group_responses``: the
  responses in the order the loss expects; ``group_fields``: any per-response / per-group numbers);
* its collator extras (``extra_fields``: the float fields its batches carry, name -> ``response`` /
  ``group`` / ``token``; ``make_collator`` to wrap the group collator);
* its loss (``compute_batch_loss``: the loss and the terms to log);
* whether it needs a reference policy (``uses_reference``, or ``needs_reference(args)``).

Datasets: ONE hook, :meth:`AlignTrainer.build_split`, builds every split: the train set, each eval set
(a dict of eval sets is handled here once) and records passed to ``evaluate()`` (``get_eval_dataloader``
is overridden here only). It runs at the end of ``__init__``, after the trainer is set up: the reference
policy, the accelerator and the plug-ins exist. The default loads and validates the records, tokenizes each
into a response group and, with ``reference='precomputed'``, adds the reference log-probs (cached,
:mod:`alignkit.cache`); a method that needs more (samples first, a retain set, records built from
problems) overrides it and calls ``super()``. No method swaps datasets or collators afterwards.

Everything else is shared: collating into the scoring layouts, scoring, the reference policy, per-term
metric logging, checkpoints and resume (from ``transformers.Trainer``), and ``accelerate`` for DDP / FSDP /
DeepSpeed.

Reference policy (``AlignConfig.reference``):

``adapter``      the model being trained with its LoRA adapter switched off: no second copy in memory;
``model``        a frozen reference model (a copy of the starting model unless one is passed);
``precomputed``  log-probs computed once before training with the starting model and cached to disk;
``none``         reference-free methods;
``auto``         ``adapter`` for a PEFT model, ``model`` otherwise.

Plug-ins (the base knows none of them by name; the recipe layer attaches them from their config keys):

* auxiliary loss terms (``aux_losses=[...]``, :class:`AuxiliaryLoss`): added to the training loss with
  their weight and logged as ``loss/<name>``; e.g. the MUSCLE-style compatibility term
  (:class:`alignkit.compatibility.CompatibilityTerm`);
* callbacks: one with ``bind(trainer)`` is bound to the trainer, one with ``pop_logs()`` has its pending
  metrics merged into the log of the step they were measured at; e.g. the flip guard
  (:class:`alignkit.evaluation.flip_guard.FlipGuardCallback`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer, TrainingArguments

from alignkit.cache import CacheEntry, cached, json_digest, model_key, read_torch, write_torch
from alignkit.data.collate import LAYOUTS, GroupCollator
from alignkit.data.loading import load_records_of_kinds
from alignkit.data.records import Schema
from alignkit.data.tokenize import tokenize_group
from alignkit.modeling import ModelArguments, load_model_and_tokenizer
from alignkit.scoring import ResponseScores, score_responses
from alignkit.trainers.checkpointing import CheckpointingMixin

logger = logging.getLogger(__name__)

REFERENCE_MODES = ("auto", "adapter", "model", "precomputed", "none")


@dataclass
class AlignConfig(TrainingArguments):
    """Settings shared by every alignkit trainer, on top of ``transformers.TrainingArguments``."""

    max_length: int | None = field(default=1024, metadata={"help": "Max prompt + response tokens per sequence."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Longer prompts keep their end."})
    score_layout: str = field(
        default="auto",
        metadata={"help": "auto (per batch, whichever of the three below a cost model rates cheapest for the "
                          "model; the rule is in alignkit.data.collate), prompt_kv (prompts once with a KV cache, "
                          "responses against it), shared_prompt (prompt once per packed row; sdpa/eager) or padded "
                          "(any attention)."},
    )
    reference: str = field(default="auto", metadata={"help": f"Reference policy: one of {REFERENCE_MODES}."})
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Where precomputed reference log-probs are cached (default OUTPUT_DIR/ref_logps)."}
    )
    dataset_num_proc: int | None = None
    # Trainer defaults that differ for alignment
    remove_unused_columns: bool = False
    logging_steps: float = 10

    def __post_init__(self):
        super().__post_init__()
        if self.score_layout not in LAYOUTS:
            raise ValueError(f"score_layout must be one of {LAYOUTS}, got {self.score_layout!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")


@runtime_checkable
class AuxiliaryLoss(Protocol):
    """A term added to every training micro-batch's loss: ``loss + weight · term(trainer, model)``, logged as
    ``loss/<name>``. ``setup(trainer)`` runs once, after the trainer's reference policy and accelerator exist
    and before the datasets are built (the starting model is still the model being trained)."""

    name: str
    weight: float

    def setup(self, trainer: AlignTrainer) -> None: ...

    def __call__(self, trainer: AlignTrainer, model) -> torch.Tensor: ...


def is_peft_model(model) -> bool:
    """Whether ``model`` is a peft (LoRA) model."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class AlignTrainer(CheckpointingMixin, Trainer):
    """Base class of the alignkit trainers; see the module docstring for what a method declares."""

    record_kind: str | Schema | tuple = "preference"
    uses_reference: bool = True
    extra_fields: Mapping[str, str] = {}

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: AlignConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        ref_model: PreTrainedModel | None = None,
        peft_config=None,
        callbacks=None,
        aux_losses=None,
        **kwargs,
    ):
        if isinstance(model, str):
            model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=model))
            processing_class = processing_class or tokenizer
        if processing_class is None:
            raise ValueError("pass processing_class (the tokenizer) or a model path to load it from")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            if getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False):
                model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input with LoRA
            model = get_peft_model(model, peft_config)

        # a method without a reference term gets none: no frozen copy, no pass
        if self.needs_reference(args):
            self.reference_mode = self._resolve_reference(args.reference, model, ref_model)
        else:
            self.reference_mode = "none"
        if self.reference_mode in ("model", "precomputed") and ref_model is None:
            # a frozen copy of the starting weights; for "precomputed" it is dropped after the pass
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if self.reference_mode in ("adapter", "none"):
            ref_model = None

        self.tokenizer = processing_class
        self.group_collator = GroupCollator(processing_class.pad_token_id, args.score_layout,
                                            extra_fields=dict(self.extra_fields))
        collator = kwargs.pop("data_collator", None) or self.make_collator(self.group_collator, args)
        # the raw data goes to Trainer only for its argument checks; build_split replaces it below
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        # compute_batch_loss returns a mean over the micro-batch: let Trainer scale by accumulation steps
        self.model_accepts_loss_kwargs = False
        self.ref_model = self.prepare_frozen_model(ref_model) if ref_model is not None else None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        for callback in self.callback_handler.callbacks:
            self._bind(callback)
        self.aux_losses = list(aux_losses or [])
        for term in self.aux_losses:
            term.setup(self)
        # every split, once, now that the reference policy, the accelerator and the plug-ins exist
        self._built: list = []
        self.train_dataset = self._build(train_dataset, "train")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {k: self._build(v, f"eval-{k}") for k, v in eval_dataset.items()}
        else:
            self.eval_dataset = self._build(eval_dataset, "eval")
        if self.reference_mode == "precomputed":
            self.ref_model = None  # the values are in the datasets; free the copy

    # ----------------------------------------------------------------------------------------- method

    def needs_reference(self, args: AlignConfig) -> bool:
        """Whether this method, with these settings, compares with a reference policy."""
        return self.uses_reference

    def group_responses(self, record: dict) -> list:
        """The responses a record contributes to its group, in the order the loss expects."""
        raise NotImplementedError

    def group_fields(self, record: dict) -> dict:
        """Extra fields of a record's group (numbers the loss reads; see ``extra_fields``)."""
        return {}

    def make_collator(self, group_collator: GroupCollator, args: AlignConfig):
        """The training collator, from the group collator (a method wraps it to add batch fields); called before
        ``Trainer.__init__``, so the settings come as ``args``."""
        return group_collator

    def compute_batch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (scalar loss, {metric name: scalar tensor}). Implemented by each method."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- data

    def build_split(self, data, name: str):
        """The one hook that builds a split from what the caller passed (records, a path, a dataset):
        validated records tokenized into response groups, plus ``ref_logps`` with a precomputed reference."""
        return self.with_reference_logps(self.tokenize_records(data, name), name)

    def _build(self, data, name: str):
        if data is None:
            return None
        split = self.build_split(data, name)
        self._built.append(split)
        return split

    def _is_built(self, dataset) -> bool:
        return any(dataset is split for split in self._built)

    def load_split(self, data, name: str):
        """``(records, kind)``: ``data`` loaded and validated as the first of the method's record kinds its rows
        match (:func:`alignkit.data.loading.load_records_of_kinds`)."""
        return load_records_of_kinds(data, self.record_kind)

    def tokenize_records(self, data, name: str):
        """Records -> response groups (``prompt_ids``, ``response_ids`` and the method's ``group_fields``)."""
        if hasattr(data, "column_names") and "prompt_ids" in data.column_names:
            return data  # already tokenized
        source = str(data) if isinstance(data, (str, os.PathLike)) else f"<{name} dataset>"
        records, _ = self.load_split(data, name)
        keep = [c for c in ("ref_logps",) if c in records.column_names]
        tokenizer, args = self.tokenizer, self.args

        def tokenize(record, index):
            group = tokenize_group(tokenizer, record["prompt"], self.group_responses(record), max_length=args.max_length,
                                   max_prompt_length=args.max_prompt_length, source=source, row=index + 1)
            return {**group, **self.group_fields(record)}

        remove = [c for c in records.column_names if c not in keep]
        # a fingerprint of our own: datasets would otherwise hash the closure, and with it this trainer
        fingerprint = json_digest([records._fingerprint, type(self).__name__, name, args.max_length,
                                   args.max_prompt_length, getattr(tokenizer, "name_or_path", "")])
        with args.main_process_first(desc=f"tokenizing {name}"):
            return records.map(tokenize, with_indices=True, remove_columns=remove, num_proc=args.dataset_num_proc,
                               desc=f"Tokenizing {name}", new_fingerprint=fingerprint)

    def get_eval_dataloader(self, eval_dataset=None):
        """Records passed to ``evaluate()`` are built like the eval sets given at construction."""
        if eval_dataset is not None and not isinstance(eval_dataset, str) and not self._is_built(eval_dataset):
            if self.reference_mode == "precomputed" and self.ref_model is None:
                raise ValueError("reference='precomputed' freed the reference after precomputing the datasets it was "
                                 "given; pass this eval set to the trainer as eval_dataset (or use reference='model')")
            eval_dataset = self._build(eval_dataset, "eval")
        return super().get_eval_dataloader(eval_dataset)

    # ------------------------------------------------------------------------------------ reference

    @staticmethod
    def _resolve_reference(mode: str, model, ref_model) -> str:
        if mode == "auto":
            if ref_model is not None:
                return "model"
            return "adapter" if is_peft_model(model) else "model"
        if mode == "adapter" and not is_peft_model(model):
            raise ValueError("reference='adapter' needs a PEFT (LoRA) model; pass peft_config or use_peft")
        return mode

    def prepare_frozen_model(self, ref_model):
        """A frozen model (the reference, or a plug-in's copy of the starting model) placed like the policy."""
        if self.is_deepspeed_enabled:
            return _prepare_deepspeed_reference(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        return ref_model.to(self.accelerator.device)

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        """log π_ref(y|x) of every response in the batch ([R], no gradient)."""
        if self.reference_mode == "precomputed":
            if "ref_logps" not in batch:
                raise RuntimeError("reference='precomputed' but the batch has no ref_logps")
            return batch["ref_logps"]
        return self.reference_scores(model, batch).logps

    def reference_scores(self, model, batch: dict, **score_kwargs) -> ResponseScores:
        """The live reference's :class:`ResponseScores` of the batch (no gradient): the policy with its
        adapter disabled, or the frozen reference model. ``score_kwargs`` go to ``score_responses``
        (``keep_logits=True`` for KL terms). Precomputed mode has only sequence log-probs: use
        :meth:`reference_logps`."""
        mode = self.reference_mode
        if mode in ("none", "precomputed"):
            raise RuntimeError(f"{type(self).__name__} has reference={mode!r} but asked for a live reference pass")
        with torch.no_grad():
            if mode == "adapter":
                with self.accelerator.unwrap_model(model).disable_adapter():
                    return score_responses(model, batch, **score_kwargs)
            return score_responses(self.ref_model, batch, **score_kwargs)

    def with_reference_logps(self, dataset, name: str):
        """``dataset`` with a ``ref_logps`` column when the reference is precomputed (else as it is)."""
        if self.reference_mode != "precomputed" or self.ref_model is None:
            return dataset
        return self.precompute_reference_logps(dataset, name)

    def reference_cache_key(self, dataset) -> dict:
        """What the precomputed reference log-probs of ``dataset`` depend on: the reference model (name and
        the digest of every weight, adapter included) and the tokens scored."""
        model = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else self.model)
        tokens = json_digest([[p, r] for p, r in zip(dataset["prompt_ids"], dataset["response_ids"])])
        return {"kind": "reference_logps", "version": 2, **model_key(model, exclude=()), "tokens": tokens,
                "rows": len(dataset)}

    def precompute_reference_logps(self, dataset, name: str):
        """Add a ``ref_logps`` column (one value per response) computed with the reference model.

        The values are cached under ``ref_logps_cache_dir`` (:mod:`alignkit.cache`) keyed by the reference
        model's full weights digest and the tokens, so a resumed or repeated run does not recompute them
        and a run with other weights or data never reuses them.
        """
        if "ref_logps" in dataset.column_names:
            return dataset
        cache_dir = self.args.ref_logps_cache_dir or os.path.join(self.args.output_dir, "ref_logps")
        entry = CacheEntry.named(cache_dir, name, self.reference_cache_key(dataset), ".pt")
        values = cached(entry, lambda: self._compute_reference_logps(dataset, name), read=read_torch,
                        write=write_torch, collective=True, what=f"reference log-probs ({name})")
        return dataset.add_column("ref_logps", values)

    def _compute_reference_logps(self, dataset, name: str) -> list[list[float]]:
        indexed = dataset.add_column("_index", list(range(len(dataset))))
        collate = self.group_collator

        def collate_with_index(examples):
            batch = collate(examples)
            batch["_index"] = torch.tensor([ex["_index"] for ex in examples])
            return batch

        loader = DataLoader(indexed, batch_size=self.args.per_device_eval_batch_size, collate_fn=collate_with_index)
        loader = self.accelerator.prepare(loader)
        model = self.ref_model
        values: dict[int, list[float]] = {}
        for batch in tqdm(loader, desc=f"Reference log-probs ({name})", disable=not self.accelerator.is_main_process):
            with torch.no_grad():
                logps = score_responses(model, batch).logps
            # one row per group: pad responses to the batch's max group size for gathering
            groups = batch["response_group"]
            width = int(torch.bincount(groups).max())
            table = torch.full((batch["_index"].numel(), width), float("nan"), device=logps.device)
            slot = torch.arange(groups.numel(), device=groups.device) - torch.searchsorted(groups, groups)
            table[groups, slot] = logps.float()
            table, index = self.accelerator.gather_for_metrics((table, batch["_index"]))
            for i, row in zip(index.tolist(), table.tolist()):
                values[i] = [v for v in row if v == v]  # drop NaN padding
        return [values[i] for i in range(len(dataset))]

    # ----------------------------------------------------------------------------------------- loss

    def score(self, model, batch: dict, **kwargs) -> ResponseScores:
        """Policy log-probs of the batch's responses (with gradient)."""
        return score_responses(model, batch, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.compute_batch_loss(model, inputs)
        mode = "train" if model.training else "eval"
        if mode == "train" and self.aux_losses:
            metrics = dict(metrics)
            for term in self.aux_losses:
                value = term(self, model)
                loss = loss + term.weight * value
                metrics[f"loss/{term.name}"] = value.detach()
        if metrics:  # a term a batch does not have is NaN: left out of the averages (across processes and steps)
            names = list(metrics)
            values = torch.stack([metrics[k].detach().float().reshape(()) for k in names])
            values = self.accelerator.gather_for_metrics(values.unsqueeze(0)).nanmean(0)
            for k, v in zip(names, values.tolist()):
                if v == v:
                    self._metrics[mode][k].append(v)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------ logging

    # callbacks with pending metrics (pop_logs) have them merged into the log of the step they were measured at
    merges_callback_logs = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            prefix = next((k[: -len("loss")] for k in logs if k.endswith("_loss")), "eval_")
            averaged = {f"{prefix}{k}": v for k, v in averaged.items()}
        # in place: Trainer.evaluate returns this same dict, so the per-term metrics reach its caller
        logs.update(averaged)
        for callback in self.callback_handler.callbacks:
            if mode == "train" and hasattr(callback, "pop_logs"):
                logs.update(callback.pop_logs())
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def _bind(self, callback) -> None:
        if hasattr(callback, "bind") and getattr(callback, "trainer", None) is None:
            callback.bind(self)

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        for cb in self.callback_handler.callbacks:
            self._bind(cb)


def _prepare_deepspeed_reference(model, accelerator):
    """Wrap a frozen reference model for DeepSpeed: ZeRO-3 shards it like the policy, other stages
    keep a full copy per device (stage 0)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
