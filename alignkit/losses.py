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
