"""K responses per prompt sampled through a rollout engine, cached on disk (:mod:`alignkit.cache`).

D²O (:mod:`alignkit.trainers.d2o`) needs, for every prompt, K responses sampled from the reference
policy. Sampling is the expensive part of a run, so the samples are written once as JSON Lines and
reused by every later run with the same inputs::

    <cache_dir>/<name>-<fingerprint>.jsonl            one line per distinct prompt: {"prompt": ..., "samples": [K texts]}
    <cache_dir>/<name>-<fingerprint>.jsonl.key.json   what the fingerprint was computed from (for people)

The key (:func:`samples_key`) covers everything that changes the samples' distribution or their number:
the model's name/path and the digest of every weight (:func:`alignkit.cache.weights_digest`; LoRA weights
left out, since the reference of a LoRA run is its base), the prompts (in order), the sampling settings
(temperature, top-p, top-k, max new tokens, stop strings, seed), the backend, K and the instruction
prefix. Changing any of them misses the cache.

With several processes the main process alone decides hit or miss; on a miss each process samples its
share of the prompts and every process gets all samples back in prompt order
(:meth:`alignkit.rollout.setup.RolloutSetup.sample_texts`); the main process writes the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from alignkit.cache import (  # noqa: F401  (weights_digest, model_identity, on_main_process: re-exported)
    CacheEntry,
    cached,
    canonical_json,
    json_digest,
    model_identity,
    model_key,
    on_main_process,
    read_jsonl,
    weights_digest,
    write_jsonl,
)
from alignkit.rollout.base import Prompt, RolloutEngine, SamplingConfig
from alignkit.rollout.setup import RolloutSetup
from alignkit.rollout.setup import sample_texts as _sample_texts

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2


def prompt_key(prompt: Prompt) -> str:
    """A canonical string of a prompt (text or chat messages), to deduplicate and hash prompts."""
    return canonical_json(prompt)


def with_instruction_prefix(prompt: Prompt, prefix: str | None) -> Prompt:
    """The prompt a sample is drawn under: ``prefix + prompt`` for text; for chat messages the prefix is
    prepended to the first user message's content (roles and the other messages are left as they are)."""
    if not prefix:
        return prompt
    if isinstance(prompt, str):
        return prefix + prompt
    messages = [dict(m) for m in prompt]
    for message in messages:
        if message.get("role") == "user":
            message["content"] = prefix + message["content"]
            return messages
    return [{"role": "user", "content": prefix}] + messages


def samples_key(*, model, prompts: Sequence[Prompt], sampling: SamplingConfig, backend: str, num_samples: int,
                instruction_prefix: str | None) -> dict:
    """Everything the samples depend on (the prompts appear as their count and digest)."""
    settings = sampling.to_dict()
    settings.pop("logprobs", None)  # the cache stores texts only
    return {
        "kind": "reference_samples",
        "version": CACHE_FORMAT_VERSION,
        **model_key(model),
        "prompts": {"count": len(prompts), "sha256": json_digest(prompts)},
        "sampling": settings,
        "backend": backend,
        "num_samples": num_samples,
        "instruction_prefix": instruction_prefix or "",
    }


def _write_samples(prompts: Sequence[Prompt]):
    def write(samples, path):
        return write_jsonl(({"prompt": p, "samples": list(s)} for p, s in zip(prompts, samples)), path)

    return write


def _read_samples(prompts: Sequence[Prompt]):
    def read(path: Path) -> list[list[str]]:
        rows = read_jsonl(path)
        if len(rows) != len(prompts) or any(prompt_key(r["prompt"]) != prompt_key(p) for r, p in zip(rows, prompts)):
            raise RuntimeError(f"{path} does not hold the samples of its prompts (a foreign or edited file); remove it")
        return [list(r["samples"]) for r in rows]

    return read


def cached_samples(setup: RolloutSetup, model, prompts: Sequence[Prompt], num_samples: int, sampling: SamplingConfig,
                   *, cache_dir: str | Path, name: str, instruction_prefix: str | None = None,
                   context=None, on_miss=None) -> list[list[str]]:
    """``num_samples`` texts per prompt sampled from ``model`` through ``setup``, from the cache when it holds
    them (see the module docstring). ``context`` (a peft model's ``disable_adapter()``) is entered around the
    engine call; ``on_miss()`` runs before sampling (to refuse it). Every process must call this."""
    key = samples_key(model=model, prompts=prompts, sampling=sampling, backend=setup.backend, num_samples=num_samples,
                      instruction_prefix=instruction_prefix)
    entry = CacheEntry.named(cache_dir, name, key, ".jsonl")

    def sample():
        if on_miss is not None:
            on_miss()
        logger.info("%s: sampling %d x %d responses", name, len(prompts), num_samples)
        return setup.sample_texts(model, prompts, num_samples, sampling, context=context,
                                  transform=lambda p: with_instruction_prefix(p, instruction_prefix))

    return cached(entry, sample, read=_read_samples(prompts), write=_write_samples(prompts), collective=True,
                  what=f"samples ({name})")


def sample_texts(engine: RolloutEngine, prompts: Sequence[Prompt], num_samples: int, sampling: SamplingConfig, *,
                 instruction_prefix: str | None = None, context=None) -> list[list[str]]:
    """``num_samples`` completion texts per prompt from ``engine``, in prompt order, under
    ``instruction_prefix``; each process samples its share (every process must call this)."""
    return _sample_texts(engine, prompts, num_samples, sampling, context=context,
                         transform=lambda p: with_instruction_prefix(p, instruction_prefix))
