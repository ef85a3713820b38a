"""The transformers backend: the CPU path, the test path, and a GPU fallback, with continuous batching.

``model.generate`` runs a batch until its longest row ends, so every row that finished early keeps
costing a decode step (on SmolLM2 at batch 32 it decoded 16,384 row-steps to keep 2,280 tokens).
:class:`HFEngine` runs its own decode loop over the model's forward with a KV cache (a
:class:`transformers.DynamicCache`) and keeps the batch made of rows that are still running:

* **prefill**: waiting prompts run together, left-padded, with ``logits_to_keep=1`` (no
  [batch, seq, vocab] logits), longest prompts first; the ``n`` copies of a prompt share one prefill
  (their cache rows are copies of one row);
* **decode**: one token for every row per forward. Each row has its own position ids and the 2-D
  attention mask hides its left padding (the causal mask runs over cache columns, the positions drive
  the rotary embedding), so rows of different lengths share one cache, as in ``generate``;
* **evict and refill**: once an eighth of the rows (``refill_every``) have ended, or none is left
  running, their cache rows are dropped, the leading columns that only padding uses are trimmed, and
  waiting prompts are prefilled and merged in, left-padded to the common width, in one copy of the
  cache. This is continuous batching (Yu et al. 2022, "Orca"; vLLM's scheduler, Kwon et al. 2023) at
  the granularity of whole prefills, since the cache is one dense tensor per layer.

The cache layers (:class:`_SlackLayer`) append into spare columns instead of concatenating, which
``DynamicLayer`` does at every token (a copy of the whole cache per decode step: 18% of a SmolLM2
step at 64 rows of 300 tokens).

Sampling keeps ``generate``'s rules: temperature, then top-k (transformers' ``TopKLogitsWarper``),
then top-p (the set transformers' ``TopPLogitsWarper`` keeps, found without sorting the vocabulary),
then a draw from the renormalised probabilities; greedy is the argmax of the raw logits. The
settings come from :class:`SamplingConfig` alone (a checkpoint's ``generation_config`` defaults such as
``top_k=50`` or a repetition penalty do not leak in). A row ends at an end-of-sequence token (kept in
``token_ids``), at a stop string (tokens and text cut as :func:`alignkit.rollout.base.stop_token_end`
and :func:`~alignkit.rollout.base.cut_at_stop` say), or at ``max_new_tokens``.

Log-probs are collected while decoding: at every step, log π(chosen token) = logit − logsumexp(logits)
of the **raw** logits (temperature 1, no top-p / top-k), vLLM's ``raw_logprobs``; they equal a
teacher-forced forward of the same tokens up to float rounding. None are computed when
``SamplingConfig.logprobs`` is False. Memory stays bounded: the only vocabulary-sized tensors are one
step's [batch, vocab] logits and the sampler's copies of them.

The default batch (rows decoded together) is chosen from memory (:func:`default_batch_size`): the
KV-cache bytes per token from the model config (2 × layers × KV heads × head dim × dtype bytes) times
the tokens a row can reach (longest prompt + ``max_new_tokens``), plus the sampler's vocabulary-sized
buffers, against a budget: half the free GPU memory on CUDA; on CPU a quarter of the available RAM, at
most :data:`CPU_BUDGET_BYTES` (on one CPU thread a SmolLM2 decode step costs about 100 ms plus 5 ms per
row, so wide batches pay). ``batch_size`` overrides it.

Every draw uses one uniform number per row (inverse-CDF sampling). With ``SamplingConfig.seed``, sample
``k`` of prompt ``i`` takes its numbers from its own generator seeded with ``seed + i * n + k`` (the
per-request seeds of the vLLM backend): a seeded call is reproducible whatever the batch size (which
the memory-based default makes machine-dependent) and whatever else is in the batch, up to float
rounding of the logits, and it leaves the caller's random state alone. Unseeded calls draw from
torch's global generator.

The engine samples from the model object it holds, so ``sync_weights`` after an in-place update is
free; passing another model object switches to it. ``last_stats`` (:class:`DecodeStats`) says what the
last call cost.
"""

from __future__ import annotations

import inspect
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TopKLogitsWarper

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

CPU_BUDGET_BYTES = 2 << 30  # KV cache + sampler buffers of one call on CPU (2 GiB, worst case: every row at full length)
GPU_FREE_FRACTION = 0.5  # of the free CUDA memory after the model is loaded
MAX_BATCH = 512  # rows decoded together, whatever the memory allows
PREFILL_TOKENS = 2048  # padded prompt tokens per prefill forward (bounds the prefill's activations)
SAMPLER_VOCAB_COPIES = 6  # float32 [vocab] buffers per row while sampling (logits, scores, probs, cumsum, ...)


@dataclass
class DecodeStats:
    """What one ``generate`` call cost.

    ``generated_tokens`` counts every row-step the model decoded (including the steps of rows that had
    already ended and were waiting to be evicted: the wasted work); ``kept_tokens`` the tokens in the
    returned completions (``Completion.token_ids``, cut at the end of sequence or stop string).
    """

    prompts: int = 0
    completions: int = 0
    batch_size: int = 0
    prompt_tokens: int = 0  # prompt tokens prefilled (a prompt's n copies share one prefill)
    prefill_forwards: int = 0
    decode_steps: int = 0  # decode forwards
    generated_tokens: int = 0
    kept_tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def completions_per_second(self) -> float:
        return self.completions / self.seconds if self.seconds > 0 else 0.0

    @property
    def kept_tokens_per_cpu_second(self) -> float:
        return self.kept_tokens / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "completions_per_second": self.completions_per_second,
            "kept_tokens_per_cpu_second": self.kept_tokens_per_cpu_second,
        }

    def format(self) -> str:
        return (
            f"{self.completions} completions in {self.seconds:.1f}s ({self.completions_per_second:.3g} completions/s, "
            f"{self.cpu_seconds:.1f} CPU-s); kept {self.kept_tokens} of {self.generated_tokens} generated tokens; "
            f"{self.decode_steps} decode steps at batch <= {self.batch_size}, {self.prefill_forwards} prefills"
        )


# ------------------------------------------------------------------------------------ model facts


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i not in ids:
                ids.append(int(i))
    return ids


def _base_model(model):
    """The transformers model under a peft wrapper (the one whose forward signature matters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model) -> str:
    """transformers >= 5.x names the cache argument ``cache`` (``past_key_values`` before, deprecated)."""
    params = inspect.signature(_base_model(model).forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def _keeps_last_logits(model) -> bool:
    """Whether the forward takes ``logits_to_keep`` (every causal LM of transformers does; remote code may not)."""
    params = inspect.signature(_base_model(model).forward).parameters
    return "logits_to_keep" in params


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def kv_cache_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values one token occupies in the cache: 2 × layers × KV heads × head dim × dtype size."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_FRACTION)
    import psutil

    return min(CPU_BUDGET_BYTES, psutil.virtual_memory().available // 4)


def default_batch_size(model, tokens_per_row: int, device: torch.device | None = None) -> int:
    """Rows to decode together so their KV cache and sampler buffers fit the memory budget (module docstring)."""
    device = device or next(model.parameters()).device
    config = model.config
    vocab = config.get_text_config(decoder=True).vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    per_row = kv_cache_bytes_per_token(config, _model_dtype(model)) * tokens_per_row + SAMPLER_VOCAB_COPIES * 4 * vocab
    return int(max(1, min(MAX_BATCH, _memory_budget(device) // per_row)))


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


# ------------------------------------------------------------------------------------ sampling


def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` [rows, k] (non-negative, not necessarily normalised), with
    probability proportional to its weight: inverse-CDF sampling with the row's ``uniform`` number in
    [0, 1). (``torch.multinomial`` draws as many random numbers as the row is long: 25x slower at a 49k
    vocabulary, and its draws depend on the other rows of the batch.)"""
    cdf = weights.cumsum(-1)
    u = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(-1)
    zero = weights.gather(-1, index[:, None]).squeeze(-1) == 0  # u rounded up to the total: take the likeliest
    if zero.any():
        index[zero] = weights[zero].argmax(-1)
    return index


class _Sampler:
    """Next tokens (and their raw log-probs) from one step's logits, with ``generate``'s sampling rules:
    temperature, then top-k (transformers' ``TopKLogitsWarper``), then top-p, then a draw from the
    renormalised probabilities; greedy takes the argmax of the raw logits.

    Top-p keeps the most likely tokens while the probability mass before them is below ``top_p``, the
    set transformers' ``TopPLogitsWarper`` keeps (it sorts ascending and drops tokens whose cumulative
    mass is <= 1 - top_p). Instead of sorting the whole vocabulary at every step (240 ms for 64 rows of
    49,152 on one CPU thread, more than the rest of the sampler and a third of SmolLM2's decode step),
    it looks among the ``top_p_candidates`` likeliest tokens first and widens the search only for rows
    whose nucleus is larger."""

    top_p_candidates = 256

    def __init__(self, sampling: SamplingConfig):
        self.greedy = sampling.greedy
        self.logprobs = sampling.logprobs
        self.temperature = sampling.temperature if sampling.temperature not in (0, 1) else None
        self.top_k = TopKLogitsWarper(top_k=sampling.top_k) if sampling.top_k else None
        self.top_p = sampling.top_p if sampling.top_p < 1 else None

    def __call__(self, logits: torch.Tensor, uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``logits``: [rows, vocab] raw scores of the next token; ``uniform``: [rows] numbers in [0, 1), one
        per row, that decide the draws (not needed when greedy). Returns token ids [rows] and their raw
        log-probs [rows] (``None`` when log-probs are off)."""
        logits = logits.float()
        if self.greedy:
            tokens = logits.argmax(-1)
        else:
            scores = logits / self.temperature if self.temperature else logits
            if self.top_k is not None:
                scores = self.top_k(None, scores)
            probs = scores.softmax(-1)
            tokens = self._nucleus(probs, uniform) if self.top_p is not None else _draw(probs, uniform)
        if not self.logprobs:
            return tokens, None
        chosen = logits.gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, chosen - logits.logsumexp(-1)

    def _nucleus(self, probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        rows = torch.arange(probs.shape[0], device=probs.device)
        k, vocab = self.top_p_candidates, probs.shape[1]
        while len(rows):
            k = min(k, vocab)
            top, index = probs.topk(k, dim=-1)  # sorted, most likely first
            if k < vocab:  # rows whose k likeliest tokens hold less than top_p need a wider search
                done = top.sum(-1) >= self.top_p
                if not done.all():
                    top, index = top[done], index[done]
                    wider = (~done).nonzero().squeeze(-1)
                    probs, rest, rest_uniform = probs[wider], rows[wider], uniform[wider]
                    rows, uniform = rows[done], uniform[done]
                else:
                    rest = None
            else:
                rest = None
            mass_before = top.cumsum(-1) - top
            weights = top.masked_fill(mass_before >= self.top_p, 0)
            if len(rows):
                tokens[rows] = index.gather(-1, _draw(weights, uniform)[:, None]).squeeze(-1)
            if rest is None:
                break
            rows, uniform, k = rest, rest_uniform, k * 8
        return tokens


# ------------------------------------------------------------------------------------ the running batch


@dataclass
class _Row:
    prompt: int  # index of its prompt
    copy: int  # which of the prompt's n samples
    tokens: list
    logprobs: list
    done: bool = False
    uniforms: "np.ndarray | None" = None  # seeded sampling: the numbers its draws use, one per token


class _Batch:
    """Rows sharing one KV cache: ``mask`` [rows, width] marks real cache columns (left padding is 0),
    ``last`` [rows] the token each row feeds next, ``positions`` [rows] that token's position."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, last: torch.Tensor, positions: torch.Tensor, rows: list):
        self.cache, self.mask, self.last, self.positions, self.rows = cache, mask, last, positions, rows

    def __len__(self) -> int:
        return len(self.rows)


class _SlackLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` that appends into spare columns of a buffer instead of
    concatenating: ``DynamicLayer`` copies the whole layer's cache at every token, this copies only when the
    buffer is full (it then grows by ``slack`` columns). ``keys`` / ``values`` are views of the filled part."""

    slack = 32

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = self.value_buffer = None
        self.length = 0
        self.is_initialized = True

    def assign(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Hold these buffers, of which the first ``length`` columns are filled."""
        self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]

    def release(self) -> None:
        """Drop the buffers (the layer's rows now live in another cache)."""
        self.key_buffer = self.value_buffer = self.keys = self.values = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.key_buffer is None or self.length + new > self.key_buffer.shape[-2]:
            shape = list(key_states.shape)
            shape[-2] = self.length + new + self.slack
            key_buffer, value_buffer = key_states.new_empty(shape), value_states.new_empty(shape[:-1] + [value_states.shape[-1]])
            if self.length:
                key_buffer[:, :, : self.length] = self.keys
                value_buffer[:, :, : self.length] = self.values
            self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.assign(self.key_buffer, self.value_buffer, self.length + new)
        return self.keys, self.values


def _new_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = _SlackLayer
    return cache


def _layers(cache: DynamicCache) -> list:
    for layer in cache.layers:
        if not isinstance(layer, _SlackLayer) or not layer.is_initialized:
            raise NotImplementedError(
                f"HFEngine batches rows through a DynamicCache of full-attention layers; this model's cache has "
                f"{type(layer).__name__} layers"
            )
    return cache.layers


def _merge(parts: list[tuple[_Batch, list[int]]]) -> _Batch | None:
    """One batch of the rows ``keep`` of each ``(batch, keep)`` part, in order: every part's leading
    columns that no kept row uses are dropped, then all are left-padded to a common width. One copy of
    the kept cache rows (none when a single part keeps everything)."""
    prepared = []
    for batch, keep in parts:
        if not keep:
            continue
        index = None if keep == list(range(len(batch))) else torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask if index is None else batch.mask.index_select(0, index)
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding in every kept row
        prepared.append((batch, index, first, mask[:, first:]))
    if not prepared:
        return None
    if len(prepared) == 1 and prepared[0][1] is None and prepared[0][2] == 0:
        return prepared[0][0]

    def select(t: torch.Tensor, index) -> torch.Tensor:
        return t if index is None else t.index_select(0, index)

    width = max(mask.shape[1] for *_, mask in prepared)
    total = sum(mask.shape[0] for *_, mask in prepared)
    out_mask = prepared[0][3].new_zeros(total, width)
    start = 0
    for *_, mask in prepared:
        out_mask[start : start + mask.shape[0], width - mask.shape[1] :] = mask
        start += mask.shape[0]
    layer_lists = [_layers(batch.cache) for batch, *_ in prepared]
    for i, target in enumerate(layer_lists[0]):
        buffers = []
        for name in ("keys", "values"):
            template = getattr(target, name)
            out = template.new_zeros(total, template.shape[1], width + _SlackLayer.slack, template.shape[3])
            start = 0
            for (batch, index, first, mask), layers in zip(prepared, layer_lists):
                t = getattr(layers[i], name)
                t = t[:, :, first:] if index is None else t[index, :, first:]
                out[start : start + t.shape[0], :, width - t.shape[2] : width] = t
                start += t.shape[0]
            buffers.append(out)
        target.assign(*buffers, width)
        for layers in layer_lists[1:]:  # the other parts' copies of this layer are merged: free them now
            layers[i].release()
    last = torch.cat([select(batch.last, index) for batch, index, *_ in prepared])
    positions = torch.cat([select(batch.positions, index) for batch, index, *_ in prepared])
    rows = [r for batch, index, *_ in prepared for r in (batch.rows if index is None else [batch.rows[j] for j in index.tolist()])]
    return _Batch(prepared[0][0].cache, out_mask, last, positions, rows)


# ------------------------------------------------------------------------------------ the engine


class HFEngine:
    """Rollouts with transformers models: continuous batching over the model's forward (module docstring).

    Args:
        model: a causal LM (a peft model, also under ``with model.disable_adapter():``, or an
            accelerate-wrapped model works too).
        tokenizer: its tokenizer (needs a pad token; the eos token is used if missing).
        batch_size: rows (prompt copies) decoded together; ``None`` chooses it from memory per call
            (:func:`default_batch_size`).
        progress: show a tqdm bar over finished completions.
        refill_every: evict finished rows and admit waiting prompts once this many rows have finished
            (``None``: an eighth of the rows in the batch). Fewer, larger refills copy the cache less
            often; the finished rows left in the batch meanwhile cost their decode steps.
    """

    def __init__(self, model, tokenizer, batch_size: int | None = None, progress: bool = True, refill_every: int | None = None):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.refill_every = refill_every
        self.last_stats: DecodeStats | None = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def sync_weights(self, model) -> None:
        """Sample from ``model`` from now on (the same object: nothing to copy)."""
        self.model = model

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[Completion]]:
        check_generate_args(prompts, n)
        sampling = sampling or SamplingConfig()
        model = extract_model_from_parallel(self.model)
        peft_config = getattr(model, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise NotImplementedError("HFEngine does not sample from prompt-learning peft models (prefix/prompt tuning)")
        device = next(model.parameters()).device
        wall, cpu = time.perf_counter(), time.process_time()
        encoded = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        if not encoded:
            self.last_stats = DecodeStats()
            return []
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} tokenizes to no tokens")
        batch_size = self.batch_size or default_batch_size(model, max(map(len, encoded)) + sampling.max_new_tokens, device)
        run = _Run(self, model, encoded, n, sampling, batch_size, device)
        with _eval_mode(model):
            out = run.decode()
        stats = run.stats
        stats.seconds, stats.cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        self.last_stats = stats
        return out

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


class _Run:
    """One ``generate`` call: the waiting prompts, the running batch, the finished completions."""

    def __init__(self, engine: HFEngine, model, encoded, n, sampling: SamplingConfig, batch_size, device):
        self.engine, self.model, self.encoded, self.n = engine, model, encoded, n
        self.sampling, self.batch_size, self.device = sampling, batch_size, device
        self.sample = _Sampler(sampling)
        self.eos = set(_eos_ids(model, engine.tokenizer))
        self.pad = engine.tokenizer.pad_token_id
        self.forward_kwargs = {"use_cache": True, **({"logits_to_keep": 1} if _keeps_last_logits(model) else {})}
        self.cache_kwarg = _cache_kwarg(model)
        self.refill_every = engine.refill_every
        # stop strings are looked for in the decoding of a row's last tokens (enough for the longest one)
        self.stop_window = max((len(s) for s in sampling.stop), default=0) + 4
        # longest prompts first: prefill groups of similar length, and the widest caches start early
        self.waiting = [[i, 0] for i in sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))]
        self.out: list[list[Completion | None]] = [[None] * n for _ in encoded]
        self.stats = DecodeStats(prompts=len(encoded), completions=len(encoded) * n, batch_size=batch_size)
        self.bar = tqdm(total=len(encoded) * n, desc="generate", unit="seq", disable=not engine.progress or len(encoded) * n < 2)

    # -- forward passes

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            **self.forward_kwargs, **{self.cache_kwarg: cache},
        )
        return out.logits[:, -1]

    def _admit(self, slots: int) -> _Batch | None:
        """Prefill up to ``slots`` waiting rows (a prompt's copies share one prefill) and sample their first tokens."""
        groups: list[tuple[int, int, int]] = []  # (prompt, first copy, copies)
        width = 0
        while self.waiting and slots > 0:
            prompt, copied = self.waiting[0]
            width_with = max(width, len(self.encoded[prompt]))
            if groups and width_with * (len(groups) + 1) > PREFILL_TOKENS:
                break
            take = min(slots, self.n - copied)
            groups.append((prompt, copied, take))
            width, slots = width_with, slots - take
            if copied + take == self.n:
                self.waiting.pop(0)
            else:
                self.waiting[0][1] = copied + take
        if not groups:
            return None
        ids = torch.full((len(groups), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for g, (prompt, _, _) in enumerate(groups):
            p = self.encoded[prompt]
            ids[g, width - len(p) :] = torch.tensor(p)
            mask[g, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = _new_cache()
        logits = self._forward(ids, mask, positions, cache)
        self.stats.prefill_forwards += 1
        self.stats.prompt_tokens += int(mask.sum())
        repeat = torch.tensor([g for g, (_, _, take) in enumerate(groups) for _ in range(take)], device=self.device)
        self.stats.generated_tokens += len(repeat)  # the first token of each row comes from its prefill
        for layer in _layers(cache):  # the copies of a prompt share its prefill
            if len(repeat) != len(groups):
                layer.assign(layer.key_buffer.index_select(0, repeat), layer.value_buffer.index_select(0, repeat), layer.length)
        logits = logits.index_select(0, repeat)
        rows = [self._row(prompt, first + k) for prompt, first, take in groups for k in range(take)]
        tokens, logps = self.sample(logits, self._uniforms(rows))
        batch = _Batch(cache, mask.index_select(0, repeat), tokens, positions[:, -1].index_select(0, repeat) + 1, rows)
        self._append(batch, tokens, logps)
        return batch

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row of ``batch``: feed its last token, sample the next."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
        logits = self._forward(batch.last[:, None], batch.mask, batch.positions[:, None], batch.cache)
        self.stats.decode_steps += 1
        self.stats.generated_tokens += len(batch)
        tokens, logps = self.sample(logits, self._uniforms(batch.rows))
        batch.last, batch.positions = tokens, batch.positions + 1
        self._append(batch, tokens, logps)

    # -- random numbers

    def _row(self, prompt: int, copy: int) -> _Row:
        """A new row; seeded sampling gives it its own stream of uniform numbers, one per token it may draw,
        seeded with ``seed + prompt * n + copy`` (the vLLM backend's per-request seeds), so what it samples
        does not depend on the batch it runs in."""
        row = _Row(prompt, copy, [], [])
        if self.sampling.seed is not None and not self.sampling.greedy:
            generator = torch.Generator().manual_seed(self.sampling.seed + prompt * self.n + copy)
            row.uniforms = torch.rand(self.sampling.max_new_tokens, generator=generator).numpy()
        return row

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor | None:
        """This step's uniform number of each row: from its own stream when seeded, else from torch's RNG."""
        if self.sampling.greedy:
            return None
        if self.sampling.seed is None:
            return torch.rand(len(rows), device=self.device)
        values = np.array([row.uniforms[len(row.tokens)] if not row.done else 0.0 for row in rows], dtype=np.float32)
        return torch.from_numpy(values).to(self.device)

    # -- bookkeeping

    def _append(self, batch: _Batch, tokens: torch.Tensor, logps: torch.Tensor | None) -> None:
        """Give each running row its new token; end the rows that reached an end."""
        tokens = tokens.tolist()
        logps = logps.tolist() if logps is not None else None
        sampling, tokenizer = self.sampling, self.engine.tokenizer
        for j, row in enumerate(batch.rows):
            if row.done:
                continue
            row.tokens.append(tokens[j])
            if logps is not None:
                row.logprobs.append(logps[j])
            ended = tokens[j] in self.eos or len(row.tokens) >= sampling.max_new_tokens
            if not ended and sampling.stop:
                tail = tokenizer.decode(row.tokens[-self.stop_window :], skip_special_tokens=True)
                ended = any(s in tail for s in sampling.stop)
            if ended:
                self._complete(row)

    def _complete(self, row: _Row) -> None:
        row.done = True
        completion = self.engine._finish(row.tokens, self.sampling, self.eos)
        if self.sampling.logprobs:
            completion.logprobs = row.logprobs[: len(completion.token_ids)]
        self.out[row.prompt][row.copy] = completion
        self.stats.kept_tokens += len(completion.token_ids)
        self.bar.update(1)

    def _refill(self, batch: _Batch | None, running: list[int]) -> _Batch | None:
        """Evict the finished rows of ``batch`` and fill the free slots with waiting prompts (one cache copy)."""
        parts = [(batch, running)] if batch is not None and running else []
        if batch is not None and not running:  # nothing to keep: free the cache before prefilling more
            for layer in batch.cache.layers:
                layer.release()
        alive = len(running)
        while self.waiting and alive < self.batch_size:
            new = self._admit(self.batch_size - alive)
            keep = [j for j, row in enumerate(new.rows) if not row.done]  # some may end at their first token
            parts.append((new, keep))
            alive += len(keep)
        return _merge(parts)

    def decode(self) -> list[list[Completion]]:
        batch: _Batch | None = None
        try:
            while True:
                running = [j for j, row in enumerate(batch.rows) if not row.done] if batch is not None else []
                finished = (len(batch) if batch is not None else 0) - len(running)
                if not running or finished >= (self.refill_every or max(1, len(batch) // 8)):
                    batch = self._refill(batch, running)
                    if batch is None:  # nothing running, nothing waiting
                        break
                self._step(batch)
        finally:
            self.bar.close()
        return self.out
