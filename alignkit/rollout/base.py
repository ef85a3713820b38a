"""The rollout contract: prompts in, ``n`` sampled :class:`Completion` per prompt out.

Every backend (``hf``, ``vllm``, ``server``) implements :class:`RolloutEngine`:

* ``generate(prompts, n, sampling) -> list[list[Completion]]``: one inner list of ``n`` completions per
  prompt, in prompt order. A prompt is text or a chat message list; chat prompts are rendered with the
  tokenizer's chat template and ``add_generation_prompt=True``, exactly as the trainers tokenize them
  (:func:`alignkit.data.tokenize.tokenize_group`), so a completion can be trained on as sampled.
* ``sync_weights(model)``: make the next ``generate`` sample from ``model``'s current weights (a LoRA
  adapter is synced as an adapter by the vLLM backends).

Conventions shared by all backends (they follow vLLM, so switching backend changes no numbers):

* ``Completion.token_ids`` are the generated tokens, including the end-of-sequence token when the model
  emitted one; ``text`` is their decoding without special tokens, cut *before* a matched stop string.
* ``Completion.logprobs[i]`` is log π(token_i | prompt, tokens_<i) under the model's **raw**
  distribution (temperature 1, no top-p / top-k), vLLM's default ``raw_logprobs``; it equals a
  teacher-forced forward of the same tokens.
* ``finish_reason`` is ``"stop"`` (end-of-sequence token or a stop string; ``stop_string`` says which)
  or ``"length"`` (``max_new_tokens`` reached).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

Prompt = Any  # text, or a list of {"role", "content"} messages


@dataclass
class SamplingConfig:
    """How to sample. ``seed`` makes a call reproducible on the same backend and hardware."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    """One sampled response."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str = "stop"  # "stop" or "length"
    stop_string: str | None = None

    @property
    def sum_logprob(self) -> float | None:
        return None if self.logprobs is None else float(sum(self.logprobs))

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class RolloutEngine(Protocol):
    """What a trainer or the negatives builder needs from a sampler."""

    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[Completion]]: ...

    def sync_weights(self, model) -> None: ...


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """A prompt as the text a model continues: chat prompts through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat-message prompt but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    raise TypeError(f"a prompt is text or a list of chat messages, got {type(prompt).__name__}")


def prompt_token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, the same ids the trainers use (see ``tokenize_group``)."""
    from alignkit.data.tokenize import _ids

    if isinstance(prompt, list):
        return _ids(tokenizer, prompt, add_generation_prompt=True)
    return _ids(tokenizer, prompt)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` cut before the earliest stop string, and which one matched (``None`` if none)."""
    best, which = len(text), None
    for s in stop:
        i = text.find(s)
        if i != -1 and i < best:
            best, which = i, s
    return text[:best], which


def stop_token_end(tokenizer, tokens: Sequence[int], stop: str) -> int:
    """Number of leading ``tokens`` whose decoding first contains ``stop`` (binary search on prefixes): the
    generated tokens to keep when a stop string ends a completion."""
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in tokenizer.decode(tokens[:mid], skip_special_tokens=True):
            hi = mid
        else:
            lo = mid + 1
    return lo


def check_generate_args(prompts, n: int) -> None:
    if isinstance(prompts, (str, dict)):
        raise TypeError("prompts must be a list of prompts (wrap a single prompt in a list)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
