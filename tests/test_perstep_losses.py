"""The advantage-weighted loss against a direct per-token re-computation from model forwards (value and
gradients, with and without the KL term), its special cases, and ``token_weights`` collation in both
layouts (flattened in ``score_targets`` order)."""

import pytest
import torch
from conftest import load_tiny

from alignkit.data.collate import GroupCollator
from alignkit.data.tokenize import tokenize_group
from alignkit.losses import advantage_weighted_loss
from alignkit.scoring import score_responses

WEIGHTS = {"token_weights": "token"}  # the per-token field the per-step trainer declares

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _groups(tokenizer):
    groups = []
    specs = [("Start with 2. Add 3. What is the result?", ["2 + 3 = 5\nThe answer is 5.", "2 + 3 = 6\nThe answer is 6."]),
             ("Start with 4. Multiply by 2. What is the result?", ["4 * 2 = 9\nThe answer is 9."])]
    gen = torch.Generator().manual_seed(0)
    for prompt, responses in specs:
        g = tokenize_group(tokenizer, prompt, responses)
        g["token_weights"] = [(torch.rand(len(r), generator=gen) * 2 - 1).tolist() for r in g["response_ids"]]
        g["_prompt"] = prompt
        groups.append(g)
    return groups


def _slow(model, ref, groups, kl_coef):
    """Per response: one forward of prompt + response, log-softmax, the formula token by token."""
    total, kl_total, count = 0.0, 0.0, 0
    for g in groups:
        for resp, weights in zip(g["response_ids"], g["token_weights"]):
            ids = torch.tensor([g["prompt_ids"] + resp])
            logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            ref_logps = torch.log_softmax(ref(input_ids=ids).logits[0].float(), -1) if ref is not None else None
            p = len(g["prompt_ids"])
            for t, (token, w) in enumerate(zip(resp, weights)):
                lp = logps[p + t - 1, token]
                total = total - w * lp
                if ref_logps is not None:
                    d = ref_logps[p + t - 1, token] - lp
                    kl_total = kl_total + torch.exp(d) - d - 1
                count += 1
    return total / count + kl_coef * kl_total / count, total / count, kl_total / count


@pytest.mark.parametrize("layout", ["shared_prompt", "padded"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_loss_and_gradients_equal_a_direct_recomputation(tiny_model_path, tokenizer, layout, kl_coef):
    model = load_tiny(tiny_model_path)
    ref = load_tiny(tiny_model_path)
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    groups = _groups(tokenizer)
    batch = GroupCollator(tokenizer.pad_token_id, layout, extra_fields=WEIGHTS)([{k: v for k, v in g.items() if k != "_prompt"} for g in groups])

    scores = score_responses(model, batch)
    with torch.no_grad():
        ref_scores = score_responses(ref, batch)
    out = advantage_weighted_loss(scores.token_logps, batch["token_weights"], ref_token_logps=ref_scores.token_logps,
                                  kl_coef=kl_coef)
    out.loss.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    slow_loss, slow_nll, slow_kl = _slow(model, ref if kl_coef else None, groups, kl_coef)
    slow_loss.backward()
    assert float(out.loss) == pytest.approx(float(slow_loss), abs=1e-5)
    assert float(out.weighted_nll) == pytest.approx(float(slow_nll), abs=1e-5)
    if kl_coef:
        assert float(out.kl) == pytest.approx(float(slow_kl), abs=1e-6) and float(out.kl) > 1e-4
    for fast, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(fast, p.grad, atol=1e-5, rtol=1e-4)


def test_special_cases():
    logps = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    # all weights 1, no KL: the token-mean NLL (SFT)
    out = advantage_weighted_loss(logps, torch.ones(4))
    assert float(out.loss) == pytest.approx(6.5 / 4) and float(out.kl) == 0.0
    # zero weights: no loss, no gradient
    out = advantage_weighted_loss(logps, torch.zeros(4))
    out.loss.backward()
    assert float(out.loss) == 0.0 and torch.count_nonzero(logps.grad) == 0
    # negative weight pushes the token down: d loss / d logp = -w / T > 0
    logps.grad = None
    advantage_weighted_loss(logps, torch.tensor([0.0, -1.0, 0.0, 0.5])).loss.backward()
    assert logps.grad.tolist() == pytest.approx([0.0, 0.25, 0.0, -0.125])
    # KL term: zero when policy = reference; normalizer
    out = advantage_weighted_loss(logps.detach(), torch.ones(4), ref_token_logps=logps.detach(), kl_coef=1.0, normalizer=2)
    assert float(out.kl) == 0.0 and float(out.loss) == pytest.approx(6.5 / 2)
    with pytest.raises(ValueError, match="ref_token_logps"):
        advantage_weighted_loss(logps, torch.ones(4), kl_coef=0.1)
    with pytest.raises(ValueError, match="differ"):
        advantage_weighted_loss(logps, torch.ones(3))


def test_token_weights_follow_score_targets_in_both_layouts(tokenizer):
    groups = [{k: v for k, v in g.items() if k != "_prompt"} for g in _groups(tokenizer)]
    expected = [(t, w) for g in groups for r, ws in zip(g["response_ids"], g["token_weights"]) for t, w in zip(r, ws)]
    for layout in ("shared_prompt", "padded"):
        batch = GroupCollator(tokenizer.pad_token_id, layout, extra_fields=WEIGHTS)(groups)
        got = list(zip(batch["score_targets"].tolist(), batch["token_weights"].tolist()))
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert [w for _, w in got] == pytest.approx([w for _, w in expected])
    bad = [dict(groups[0], token_weights=[w[:-1] for w in groups[0]["token_weights"]])]
    with pytest.raises(ValueError, match="one value per response token"):
        GroupCollator(tokenizer.pad_token_id, extra_fields=WEIGHTS)(bad)
    # without the field, nothing changes
    plain = GroupCollator(tokenizer.pad_token_id, extra_fields=WEIGHTS)(
        [{k: v for k, v in g.items() if k != "token_weights"} for g in groups])
    assert "token_weights" not in plain
    undeclared = GroupCollator(tokenizer.pad_token_id)(groups)  # a field the method did not declare is not collated
    assert "token_weights" not in undeclared
