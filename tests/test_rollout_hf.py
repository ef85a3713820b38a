"""The transformers rollout backend: seeds, n per prompt, stop strings, raw log-probs, eos handling."""

import pytest
import torch

from alignkit.rollout import SamplingConfig, make_engine
from alignkit.rollout.base import Completion, RolloutEngine, cut_at_stop, prompt_token_ids
from tests.conftest import load_tiny

PROMPTS = [
    "What is 3 + 4?",
    [{"role": "user", "content": "Compute 12 * 3, step by step."}],
    "Hi",
]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    from transformers import AutoTokenizer

    model = load_tiny(tiny_model_path)
    return make_engine("hf", model, AutoTokenizer.from_pretrained(tiny_model_path), batch_size=4, progress=False)


def _ids(out):
    return [[c.token_ids for c in group] for group in out]


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, RolloutEngine)


def test_n_samples_per_prompt_in_prompt_order(engine):
    out = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=8, seed=0))
    assert [len(group) for group in out] == [3, 3, 3]
    assert all(isinstance(c, Completion) and 1 <= len(c.token_ids) <= 8 for group in out for c in group)
    # a single prompt generated alone gives the group that prompt got in the batch (same seed, same rows)
    alone = engine.generate([PROMPTS[0]], n=3, sampling=SamplingConfig(max_new_tokens=8, temperature=0))
    batched = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=8, temperature=0))
    assert _ids(alone)[0] == _ids(batched)[0]


def test_seed_makes_sampling_reproducible_and_leaves_global_rng_alone(engine):
    sampling = SamplingConfig(max_new_tokens=12, seed=123)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = engine.generate(PROMPTS, n=2, sampling=sampling)
    after = torch.rand(1)
    b = engine.generate(PROMPTS, n=2, sampling=sampling)
    c = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=12, seed=124))
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    assert torch.equal(before, after), "a seeded call must not consume the caller's random stream"
    # samples of the same prompt differ from each other (random model, temperature 1)
    assert a[0][0].token_ids != a[0][1].token_ids


def test_greedy_is_batch_invariant(engine):
    sampling = SamplingConfig(max_new_tokens=10, temperature=0)
    together = engine.generate(PROMPTS, n=1, sampling=sampling)
    separate = [engine.generate([p], n=1, sampling=sampling)[0] for p in PROMPTS]
    assert _ids(together) == _ids(separate)


def test_logprobs_equal_teacher_forced_forward(engine):
    out = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=16, seed=3, temperature=1.3, top_p=0.9))
    model, tok = engine.model, engine.tokenizer
    for prompt, group in zip(PROMPTS, out):
        p_ids = prompt_token_ids(tok, prompt)
        for c in group:
            ids = torch.tensor([p_ids + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(p_ids) - 1 : -1].float()
            direct = torch.log_softmax(logits, -1).gather(-1, ids[0, len(p_ids) :, None]).squeeze(-1)
            assert len(c.logprobs) == len(c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), direct, atol=1e-4, rtol=0)


def test_stop_strings_cut_text_and_tokens(engine):
    tok = engine.tokenizer
    sampling = SamplingConfig(max_new_tokens=40, seed=5, stop=["e", "1"])
    out = engine.generate(PROMPTS, n=4, sampling=sampling)
    stopped = [c for group in out for c in group if c.stop_string is not None]
    assert stopped, "a random model writes an 'e' or a '1' within 40 tokens"
    for c in stopped:
        assert c.finish_reason == "stop"
        assert c.stop_string not in c.text
        full = tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.stop_string in full and full.startswith(c.text)
        # the last token completed the stop string: without it, no stop string yet
        assert not any(s in tok.decode(c.token_ids[:-1], skip_special_tokens=True) for s in sampling.stop)
    for c in (c for group in out for c in group if c.stop_string is None):
        assert not any(s in c.text for s in sampling.stop)


def test_finish_cuts_at_first_eos_and_keeps_it(engine):
    tok = engine.tokenizer
    eos = tok.eos_token_id
    body = tok("7 + 5 = 12")["input_ids"]
    done = engine._finish(body + [eos, tok.pad_token_id, tok.pad_token_id], SamplingConfig(), {eos})
    assert done.token_ids == body + [eos] and done.finish_reason == "stop" and done.text == "7 + 5 = 12"
    running = engine._finish(body, SamplingConfig(), {eos})
    assert running.finish_reason == "length" and running.token_ids == body


def test_cut_at_stop_takes_earliest():
    assert cut_at_stop("abc\n\nStep 2", ["Step", "\n\n"]) == ("abc", "\n\n")
    assert cut_at_stop("abc", ["x"]) == ("abc", None)


def test_restores_training_mode_and_follows_a_peft_model(tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    model = get_peft_model(load_tiny(tiny_model_path), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = make_engine("hf", model, tok, progress=False)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0)
    with_adapter = engine.generate(PROMPTS, sampling=sampling)
    assert model.training
    with model.disable_adapter():
        base = engine.generate(PROMPTS, sampling=sampling)
    plain = make_engine("hf", load_tiny(tiny_model_path), tok, progress=False).generate(PROMPTS, sampling=sampling)
    assert _ids(base) == _ids(plain)
    assert _ids(with_adapter) != _ids(base)


def test_bad_arguments_are_named(engine):
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("just a string")
    with pytest.raises(ValueError, match="n must be"):
        engine.generate(PROMPTS, n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_engine("tgi")
