"""The shared trainer core: ``AlignConfig`` and ``AlignTrainer`` on ``transformers.Trainer``.

A method is a thin subclass that says

* which record kind it reads (``record_kind``) and which responses a record contributes to its group
  (``group_responses``),
* how a batch becomes a loss and the terms to log (``compute_batch_loss``),
* whether it needs a reference policy (``uses_reference``).

Everything else is shared: loading and validating records, tokenizing them into response groups,
collating into the padded or shared-prompt layout, scoring, the reference policy, per-term metric
logging, checkpoints and resume (from ``transformers.Trainer``), and ``accelerate`` for DDP / FSDP /
DeepSpeed.

Reference policy (``AlignConfig.reference``):

``adapter``      the model being trained with its LoRA adapter switched off: no second copy in memory;
``model``        a frozen reference model (a copy of the starting model unless one is passed);
``precomputed``  log-probs computed once before training with the starting model and cached to disk;
``none``         reference-free methods;
``auto``         ``adapter`` for a PEFT model, ``model`` otherwise.

Two options every method gets (both off by default; off, nothing changes and no model copy is made):

* the MUSCLE-style compatibility term (``compat_weight`` λ > 0, ``compat_data``): λ · mean over the
  response tokens of a compatibility mini-batch of KL(π_old ‖ πθ), π_old the starting model, added to
  the method's loss and logged as ``loss/compat`` (:mod:`alignkit.compatibility`);
* the flip guard (``flip_guard_data``): negative flips against the starting model measured every
  ``flip_guard_steps`` steps on held-out problems, logged as ``flips/*``, optionally stopping training or
  keeping the best model within an NFR budget (:mod:`alignkit.evaluation.flip_guard`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer, TrainingArguments

from alignkit.cache import CacheEntry, cached, json_digest, model_key, read_torch, write_torch
from alignkit.data.collate import LAYOUTS, GroupCollator
from alignkit.data.loading import load_records
from alignkit.data.tokenize import tokenize_group
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
    # MUSCLE-style compatibility term (alignkit.compatibility)
    compat_weight: float = field(
        default=0.0, metadata={"help": "λ of the compatibility term λ·KL(π_old ‖ πθ) on compat_data tokens; 0 = off."}
    )
    compat_data: str | None = field(
        default=None,
        metadata={"help": "SFT records (prompt, response) the old model got right: JSONL/Parquet path or dataset "
                          "source (or pass compat_dataset= to the trainer)."},
    )
    compat_batch_size: int | None = field(
        default=None, metadata={"help": "Compat records per micro-batch and process (default per_device_train_batch_size)."}
    )
    compat_mask: str = field(
        default="all",
        metadata={"help": "all: every response token of a compat record; token: only tokens the old model predicts "
                          "greedily."},
    )
    # flip guard (alignkit.evaluation.flip_guard)
    flip_guard_data: str | None = field(
        default=None,
        metadata={"help": "Held-out problems (path or synthetic:arithmetic_problems) for negative-flip checks; None = off."},
    )
    flip_guard_steps: int = field(default=100, metadata={"help": "Flip guard: evaluate every N optimizer steps."})
    flip_guard_max_nfr: float | None = field(default=None, metadata={"help": "Flip guard: NFR budget (share of items)."})
    flip_guard_action: str = field(default="log", metadata={"help": "Flip guard: log, stop or best."})
    flip_guard_max_items: int = field(default=256, metadata={"help": "Flip guard: evaluate at most N items."})
    flip_guard_verifier: str = field(default="math", metadata={"help": "Flip guard: verifier name."})
    flip_guard_max_new_tokens: int = field(default=256, metadata={"help": "Flip guard: greedy decoding length."})
    flip_guard_batch_size: int = field(default=64, metadata={"help": "Flip guard: sequences generated together."})
    # Trainer defaults that differ for alignment
    remove_unused_columns: bool = False
    logging_steps: float = 10

    def __post_init__(self):
        super().__post_init__()
        if self.score_layout not in LAYOUTS:
            raise ValueError(f"score_layout must be one of {LAYOUTS}, got {self.score_layout!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        from alignkit.compatibility import COMPAT_MASKS
        from alignkit.evaluation.flip_guard import check_action

        if not self.compat_weight >= 0:
            raise ValueError(f"compat_weight must be >= 0, got {self.compat_weight}")
        if self.compat_mask not in COMPAT_MASKS:
            raise ValueError(f"compat_mask must be one of {COMPAT_MASKS}, got {self.compat_mask!r}")
        if self.compat_batch_size is not None and self.compat_batch_size < 1:
            raise ValueError(f"compat_batch_size must be >= 1, got {self.compat_batch_size}")
        check_action(self.flip_guard_action)
        if self.flip_guard_steps < 1:
            raise ValueError(f"flip_guard_steps must be >= 1, got {self.flip_guard_steps}")
        if self.flip_guard_max_nfr is not None and not 0.0 <= self.flip_guard_max_nfr <= 1.0:
            raise ValueError(f"flip_guard_max_nfr is a share of items in [0, 1], got {self.flip_guard_max_nfr}")
        if self.flip_guard_data and self.flip_guard_action == "stop" and self.flip_guard_max_nfr is None:
            raise ValueError("flip_guard_action='stop' needs an NFR budget: set flip_guard_max_nfr")


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class AlignTrainer(CheckpointingMixin, Trainer):
    """Base class of the alignkit trainers. Subclasses set ``record_kind`` and implement
    ``group_responses`` and ``compute_batch_loss``."""

    record_kind: str = "preference"
    uses_reference: bool = True

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
        **kwargs,
    ):
        compat_dataset = kwargs.pop("compat_dataset", None)
        if isinstance(model, str):
            from alignkit.modeling import ModelArguments, load_model_and_tokenizer

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

        # a method without a reference term (uses_reference False) gets none: no frozen copy, no pass
        if self.uses_reference:
            self.reference_mode = self._resolve_reference(args.reference, model, ref_model)
        else:
            self.reference_mode = "none"
        if self.reference_mode in ("model", "precomputed") and ref_model is None:
            # a frozen copy of the starting weights; for "precomputed" it is dropped after the pass
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if self.reference_mode == "adapter":
            ref_model = None
        compat_model = self._resolve_compat_old_model(args, model, ref_model, compat_dataset)

        self.tokenizer = processing_class
        with args.main_process_first(desc="tokenizing"):
            train_dataset = self.prepare_dataset(train_dataset, args, "train") if train_dataset is not None else None
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self.prepare_dataset(v, args, f"eval/{k}") for k, v in eval_dataset.items()}
            elif eval_dataset is not None:
                eval_dataset = self.prepare_dataset(eval_dataset, args, "eval")
        collator = kwargs.pop("data_collator", None) or GroupCollator(processing_class.pad_token_id, args.score_layout)

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
        self.ref_model = self._prepare_ref_model(ref_model) if ref_model is not None else None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._setup_compat(args, compat_model, compat_dataset, shares_reference=compat_model is not None and compat_model is ref_model)
        self._setup_flip_guard(args)

    # ----------------------------------------------------------------------------------------- data

    def group_responses(self, record: dict) -> list:
        """The responses a record contributes to its group, in the order the loss expects."""
        raise NotImplementedError

    def prepare_dataset(self, dataset, args: AlignConfig, name: str):
        """Validate the records and tokenize each into a response group."""
        if hasattr(dataset, "column_names") and "prompt_ids" in dataset.column_names:
            return dataset  # already tokenized
        source = dataset if isinstance(dataset, str) else f"<{name} dataset>"
        dataset = load_records(dataset, self.record_kind)
        keep = [c for c in ("ref_logps",) if c in dataset.column_names]

        def tokenize(record, index):
            return tokenize_group(
                self.tokenizer,
                record["prompt"],
                self.group_responses(record),
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                source=str(source),
                row=index + 1,
            )

        remove = [c for c in dataset.column_names if c not in keep]
        return dataset.map(
            tokenize, with_indices=True, remove_columns=remove, num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {name}",
        )

    # ------------------------------------------------------------------------------------ reference

    @staticmethod
    def _resolve_reference(mode: str, model, ref_model) -> str:
        if mode == "auto":
            if ref_model is not None:
                return "model"
            return "adapter" if _is_peft_model(model) else "model"
        if mode == "adapter" and not _is_peft_model(model):
            raise ValueError("reference='adapter' needs a PEFT (LoRA) model; pass peft_config or use_peft")
        return mode

    def _prepare_ref_model(self, ref_model):
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
        collate = self.reference_collator()

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

    def reference_collator(self):
        """The collator of the reference pass over one tokenized group dataset (the training collator
        unless a method batches several datasets together)."""
        return self.data_collator

    def _ensure_reference_logps(self):
        """Before the first dataloader: add ``ref_logps`` to the train and eval sets, then free the
        reference copy, which precomputed mode no longer needs."""
        if self.reference_mode != "precomputed" or self.ref_model is None:
            return
        if self.train_dataset is not None:
            self.train_dataset = self.precompute_reference_logps(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                k: self.precompute_reference_logps(v, f"eval-{k}") for k, v in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self.precompute_reference_logps(self.eval_dataset, "eval")
        self.ref_model = None

    def get_train_dataloader(self):
        self._ensure_reference_logps()
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        self._ensure_reference_logps()
        return super().get_eval_dataloader(eval_dataset)

    # ----------------------------------------------------------------------------------------- loss

    def compute_batch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (scalar loss, {metric name: scalar tensor}). Implemented by each method."""
        raise NotImplementedError

    def score(self, model, batch: dict, **kwargs) -> ResponseScores:
        """Policy log-probs of the batch's responses (with gradient)."""
        return score_responses(model, batch, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.compute_batch_loss(model, inputs)
        mode = "train" if model.training else "eval"
        if self.compat_stream is not None and mode == "train":
            compat = self.compat_term(model)
            loss = loss + self.args.compat_weight * compat
            metrics = {**metrics, "loss/compat": compat.detach()}
        if metrics:
            names = list(metrics)
            values = torch.stack([metrics[k].detach().float().reshape(()) for k in names])
            values = self.accelerator.gather_for_metrics(values.unsqueeze(0)).mean(0)
            for k, v in zip(names, values.tolist()):
                self._metrics[mode][k].append(v)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            prefix = next((k[: -len("loss")] for k in logs if k.endswith("_loss")), "eval_")
            averaged = {f"{prefix}{k}": v for k, v in averaged.items()}
        # in place: Trainer.evaluate returns this same dict, so the per-term metrics reach its caller
        logs.update(averaged)
        for callback in self.callback_handler.callbacks:  # flip guard metrics measured at this step
            if mode == "train" and hasattr(callback, "pop_logs"):
                logs.update(callback.pop_logs())
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # -------------------------------------------------------------------------------- compatibility

    # AlignTrainer.log merges the flip guard's pending metrics (see alignkit.evaluation.flip_guard)
    merges_callback_logs = True

    def _resolve_compat_old_model(self, args, model, ref_model, compat_dataset):
        """Where π_old of the compatibility term comes from; returns a model to prepare, or ``None``.

        ``self.compat_source``: ``None`` (term off), ``reference`` (the live reference: adapter off or the
        frozen reference model), ``adapter`` (a LoRA policy without a live reference: adapter off),
        ``copy`` (a frozen copy of the starting model, made only here and only when λ > 0; with
        ``reference='precomputed'`` it is the copy already made for the reference pass, kept)."""
        self.compat_source = None
        if not args.compat_weight:
            if compat_dataset is not None or args.compat_data:
                logger.warning("compat data given but compat_weight is 0: no compatibility term")
            return None
        if compat_dataset is None and not args.compat_data:
            raise ValueError("compat_weight > 0 needs compatibility records: set compat_data (or pass compat_dataset=)")
        if self.reference_mode in ("adapter", "model"):
            self.compat_source = "reference"
            return None
        if _is_peft_model(model):
            self.compat_source = "adapter"
            return None
        self.compat_source = "copy"
        if self.reference_mode == "precomputed" and ref_model is not None:
            return ref_model  # the same object: no second copy
        return copy.deepcopy(model).eval().requires_grad_(False)

    def _setup_compat(self, args, compat_model, compat_dataset, shares_reference: bool = False) -> None:
        from alignkit.compatibility import CompatStream

        self.compat_stream = None
        self.compat_model = None
        self._compat_step = (-1, -1)  # (global step, micro-step) of the last compat batch
        if self.compat_source is None:
            return
        if compat_model is not None:
            self.compat_model = self.ref_model if shares_reference else self._prepare_ref_model(compat_model)
        source = compat_dataset if compat_dataset is not None else args.compat_data
        if isinstance(source, str) and not os.path.exists(source):
            from alignkit.recipes import DataArguments, load_data

            source = load_data(source, DataArguments(), "sft", train=True)
        with args.main_process_first(desc="tokenizing compatibility set"):
            dataset = self._prepare_compat_dataset(source, args)
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.compat_stream = CompatStream(
            dataset, GroupCollator(self.tokenizer.pad_token_id, args.score_layout),
            args.compat_batch_size or args.per_device_train_batch_size, seed,
        )

    def _prepare_compat_dataset(self, source, args):
        name = "compat"
        label = source if isinstance(source, str) else "<compat dataset>"
        dataset = load_records(source, "sft")

        def tokenize(record, index):
            return tokenize_group(self.tokenizer, record["prompt"], [record["response"]], max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, source=str(label), row=index + 1)

        return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names,
                           num_proc=args.dataset_num_proc, desc=f"Tokenizing {name}")

    def compat_micro_index(self) -> int:
        """The index of the current training micro-batch: global step · accumulation + micro-step. The
        micro-step counts the compat batches drawn at the same global step, from 0 (a resumed run starts
        at a step boundary, so it counts exactly like an uninterrupted one)."""
        step = self.state.global_step
        last_step, micro = self._compat_step
        micro = micro + 1 if step == last_step else 0
        self._compat_step = (step, micro)
        return step * self.args.gradient_accumulation_steps + micro

    def compat_old_scores(self, model, batch: dict) -> ResponseScores:
        """π_old's scores of a compat batch, with logits (no gradient)."""
        with torch.no_grad():
            if self.compat_source == "reference":
                return self.reference_scores(model, batch, keep_logits=True)
            if self.compat_source == "adapter":
                with self.accelerator.unwrap_model(model).disable_adapter():
                    return score_responses(model, batch, keep_logits=True)
            return score_responses(self.compat_model, batch, keep_logits=True)

    def compat_term(self, model) -> torch.Tensor:
        """The compatibility term of this micro-batch: mean over compat response tokens of
        KL(π_old ‖ πθ) (:func:`alignkit.compatibility.compatibility_loss`)."""
        from alignkit.compatibility import compatibility_loss, old_correct_token_mask

        index = self.compat_micro_index()
        batch = self.compat_stream.batch(index, self.accelerator.process_index, self.accelerator.num_processes)
        batch = self._prepare_inputs(batch)
        policy = score_responses(model, batch, keep_logits=True)
        old = self.compat_old_scores(model, batch)
        mask = old_correct_token_mask(old.logits, batch["score_targets"]) if self.args.compat_mask == "token" else None
        return compatibility_loss(policy.logits, old.logits, mask)

    # ------------------------------------------------------------------------------------ flip guard

    def _setup_flip_guard(self, args) -> None:
        from alignkit.evaluation.flip_guard import FlipGuardCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, FlipGuardCallback):
                callback.bind(self)
        if not args.flip_guard_data:
            return
        self.add_callback(FlipGuardCallback(
            args.flip_guard_data, eval_steps=args.flip_guard_steps, max_nfr=args.flip_guard_max_nfr,
            action=args.flip_guard_action, max_items=args.flip_guard_max_items, verifier=args.flip_guard_verifier,
            max_new_tokens=args.flip_guard_max_new_tokens, batch_size=args.flip_guard_batch_size,
            tokenizer=self.tokenizer,
        ))

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        from alignkit.evaluation.flip_guard import FlipGuardCallback

        for cb in self.callback_handler.callbacks:
            if isinstance(cb, FlipGuardCallback) and cb.trainer is None:
                cb.bind(self)


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
