"""The tiled output head (alignkit.output_head) and the scorer's use of it: values and gradients equal the full
[N, V] logits computation (fp32, 1e-5), for tied and untied heads, LoRA, post-head transforms and the KL term;
the head's live memory stays a few tiles whatever the vocabulary."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import load_tiny

import alignkit.output_head as output_head
from alignkit.data.collate import GroupCollator
from alignkit.data.tokenize import tokenize_group
from alignkit.losses import token_kl_divergence
from alignkit.output_head import OutputHead, greedy_tokens, selective_log_softmax, token_kl, token_log_probs
from alignkit.scoring import response_token_kl, score_responses
from alignkit.tasks.arithmetic import make_preference_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = dict(atol=1e-5, rtol=1e-5)


def _peak_tensor_memory():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "head_memory.py"
    spec = importlib.util.spec_from_file_location("head_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakTensorMemory


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 rows × 35 vocabulary columns (log-probs: 2 tables of 500 values), so that every test below
    crosses row and vocabulary tile boundaries."""
    monkeypatch.setattr(output_head, "CHUNK_ELEMENTS", 500)
    monkeypatch.setattr(output_head, "ROW_BLOCK", 7)
    monkeypatch.setattr(output_head, "MIN_COLUMNS", 16)


def _head(vocab=301, hidden=24, bias=False, trained=True, seed=0, **transform):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(hidden, vocab, bias=bias)
    linear.weight.requires_grad_(trained)
    if bias:
        linear.bias.requires_grad_(trained)
    return OutputHead(linear, **transform)


def _grads(*tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("trained", [True, False], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.7, "temperature": 0.9}, {"softcap": 3.0}, "bias"],
                         ids=["plain", "scale-temperature", "softcap", "bias"])
def test_token_log_probs_equal_full_table(small_tiles, trained, transform):
    bias = transform == "bias"
    head = _head(bias=bias, trained=trained, **({} if bias else transform))
    hidden = torch.randn(45, 24, requires_grad=True)
    targets = torch.randint(301, (45,))
    weights = torch.randn(45)
    direct = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None])[:, 0]
    (direct * weights).sum().backward()
    expected = _grads(hidden, *head.module.parameters())
    hidden.grad = None
    head.module.zero_grad(set_to_none=True)
    tiled = token_log_probs(head, hidden, targets)
    (tiled * weights).sum().backward()
    torch.testing.assert_close(tiled, direct.detach(), **TOL)
    for got, want in zip(_grads(hidden, *head.module.parameters()), expected):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, **TOL)


def test_token_log_probs_rejects_targets_outside_the_vocabulary():
    head = _head(vocab=10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        token_log_probs(head, torch.randn(3, 24), torch.tensor([1, 10, 2]))


def test_selective_log_softmax_equals_log_softmax(small_tiles):
    logits = torch.randn(30, 101, requires_grad=True)
    targets = torch.randint(101, (30,))
    weights = torch.randn(30)
    direct = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    (direct * weights).sum().backward()
    expected, logits.grad = logits.grad.clone(), None
    before = logits.detach().clone()
    tiled = selective_log_softmax(logits, targets)
    (tiled * weights).sum().backward()
    torch.testing.assert_close(tiled, direct.detach(), **TOL)
    torch.testing.assert_close(logits.grad, expected, **TOL)
    assert torch.equal(logits.detach(), before)  # the input is left alone


@pytest.mark.parametrize("trained", [True, False], ids=["trained-head", "frozen-head"])
def test_token_kl_and_greedy_equal_full_table(small_tiles, trained):
    head = _head(trained=trained, softcap=5.0 if trained else None)
    ref_head = _head(seed=1, trained=False)
    hidden = torch.randn(40, 24, requires_grad=True)
    ref_hidden = torch.randn(40, 24)
    weights = torch.rand(40)
    direct = token_kl_divergence(head(hidden), ref_head(ref_hidden))
    (direct * weights).sum().backward()
    expected = _grads(hidden, *head.module.parameters())
    hidden.grad = None
    head.module.zero_grad(set_to_none=True)
    tiled = token_kl(head, hidden, lambda r0, r1, v0, v1: ref_head.tile(ref_hidden, r0, r1, v0, v1))
    (tiled * weights).sum().backward()
    torch.testing.assert_close(tiled, direct.detach(), **TOL)
    for got, want in zip(_grads(hidden, *head.module.parameters()), expected):
        if want is not None:
            torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(greedy_tokens(head, hidden.detach()), head(hidden).argmax(-1))


# ------------------------------------------------------------------------------------------- the scorer


def _groups(tokenizer, n=4):
    groups = []
    for i, p in enumerate(make_preference_pairs(n, seed=11)):
        groups.append(tokenize_group(tokenizer, p["prompt"], [p["chosen"], p["rejected"]][: 1 + i % 2]))
    return groups


def _full_table_scores(model, batch):
    """Token log-probs the way alignkit computed them before the tiled head: the model's [rows, seq, V] logits,
    the scored rows picked out, log-softmax-gather on the table (padded batches)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    rows = logits.reshape(-1, logits.size(-1)).index_select(0, batch["score_index"]).float()
    return torch.log_softmax(rows, -1).gather(-1, batch["score_targets"][:, None])[:, 0], rows


def _untied(model):
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    model.config.tie_word_embeddings = False
    return model


def _lora(model, target_modules):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules,
                                             init_lora_weights=False))
    return model


MODELS = {
    "tied": lambda m: m,
    "untied": _untied,
    "lora": lambda m: _lora(m, "all-linear"),  # head frozen: the forward contracts the gradient
    "lora-on-head": lambda m: _lora(m, ["q_proj", "v_proj", "lm_head"]),  # a PEFT head: called whole
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_scores_and_gradients_equal_full_table(small_tiles, kind, tiny_model_path, tokenizer):
    torch.manual_seed(0)
    model = MODELS[kind](load_tiny(tiny_model_path))
    batch = GroupCollator(tokenizer.pad_token_id, "padded")(_groups(tokenizer))
    weights = torch.randn(batch["score_targets"].numel())
    expected_logps, _ = _full_table_scores(model, batch)
    (expected_logps * weights).sum().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expected = {n: p.grad.clone() for n, p in params}
    model.zero_grad(set_to_none=True)
    scores = score_responses(model, batch)
    (scores.token_logps * weights).sum().backward()
    torch.testing.assert_close(scores.token_logps, expected_logps.detach(), **TOL)
    assert {n for n, p in params if p.grad is not None} == set(expected)
    for name, p in params:
        torch.testing.assert_close(p.grad, expected[name], **TOL, msg=name)


@pytest.mark.parametrize("kind", ["untied", "lora-on-head"])
def test_response_token_kl_equals_kl_of_logits(small_tiles, kind, tiny_model_path, tokenizer):
    """The tiled KL of two keep_logits scorings equals losses.token_kl_divergence on their [N, V] logits, values and
    gradients, with a frozen reference model (untied) and with the adapter-disabled reference (a PEFT head)."""
    torch.manual_seed(0)
    base = load_tiny(tiny_model_path)
    batch = GroupCollator(tokenizer.pad_token_id, "prompt_kv")(_groups(tokenizer))
    if kind == "untied":
        policy, ref = _untied(copy.deepcopy(base)), base.requires_grad_(False)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        reference = lambda: score_responses(ref, batch, keep_logits=True)  # noqa: E731
    else:
        policy = MODELS[kind](base)

        def reference():
            with policy.disable_adapter():
                return score_responses(policy, batch, keep_logits=True)
    weights = torch.rand(batch["score_targets"].numel())
    results = {}
    for way in ("table", "tiled"):
        policy.zero_grad(set_to_none=True)
        scores = score_responses(policy, batch, keep_logits=True)
        with torch.no_grad():
            ref_scores = reference()
        kl = (token_kl_divergence(scores.logits, ref_scores.logits) if way == "table"
              else response_token_kl(scores, ref_scores))
        (kl * weights).sum().backward()
        results[way] = (kl.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None},
                        ref_scores.greedy_tokens(), ref_scores.logits.argmax(-1))
    assert results["tiled"][0].abs().max() > 1e-3  # the two distributions differ
    torch.testing.assert_close(results["tiled"][0], results["table"][0], **TOL)
    assert set(results["tiled"][1]) == set(results["table"][1])
    for name, g in results["table"][1].items():
        torch.testing.assert_close(results["tiled"][1][name], g, **TOL, msg=name)
    assert torch.equal(results["tiled"][2], results["tiled"][3])


def test_post_head_transform_is_applied_and_checked(tokenizer):
    """Gemma 2 soft-caps its logits after the head: the scores follow (and its sliding-window layers send a
    prompt_kv batch through the dense fallback). A transform the config declares but the model does not apply
    is caught by the one-row check instead of giving wrong log-probs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    groups = [{"prompt_ids": [5, 6, 7], "response_ids": [[8, 9], [10, 11, 12]]}, {"prompt_ids": [3, 4], "response_ids": [[1]]}]
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=2.0, attn_implementation="eager"))
    with torch.no_grad():
        gemma.lm_head.weight.mul_(50)  # logits well beyond the cap
        scores = score_responses(gemma, GroupCollator(0, "prompt_kv")(groups))
        batch = GroupCollator(0, "padded")(groups)
        expected, rows = _full_table_scores(gemma, batch)
    assert rows.abs().max() > 1.5  # the cap binds
    torch.testing.assert_close(scores.token_logps, expected, **TOL)

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    qwen.config.logit_scale = 2.0  # Qwen2 does not scale its logits
    with pytest.raises(RuntimeError, match="post_head_transform"):
        score_responses(qwen, GroupCollator(0, "padded")(groups))


# ------------------------------------------------------------------------------------------- memory


def _head_step(head, hidden, targets, tiled: bool) -> None:
    if tiled:
        token = token_log_probs(head, hidden, targets)
    else:
        token = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None])[:, 0]
    (token * torch.linspace(0.5, 1.5, token.numel())).sum().backward()


@pytest.mark.parametrize("trained", [False, True], ids=["frozen-head", "trained-head"])
def test_head_memory_is_a_few_tiles_whatever_the_vocabulary(monkeypatch, trained):
    """Peak live tensor bytes of one forward + backward through the head: the full table grows with N·V; the
    tiled head stays within a few tiles plus [N, hidden] rows (plus the weight's own gradient when trained)."""
    PeakTensorMemory = _peak_tensor_memory()
    chunk = 1 << 16
    monkeypatch.setattr(output_head, "CHUNK_ELEMENTS", chunk)
    rows, hidden_size = 256, 32
    peaks = {}
    for vocab in (8_000, 32_000):
        for tiled in (False, True):
            head = _head(vocab=vocab, hidden=hidden_size, trained=trained)
            hidden = torch.randn(rows, hidden_size, requires_grad=True)
            targets = torch.randint(vocab, (rows,))
            tracker = PeakTensorMemory()
            with tracker:
                _head_step(head, hidden, targets, tiled)
            weight_grad = vocab * hidden_size * 4 if trained else 0
            peaks[vocab, tiled] = tracker.peak - weight_grad
    table = lambda vocab: rows * vocab * 4  # noqa: E731
    for vocab in (8_000, 32_000):
        assert peaks[vocab, False] >= 2 * table(vocab)  # the full table and its softmax / gradient
        # a few tiles and a few [rows, hidden] / [rows] vectors (trained: plus a [vocab-block, hidden] slice)
        bound = 6 * chunk * 4 + 8 * rows * hidden_size * 4 + (chunk * 4 if trained else 0)
        assert peaks[vocab, True] <= bound, (vocab, peaks[vocab, True], bound)
    assert abs(peaks[32_000, True] - peaks[8_000, True]) <= 2 * chunk * 4  # independent of the vocabulary


def test_tile_geometry_follows_the_device_budget():
    """A linear head's tiles hold at most the device's budget per table, with many rows and at least MIN_COLUMNS
    vocabulary columns; a head called whole gets whole-vocabulary rows."""
    head = _head(vocab=151_936, hidden=8)
    for n, device in ((512, torch.device("cpu")), (8192, torch.device("cpu")), (8192, torch.device("cuda"))):
        budget = output_head.CHUNK_ELEMENTS if device.type == "cpu" else output_head.CHUNK_ELEMENTS_ACCELERATOR
        rows, cols = head.blocks(n, tables=2, device=device)
        assert rows * cols * 2 <= budget and cols >= output_head.MIN_COLUMNS and rows == min(n, budget // 2 // 1024,
                                                                                           output_head.ROW_BLOCK)
    whole = OutputHead(torch.nn.Sequential(torch.nn.Linear(8, 1000)), vocab_size=1000)
    assert not whole.linear and whole.blocks(100, tables=2) == (output_head.CHUNK_ELEMENTS // 2 // 1000, 1000)
