"""NPO-family losses against direct re-computation of their formulas (plain Python floats), their
gradients (NPO's tends to gradient ascent's as β → 0), and the KL term against its definition."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses import (
    UNLEARNING_LOSS_TYPES,
    gradient_ascent_loss,
    npo_loss,
    simnpo_loss,
    token_kl_divergence,
)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _data(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = -(torch.rand(n, generator=g, dtype=torch.float64) * 80 + 0.5)
    ref = -(torch.rand(n, generator=g, dtype=torch.float64) * 80 + 0.5)
    lengths = torch.randint(1, 40, (n,), generator=g)
    return policy, ref, lengths


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_npo_matches_formula(beta):
    policy, ref, _ = _data()
    out = npo_loss(policy, ref, beta=beta)
    for i in range(len(policy)):
        r = policy[i].item() - ref[i].item()
        assert out[i].item() == pytest.approx(-(2 / beta) * _log_sigmoid(-beta * r), rel=1e-12, abs=1e-12)
    # r = 0 (policy = reference, the start of training): 2·ln 2 / β
    assert npo_loss(torch.tensor([-5.0]), torch.tensor([-5.0]), beta=beta).item() == pytest.approx(2 * math.log(2) / beta)


@pytest.mark.parametrize(("beta", "gamma"), [(4.5, 0.0), (2.5, 0.0), (1.0, 0.7)])
def test_simnpo_matches_formula_and_paper_sign(beta, gamma):
    policy, _, lengths = _data(seed=1)
    out = simnpo_loss(policy, lengths, beta=beta, gamma=gamma)
    for i in range(len(policy)):
        x = -(beta / lengths[i].item()) * policy[i].item() - gamma
        assert out[i].item() == pytest.approx(-(2 / beta) * _log_sigmoid(x), rel=1e-12, abs=1e-12)
    # the margin makes forgetting stricter: a larger γ gives a larger loss for the same policy
    assert (simnpo_loss(policy, lengths, beta=beta, gamma=gamma + 1.0) > out).all()
    # the authors' code writes the margin inside the β scaling: −(2/β)·log σ(β·(−logp/|y| − δ)), γ = β·δ
    delta = 0.3
    code_form = -(2 / beta) * F.logsigmoid(beta * (-policy / lengths - delta))
    torch.testing.assert_close(simnpo_loss(policy, lengths, beta=beta, gamma=beta * delta), code_form)


def test_gradient_ascent_is_the_log_likelihood():
    policy, _, _ = _data(seed=2)
    logps = policy.clone().requires_grad_(True)
    loss = gradient_ascent_loss(logps)
    torch.testing.assert_close(loss, policy)
    loss.sum().backward()
    assert (logps.grad == 1).all()  # descending this loss lowers log π(y|x): raises the NLL


def test_npo_gradient_is_weighted_gradient_ascent():
    """∂L_NPO/∂log πθ = 2·σ(β·r): GA's gradient times a weight that starts at 1 and shrinks with r."""
    policy, ref, _ = _data(seed=3)
    beta = 0.1
    logps = policy.clone().requires_grad_(True)
    npo_loss(logps, ref, beta=beta).sum().backward()
    torch.testing.assert_close(logps.grad, 2 * torch.sigmoid(beta * (policy - ref)))
    assert (logps.grad > 0).all() and (logps.grad < 2).all()


def test_npo_gradient_tends_to_ga_gradient_as_beta_goes_to_zero():
    """On the parameters of a small log-linear policy, ‖∇L_NPO − ∇L_GA‖ / ‖∇L_GA‖ → 0 as β → 0,
    linearly in β (the weight is 2·σ(β·r) = 1 + β·r/2 + O(β³))."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 5, 8, generator=g, dtype=torch.float64)  # 6 sequences x 5 tokens x 8 features
    targets = torch.randint(0, 11, (6, 5), generator=g)
    start = torch.randn(8, 11, generator=g, dtype=torch.float64)
    moved = (start + 0.3 * torch.randn(8, 11, generator=g, dtype=torch.float64)).requires_grad_(True)

    def sequence_logps(weights):
        logprobs = torch.log_softmax(features @ weights, dim=-1)
        return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)

    ref = sequence_logps(start).detach()
    (ga_grad,) = torch.autograd.grad(gradient_ascent_loss(sequence_logps(moved)).sum(), moved)
    errors = []
    for beta in (1.0, 0.1, 0.01, 0.001):
        (npo_grad,) = torch.autograd.grad(npo_loss(sequence_logps(moved), ref, beta=beta).sum(), moved)
        errors.append(((npo_grad - ga_grad).norm() / ga_grad.norm()).item())
    assert errors == sorted(errors, reverse=True)
    for big, small in zip(errors, errors[1:]):
        assert small < big / 5  # ~10x smaller per decade of β
    assert errors[-1] < 1e-3


def test_npo_is_bounded_and_ga_is_not():
    ref = torch.tensor([-10.0])
    far = torch.tensor([-1e4])
    assert npo_loss(far, ref, beta=0.1).item() == pytest.approx(0.0, abs=1e-6)  # bounded below by 0
    assert (npo_loss(torch.tensor([-20.0, -50.0, -200.0]), ref.expand(3), beta=0.1) > 0).all()
    assert gradient_ascent_loss(far).item() == -1e4  # keeps decreasing without bound


def test_token_kl_matches_definition_and_tofu_form():
    g = torch.Generator().manual_seed(4)
    policy_logits = torch.randn(7, 13, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(7, 13, generator=g, dtype=torch.float64)
    out = token_kl_divergence(policy_logits, ref_logits)
    for t in range(7):
        p_ref = [math.exp(v) for v in torch.log_softmax(ref_logits[t], -1).tolist()]
        p_pol = [math.exp(v) for v in torch.log_softmax(policy_logits[t], -1).tolist()]
        expected = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_ref, p_pol))
        assert out[t].item() == pytest.approx(expected, rel=1e-6)
    # TOFU / open-unlearning: kl_div(log πθ, log π_ref, log_target=True) = KL(π_ref ‖ πθ)
    tofu = F.kl_div(torch.log_softmax(policy_logits, -1), torch.log_softmax(ref_logits, -1), reduction="none",
                    log_target=True).sum(-1)
    torch.testing.assert_close(out, tofu.float(), rtol=1e-5, atol=1e-6)
    assert (out >= 0).all()
    torch.testing.assert_close(token_kl_divergence(ref_logits, ref_logits), torch.zeros(7), atol=1e-6, rtol=0)


def test_loss_type_table():
    assert UNLEARNING_LOSS_TYPES["npo"] == ("npo", None)
    assert UNLEARNING_LOSS_TYPES["npo_rt"] == ("npo", "nll")
    assert UNLEARNING_LOSS_TYPES["npo_kl"] == ("npo", "kl")
    assert UNLEARNING_LOSS_TYPES["simnpo"] == ("simnpo", None)
    assert UNLEARNING_LOSS_TYPES["ga"] == ("ga", None)
    assert UNLEARNING_LOSS_TYPES["ga_rt"] == ("ga", "nll")
