"""The hf rollout backend on the embedded real model (SmolLM2-135M-Instruct, ChatML): a chat prompt's
completion ends with ``<|im_end|>`` and its log-probs, collected while decoding, equal a teacher-forced
forward. Deselect with ``-m "not real_model"``."""

import pytest
import torch

from alignkit.rollout.base import SamplingConfig, prompt_token_ids
from alignkit.rollout.hf import HFEngine

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

# fp32 through 30 layers: a cached decode step and a full forward round differently (largest difference
# measured here 3.3e-5 over 6 sampled completions of 48 tokens); the margin is for other CPUs' kernels
LOGPROB_ATOL = 5e-4

PROMPT = [{"role": "user", "content": "What is 2 + 3? Reply with just the number."}]


@pytest.fixture(scope="module")
def smollm2():
    from alignkit.modeling import ModelArguments, load_model_and_tokenizer

    return load_model_and_tokenizer(ModelArguments(model_name_or_path="smollm2"))


def _teacher_forced(model, prompt_ids, token_ids):
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids) :, None]).squeeze(-1)


@pytest.mark.slow  # about 30 s on a loaded 2-core machine (30 layers, ~60 decode steps, 5 teacher-forced checks)
def test_chat_completion_ends_with_im_end_and_logprobs_match_teacher_forcing(smollm2):
    model, tok = smollm2
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    engine = HFEngine(model, tok, batch_size=2, progress=False)  # 4 rows through a batch of 2: evicted and refilled
    greedy = engine.generate([PROMPT], sampling=SamplingConfig(temperature=0, max_new_tokens=32))[0][0]
    assert greedy.finish_reason == "stop" and greedy.token_ids[-1] == im_end
    assert "5" in greedy.text and "<|im_end|>" not in greedy.text
    sampled = engine.generate([PROMPT, PROMPT[0]["content"]], n=2,
                              sampling=SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=0))
    p_ids = prompt_token_ids(tok, PROMPT)
    for c in [greedy, *sampled[0]]:
        torch.testing.assert_close(torch.tensor(c.logprobs), _teacher_forced(model, p_ids, c.token_ids),
                                   atol=LOGPROB_ATOL, rtol=0)
        assert c.finish_reason == "length" or c.token_ids[-1] == im_end
