"""DPO: ``DPOConfig`` + ``DPOTrainer`` on preference records (``prompt``, ``chosen``, ``rejected``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.losses import DPO_LOSS_TYPES, dpo_loss, nll_loss
from alignkit.trainers.base import AlignConfig, AlignTrainer


@dataclass
class DPOConfig(AlignConfig):
    """DPO settings. Defaults follow Rafailov et al. (β = 0.1) and TRL (learning rate 1e-6)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {DPO_LOSS_TYPES}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO: probability that a label is flipped."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of a per-token NLL term on the chosen response."})
    learning_rate: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")


class DPOTrainer(AlignTrainer):
    """Direct Preference Optimization on (prompt, chosen, rejected) records.

    Each record is one group of two responses, [chosen, rejected]; both go through the policy in one
    forward (sharing the prompt with the default layout) and through the reference in another.
    Logged: ``loss/dpo``, ``loss/sft`` (if weighted), ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.
    """

    record_kind = "preference"
    args: DPOConfig

    def group_responses(self, record):
        return [record["chosen"], record["rejected"]]

    def compute_batch_loss(self, model, batch):
        policy = self.score(model, batch)
        ref_logps = self.reference_logps(model, batch)
        chosen, rejected = policy.logps.view(-1, 2).unbind(1)
        ref_chosen, ref_rejected = ref_logps.view(-1, 2).unbind(1)
        chosen_len, rejected_len = policy.lengths.view(-1, 2).unbind(1)
        out = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected,
            beta=self.args.beta,
            loss_type=self.args.loss_type,
            label_smoothing=self.args.label_smoothing,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
        )
        loss = out.losses.mean()
        metrics = {"loss/dpo": loss.detach()}
        if self.args.sft_weight:
            sft = nll_loss(chosen, chosen_len).mean()
            loss = loss + self.args.sft_weight * sft
            metrics["loss/sft"] = sft.detach()
        metrics.update(
            {
                "rewards/chosen": out.chosen_rewards.mean(),
                "rewards/rejected": out.rejected_rewards.mean(),
                "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
                "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
                "logps/chosen": chosen.detach().mean(),
                "logps/rejected": rejected.detach().mean(),
            }
        )
        return loss, metrics
