"""The transformers rollout backend: continuous batching, seeds, n per prompt, stop strings, raw log-probs
collected while decoding, eos handling, the sampler against transformers' warpers, memory-based batch."""

import pytest
import torch

from alignkit.rollout import SamplingConfig, make_engine
from alignkit.rollout.base import Completion, RolloutEngine, cut_at_stop, prompt_token_ids
from alignkit.rollout.hf import HFEngine, _draw, _Sampler, default_batch_size, kv_cache_bytes_per_token
from tests.conftest import load_tiny, requires_cuda

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "What is 3 + 4?",
    [{"role": "user", "content": "Compute 12 * 3, step by step."}],
    "Hi",
    "Start with 7. Add 5. Multiply by 3. Subtract 5. What is the result? Show each step on its own line.",
]

LOGPROB_ATOL = 1e-4  # decode-step log-probs vs one teacher-forced forward, fp32 tiny models


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    from transformers import AutoTokenizer

    model = load_tiny(tiny_model_path)
    return make_engine("hf", model, AutoTokenizer.from_pretrained(tiny_model_path), batch_size=4, progress=False)


def _ids(out):
    return [[c.token_ids for c in group] for group in out]


def teacher_forced_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """log π(token_i | prompt, tokens_<i) from one forward of the whole sequence (no cache, no padding)."""
    ids = torch.tensor([prompt_ids + token_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids) :, None]).squeeze(-1).cpu()


def _model_ending_rows_early(path, attn_implementation="sdpa"):
    """A tiny model whose greedy rows end at different steps: one token that prompt 0 emits greedily at
    its third step is made an extra end-of-sequence token."""
    from transformers import AutoTokenizer

    model, tok = load_tiny(path, attn_implementation), AutoTokenizer.from_pretrained(path)
    first = HFEngine(model, tok, progress=False).generate(PROMPTS[:1], sampling=SamplingConfig(max_new_tokens=3, temperature=0))
    model.generation_config.eos_token_id = [tok.eos_token_id, first[0][0].token_ids[2]]
    return model, tok


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, RolloutEngine)


def test_n_samples_per_prompt_in_prompt_order(engine):
    out = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=8, seed=0))
    assert [len(group) for group in out] == [3, 3, 3, 3]
    assert all(isinstance(c, Completion) and 1 <= len(c.token_ids) <= 8 for group in out for c in group)
    # a single prompt generated alone gives the group that prompt got in the batch (greedy)
    alone = engine.generate([PROMPTS[0]], n=3, sampling=SamplingConfig(max_new_tokens=8, temperature=0))
    batched = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=8, temperature=0))
    assert _ids(alone)[0] == _ids(batched)[0]


def test_one_new_token_ends_every_row_at_its_prefill(engine):
    out = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=1, seed=0))
    assert all(len(c.token_ids) == 1 and len(c.logprobs) == 1 for g in out for c in g)
    assert engine.last_stats.decode_steps == 0 and engine.last_stats.generated_tokens == 12


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
    # each sample has its own seeded stream: the batch size (memory-dependent by default) changes nothing
    for batch_size in (1, 3, None):
        other = HFEngine(engine.model, engine.tokenizer, batch_size=batch_size, progress=False)
        assert _ids(other.generate(PROMPTS, n=2, sampling=sampling)) == _ids(a)
    # nor does the rest of the call: a prompt alone gets the samples it got among the others
    alone = engine.generate(PROMPTS[:1], n=2, sampling=sampling)
    assert _ids(alone)[0] == _ids(a)[0]
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert _ids(a) != _ids(c)
    assert torch.equal(before, after), "a seeded call must not consume the caller's random stream"
    # samples of the same prompt differ from each other (random model, temperature 1)
    assert a[0][0].token_ids != a[0][1].token_ids


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_identical_with_and_without_batching_and_refilling(arch, tiny_model_path, tiny_llama_path):
    """One row at a time, everything in one batch, and a batch of 2 that evicts and refills as rows end
    (also after every single ending) all give the same greedy tokens."""
    model, tok = _model_ending_rows_early(tiny_model_path if arch == "qwen2" else tiny_llama_path)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    runs = {}
    for name, kwargs in {"one row": dict(batch_size=1), "all at once": dict(batch_size=None),
                         "refilled": dict(batch_size=2), "refilled each end": dict(batch_size=3, refill_every=1)}.items():
        engine = HFEngine(model, tok, progress=False, **kwargs)
        runs[name] = engine.generate(PROMPTS, n=2, sampling=sampling)
    reference = _ids(runs["one row"])
    for name, out in runs.items():
        assert _ids(out) == reference, name
    ends = {c.finish_reason for g in runs["one row"] for c in g}
    lengths = {len(c.token_ids) for g in runs["one row"] for c in g}
    assert ends == {"stop", "length"} and len(lengths) > 1, "rows must end at different steps for this test to mean anything"
    separate = [HFEngine(model, tok, progress=False).generate([p], n=2, sampling=sampling)[0] for p in PROMPTS]
    assert _ids(separate) == reference


@pytest.mark.parametrize("arch,attn", [("qwen2", "sdpa"), ("llama", "eager")])
def test_logprobs_equal_teacher_forced_forward(arch, attn, tiny_model_path, tiny_llama_path):
    """Raw log-probs collected while decoding (rows of different lengths, evicted and refilled, left padding
    in the shared cache) equal a teacher-forced forward of each completion alone, whatever the sampling."""
    from transformers import AutoTokenizer

    path = tiny_model_path if arch == "qwen2" else tiny_llama_path
    model, tok = load_tiny(path, attn), AutoTokenizer.from_pretrained(path)
    engine = HFEngine(model, tok, batch_size=3, progress=False)
    out = engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=16, seed=3, temperature=1.3, top_p=0.9))
    assert engine.last_stats.prefill_forwards > 1, "the batch of 3 must have been refilled"
    for prompt, group in zip(PROMPTS, out):
        p_ids = prompt_token_ids(tok, prompt)
        for c in group:
            assert len(c.logprobs) == len(c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced_logprobs(model, p_ids, c.token_ids),
                                       atol=LOGPROB_ATOL, rtol=0)


def test_no_logprobs_when_not_asked(engine):
    out = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=6, seed=0, logprobs=False))
    assert all(c.logprobs is None and c.token_ids for g in out for c in g)
    with_logprobs = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=6, seed=0))
    assert _ids(out) == _ids(with_logprobs), "log-probs change nothing about the samples"


def test_finished_rows_stop_costing_decode_steps(tiny_model_path):
    """Evicting every row as it ends decodes exactly the tokens kept; ``generate`` would decode every
    row of a batch until its longest row ends."""
    model, tok = _model_ending_rows_early(tiny_model_path)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    engine = HFEngine(model, tok, batch_size=3, refill_every=1, progress=False)
    out = engine.generate(PROMPTS, n=2, sampling=sampling)
    s = engine.last_stats
    kept = [len(c.token_ids) for g in out for c in g]
    assert s.kept_tokens == sum(kept) == s.generated_tokens
    assert s.completions == 8 and s.prompts == 4
    # the same rows as batches of 3 that each run until their longest row ends
    batches = [kept[i : i + 3] for i in range(0, len(kept), 3)]
    assert s.generated_tokens < sum(len(b) * max(b) for b in batches)
    # with the default refill (an eighth of the batch) some ended rows wait for eviction, never past it
    engine = HFEngine(model, tok, batch_size=8, progress=False)
    engine.generate(PROMPTS, n=2, sampling=sampling)
    assert engine.last_stats.kept_tokens == sum(kept) <= engine.last_stats.generated_tokens < 8 * max(kept)


def test_copies_of_a_prompt_split_across_refills(engine):
    sampling = SamplingConfig(max_new_tokens=6, temperature=0)
    one = engine.generate(PROMPTS, n=1, sampling=sampling)
    small = HFEngine(engine.model, engine.tokenizer, batch_size=2, progress=False)
    five = small.generate(PROMPTS, n=5, sampling=sampling)
    assert [[c.token_ids for c in g] for g in five] == [[g[0].token_ids] * 5 for g in one]
    # a prompt's copies share a prefill: 4 prompts x 5 copies at batch 2 need at most 10 prefills
    assert small.last_stats.prefill_forwards <= 10


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
        assert len(c.logprobs) == len(c.token_ids)
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


def test_eos_ends_a_row_and_is_kept(tiny_model_path):
    model, tok = _model_ending_rows_early(tiny_model_path)
    eos = set(model.generation_config.eos_token_id)
    out = HFEngine(model, tok, progress=False).generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=12, seed=0))
    for c in (c for g in out for c in g):
        assert not eos & set(c.token_ids[:-1]), "nothing is generated after an end-of-sequence token"
        assert (c.finish_reason == "stop") == (c.token_ids[-1] in eos)
        assert c.finish_reason == "stop" or len(c.token_ids) == 12


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
    plain = make_engine("hf", load_tiny(tiny_model_path), tok, progress=False)
    for sampling in (SamplingConfig(max_new_tokens=6, temperature=0), SamplingConfig(max_new_tokens=10, seed=11)):
        with_adapter = engine.generate(PROMPTS, n=2, sampling=sampling)
        assert model.training
        with model.disable_adapter():
            base = engine.generate(PROMPTS, n=2, sampling=sampling)
        assert model.training
        expected = plain.generate(PROMPTS, n=2, sampling=sampling)
        assert _ids(base) == _ids(expected)
        if sampling.logprobs:
            assert [[c.logprobs for c in g] for g in base] == [[c.logprobs for c in g] for g in expected]
        assert _ids(with_adapter) != _ids(base)


def test_accelerate_wrapped_model(tiny_model_path, tmp_path):
    """A model wrapped for distributed training (what ``accelerator.prepare`` returns) samples like the bare one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoTokenizer

    if dist.is_initialized():
        pytest.skip("a process group is already running")
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    sampling = SamplingConfig(max_new_tokens=8, seed=2)
    expected = HFEngine(load_tiny(tiny_model_path), tok, progress=False).generate(PROMPTS, n=2, sampling=sampling)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(load_tiny(tiny_model_path))
        out = HFEngine(wrapped, tok, progress=False).generate(PROMPTS, n=2, sampling=sampling)
    finally:
        dist.destroy_process_group()
    assert _ids(out) == _ids(expected)


# ------------------------------------------------------------------------------------ memory


def test_kv_cache_bytes_per_token_is_what_the_cache_holds(tiny_model_path):
    from transformers import DynamicCache

    model = load_tiny(tiny_model_path)
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]), cache=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes_per_token(model.config) == held / 10
    assert kv_cache_bytes_per_token(model.config, torch.bfloat16) == held / 20


def test_default_batch_comes_from_memory(tiny_model_path, monkeypatch):
    import alignkit.rollout.hf as hf

    from transformers import AutoTokenizer

    model = load_tiny(tiny_model_path)
    engine = HFEngine(model, AutoTokenizer.from_pretrained(tiny_model_path), progress=False)
    row_tokens = max(len(prompt_token_ids(engine.tokenizer, p)) for p in PROMPTS) + 8  # longest prompt + max_new_tokens
    per_row = kv_cache_bytes_per_token(model.config) * row_tokens + hf.SAMPLER_VOCAB_COPIES * 4 * model.config.vocab_size
    monkeypatch.setattr(hf, "_memory_budget", lambda device: 37 * per_row + 5)
    assert default_batch_size(model, row_tokens) == 37
    monkeypatch.setattr(hf, "_memory_budget", lambda device: 10**15)
    assert default_batch_size(model, row_tokens) == hf.MAX_BATCH
    monkeypatch.setattr(hf, "_memory_budget", lambda device: 7 * per_row)
    engine.generate(PROMPTS, n=4, sampling=SamplingConfig(max_new_tokens=8, seed=0))
    assert engine.last_stats.batch_size == 7
    engine.generate(PROMPTS, n=4, sampling=SamplingConfig(max_new_tokens=40, seed=0))
    assert engine.last_stats.batch_size < 7, "longer rows, fewer of them"
    engine.batch_size = 5  # the override
    engine.generate(PROMPTS, n=4, sampling=SamplingConfig(max_new_tokens=4, seed=0))
    assert engine.last_stats.batch_size == 5


# ------------------------------------------------------------------------------------ the sampler


def _warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What ``generate`` samples from: transformers' warpers in its order, then softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits[None].clone()
    if temperature != 1:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize(
    "temperature,top_k,top_p,candidates",
    [(1.0, 0, 1.0, 256), (1.0, 0, 0.8, 256), (1.0, 0, 0.8, 2), (0.7, 5, 0.9, 256), (1.5, 0, 0.95, 3)],
)
def test_sampler_draws_from_the_distribution_generate_samples(temperature, top_k, top_p, candidates):
    """Empirical frequencies of 40,000 draws against transformers' warpers (temperature, top-k, top-p):
    no token outside their support, every frequency within 0.01 (4 standard errors) of their probability.
    ``candidates`` 2 / 3 forces the widening search of top-p."""
    draws, vocab = 40_000, 40
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2
    expected = _warped_probs(logits, temperature, top_k, top_p)
    sampler = _Sampler(SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    sampler.top_p_candidates = candidates
    tokens, logps = sampler(logits.expand(draws, vocab), torch.rand(draws, generator=torch.Generator().manual_seed(1)))
    counts = torch.bincount(tokens, minlength=vocab).float() / draws
    assert (counts[expected == 0] == 0).all()
    assert (counts - expected).abs().max() < 0.01
    torch.testing.assert_close(logps, torch.log_softmax(logits, -1)[tokens])  # raw log-probs, whatever the warping


def test_sampler_greedy_and_top_p_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    tokens, _ = _Sampler(SamplingConfig(temperature=0))(logits)
    assert tokens.tolist() == [1, 0, 0]
    # a tiny top-p keeps only each row's likeliest token, whatever the uniform number
    sampler = _Sampler(SamplingConfig(top_p=1e-6))
    sampler.top_p_candidates = 1
    assert sampler(logits[:2], torch.tensor([0.999, 0.5]))[0].tolist() == [1, 0]
    # a top-p that needs more than the first candidate widens the search for that row only
    sampler = _Sampler(SamplingConfig(top_p=0.9))
    sampler.top_p_candidates = 1
    flat, peaked = torch.zeros(4), torch.tensor([9.0, 0.0, 0.0, 0.0])
    draws = sampler(torch.stack([flat, peaked, flat, flat]), torch.tensor([0.1, 0.9, 0.6, 0.99]))[0].tolist()
    assert draws[1] == 0 and len(set(draws[0:1] + draws[2:])) == 3  # the flat rows' draws follow their numbers


def test_draw_is_proportional_to_weights_and_never_picks_zero_weight():
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0]]).expand(40_000, 4)
    index = _draw(weights, torch.rand(40_000, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(index, minlength=4).float() / len(index)
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[2] - 0.75) < 0.01


def test_bad_arguments_are_named(engine):
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("just a string")
    with pytest.raises(ValueError, match="n must be"):
        engine.generate(PROMPTS, n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_engine("tgi")
    with pytest.raises(ValueError, match="batch_size"):
        HFEngine(engine.model, engine.tokenizer, batch_size=0)


@requires_cuda
def test_cuda_model_samples_and_logprobs_match_teacher_forcing(tiny_model_path):
    from transformers import AutoTokenizer

    model, tok = load_tiny(tiny_model_path).to("cuda"), AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(model, tok, batch_size=3, progress=False)
    sampling = SamplingConfig(max_new_tokens=16, seed=4, top_p=0.9)
    out = engine.generate(PROMPTS, n=2, sampling=sampling)
    assert _ids(out) == _ids(engine.generate(PROMPTS, n=2, sampling=sampling))
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            direct = teacher_forced_logprobs(model, prompt_token_ids(tok, prompt), c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), direct, atol=1e-3, rtol=0)
