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


# ---------------------------------------------------------------------------------------------------
# Per-step negatives: advantage-weighted log-likelihood (Setlur et al. 2024)


class AdvantageWeightedLoss(NamedTuple):
    loss: torch.Tensor  # scalar
    weighted_nll: torch.Tensor  # scalar, −Σ_t w_t·log πθ(y_t|·) / T, detached
    kl: torch.Tensor  # scalar, mean per-token k3 estimate of KL(πθ ‖ π_ref) (0 without a reference), detached


def advantage_weighted_loss(
    token_logps: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    ref_token_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
) -> AdvantageWeightedLoss:
    """Advantage-weighted log-likelihood with a per-token KL penalty, over the T scored tokens of a batch:

        L_AW = −(1/T)·Σ_t w_t·log πθ(y_t | x, y_<t)  +  kl_coef·(1/T)·Σ_t k3_t
        k3_t = exp(d_t) − d_t − 1,   d_t = log π_ref(y_t | x, y_<t) − log πθ(y_t | x, y_<t)

    where w_t is the advantage A_i = Q_i − Q_{i−1} of the step i that token t belongs to (a constant for
    positive responses, see ``PerStepConfig``). This is the sample form of the advantage-weighted RL
    objective that Setlur et al. 2024 (arXiv:2406.14532, §6) show per-step DPO optimises:
    max_π E_{x, y∼π_sft}[Σ_i A^{π_sft}(x, y_{1:i−1}; y_i)·log π(y_i | x, y_{1:i−1})] − β·KL(π ‖ π_sft).
    Its gradient is −(1/T)·Σ_t w_t·∇log πθ(y_t|·): tokens of steps that raised the chance of success are
    pushed up, tokens of the step that lost it (the pit) pushed down, steps that changed nothing (A = 0)
    left alone. A negative weight is unbounded below on its own; the KL term (k3, Schulman 2020,
    "Approximating KL divergence", as in GRPO; ≥ 0, zero when πθ = π_ref on the token) keeps the policy
    near the reference. T = ``normalizer`` (default: the number of tokens); pass e.g. the number of
    responses for a per-response sum.
    Shapes: all per-token tensors [N] in the same order.
    """
    if token_logps.shape != token_weights.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and token_weights {tuple(token_weights.shape)} differ")
    denom = normalizer if normalizer is not None else max(token_logps.numel(), 1)
    weighted = -(token_weights.to(token_logps.dtype) * token_logps).sum() / denom
    loss = weighted
    kl = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    if kl_coef:
        if ref_token_logps is None:
            raise ValueError("kl_coef > 0 needs ref_token_logps")
        d = ref_token_logps.to(token_logps.dtype) - token_logps
        kl = (torch.exp(d) - d - 1).sum() / denom
        loss = loss + kl_coef * kl
    return AdvantageWeightedLoss(loss, weighted.detach(), kl.detach())


# ---------------------------------------------------------------------------------------------------
# KTO: unpaired desirable and undesirable responses


class KTOLoss(NamedTuple):
    losses: torch.Tensor  # [N] per-example loss, weighted by λ_D (desirable) or λ_U (undesirable)
    rewards: torch.Tensor  # [N] β·r(y), detached
    reference_point: torch.Tensor  # [] z_ref = max(0, KL estimate), detached


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_estimate: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", arXiv:2402.01306, Eq. 7-8), in the form ``trl.KTOTrainer`` computes (``loss_type='kto'``).

    With r(y) = log πθ(y|x) − log π_ref(y|x) and the reference point z_ref = max(0, KL estimate), detached
    (no gradient flows through it):

    * desirable y (``desirable`` true):   λ_D · (1 − σ(β·(r(y) − z_ref)))
    * undesirable y:                      λ_U · (1 − σ(β·(z_ref − r(y))))

    ``kl_estimate`` is the estimate of KL(πθ ‖ π_ref) from mismatched pairs: the mean over pairs (x_i, y_j),
    j ≠ i, of log πθ(y_j|x_i) − log π_ref(y_j|x_i) (TRL: each completion of a batch with the previous
    example's prompt; averaged over the processes before it is passed here). The batch loss is the mean of
    ``losses`` over all examples, desirable and undesirable together (TRL: ``losses.nanmean()``).
    """
    desirable = desirable.to(torch.bool)
    reference_point = kl_estimate.detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    values = torch.where(desirable, 1 - torch.sigmoid(beta * (logratios - reference_point)),
                         1 - torch.sigmoid(beta * (reference_point - logratios)))
    weights = torch.where(desirable, torch.full_like(values, desirable_weight), torch.full_like(values, undesirable_weight))
    return KTOLoss(weights * values, (beta * logratios).detach(), reference_point)
