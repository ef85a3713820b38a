"""NPO unlearning: ``NPOConfig`` + ``NPOTrainer`` on a forget set and an optional retain set.

Records are ``sft`` records (``prompt``, ``response``) in both sets. ``loss_type`` picks the forget
term and the retain term (:data:`alignkit.losses.UNLEARNING_LOSS_TYPES`):

=============  ==========================================  ==================================
loss_type      forget term (per forget example, averaged)   retain term (weighted by α)
=============  ==========================================  ==================================
``npo``        −(2/β)·log σ(−β·r(y))                        —
``npo_rt``     same                                         per-token NLL on retain responses
``npo_kl``     same                                         KL(π_ref ‖ πθ) per retain token
``simnpo``     −(2/β)·log σ(−(β/|y|)·log πθ(y|x) − γ)       —
``simnpo_rt``  same                                         per-token NLL
``ga``         log πθ(y|x)  (gradient ascent)               —
``ga_rt``      same                                         per-token NLL  (TOFU's "grad diff")
``ga_kl``      same                                         KL(π_ref ‖ πθ)
=============  ==========================================  ==================================

r(y) = log πθ(y|x) − log π_ref(y|x) with sequence-summed log-probs; the reference is the starting model
(LoRA: the adapter switched off; otherwise a frozen copy, or log-probs precomputed before training).
SimNPO and GA need no reference, so none is built for them. Sources and conventions are in
:mod:`alignkit.losses`; the batching of the two sets in :mod:`alignkit.data.forget_retain`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from alignkit.data.forget_retain import ForgetRetainCollator, ForgetRetainDataset, ForgetRetainSampler
from alignkit.data.records import RecordError
from alignkit.losses import (
    UNLEARNING_LOSS_TYPES,
    gradient_ascent_loss,
    nll_loss,
    npo_loss,
    simnpo_loss,
    token_kl_divergence,
)
from alignkit.trainers.base import AlignConfig, AlignTrainer

logger = logging.getLogger(__name__)

DEFAULT_BETA = {"npo": 0.1, "simnpo": 4.5, "ga": None}


@dataclass
class NPOConfig(AlignConfig):
    """NPO / SimNPO / GA unlearning settings. Defaults: NPO paper (β = 0.1, α = 1, learning rate 1e-5);
    SimNPO β = 4.5, γ = 0 (the value alignkit's design takes; the SimNPO authors tune β per task)."""

    loss_type: str = field(default="npo", metadata={"help": f"One of {sorted(UNLEARNING_LOSS_TYPES)}."})
    beta: float | None = field(
        default=None, metadata={"help": "Inverse temperature β; default 0.1 for NPO variants, 4.5 for SimNPO."}
    )
    simnpo_gamma: float = field(
        default=0.0, metadata={"help": "SimNPO reward margin γ (the paper's sign: γ > 0 forgets harder)."}
    )
    retain_weight: float = field(default=1.0, metadata={"help": "α: weight of the retain term (NLL or KL)."})
    forget_weight: float = field(default=1.0, metadata={"help": "Weight of the forget term."})
    learning_rate: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in UNLEARNING_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {sorted(UNLEARNING_LOSS_TYPES)}, got {self.loss_type!r}")
        forget_term, retain_term = UNLEARNING_LOSS_TYPES[self.loss_type]
        if self.beta is None:
            self.beta = DEFAULT_BETA[forget_term]
        if forget_term != "ga" and not self.beta > 0:
            raise ValueError(f"beta must be > 0 for {self.loss_type}, got {self.beta}")
        if retain_term == "kl" and self.reference == "precomputed":
            raise ValueError(
                f"loss_type={self.loss_type!r} needs the reference's full next-token distributions on the retain "
                "tokens, which reference='precomputed' does not store (it keeps sequence log-probs only); "
                "use reference='adapter' (LoRA) or 'model'"
            )

    @property
    def forget_term(self) -> str:
        return UNLEARNING_LOSS_TYPES[self.loss_type][0]

    @property
    def retain_term(self) -> str | None:
        return UNLEARNING_LOSS_TYPES[self.loss_type][1]


def _is_empty(data) -> bool:
    return not isinstance(data, (str, os.PathLike)) and hasattr(data, "__len__") and len(data) == 0


class NPOTrainer(AlignTrainer):
    """Unlearning on a forget set (``train_dataset``) with an optional retain set (``retain_dataset``).

    Batches are ``{"forget": ..., "retain": ...}`` (see :mod:`alignkit.data.forget_retain`): one retain
    example per forget example, cycling through the whole retain set over the epochs.
    Logged: ``loss/forget`` (the forget term), ``loss/retain`` (the retain term: NLL or KL),
    ``logps/forget`` and ``logps/forget_per_token`` (log πθ summed / per token), for NPO
    ``logratio/forget`` (mean r) and ``weights/forget`` (mean 2·σ(β·r), the adaptive GA weight), and on
    retain batches ``nll/retain`` (always) and ``kl/retain`` (KL variants).
    """

    record_kind = "sft"
    uses_retain_data = True  # recipes pass DataArguments.retain_data as retain_dataset
    args: NPOConfig

    def __init__(self, model, args: NPOConfig, train_dataset=None, retain_dataset=None, eval_dataset=None,
                 processing_class=None, ref_model=None, peft_config=None, callbacks=None, **kwargs):
        if train_dataset is None:
            raise ValueError("NPOTrainer needs the forget set as train_dataset")
        retain_term = args.retain_term
        if retain_term is None:
            if retain_dataset is not None:
                logger.warning("loss_type=%r has no retain term: the retain set is not used", args.loss_type)
            retain_dataset = None
        elif retain_dataset is None:
            raise ValueError(
                f"loss_type={args.loss_type!r} adds a retain term ({retain_term} on the retain set) but no retain set "
                "was given: pass retain_dataset= (recipes: retain_data), or use a loss without one (npo, simnpo, ga)"
            )
        elif _is_empty(retain_dataset):
            raise RecordError("<retain set>", None, None, _empty_retain_message(args.loss_type, retain_term))
        self.retain_records = retain_dataset
        self.retain_dataset = None  # tokenized once, when the first split is built
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, ref_model=ref_model, peft_config=peft_config,
                         callbacks=callbacks, **kwargs)

    def needs_reference(self, args: NPOConfig) -> bool:
        # NPO's forget term and the KL retain term compare with the reference; SimNPO, GA and NLL do not
        return args.forget_term == "npo" or args.retain_term == "kl"

    # ----------------------------------------------------------------------------------------- data

    def group_responses(self, record):
        return [record["response"]]

    def make_collator(self, group_collator, args):
        return ForgetRetainCollator(group_collator)

    @property
    def data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def build_split(self, data, name):
        """The forget groups (with their reference log-probs when precomputed; the retain terms need none: NLL
        is reference-free and KL is refused with precomputed values), paired with the retain set."""
        forget = super().build_split(data, name)
        return ForgetRetainDataset(forget, self._retain_groups(), seed=self.data_seed)

    def _retain_groups(self):
        if self.retain_records is None or self.retain_dataset is not None:
            return self.retain_dataset
        try:
            self.retain_dataset = self.tokenize_records(self.retain_records, "retain")
        except RecordError as error:
            if error.row is None and error.message.startswith("no records"):
                raise RecordError(error.source, None, None,
                                  _empty_retain_message(self.args.loss_type, self.args.retain_term)) from None
            raise
        return self.retain_dataset

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not isinstance(dataset, ForgetRetainDataset):
            return super()._get_train_sampler(train_dataset)
        num_retain = len(dataset.retain) if dataset.retain is not None else None
        return ForgetRetainSampler(len(dataset.forget), num_retain, seed=self.data_seed)

    # ----------------------------------------------------------------------------------------- loss

    def compute_batch_loss(self, model, batch):
        args = self.args
        forget = batch["forget"]
        policy = self.score(model, forget)
        metrics = {
            "logps/forget": policy.logps.detach().mean(),
            "logps/forget_per_token": policy.mean_logps().detach().mean(),
        }
        if args.forget_term == "npo":
            ref_logps = self.reference_logps(model, forget)
            losses = npo_loss(policy.logps, ref_logps, beta=args.beta)
            logratio = (policy.logps - ref_logps).detach()
            metrics["logratio/forget"] = logratio.mean()
            metrics["weights/forget"] = (2 * torch.sigmoid(args.beta * logratio)).mean()
        elif args.forget_term == "simnpo":
            losses = simnpo_loss(policy.logps, policy.lengths, beta=args.beta, gamma=args.simnpo_gamma)
        else:
            losses = gradient_ascent_loss(policy.logps)
        forget_loss = losses.mean()
        metrics["loss/forget"] = forget_loss.detach()
        loss = args.forget_weight * forget_loss

        if args.retain_term is not None:
            retain = batch["retain"]
            use_kl = args.retain_term == "kl"
            retain_policy = self.score(model, retain, keep_logits=use_kl)
            nll = nll_loss(retain_policy.logps, retain_policy.lengths).mean()
            metrics["nll/retain"] = nll.detach()
            if use_kl:
                ref = self.reference_scores(model, retain, keep_logits=True)
                retain_loss = token_kl_divergence(retain_policy.logits, ref.logits).mean()
                metrics["kl/retain"] = retain_loss.detach()
            else:
                retain_loss = nll
            metrics["loss/retain"] = retain_loss.detach()
            loss = loss + args.retain_weight * retain_loss
        return loss, metrics


def _empty_retain_message(loss_type: str, retain_term: str) -> str:
    return (f"the retain set has no records, but loss_type={loss_type!r} trains a retain term ({retain_term} on "
            "retain examples) and needs at least one; give a non-empty retain set or use a loss without one "
            "(npo, simnpo, ga)")
