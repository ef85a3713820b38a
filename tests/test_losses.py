"""Each loss against a slow, direct re-computation of its formula (plain Python floats)."""

import math

import pytest
import torch

from alignkit.losses import dpo_loss, nll_loss


def _data(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(n, generator=g, dtype=torch.float64) * 50 + 5) for _ in range(4))
    lc = torch.randint(1, 30, (n,), generator=g)
    lr = torch.randint(1, 30, (n,), generator=g)
    return pc, pr, rc, rr, lc, lr


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_sigmoid_matches_formula(beta, label_smoothing):
    pc, pr, rc, rr, lc, lr = _data()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing)
    for i in range(len(pc)):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected = -(1 - label_smoothing) * _log_sigmoid(beta * delta) - label_smoothing * _log_sigmoid(-beta * delta)
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()))


def test_dpo_ipo_matches_formula():
    pc, pr, rc, rr, lc, lr = _data(seed=1)
    beta = 0.1
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) / lc[i].item() - (pr[i].item() - rr[i].item()) / lr[i].item()
        assert out.losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_dpo_hinge_matches_formula():
    pc, pr, rc, rr, lc, lr = _data(seed=2)
    out = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="hinge")
    for i in range(len(pc)):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert out.losses[i].item() == pytest.approx(max(0.0, 1 - 0.3 * delta), abs=1e-12)
    assert (out.losses == 0).any() or (out.losses > 0).all()


def test_dpo_gradient_direction():
    """Raising the chosen log-prob lowers the sigmoid loss; raising the rejected one raises it."""
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    loss = dpo_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-10.0])).losses.sum()
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # ±β·σ(0)


def test_ipo_requires_lengths_and_unknown_type_rejected():
    pc, pr, rc, rr, _, _ = _data()
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_nll_is_per_token_negative_log_likelihood():
    logps = torch.tensor([-12.0, -3.0])
    assert nll_loss(logps, torch.tensor([4, 3])).tolist() == [3.0, 1.0]
