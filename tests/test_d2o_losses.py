"""d2o_loss against a direct re-computation of Eq. 3, its DPO special case, and its gradients."""

import math

import pytest
import torch

from alignkit.losses import d2o_loss, dpo_loss


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _data(batch=5, k=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = lambda *shape: -(torch.rand(*shape, generator=g, dtype=torch.float64) * 60 + 2)
    return logps(batch, k), logps(batch, k), logps(batch), logps(batch)


@pytest.mark.parametrize("k", [1, 3, 11])
@pytest.mark.parametrize("beta,alpha", [(0.1, 0.1), (0.5, 0.05), (0.02, 1.0)])
def test_matches_the_formula(k, beta, alpha):
    ps, rs, pl, rl = _data(k=k, seed=k)
    out = d2o_loss(ps, rs, pl, rl, beta=beta, alpha=alpha)
    for b in range(ps.size(0)):
        positive = beta / k * sum(ps[b, i].item() - rs[b, i].item() for i in range(k))
        negative = alpha * (pl[b].item() - rl[b].item())
        assert out.losses[b].item() == pytest.approx(-_log_sigmoid(positive - negative), rel=1e-12, abs=1e-12)
        assert out.positive_terms[b].item() == pytest.approx(positive, rel=1e-12)
        assert out.negative_terms[b].item() == pytest.approx(negative, rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_one_sample_with_alpha_equal_beta_is_dpo_with_the_sample_as_chosen(beta):
    ps, rs, pl, rl = _data(k=1, seed=3)
    d2o = d2o_loss(ps, rs, pl, rl, beta=beta, alpha=beta)
    dpo = dpo_loss(ps[:, 0], pl, rs[:, 0], rl, beta=beta, loss_type="sigmoid")
    torch.testing.assert_close(d2o.losses, dpo.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d2o.positive_terms, dpo.chosen_rewards, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d2o.negative_terms, dpo.rejected_rewards, rtol=1e-12, atol=1e-12)


def test_divides_by_k_once_and_does_not_length_normalise():
    """Doubling every sample's log-ratio doubles the positive term; K copies of one sample act like one."""
    one = d2o_loss(torch.tensor([[-5.0]]), torch.tensor([[-7.0]]), torch.tensor([-9.0]), torch.tensor([-9.0]))
    many = d2o_loss(torch.full((1, 11), -5.0), torch.full((1, 11), -7.0), torch.tensor([-9.0]), torch.tensor([-9.0]))
    assert one.positive_terms.item() == pytest.approx(0.1 * 2.0)
    torch.testing.assert_close(many.losses, one.losses)


def test_gradients():
    """∂L/∂log πθ(y_i) = −(β/K)·σ(−m), ∂L/∂log πθ(y_l) = α·σ(−m), with m the margin (0 at the start)."""
    k, beta, alpha = 4, 0.1, 0.3
    samples = torch.full((1, k), -10.0, requires_grad=True)
    rejected = torch.tensor([-10.0], requires_grad=True)
    d2o_loss(samples, torch.full((1, k), -10.0), rejected, torch.tensor([-10.0]), beta=beta, alpha=alpha).losses.sum().backward()
    torch.testing.assert_close(samples.grad, torch.full((1, k), -beta / k * 0.5))
    torch.testing.assert_close(rejected.grad, torch.tensor([alpha * 0.5]))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        d2o_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3))
