"""Scoring core: summed response log-probs equal a direct per-sequence forward, in every layout; the auto rule."""

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


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "prompt_kv", "auto"])
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


@pytest.mark.parametrize("layout", ["shared_prompt", "prompt_kv"])
def test_gradients_equal_padded(layout, tiny_model_path, tokenizer):
    """Gradients of every weight equal the padded layout's: prompt_kv's flow back through the cached prompt keys
    and values into the prompt tokens' forward."""
    groups = _groups(tokenizer)
    grads = {}
    for name in ("padded", layout):
        model = load_tiny(tiny_model_path)
        batch = GroupCollator(tokenizer.pad_token_id, name)(groups)
        weights = torch.arange(1.0, batch["response_lengths"].numel() + 1)
        (score_responses(model, batch).logps * weights).sum().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["padded"].items():
        torch.testing.assert_close(grads[layout][name], g, atol=1e-4, rtol=1e-4)


def test_prompt_kv_lora_gradients_reach_the_prompt(tiny_model_path, tokenizer):
    """With LoRA on k_proj / v_proj only, the responses' log-probs depend on those adapters through the prompt's
    cached keys and values alone in prompt_kv (the response tokens' own keys too, but the prompt's matter):
    the gradients equal the padded layout's."""
    from peft import LoraConfig, get_peft_model

    groups = _groups(tokenizer)
    grads = {}
    for layout in ("padded", "prompt_kv"):
        torch.manual_seed(0)
        model = get_peft_model(load_tiny(tiny_model_path), LoraConfig(r=4, target_modules=["k_proj", "v_proj"],
                                                                        init_lora_weights=False))
        score_responses(model, GroupCollator(tokenizer.pad_token_id, layout)(groups)).logps.sum().backward()
        grads[layout] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["padded"] and all(g.abs().sum() > 0 for g in grads["padded"].values())
    for name, g in grads["padded"].items():
        torch.testing.assert_close(grads["prompt_kv"][name], g, atol=1e-4, rtol=1e-4)


def test_prompt_kv_falls_back_under_gradient_checkpointing(tiny_model_path, tokenizer, caplog):
    """Gradient checkpointing drops the KV cache in training: an explicit prompt_kv batch is scored in a dense
    layout (with a warning), an auto batch never picks prompt_kv; the log-probs and gradients do not change."""
    from alignkit.scoring import scoring_layout

    groups = _groups(tokenizer)
    reference = load_tiny(tiny_model_path)
    batch = GroupCollator(tokenizer.pad_token_id, "padded")(groups)
    expected = score_responses(reference, batch).logps
    expected.sum().backward()
    model = load_tiny(tiny_model_path)
    model.activation_checkpointing_enable()
    model.train()
    for layout in ("prompt_kv", "auto"):
        batch = GroupCollator(tokenizer.pad_token_id, layout)(groups)
        assert scoring_layout(model, batch) in ("padded", "shared_prompt")
        with caplog.at_level("WARNING", logger="alignkit.scoring"):
            scores = score_responses(model, batch)
        torch.testing.assert_close(scores.logps, expected.detach(), atol=1e-4, rtol=1e-6)
        scores.logps.sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
        model.zero_grad()
    with torch.no_grad():  # no backward to replay: the cache is kept, prompt_kv runs
        assert scoring_layout(model, GroupCollator(tokenizer.pad_token_id, "prompt_kv")(groups)) == "prompt_kv"


def test_auto_rule(monkeypatch):
    """The cost model behind score_layout='auto' (alignkit.data.collate.layout_costs) at the shapes it was fitted to
    (hidden 384): no shared prompt -> padded; D2O groups of 9 responses -> prompt_kv; short DPO pairs -> shared."""
    from alignkit.data.collate import layout_costs

    best = lambda p, ns, h=384: min((c, k) for k, c in layout_costs(p, ns, h).items())[1]  # noqa: E731
    assert best([64, 80], [[64], [64]]) == "padded"  # one response per group: nothing to share
    assert best([256] * 4, [[256] * 9] * 4) == "prompt_kv"  # D2O 256:256: the packed row would be 2,560 long
    assert best([64] * 4, [[64] * 9] * 4) == "prompt_kv"
    assert best([128] * 2, [[33, 33]] * 2) == "shared_prompt"  # DPO 4:1, short: one forward call beats two
    assert best([4] * 8, [[200, 200]] * 8) == "padded"  # a short prompt is not worth a second forward
    costs = layout_costs([10, 20], [[5, 7], [3]], 64)
    per_key = 1 / (3 * 64)
    assert costs["padded"] == pytest.approx(3 * 23 + 3 * 23**2 * per_key)  # 3 rows of max(P + n) = 23
    assert costs["shared_prompt"] == pytest.approx(2 * 23 + 2 * 23**2 * per_key)  # 2 rows of max(10 + 12, 20 + 3)
    kv = 2 * 20 + 3 * 7 + (2 * 20**2 + 3 * 7 * (20 + 7)) * per_key + 80 * (384 / 64) ** 2
    assert costs["prompt_kv"] == pytest.approx(kv)


@pytest.mark.parametrize("overhead, keys_per_token, expected", [
    (80.0, 3.0, "padded"),  # the defaults, at hidden 64: a second forward call costs 2,880 token forwards
    (0.0, 3.0, "prompt_kv"),
    (1e9, 1e9, "shared_prompt"),  # attention free, a second call unaffordable: the fewest tokens in one call
])
def test_auto_scores_in_the_layout_the_cost_model_picks(overhead, keys_per_token, expected, monkeypatch,
                                                        tiny_model_path, tokenizer):
    import alignkit.data.collate as collate
    from alignkit.scoring import scoring_layout

    monkeypatch.setattr(collate, "PROMPT_KV_OVERHEAD_TOKENS", overhead)
    monkeypatch.setattr(collate, "ATTENTION_KEYS_PER_TOKEN", keys_per_token)
    model = load_tiny(tiny_model_path)
    groups = _groups(tokenizer)
    batch = GroupCollator(tokenizer.pad_token_id)(groups)  # auto, the default
    assert scoring_layout(model, batch) == expected
    with torch.no_grad():
        scores = score_responses(model, batch)
        padded = score_responses(model, GroupCollator(tokenizer.pad_token_id, "padded")(groups))
    torch.testing.assert_close(scores.logps, padded.logps, atol=1e-4, rtol=1e-6)


def test_relayout_equals_collating_in_that_layout(tokenizer):
    from alignkit.data.collate import relayout

    groups = _groups(tokenizer)
    for g in groups:
        g["token_weights"] = [[0.5] * len(r) for r in g["response_ids"]]
    kv = GroupCollator(tokenizer.pad_token_id, "auto")(groups)
    for layout in ("padded", "shared_prompt"):
        direct = GroupCollator(tokenizer.pad_token_id, layout)(groups)
        moved = relayout(kv, layout, pad_token_id=tokenizer.pad_token_id)
        assert set(moved) == set(direct)
        for key, value in direct.items():
            assert torch.equal(moved[key], value), key


def test_collator_rejects_empty_prompt_or_response():
    with pytest.raises(ValueError, match="example 1: prompt_ids is empty"):
        GroupCollator(0)([{"prompt_ids": [1], "response_ids": [[2]]}, {"prompt_ids": [], "response_ids": [[2]]}])
    with pytest.raises(ValueError, match=r"example 0: response_ids\[1\] is empty"):
        GroupCollator(0, "padded")([{"prompt_ids": [1], "response_ids": [[2], []]}])


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


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "prompt_kv"])
def test_model_head_never_builds_the_logits(layout, tiny_model_path, tokenizer):
    """The model's own head sees at most one row (the one-off post-head transform check): the scored logits are
    built by the tiled head only, and ``ResponseScores.logits`` still gives the [N, V] table on request."""
    model = load_tiny(tiny_model_path)
    groups = _groups(tokenizer)
    batch = GroupCollator(tokenizer.pad_token_id, layout)(groups)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        scores = score_responses(model, batch, keep_logits=True)
    handle.remove()
    assert shapes and all(torch.Size(s[:-1]).numel() <= 1 for s in shapes), shapes
    n_response_tokens = sum(len(r) for g in groups for r in g["response_ids"])
    assert scores.logits.shape == (n_response_tokens, model.config.vocab_size)
    direct = torch.log_softmax(scores.logits.double(), -1).gather(-1, batch["score_targets"][:, None])[:, 0]
    torch.testing.assert_close(scores.token_logps.double(), direct, atol=1e-5, rtol=0)
