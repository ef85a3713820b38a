"""The transformers ``generate`` backend: the CPU path, the test path, and a GPU fallback.

Prompts are expanded ``n`` times and generated in batches with left padding and the KV cache. The
generation settings are built from :class:`SamplingConfig` alone (a checkpoint's
``generation_config`` defaults such as ``top_k=50`` do not leak in). Stop strings use transformers'
``stop_strings``; the completion is cut after the token that completed the string.

Log-probs are computed by one teacher-forced forward of each finished batch, with the output head
applied only to the generated positions: they are exactly the raw log π the trainers score (the same
numbers vLLM reports with ``raw_logprobs``), whatever temperature / top-p shaped the sampling, and
no [steps, batch, vocab] score tensor is kept during generation.

The engine samples from the model object it holds, so ``sync_weights`` after an in-place update is
free; passing another model object switches to it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from tqdm.auto import tqdm
from transformers import GenerationConfig

from alignkit.rollout.base import (
    Completion,
    Prompt,
    SamplingConfig,
    check_generate_args,
    cut_at_stop,
    prompt_token_ids,
    stop_token_end,
)

logger = logging.getLogger(__name__)


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i not in ids:
                ids.append(int(i))
    return ids


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's generators for one call without disturbing the caller's random state."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFEngine:
    """Rollouts with ``model.generate``.

    Args:
        model: a causal LM (a peft model or an accelerate-wrapped model works too).
        tokenizer: its tokenizer (needs a pad token; the eos token is used if missing).
        batch_size: sequences (prompt copies) generated together.
        progress: show a tqdm bar over batches.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def sync_weights(self, model) -> None:
        """Sample from ``model`` from now on (the same object: nothing to copy)."""
        self.model = model

    def generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        model = extract_model_from_parallel(self.model)
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            eos_token_id=_eos_ids(model, self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0)
        else:  # greedy: no sampling knobs at all (a checkpoint's defaults would only raise warnings)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs["stop_strings"] = list(sampling.stop)
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[Completion]]:
        check_generate_args(prompts, n)
        sampling = sampling or SamplingConfig()
        model = extract_model_from_parallel(self.model)
        device = next(model.parameters()).device
        encoded = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(n)]
        config = self.generation_config(sampling)
        eos = set(config.eos_token_id)
        out: list[list[Completion]] = [[] for _ in prompts]
        batches = range(0, len(jobs), self.batch_size)
        bar = tqdm(batches, desc="generate", unit="batch", disable=not self.progress or len(batches) < 2)
        with _eval_mode(model), _seeded(sampling.seed, device):
            for start in bar:
                chunk = jobs[start : start + self.batch_size]
                for (i, _), completion in zip(chunk, self._generate_batch(model, [ids for _, ids in chunk], config, sampling, eos, device)):
                    out[i].append(completion)
        return out

    def _generate_batch(self, model, prompt_ids: list[list[int]], config, sampling, eos: set[int], device):
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        kwargs = {"tokenizer": self.tokenizer} if sampling.stop else {}
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs
        )
        generated = sequences[:, width:].tolist()
        completions = [self._finish(tokens, sampling, eos) for tokens in generated]
        if sampling.logprobs:
            self._add_logprobs(model, prompt_ids, completions, device)
        return completions

    def _finish(self, tokens: list[int], sampling: SamplingConfig, eos: set[int]) -> Completion:
        """Cut a generated row at its end: the first eos (kept), else the stop string, else the length."""
        end = next((k + 1 for k, t in enumerate(tokens) if t in eos), None)
        if end is not None:
            tokens = tokens[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            text, which = cut_at_stop(text, sampling.stop)
            return Completion(text, tokens, finish_reason="stop", stop_string=which)
        if sampling.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut, which = cut_at_stop(text, sampling.stop)
            if which is not None:
                end = stop_token_end(self.tokenizer, tokens, which)
                return Completion(cut, tokens[:end], finish_reason="stop", stop_string=which)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(text, tokens, finish_reason="length")

    def _add_logprobs(self, model, prompt_ids, completions: list[Completion], device) -> None:
        """Raw log π of every generated token, by one teacher-forced forward (left-padded rows)."""
        pad = self.tokenizer.pad_token_id
        rows = [p + c.token_ids for p, c in zip(prompt_ids, completions)]
        width = max(len(r) for r in rows)
        gen_width = max(len(c.token_ids) for c in completions)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))
        # logits of the last gen_width + 1 positions predict the last gen_width tokens
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=gen_width + 1,
            use_cache=False,
        ).logits[:, :-1].float()
        logps = torch.log_softmax(logits, dim=-1)
        targets = input_ids[:, -gen_width:]
        token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        for row, c in enumerate(completions):
            k = len(c.token_ids)
            c.logprobs = token_logps[row, gen_width - k :].tolist() if k else []
