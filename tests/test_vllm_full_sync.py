"""The real colocated vLLM backend without LoRA: full-weight sync and sleep mode (marker ``vllm``).

One engine per model (tiny Qwen2 with head_dim 32, SmolLM2-135M-Instruct), built as recipes build it:
``enable_sleep=True`` (the recipe default), which a platform without sleep mode (CPU) must ignore.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.vllm_support import (
    ENGINE_OPTIONS,
    LOGPROB_TOLERANCE,
    TRAIN_TARGET,
    assert_same_greedy,
    hf_greedy,
    max_logprob_error,
    model_dir,
    prompts_for,
    require_vllm,
    token_ids,
    train_towards,
    vllm_platform,
)

require_vllm()
pytestmark = pytest.mark.vllm

from alignkit.rollout import SamplingConfig  # noqa: E402


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def full(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.rollout.vllm import VLLMEngine

    name = request.param
    path = model_dir(name, tmp_path_factory)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = VLLMEngine.from_model(model, tok, enable_sleep=True, **ENGINE_OPTIONS)
    yield SimpleNamespace(name=name, path=path, tok=tok, model=model, engine=engine, prompts=prompts_for(name))
    engine.close()


def test_sleep_mode_is_off_where_the_platform_has_none(full):
    platform = vllm_platform()
    if platform.is_sleep_mode_available():
        pytest.skip(f"vLLM has sleep mode on {platform.device_type}")
    assert full.engine.enable_sleep is False  # asked for (the recipe default), dropped with a warning
    assert full.engine.llm.llm_engine.vllm_config.model_config.enable_sleep_mode is False
    out = full.engine.generate(full.prompts[:1], sampling=SamplingConfig(max_new_tokens=4, temperature=0))
    assert len(out[0][0].token_ids) >= 1  # and the engine works without it


def test_sleep_and_wake_keep_the_outputs(full):
    platform = vllm_platform()
    if not platform.is_sleep_mode_available():
        pytest.skip(f"vLLM has no sleep mode on {platform.device_type} (a GPU feature)")
    engine = full.engine
    assert engine.enable_sleep and engine.llm.llm_engine.is_sleeping()  # asleep between generations
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    first = engine.generate(full.prompts, sampling=greedy)
    assert engine.llm.llm_engine.is_sleeping()
    assert token_ids(engine.generate(full.prompts, sampling=greedy)) == token_ids(first)


def test_full_fine_tune_syncs_through_load_weights(full):
    model, tok, engine = full.model, full.tok, full.engine
    prompt = full.prompts[0]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    sampled = engine.generate(full.prompts, n=2, sampling=SamplingConfig(max_new_tokens=12, seed=0))
    assert max_logprob_error(model, tok, full.prompts, sampled) < LOGPROB_TOLERANCE
    [[before]] = engine.generate([prompt], sampling=greedy)
    assert_same_greedy(model, tok, prompt, before.token_ids, hf_greedy(model, tok, prompt, 12))

    if full.name == "smollm2":  # AdamW state for 135M weights would double the memory: train the last 4 layers
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers[-4:]:
            layer.requires_grad_(True)
    losses = train_towards(model, tok, prompt, TRAIN_TARGET[full.name], steps=8, lr=1e-2 if full.name == "tiny" else 1e-4)
    assert losses[-1] < losses[0] - 0.5, f"training did not move towards the target: {losses}"
    expected = hf_greedy(model, tok, prompt, 12)
    assert expected != before.token_ids, "the fine-tune did not change the greedy answer"

    engine.sync_weights(model)  # every parameter streamed into vLLM's in-place reload, no adapter
    assert engine._lora_request is None

    [[after]] = engine.generate([prompt], sampling=greedy)
    assert_same_greedy(model, tok, prompt, after.token_ids, expected)
    sampled = engine.generate(full.prompts, n=2, sampling=SamplingConfig(max_new_tokens=12, seed=0))
    err = max_logprob_error(model, tok, full.prompts, sampled)
    assert err < LOGPROB_TOLERANCE, f"after the full-weight sync vLLM log-probs differ from the model's by {err:.2e}"
