"""The default score_layout ('auto') and the prompt-KV-reuse layout give trl.DPOTrainer's loss and gradients too
(the padded and shared_prompt layouts are checked in test_dpo_vs_trl.py, with the same helpers)."""

import copy

import pytest
import torch
from conftest import load_tiny
from test_dpo_vs_trl import _alignkit_loss_and_grads, _pairs, _trl_loss_and_grads


@pytest.mark.parametrize("layout", ["prompt_kv", "auto"])
def test_dpo_loss_and_grads_match_trl(tiny_model_path, tokenizer, tmp_path, layout):
    torch.manual_seed(0)
    base = load_tiny(tiny_model_path)
    policy = copy.deepcopy(base)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pairs = _pairs()
    trl_loss, trl_grads = _trl_loss_and_grads(copy.deepcopy(policy), copy.deepcopy(base), tokenizer, pairs, tmp_path)
    ak_loss, ak_grads = _alignkit_loss_and_grads(copy.deepcopy(policy), copy.deepcopy(base), tokenizer, pairs, tmp_path,
                                                 layout)
    assert abs(trl_loss.item() - 0.6931) > 1e-3
    torch.testing.assert_close(ak_loss, trl_loss, atol=1e-5, rtol=0)
    assert set(ak_grads) == set(trl_grads) and len(ak_grads) > 0
    for name, g in trl_grads.items():
        torch.testing.assert_close(ak_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
