"""KTO: ``KTOConfig`` + ``KTOTrainer``, alignment from unpaired desirable and undesirable responses.

Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv:2402.01306) needs no pairs: each example is one response labelled desirable or
undesirable, so it trains on negatives alone. The loss (:func:`alignkit.losses.kto_loss`, as
``trl.KTOTrainer`` computes it) with r(y) = log πθ(y|x) − log π_ref(y|x):

    desirable y:    λ_D · (1 − σ(β·(r(y) − z_ref)))        undesirable y:   λ_U · (1 − σ(β·(z_ref − r(y))))

averaged over the examples of a batch. The reference point z_ref = max(0, mean over the batch's mismatched
pairs of log πθ(y'|x) − log π_ref(y'|x)), detached: as in TRL, the completions of a batch are shifted by one,
(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n−1}), and the estimate is averaged over the processes.

Records (any of them, the first kind the rows match):

* TRL's unpaired format: ``prompt``, ``completion``, ``label`` (true: desirable);
* preference records (``prompt``, ``chosen``, ``rejected``): each becomes a desirable and an undesirable
  example (TRL's ``unpair_preference_dataset``: the chosen ones, then the rejected ones);
* negatives records (``prompt``, ``rejected``): undesirable examples only.

Logged: ``loss/kto``; ``kl`` (z_ref); ``rewards/chosen`` and ``rewards/rejected`` (mean β·r of the desirable /
undesirable examples), ``rewards/margins``; ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.data.records import Schema
from alignkit.data.tokenize import truncate_group
from alignkit.losses import kto_loss
from alignkit.trainers.base import AlignConfig, AlignTrainer

UNPAIRED = Schema("unpaired", required=("prompt", "completion", "label"))  # TRL's unpaired preference format


@dataclass
class KTOConfig(AlignConfig):
    """KTO settings. Defaults follow the paper and TRL's ``KTOConfig`` (β = 0.1, λ_D = λ_U = 1, learning rate 1e-6)."""

    beta: float = field(default=0.1, metadata={"help": "β: how far from the reference the policy may move."})
    desirable_weight: float = field(
        default=1.0, metadata={"help": "λ_D: weight of desirable examples (paper: λ_D·n_D / λ_U·n_U in [1, 4/3])."}
    )
    undesirable_weight: float = field(default=1.0, metadata={"help": "λ_U: weight of undesirable examples."})
    learning_rate: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0")
        if self.reference in ("none", "precomputed"):
            raise ValueError(f"KTO needs a live reference for its KL reference point (mismatched pairs form per batch); "
                             f"reference={self.reference!r} is not possible: use 'model' or 'adapter'")
        if self.per_device_train_batch_size < 2:
            raise ValueError("KTO estimates its reference point from mismatched pairs within a batch: "
                             "per_device_train_batch_size must be >= 2")


@dataclass
class KTOCollator:
    """``{"completions": batch, "kl": batch}``: the examples, and the mismatched pairs of the KL reference point,
    example i's prompt with example i−1's completion (the first with the last; TRL's shift by one), cut to
    ``max_length`` like every group (:func:`alignkit.data.tokenize.truncate_group`)."""

    groups: object
    max_length: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
        shifted = []
        for i, ex in enumerate(examples):
            prompt, responses = truncate_group(ex["prompt_ids"], [examples[i - 1]["response_ids"][0]],
                                               max_length=self.max_length, max_prompt_length=None)
            shifted.append({"prompt_ids": prompt, "response_ids": responses})
        return {"completions": self.groups(examples), "kl": self.groups(shifted)}


class KTOTrainer(AlignTrainer):
    """KTO on unpaired, preference or negatives records; see the module docstring."""

    record_kind = (UNPAIRED, "preference", "negatives")
    extra_fields = {"label": "group"}
    args: KTOConfig

    def build_split(self, data, name):
        """Records of any of the three kinds -> unpaired examples -> one-response groups with their label."""
        if hasattr(data, "column_names") and "prompt_ids" in data.column_names:
            return super().build_split(data, name)
        records, kind = self.load_split(data, name)
        rows = records.to_list()
        if kind == "preference":
            rows = ([{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
                    + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows])
        elif kind == "negatives":
            rows = [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows]
        return super().build_split(rows, name)

    def group_responses(self, record):
        return [record["completion"]]

    def group_fields(self, record):
        return {"label": float(record["label"])}

    def make_collator(self, group_collator, args):
        return KTOCollator(group_collator, args.max_length)

    def compute_batch_loss(self, model, batch):
        a = self.args
        completions, mismatched = batch["completions"], batch["kl"]
        policy = self.score(model, completions)
        ref_logps = self.reference_logps(model, completions)
        with torch.no_grad():  # z_ref carries no gradient (TRL: the policy's KL pass is under no_grad)
            kl_logratios = self.score(model, mismatched).logps - self.reference_logps(model, mismatched)
        kl_estimate = self.accelerator.gather_for_metrics(kl_logratios.float().mean().reshape(1)).mean()
        desirable = completions["label"] > 0.5
        out = kto_loss(policy.logps, ref_logps, desirable, kl_estimate, beta=a.beta,
                       desirable_weight=a.desirable_weight, undesirable_weight=a.undesirable_weight)
        loss = out.losses.mean()
        logps = policy.logps.detach()

        def mean(values, where):
            return values[where].mean() if bool(where.any()) else torch.full((), float("nan"), device=values.device)

        chosen, rejected = mean(out.rewards, desirable), mean(out.rewards, ~desirable)
        metrics = {
            "loss/kto": loss.detach(),
            "kl": out.reference_point,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "logps/chosen": mean(logps, desirable),
            "logps/rejected": mean(logps, ~desirable),
        }
        return loss, metrics
