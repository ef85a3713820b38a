"""Scoring core: summed response log-probs equal a direct per-sequence forward, in both layouts."""

import pytest
import torch
from conftest import load_tiny

from alignkit.data.collate import GroupCollator
from alignkit.data.tokenize import tokenize_group
from alignkit.scoring import block_attention_mask, score_responses
from alignkit.tasks.arithmetic import make_preference_pairs


def _groups(tokenizer, n=5, k=3):
    """Groups with different numbers of responses of different lengths (K-sample shape)."""
    groups = []
    for i, p in enumerate(make_preference_pairs(n, seed=7)):
        responses = [p["chosen"], p["rejected"], p["chosen"][: 5 + i]][: 1 + (i % k)]
        groups.append(tokenize_group(tokenizer, p["prompt"], responses))
    return groups


def _direct(model, groups):
    """log π(y|x) by a separate full forward of each prompt + response, summing target log-probs."""
    out = []
    with torch.no_grad():
        for g in groups:
            p = len(g["prompt_ids"])
            for r in g["response_ids"]:
                logp = model(torch.tensor([g["prompt_ids"] + r])).logits[0].double().log_softmax(-1)
                out.append(sum(logp[p - 1 + t, tok].item() for t, tok in enumerate(r)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_layouts_equal_direct_forward(layout, attn, arch, tiny_model_path, tiny_llama_path, tokenizer):
    path = tiny_model_path if arch == "qwen2" else tiny_llama_path
    model = load_tiny(path, attn)
    groups = _groups(tokenizer)
    batch = GroupCollator(tokenizer.pad_token_id, layout, pad_to_multiple_of=8)(groups)
    with torch.no_grad():
        scores = score_responses(model, batch)
    expected = _direct(model, groups)
    assert scores.logps.shape == expected.shape == (sum(len(g["response_ids"]) for g in groups),)
    torch.testing.assert_close(scores.logps.double(), expected, atol=1e-4, rtol=1e-6)
    assert scores.lengths.tolist() == [len(r) for g in groups for r in g["response_ids"]]
    # per-token values add up to the sums
    resummed = torch.zeros_like(scores.logps).index_add(0, scores.token_response, scores.token_logps)
    torch.testing.assert_close(resummed, scores.logps)


def test_shared_prompt_gradients_equal_padded(tiny_model_path, tokenizer):
    groups = _groups(tokenizer)
    grads = {}
    for layout in ("padded", "shared_prompt"):
        model = load_tiny(tiny_model_path)
        batch = GroupCollator(tokenizer.pad_token_id, layout)(groups)
        score_responses(model, batch).logps.sum().backward()
        grads[layout] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["padded"].items():
        torch.testing.assert_close(grads["shared_prompt"][name], g, atol=1e-4, rtol=1e-4)


def test_shared_prompt_forwards_fewer_tokens(tokenizer):
    groups = _groups(tokenizer, n=4, k=3)
    padded = GroupCollator(tokenizer.pad_token_id, "padded")(groups)
    shared = GroupCollator(tokenizer.pad_token_id, "shared_prompt")(groups)
    real = lambda b: int((b["attention_mask"] > 0).sum()) if "attention_mask" in b else int((b["segment_ids"] >= 0).sum())
    prompt_tokens = sum(len(g["prompt_ids"]) * (len(g["response_ids"]) - 1) for g in groups)
    assert real(padded) - real(shared) == prompt_tokens > 0


def test_block_mask_pattern():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    m = block_attention_mask(seg, "sdpa", torch.float32)[0, 0]
    # second response token 5 sees the prompt (0, 1) and itself and token 4, not response 1 (2, 3)
    assert m[5].tolist() == [True, True, False, False, True, True, False]
    assert m[3].tolist() == [True, True, True, True, False, False, False]
    assert m[6].tolist() == [False] * 6 + [True]  # padding attends only itself
    eager = block_attention_mask(seg, "eager", torch.float32)[0, 0]
    assert (eager[5] == 0).tolist() == m[5].tolist()
    with pytest.raises(ValueError, match="padded"):
        block_attention_mask(seg, "flash_attention_2", torch.float32)


def test_logits_never_built_for_prompt_positions(tiny_model_path, tokenizer):
    model = load_tiny(tiny_model_path)
    groups = _groups(tokenizer)
    batch = GroupCollator(tokenizer.pad_token_id, "shared_prompt")(groups)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        score_responses(model, batch, keep_logits=True)
    handle.remove()
    n_response_tokens = sum(len(r) for g in groups for r in g["response_ids"])
    assert shapes == [(1, n_response_tokens, model.config.vocab_size)]
