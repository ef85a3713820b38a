"""D²O: ``D2OConfig`` + ``D2OTrainer``, alignment from labelled negatives only.

Distributional Dispreference Optimization (Duan et al. 2024, "Negating Negatives", arXiv:2403.03419,
EMNLP Findings 2024). Records are negatives records (``prompt``, ``rejected``: a human-labelled
negative). For every prompt, K responses y_1..y_K are sampled from the reference policy; the loss
(Eq. 3, :func:`alignkit.losses.d2o_loss`) pushes the labelled negative y_l below the reference's own
response distribution:

    L = −log σ( (β/K)·Σ_i r(y_i) − α·r(y_l) ),   r(y) = log πθ(y|x) − log π_ref(y|x)  (sequence sums)

with α = β = 0.1 and K = 11 by default, as in the paper.

Where the samples come from
    * ``samples`` in a record (a list of >= K responses; the first K are used): no sampling;
    * otherwise the rollout engine (:class:`~alignkit.rollout.arguments.RolloutArguments`:
      ``rollout_backend``, ``rollout_temperature``, ``rollout_max_new_tokens``, ...) samples K per
      distinct prompt from the reference: the frozen reference model, or the policy with its LoRA
      adapter disabled. They are sampled once, when the trainer builds its splits (after the reference
      exists, before tokenization), and cached as JSONL in ``samples_cache_dir`` (default
      ``OUTPUT_DIR/d2o_samples``) under a fingerprint of model name + full weights digest, prompts,
      sampling settings, backend, K and instruction prefix (:mod:`alignkit.reference_samples`,
      :mod:`alignkit.cache`): a second run with the same inputs does not sample again.
    * ``instruction_prefix``: a string put before the prompt only while sampling (the paper samples
      under a harmless-instruction prompt); training scores the responses under the plain prompt.
    * ``samples_refresh_steps`` = N > 0: every N optimizer steps the training samples are re-sampled
      from the current policy (the reference log-probs of the new samples still come from the
      reference: the live reference pass, so ``reference='precomputed'`` is refused with refresh). The
      new samples are written to ``OUTPUT_DIR/d2o_refresh/step-<N·k>.jsonl`` and each checkpoint
      records which file was live (``d2o_samples.json``, written as part of the checkpoint), so ``--resume_from_checkpoint`` continues with
      the same samples. Cost: one rollout of K responses for every distinct training prompt every N
      steps, and one re-tokenization of the train set; eval samples stay the reference's.

Each group is [y_1, ..., y_K, y_l] (K + 1 responses), scored by the shared scoring core in one batched
forward (with ``score_layout='shared_prompt'`` the prompt is forwarded once for all K + 1 responses).

Logged: ``loss/d2o``; ``rewards/positive`` = (β/K)·Σ_i r(y_i), ``rewards/negative`` = α·r(y_l),
``rewards/margins`` (their difference), ``rewards/accuracies`` (share of prompts where it is > 0);
``logratio/rejected`` = r(y_l), ``logratio/samples`` = mean r(y_i); ``logps/rejected``, ``logps/samples``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import TrainerCallback

from alignkit.cache import on_main_process, read_jsonl, write_jsonl
from alignkit.checkpoints import resolve_resume_checkpoint
from alignkit.data.records import RecordError, message_text
from alignkit.losses import d2o_loss
from alignkit.reference_samples import cached_samples, prompt_key, with_instruction_prefix
from alignkit.rollout.arguments import RolloutArguments
from alignkit.rollout.setup import RolloutSetup
from alignkit.trainers.base import AlignConfig, AlignTrainer, is_peft_model

logger = logging.getLogger(__name__)

REFRESH_DIR = "d2o_refresh"
CHECKPOINT_SAMPLES_FILE = "d2o_samples.json"


@dataclass
class D2OConfig(AlignConfig):
    """D²O settings. Defaults follow Duan et al. 2024 (α = β = 0.1, K = 11) and, for the learning rate,
    alignkit's DPO (1e-6). Sampling settings are the recipe's ``rollout_*`` keys."""

    beta: float = field(default=0.1, metadata={"help": "β: weight of the reference samples' mean log-ratio."})
    alpha: float = field(default=0.1, metadata={"help": "α: weight of the labelled negative's log-ratio."})
    num_samples: int = field(default=11, metadata={"help": "K: reference responses per prompt."})
    samples_cache_dir: str | None = field(
        default=None, metadata={"help": "Where sampled responses are cached (default OUTPUT_DIR/d2o_samples)."}
    )
    samples_refresh_steps: int = field(
        default=0, metadata={"help": "N > 0: re-sample the training samples from the current policy every N steps."}
    )
    instruction_prefix: str | None = field(
        default=None,
        metadata={"help": "Text put before the prompt when sampling only, not in training (chat prompts: before the "
                          "first user message's content)."},
    )
    learning_rate: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.samples_refresh_steps < 0:
            raise ValueError(f"samples_refresh_steps must be >= 0, got {self.samples_refresh_steps}")
        if self.samples_refresh_steps and self.reference == "precomputed":
            raise ValueError(
                "samples_refresh_steps needs the reference's log-probs of samples drawn during training, which "
                "reference='precomputed' cannot give; use reference='adapter' (LoRA) or 'model'"
            )
        if self.reference == "none":
            raise ValueError("D2O compares with a reference policy; reference='none' is not possible")


class SwappableSamples(TorchDataset):
    """The training set of a run with refreshed samples: one tokenized dataset at a time, swappable in
    place (the DataLoader keeps this object). Each example carries its row and the samples version, so a
    batch collated before a swap (prefetched, or built in a worker process) is recognised as stale."""

    def __init__(self, dataset, version: int = 0):
        self.dataset, self.version = dataset, version

    def swap(self, dataset, version: int) -> None:
        if len(dataset) != len(self.dataset):
            raise ValueError("refreshed samples must keep the number of records")
        self.dataset, self.version = dataset, version

    @property
    def column_names(self):
        return self.dataset.column_names

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "record_index": index, "samples_version": self.version}


class VersionedCollator:
    """The group collator, plus ``record_index`` and ``samples_version`` tensors when examples carry them."""

    def __init__(self, group_collator):
        self.group_collator = group_collator

    def __call__(self, examples):
        batch = self.group_collator(examples)
        if examples and all("samples_version" in ex for ex in examples):
            batch["record_index"] = torch.tensor([ex["record_index"] for ex in examples], dtype=torch.long)
            batch["samples_version"] = torch.tensor([ex["samples_version"] for ex in examples], dtype=torch.long)
        return batch


class _SamplesRefreshCallback(TrainerCallback):
    """Re-sample every ``samples_refresh_steps`` optimizer steps."""

    def __init__(self, trainer: D2OTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        step = self.trainer._pending_refresh_step
        if step is not None:
            self.trainer._pending_refresh_step = None
            self.trainer.refresh_train_samples(step)

    def on_step_end(self, args, state, control, **kwargs):
        every = args.samples_refresh_steps
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            self.trainer.refresh_train_samples(state.global_step)


class D2OTrainer(AlignTrainer):
    """D²O on negatives records; see the module docstring.

    Extra arguments: ``rollout_args`` (:class:`~alignkit.rollout.arguments.RolloutArguments`, the recipe's
    ``rollout_*`` keys; defaults if omitted) or ``rollout_engine`` (any
    :class:`~alignkit.rollout.base.RolloutEngine`, used instead of building one from ``rollout_args``; it
    must sample from the model it is synced with, and is called inside ``disable_adapter()`` for a LoRA
    reference). Sampling goes through one :class:`~alignkit.rollout.setup.RolloutSetup`; the engine is built
    only when something has to be sampled.
    """

    record_kind = "negatives"
    uses_rollout_args = True  # a recipe runner passes its RolloutArguments as rollout_args
    args: D2OConfig

    def __init__(self, model, args: D2OConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 ref_model=None, peft_config=None, callbacks=None, rollout_args=None, rollout_engine=None, **kwargs):
        if rollout_args is None and rollout_engine is None:
            logger.warning("D2OTrainer got no rollout_args: sampling with the defaults (%s)",
                           RolloutArguments().sampling())
        self.rollout = RolloutSetup(rollout_args, processing_class, engine=rollout_engine, seed=args.seed)
        self._engine_holds_policy = False
        self.samples_step = 0  # the optimizer step the live training samples were drawn at (0: the reference)
        self.samples_version = 0
        self._pending_refresh_step: int | None = None
        self.train_records = None  # the train records, kept for refreshes
        if args.samples_refresh_steps:
            if train_dataset is None or self._is_tokenized(train_dataset):
                raise ValueError("samples_refresh_steps needs the train records (prompt, rejected), not a tokenized dataset")
            callbacks = [*(callbacks or []), _SamplesRefreshCallback(self)]
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, ref_model=ref_model, peft_config=peft_config,
                         callbacks=callbacks, **kwargs)
        if args.samples_refresh_steps:  # each checkpoint records which samples were live (part of the checkpoint)
            self.add_checkpoint_writer(lambda directory: (Path(directory) / CHECKPOINT_SAMPLES_FILE).write_text(
                json.dumps({"samples_step": self.samples_step})))

    # ----------------------------------------------------------------------------------------- data

    def group_responses(self, record):
        return list(record["samples"][: self.args.num_samples]) + [record["rejected"]]

    def make_collator(self, group_collator, args):
        return VersionedCollator(group_collator)

    @staticmethod
    def _is_tokenized(dataset) -> bool:
        return hasattr(dataset, "column_names") and "prompt_ids" in dataset.column_names

    def build_split(self, data, name):
        """Negatives records -> each record's own ``samples`` (first K) or K reference samples of its prompt
        (cached; sampled once per distinct prompt) -> tokenized groups [y_1..y_K, y_l]; the train split of a
        run with refreshed samples is a :class:`SwappableSamples`."""
        if self._is_tokenized(data):
            return super().build_split(data, name)
        records, _ = self.load_split(data, name)
        split = super().build_split(self.attach_samples(records, name), name)
        if name == "train" and self.args.samples_refresh_steps:
            self.train_records = records
            return SwappableSamples(split)
        return split

    def attach_samples(self, records, name: str) -> list[dict]:
        """The records with ``samples``: each record's own (at least K), else K reference samples of its prompt."""
        rows = records.to_list() if hasattr(records, "to_list") else list(records)
        k = self.args.num_samples
        to_sample: dict[str, object] = {}
        for row_number, row in enumerate(rows, start=1):
            given = row.get("samples")
            if given is None:
                to_sample.setdefault(prompt_key(row["prompt"]), row["prompt"])
            elif len(given) < k:
                raise RecordError(f"<{name} dataset>", row_number, "samples",
                                  f"has {len(given)} samples but num_samples={k}; give at least {k} or lower num_samples")
        sampled = dict(zip(to_sample, self.reference_samples(list(to_sample.values()), name))) if to_sample else {}
        return self._with_samples(rows, sampled)

    def _with_samples(self, rows: list[dict], sampled: dict[str, list[str]]) -> list[dict]:
        """Rows with K ``samples`` each (as text: message lists are joined, as tokenize_group does)."""
        k = self.args.num_samples
        out = []
        for row in rows:
            samples = row.get("samples")
            samples = sampled[prompt_key(row["prompt"])] if samples is None else samples[:k]
            out.append({**row, "samples": [message_text(x) for x in samples], "rejected": message_text(row["rejected"])})
        return out

    # -------------------------------------------------------------------------------------- sampling

    @property
    def samples_cache_dir(self) -> str:
        return self.args.samples_cache_dir or os.path.join(self.args.output_dir, "d2o_samples")

    def _reference_model(self):
        """The object the reference samples come from: the frozen reference model, else the policy (whose
        adapter, if any, is disabled while sampling)."""
        model = self.ref_model if self.ref_model is not None else self.model
        return self.accelerator.unwrap_model(model)

    def reference_samples(self, prompts: list, name: str) -> list[list[str]]:
        """K samples per prompt from the reference policy, from the cache or the rollout engine."""
        reference = self._reference_model()
        context = None
        if self.ref_model is None and is_peft_model(reference):
            context = reference.disable_adapter()
        if self._engine_holds_policy and not self._engine_respects_disable_adapter():
            def refuse():
                raise RuntimeError("reference samples after a refresh need the hf rollout backend (the engine now "
                                   "holds the policy)")
            sample_guard = refuse
        else:
            sample_guard = None
        if context is not None:
            self._check_adapter_off_for_engine(reference)
        return cached_samples(self.rollout, reference, prompts, self.args.num_samples, self.rollout.sampling(),
                              cache_dir=self.samples_cache_dir, name=name,
                              instruction_prefix=self.args.instruction_prefix, context=context, on_miss=sample_guard)

    def _engine_respects_disable_adapter(self) -> bool:
        """Whether sampling inside ``disable_adapter()`` gives the base: true for the ``hf`` backend (it
        samples from the model object itself) and assumed for an engine passed in by the caller."""
        return self.rollout.injected or self.rollout.args.rollout_backend == "hf"

    def _check_adapter_off_for_engine(self, peft_model) -> None:
        """An engine other than ``hf`` samples from the adapter it was synced with, not from the base: that
        is the reference only while the adapter is still the identity (LoRA B = 0, as when just attached)."""
        if self._engine_respects_disable_adapter():
            return
        trained = any(p.detach().abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
        if trained:
            raise ValueError(
                f"rollout_backend={self.rollout.args.rollout_backend!r} samples from the model with its adapter, but the "
                "adapter is already trained, so that is not the reference: use rollout_backend='hf', pass the samples "
                "in the records, or start from a fresh adapter"
            )

    # --------------------------------------------------------------------------------------- refresh

    def refresh_train_samples(self, step: int) -> None:
        """Re-sample K responses per training prompt from the current policy and swap them in."""
        policy = self.accelerator.unwrap_model(self.model)
        prompts = self._train_prompts()
        samples = self.rollout.sample_texts(policy, prompts, self.args.num_samples, self.rollout.sampling(step),
                                            transform=lambda p: with_instruction_prefix(p, self.args.instruction_prefix))
        self._engine_holds_policy = True
        path = self._refresh_path(step)
        if self.accelerator.is_main_process:
            write_jsonl(({"prompt": p, "samples": s} for p, s in zip(prompts, samples)), path)
        self.accelerator.wait_for_everyone()
        self._swap_train_samples(dict(zip(map(prompt_key, prompts), samples)), step)
        logger.info("D2O: step %d, re-sampled %d x %d training responses from the policy", step, len(prompts),
                    self.args.num_samples)

    def _train_prompts(self) -> list:
        seen = {}
        for prompt in self.train_records["prompt"]:
            seen.setdefault(prompt_key(prompt), prompt)
        return list(seen.values())

    def _refresh_path(self, step: int) -> Path:
        return Path(self.args.output_dir) / REFRESH_DIR / f"step-{step}.jsonl"

    def _swap_train_samples(self, samples_by_prompt: dict[str, list[str]], step: int) -> None:
        rows = [{**row, "samples": None} for row in self.train_records.to_list()]
        groups = self.tokenize_records(datasets.Dataset.from_list(self._with_samples(rows, samples_by_prompt)),
                                       f"train (samples of step {step})")
        self.samples_version += 1
        self.samples_step = step
        self.train_dataset.swap(groups, self.samples_version)

    def _restore_refreshed_samples(self, checkpoint: str | None) -> None:
        """On resume: put back the samples that were live when the checkpoint was written."""
        pointer = Path(checkpoint) / CHECKPOINT_SAMPLES_FILE if checkpoint else None
        if pointer is None:
            return
        step = on_main_process(lambda: int(json.loads(pointer.read_text())["samples_step"]) if pointer.exists() else 0)
        if step == 0 or step == self.samples_step:
            return
        path = self._refresh_path(step)

        def read():
            return read_jsonl(path) if path.exists() else None

        rows = on_main_process(read)
        if rows is None:  # re-sample once the checkpoint's weights are loaded (on_train_begin)
            logger.warning("resume: %s (the samples of step %d) is missing; re-sampling from the checkpoint's policy",
                           path, step)
            self._pending_refresh_step = step
            return
        self._swap_train_samples({prompt_key(r["prompt"]): r["samples"] for r in rows}, step)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if self.args.samples_refresh_steps:
            self._restore_refreshed_samples(resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Re-collate a batch built from samples that were swapped out since (prefetched batches, worker
        processes), so every step after a refresh trains on the new samples."""
        version = inputs.pop("samples_version", None)
        rows = inputs.pop("record_index", None)
        if version is not None and int(version[0]) != self.samples_version:
            fresh = self.data_collator([self.train_dataset[i] for i in rows.tolist()])
            fresh.pop("samples_version"), fresh.pop("record_index")
            inputs = self._prepare_inputs(fresh)
        return super().training_step(model, inputs, num_items_in_batch)

    # ----------------------------------------------------------------------------------------- loss

    def compute_batch_loss(self, model, batch):
        k = self.args.num_samples
        policy = self.score(model, batch)
        ref_logps = self.reference_logps(model, batch)
        if policy.logps.numel() % (k + 1):
            raise RuntimeError(f"D2O groups must hold K + 1 = {k + 1} responses, the batch has {policy.logps.numel()}")
        policy_logps, ref = policy.logps.view(-1, k + 1), ref_logps.view(-1, k + 1)
        out = d2o_loss(policy_logps[:, :k], ref[:, :k], policy_logps[:, k], ref[:, k],
                       beta=self.args.beta, alpha=self.args.alpha)
        loss = out.losses.mean()
        margins = out.positive_terms - out.negative_terms
        logratios = (policy_logps - ref).detach()
        metrics = {
            "loss/d2o": loss.detach(),
            "rewards/positive": out.positive_terms.mean(),
            "rewards/negative": out.negative_terms.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "logratio/samples": logratios[:, :k].mean(),
            "logratio/rejected": logratios[:, k].mean(),
            "logps/samples": policy_logps[:, :k].detach().mean(),
            "logps/rejected": policy_logps[:, k].detach().mean(),
        }
        return loss, metrics
