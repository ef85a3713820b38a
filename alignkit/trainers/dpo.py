"""DPO: ``DPOConfig`` + ``DPOTrainer`` on preference records (``prompt``, ``chosen``, ``rejected``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.losses import DPO_LOSS_TYPES, dpo_loss, nll_loss
from alignkit.negatives import preference_pairs
from alignkit.trainers.base import AlignConfig, AlignTrainer


@dataclass
class DPOConfig(AlignConfig):
    """DPO settings. Defaults follow Rafailov et al. (β = 0.1) and TRL (learning rate 1e-6)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {DPO_LOSS_TYPES}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO: probability that a label is flipped."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of a per-token NLL term on the chosen response."})
    learning_rate: float = 1e-6
    # on-policy rounds (alignkit.onpolicy): problems records in, pairs sampled from the policy
    onpolicy_rounds: int = field(
        default=0, metadata={"help": "0: train on the given pairs. N > 0: N rounds of rollout -> verify -> pairs -> DPO."}
    )
    pairs_per_prompt: int = field(default=1, metadata={"help": "On-policy: incorrect responses paired per prompt."})
    chosen_fallback: str = field(
        default="solution", metadata={"help": "On-policy: 'solution' (gold as chosen when none is correct) or 'none'."}
    )
    onpolicy_reference: str = field(
        default="initial", metadata={"help": "On-policy reference: 'initial' (starting model) or 'round' (start of each round)."}
    )
    prompts_per_round: int | None = field(default=None, metadata={"help": "On-policy: problems per round (rotating); default all."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.onpolicy_reference not in ("initial", "round"):
            raise ValueError(f"onpolicy_reference must be 'initial' or 'round', got {self.onpolicy_reference!r}")
        if self.chosen_fallback not in ("solution", "none"):
            raise ValueError(f"chosen_fallback must be 'solution' or 'none', got {self.chosen_fallback!r}")


class DPOTrainer(AlignTrainer):
    """Direct Preference Optimization on (prompt, chosen, rejected) records.

    Each record is one group of two responses, [chosen, rejected]; both go through the policy in one
    forward (sharing the prompt with the default layout) and through the reference in another.
    Logged: ``loss/dpo``, ``loss/sft`` (if weighted), ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.
    """

    record_kind = "preference"
    args: DPOConfig

    @classmethod
    def onpolicy_records(cls, args: DPOConfig, rows: list[dict]) -> list[dict]:
        """On-policy rounds: verified rollout rows -> preference pairs (see ``alignkit.negatives``)."""
        return preference_pairs(rows, pairs_per_prompt=args.pairs_per_prompt, fallback=args.chosen_fallback, seed=args.seed)

    def group_responses(self, record):
        return [record["chosen"], record["rejected"]]

    def compute_batch_loss(self, model, batch):
        a = self.args
        return pair_dpo_loss(self.score(model, batch), self.reference_logps(model, batch), beta=a.beta,
                             loss_type=a.loss_type, label_smoothing=a.label_smoothing, sft_weight=a.sft_weight)


def pair_dpo_loss(policy, ref_logps, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  sft_weight: float = 0.0):
    """DPO loss and logged terms of a batch of [chosen, rejected] groups: ``policy`` is the policy's
    :class:`~alignkit.scoring.ResponseScores`, ``ref_logps`` the reference log-probs ([2·B], group-major).
    Shared by :class:`DPOTrainer` and the first-pit mode of the per-step trainer."""
    chosen, rejected = policy.logps.view(-1, 2).unbind(1)
    ref_chosen, ref_rejected = ref_logps.view(-1, 2).unbind(1)
    chosen_len, rejected_len = policy.lengths.view(-1, 2).unbind(1)
    out = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
    )
    loss = out.losses.mean()
    metrics = {"loss/dpo": loss.detach()}
    if sft_weight:
        sft = nll_loss(chosen, chosen_len).mean()
        loss = loss + sft_weight * sft
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
