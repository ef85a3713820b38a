"""Loss functions: pure functions on tensors of sequence log-probs.

Conventions: ``*_logps`` are SUMMED response-token log-probs, log π(y|x), one value per sequence
(see :mod:`alignkit.scoring`). r(y) = log πθ(y|x) − log π_ref(y|x) is the implicit reward log-ratio.
Every function returns per-example losses (no reduction) so a trainer can weight, mask or average
them, and logs the terms it needs from the same call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class DPOLoss(NamedTuple):
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] β·r(y_w), detached
    rejected_rewards: torch.Tensor  # [B] β·r(y_l), detached


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DPOLoss:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) and two variants.

    With Δ = r(y_w) − r(y_l):

    * ``sigmoid`` (DPO, Eq. 7): −log σ(β·Δ). With ``label_smoothing`` ε > 0 it is the conservative
      DPO of Mitchell (2023): −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ).
    * ``ipo`` (Azar et al. 2023, arXiv:2310.12036, Eq. 17): (Δ̄ − 1/(2β))², where Δ̄ uses the
      log-ratios averaged per response token (needs ``chosen_lengths``/``rejected_lengths``). This
      per-token form is the one the IPO authors' results use and matches TRL.
    * ``hinge`` (SLiC, Zhao et al. 2023, arXiv:2305.10425): max(0, 1 − β·Δ).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths (response token counts)")
        avg_delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (avg_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    return DPOLoss(losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach())


def nll_loss(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each sequence: −log π(y|x) / |y| (the SFT term)."""
    return -logps / lengths.clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Unlearning: NPO family and gradient ascent (forget set), NLL and KL terms (retain set)

# loss_type -> (forget term, retain term)
UNLEARNING_LOSS_TYPES: dict[str, tuple[str, str | None]] = {
    "npo": ("npo", None),
    "npo_rt": ("npo", "nll"),
    "npo_kl": ("npo", "kl"),
    "simnpo": ("simnpo", None),
    "simnpo_rt": ("simnpo", "nll"),
    "ga": ("ga", None),
    "ga_rt": ("ga", "nll"),
    "ga_kl": ("ga", "kl"),
}


def npo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868), per forget example:

        L_NPO = −(2/β)·log σ(−β·r(y)),   r(y) = log πθ(y|x) − log π_ref(y|x)

    with sequence-summed log-probs. Its gradient is 2·σ(β·r)·∇log πθ(y|x): gradient ascent on the
    forget response weighted by 2·σ(β·r) ∈ (0, 2), which starts at 1 (πθ = π_ref) and shrinks as the
    policy moves below the reference, so the loss is bounded below by 0 and does not diverge like GA.
    As β → 0 the weight tends to 1 and the gradient to GA's (:func:`gradient_ascent_loss`).
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_logps - ref_logps))


def simnpo_loss(policy_logps: torch.Tensor, lengths: torch.Tensor, *, beta: float = 4.5,
                gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, "Simplicity Prevails", arXiv:2410.07163), reference-free, per example:

        L_SimNPO = −(2/β)·log σ(−(β/|y|)·log πθ(y|x) − γ)

    with the paper's sign convention: γ >= 0 is a reward margin that makes forgetting stricter (γ = 0
    in the paper's TOFU runs). The authors' code and open-unlearning write the margin inside the β
    scaling, −(2/β)·log σ(β·(−log πθ/|y| − δ)), which is this loss with γ = β·δ.
    """
    mean_logps = policy_logps / lengths.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_logps - gamma)


def gradient_ascent_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget set (the NPO paper's GA baseline), per example: L_GA = log πθ(y|x).

    Minimising it *raises* the negative log-likelihood of the forget response, without bound.
    Sequence-summed, as in the NPO paper's definition (so NPO's gradient tends to exactly this one as
    β → 0); TOFU-style implementations use the per-token mean, −NLL/|y| (pass ``policy_logps / lengths``).
    """
    return policy_logps


def token_kl_divergence(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ πθ) of the next-token distributions at each scored position ([N, V] logits -> [N]):

        KL_t = Σ_v π_ref(v | x, y_<t)·(log π_ref(v | x, y_<t) − log πθ(v | x, y_<t))

    the retain-set regulariser of NPO+KL (Zhang et al. 2024) and of TOFU's KL baseline, averaged over
    tokens by the caller. Zero exactly when the two distributions agree.
    """
    ref_logprobs = F.log_softmax(ref_logits.float(), dim=-1)
    policy_logprobs = F.log_softmax(policy_logits.float(), dim=-1)
    return (ref_logprobs.exp() * (ref_logprobs - policy_logprobs)).sum(-1)


# ---------------------------------------------------------------------------------------------------
# D²O: negatives only, reference samples as the positive distribution


class D2OLoss(NamedTuple):
    losses: torch.Tensor  # [B]
    positive_terms: torch.Tensor  # [B] (β/K)·Σ_i r(y_i), detached
    negative_terms: torch.Tensor  # [B] α·r(y_l), detached


def d2o_loss(
    policy_sample_logps: torch.Tensor,
    ref_sample_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> D2OLoss:
    """Distributional Dispreference Optimization (Duan et al. 2024, "Negating Negatives", arXiv:2403.03419,
    Eq. 3), per prompt x with K responses y_1..y_K sampled from the reference and a labelled negative y_l:

        L_D2O = −log σ( (β/K)·Σ_i r(y_i) − α·r(y_l) ),   r(y) = log πθ(y|x) − log π_ref(y|x)

    with sequence-summed log-probs (no length normalisation) and the sum over samples divided by K once.
    Shapes: ``*_sample_logps`` [B, K], ``*_rejected_logps`` [B]. With K = 1 and α = β it is DPO's sigmoid
    loss with the sample as the chosen response (:func:`dpo_loss`). α = β = 0.1 and K = 11 in the paper.
    """
    if policy_sample_logps.dim() != 2 or policy_sample_logps.shape != ref_sample_logps.shape:
        raise ValueError(
            f"sample log-probs must both be [B, K], got {tuple(policy_sample_logps.shape)} and {tuple(ref_sample_logps.shape)}"
        )
    num_samples = policy_sample_logps.size(1)
    positive = (beta / num_samples) * (policy_sample_logps - ref_sample_logps).sum(dim=1)
    negative = alpha * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(positive - negative)
    return D2OLoss(losses, positive.detach(), negative.detach())
