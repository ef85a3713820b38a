"""Sequence log-probabilities of many responses per prompt, with bounded output-head memory.

``score_responses(model, batch)`` returns, for every response R in a batch built by
:class:`alignkit.data.collate.GroupCollator`, log π(y|x) = the SUM of its response-token log-probs
(prompt tokens never count), plus the per-token values for methods that weight tokens.

The body. The model's own forward runs end to end (through DDP / FSDP / DeepSpeed wrappers), in the
batch's layout (:mod:`alignkit.data.collate`): ``padded`` rows, ``shared_prompt`` rows (block attention
mask, position ids restarting after the prompt), or ``prompt_kv``: the prompts run once with a KV cache
and the responses run as a second batch against their prompt's cached keys and values
(:func:`prompt_kv_hidden_states`; the cache is part of the autograd graph, so gradients reach the prompt
tokens). An ``auto`` batch (the default) is scored in whichever of the three
:func:`alignkit.data.collate.layout_costs` rates cheapest for this model (:func:`scoring_layout`);
``prompt_kv`` is left out on a model that cannot reuse a cache with gradients (:func:`prompt_kv_blocker`:
gradient checkpointing in training, sliding-window or hybrid attention layers, prompt-learning adapters).

The output head. A forward pre-hook on the model's output embeddings captures the final hidden states
and hands the head an empty input, so the model builds no logits. The N hidden states that predict
response tokens then go through the head tile by tile (:mod:`alignkit.output_head`): the forward keeps
the N log-probs and log-sum-exps, the backward recomputes each tile. No [N, vocab] table is kept; the
live logits are a few tiles, independent of the vocabulary size. With ``keep_logits=True`` the scores
also keep the N hidden rows, for the tiled KL (:func:`response_token_kl`), the greedy tokens
(:meth:`ResponseScores.greedy_tokens`) or, on request, the full [N, V] ``ResponseScores.logits``.

Reference log-probs come from the same function: call it on the same model inside
``disable_adapter()`` (LoRA), on a frozen reference model, or skip it with precomputed values.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from alignkit.data.collate import group_lengths, is_prompt_kv_batch, layout_costs, relayout
from alignkit.output_head import OutputHead, greedy_tokens, selective_log_softmax, token_kl, token_log_probs, unwrap

__all__ = [
    "ResponseScores", "score_responses", "response_token_kl", "selective_log_softmax", "block_attention_mask",
    "model_inputs", "prompt_kv_hidden_states", "response_hidden_states", "scoring_layout",
]

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = ("input_ids", "position_ids", "attention_mask")


# ------------------------------------------------------------------------------------- capturing the rows

_CHECKED_HEADS: weakref.WeakSet = weakref.WeakSet()


@contextmanager
def captured_final_hidden(model: torch.nn.Module):
    """Within the block, the model's output head gets an empty input (no logits are built) and the hidden
    states it was given are stored in the yielded list (one [batch, seq, hidden] tensor per forward).

    The first time a head is seen, one row goes through it instead, so that :func:`check_post_head_transform`
    can compare the model's own logits of that row with :class:`~alignkit.output_head.OutputHead`'s.
    """
    head = unwrap(model).get_output_embeddings()
    captured: list[torch.Tensor] = []

    def capture(module, args):
        hidden = args[0]
        captured.append(hidden)
        keep = 1 if head not in _CHECKED_HEADS and hidden.numel() else 0
        return (hidden.reshape(-1, hidden.size(-1))[:keep].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(capture)
    try:
        yield captured
    finally:
        handle.remove()


def check_post_head_transform(model: torch.nn.Module, hidden: torch.Tensor, outputs) -> None:
    """Once per head: the model's logits of one row must equal :class:`~alignkit.output_head.OutputHead`'s (else
    the model applies a transform after its head that alignkit does not reproduce, and its log-probs would
    be wrong)."""
    head = OutputHead.of_model(model)
    if head.module in _CHECKED_HEADS:
        return
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.numel() == 0:
        return
    with torch.no_grad():
        theirs = logits.detach().reshape(-1, logits.size(-1))[:1].float()
        ours = head(hidden.reshape(-1, hidden.size(-1))[:1])
    scale = float(theirs.abs().max()) + 1e-6
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * scale):
        raise RuntimeError(
            f"{type(unwrap(model)).__name__} transforms its logits after the output head in a "
            "way alignkit.output_head.OutputHead does not reproduce; add the transform to "
            "alignkit.output_head.post_head_transform"
        )
    _CHECKED_HEADS.add(head.module)


# ------------------------------------------------------------------------------------------------ scores


@dataclass
class HeadRows:
    """What the output head needs to (re)compute the logits of the scored positions, tile by tile."""

    hidden: torch.Tensor  # [N, hidden] final hidden states predicting the scored tokens
    head: OutputHead
    grad_enabled: bool  # the autograd mode they were scored in
    materialized: torch.Tensor | None = field(default=None, repr=False)  # [N, V] fp32 once built

    def logits(self) -> torch.Tensor:
        if self.materialized is None:
            with torch.set_grad_enabled(self.grad_enabled):
                self.materialized = self.head(self.hidden)
        return self.materialized

    def tile(self, r0: int, r1: int, v0: int, v1: int) -> torch.Tensor:
        """fp32 logits of rows [r0, r1) and vocabulary [v0, v1), without gradient."""
        if self.materialized is not None:
            return self.materialized[r0:r1, v0:v1].detach().float()
        return self.head.tile(self.hidden, r0, r1, v0, v1)

    @property
    def sliceable(self) -> bool:
        return self.materialized is not None or self.head.linear


@dataclass
class ResponseScores:
    """Log-probs of R responses made of N scored tokens in total."""

    logps: torch.Tensor  # [R] summed response-token log-probs
    lengths: torch.Tensor  # [R] response token counts
    token_logps: torch.Tensor  # [N] per-token log-probs, in batch["score_response"] order
    token_response: torch.Tensor  # [N] response index of each token
    rows: HeadRows | None = field(default=None, repr=False)  # with keep_logits=True

    def mean_logps(self) -> torch.Tensor:
        """Length-normalised log-probs, log π(y|x) / |y|."""
        return self.logps / self.lengths.clamp(min=1)

    @property
    def logits(self) -> torch.Tensor | None:
        """[N, V] fp32 logits of the scored positions (``keep_logits=True``), built on first access in the
        autograd mode of the scoring call. :func:`response_token_kl` and :meth:`greedy_tokens` never build it."""
        return None if self.rows is None else self.rows.logits()

    def greedy_tokens(self) -> torch.Tensor:
        """[N] the most likely next token at each scored position (tile by tile)."""
        rows = self._rows("greedy_tokens")
        if rows.materialized is not None:
            return rows.materialized.argmax(-1)
        return greedy_tokens(rows.head, rows.hidden)

    def _rows(self, what: str) -> HeadRows:
        if self.rows is None:
            raise ValueError(f"{what} needs scores made with score_responses(..., keep_logits=True)")
        return self.rows


def response_token_kl(policy: ResponseScores, reference: ResponseScores) -> torch.Tensor:
    """[N] KL(π_ref ‖ πθ) of the next-token distributions at each scored position:

        KL_t = Σ_v π_ref(v | x, y_<t)·(log π_ref(v | x, y_<t) − log πθ(v | x, y_<t))

    equal to :func:`alignkit.losses.token_kl_divergence` (``policy.logits``, ``reference.logits``) but tile by
    tile with recomputation in backward (:func:`alignkit.output_head.token_kl`), so no [N, V] table is kept.
    Both scores come from ``score_responses(..., keep_logits=True)`` on the same batch; the gradient flows
    into the policy only.
    """
    p_rows, r_rows = policy._rows("response_token_kl"), reference._rows("response_token_kl")
    if p_rows.hidden.size(0) != r_rows.hidden.size(0):
        raise ValueError(f"the policy scores {p_rows.hidden.size(0)} tokens, the reference {r_rows.hidden.size(0)}: "
                         "score the same batch")
    if p_rows.head.vocab_size != r_rows.head.vocab_size:
        raise ValueError(f"the policy's vocabulary has {p_rows.head.vocab_size} tokens, the reference's "
                         f"{r_rows.head.vocab_size}")
    if p_rows.materialized is not None:  # a context-dependent (PEFT-wrapped) policy head: its logits are built
        from alignkit.losses import token_kl_divergence

        return token_kl_divergence(p_rows.materialized, r_rows.logits().detach())
    with torch.set_grad_enabled(p_rows.grad_enabled):
        return token_kl(p_rows.head, p_rows.hidden, r_rows.tile, reference_sliceable=r_rows.sliceable)


# ------------------------------------------------------------------------------------------------ layouts


def block_attention_mask(segment_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """4D mask [B, 1, L, L] for the shared-prompt layout.

    Query q may attend key k iff k <= q and k is a prompt token or in q's own response. Padding
    queries attend only themselves (an all-masked row would give NaN in softmax).
    ``sdpa`` gets a boolean mask (True = attend), ``eager`` an additive float mask.
    """
    seq_len = segment_ids.size(1)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segment_ids.device).tril()
    key, query = segment_ids[:, None, :], segment_ids[:, :, None]
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(seq_len, dtype=torch.bool, device=segment_ids.device) & (query < 0)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"the shared_prompt layout needs attn_implementation 'sdpa' or 'eager' (a custom 4D mask), "
        f"the model uses {attn_implementation!r}; set score_layout='padded'"
    )


def model_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """The keyword arguments for the model's forward for the ``padded`` and ``shared_prompt`` layouts."""
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if "segment_ids" in batch:
        inner = unwrap(model)
        config = inner.config
        dtype = next(inner.parameters()).dtype
        if not dtype.is_floating_point:  # quantised storage: masks follow the compute dtype
            dtype = getattr(config, "dtype", None) or torch.float32
        inputs["attention_mask"] = block_attention_mask(batch["segment_ids"], config._attn_implementation, dtype)
    return inputs


def prompt_kv_blocker(model: torch.nn.Module, batch: dict | None = None) -> str | None:
    """Why ``model`` cannot run a ``prompt_kv`` batch (a reason), or ``None`` when it can."""
    inner = unwrap(model)
    # the layers' own flag (set by gradient_checkpointing_enable); vars() skips PEFT's slow attribute forwarding
    if torch.is_grad_enabled() and inner.training and any(
        vars(m).get("gradient_checkpointing", False) for m in inner.modules()
    ):
        return "gradient checkpointing drops the KV cache in training"
    peft_config = getattr(inner, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return "a prompt-learning adapter owns the KV cache"
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} need their own cache layers"
    window = getattr(config, "sliding_window", None)
    if not layer_types and window and getattr(config, "use_sliding_window", True):
        longest = None
        if batch is not None:
            longest = batch["prompt_input_ids"].size(1) + batch["input_ids"].size(1)
        if longest is None or longest > window:
            return f"sliding-window attention ({window} tokens)"
    return None


def prompt_kv_hidden_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Final hidden states ([N, hidden], in ``score_targets`` order) of a ``prompt_kv`` batch.

    Pass 1 runs the B prompts (right-padded) with a fresh :class:`transformers.DynamicCache`; pass 2 runs the
    R responses (right-padded) against their group's cached keys and values (selected per response, so the
    graph keeps the gradient path into pass 1), with a 2D mask over [prompt slots, response slots] that hides
    the prompt's padding, and position ids continuing after each prompt's real length.
    """
    from transformers import DynamicCache

    group = batch["response_group"]
    prompt_mask = batch["prompt_attention_mask"]
    prompt_ids = batch["prompt_input_ids"]
    prompt_positions = torch.arange(prompt_ids.size(1), device=prompt_ids.device).expand_as(prompt_ids)
    cache = DynamicCache()
    with captured_final_hidden(model) as captured:
        outputs = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                        cache=cache, use_cache=True)
    check_post_head_transform(model, captured[0], outputs)
    prompt_hidden = captured[0]
    if not cache.layers or cache.layers[0].keys is None:
        raise RuntimeError(f"{type(unwrap(model)).__name__} returned no KV cache for the "
                           "prompts; use score_layout='padded' or 'shared_prompt'")
    response_cache = DynamicCache(
        [(layer.keys.index_select(0, group), layer.values.index_select(0, group)) for layer in cache.layers]
    )
    del cache
    attention_mask = torch.cat([prompt_mask.index_select(0, group), batch["attention_mask"]], dim=1)
    with captured_final_hidden(model) as captured:
        model(input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=batch["position_ids"],
              cache=response_cache, use_cache=True)
    hidden = torch.cat([prompt_hidden.reshape(-1, prompt_hidden.size(-1)),
                        captured[0].reshape(-1, captured[0].size(-1))])
    return hidden.index_select(0, batch["score_index"])


def scoring_layout(model: torch.nn.Module, batch: dict) -> str:
    """The layout ``batch`` is scored in: its own for ``padded`` / ``shared_prompt`` / ``prompt_kv`` batches (a
    ``prompt_kv`` one the model cannot run falls back to the cheaper dense layout); for ``auto`` batches the
    cheapest by :func:`alignkit.data.collate.layout_costs` among the layouts the model can run (the rule is
    stated in :mod:`alignkit.data.collate`)."""
    if not is_prompt_kv_batch(batch):
        return "shared_prompt" if "segment_ids" in batch else "padded"
    inner = unwrap(model)
    kv_ok = prompt_kv_blocker(model, batch) is None
    if kv_ok and "layout_auto" not in batch:
        return "prompt_kv"
    candidates = ["padded"]
    if getattr(inner.config, "_attn_implementation", None) in ("sdpa", "eager"):
        candidates.append("shared_prompt")
    if kv_ok:
        candidates.append("prompt_kv")
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    costs = layout_costs(*group_lengths(batch), hidden_size=config.hidden_size)
    return min(candidates, key=costs.__getitem__)


# dense re-layouts of prompt_kv batches, kept while the batch lives (a DPO step scores a batch twice)
_RELAYOUTS = WeakIdKeyDictionary()
_WARNED: set = set()


def _relaid(batch: dict, layout: str) -> dict:
    cached = _RELAYOUTS.setdefault(batch["prompt_input_ids"], {})
    if layout not in cached:
        cached[layout] = relayout(batch, layout)
    return cached[layout]


def response_hidden_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[N, hidden]: the final hidden states that predict each scored token, in ``score_targets`` order."""
    layout = scoring_layout(model, batch)
    if layout == "prompt_kv":
        return prompt_kv_hidden_states(model, batch)
    if is_prompt_kv_batch(batch):
        if "layout_auto" not in batch:
            reason = prompt_kv_blocker(model, batch)
            if reason not in _WARNED:
                _WARNED.add(reason)
                logger.warning("score_layout='prompt_kv' is unavailable (%s): scoring in the %s layout", reason, layout)
        batch = _relaid(batch, layout)
    with captured_final_hidden(model) as captured:
        outputs = model(**model_inputs(model, batch), use_cache=False)
    check_post_head_transform(model, captured[0], outputs)
    hidden = captured[0]
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, batch["score_index"])


def score_responses(
    model: torch.nn.Module,
    batch: dict,
    *,
    temperature: float = 1.0,
    keep_logits: bool = False,
) -> ResponseScores:
    """Summed and per-token response log-probs of every response in ``batch``.

    ``keep_logits=True`` keeps what the head needs to recompute the scored positions' logits
    (``ResponseScores.rows``): for :func:`response_token_kl`, :meth:`ResponseScores.greedy_tokens`, or
    ``ResponseScores.logits`` (the [N, V] table, built on first access).
    """
    hidden = response_hidden_states(model, batch)
    head = OutputHead.of_model(model, temperature)
    token_logps = token_log_probs(head, hidden, batch["score_targets"])
    lengths = batch["response_lengths"]
    logps = torch.zeros(lengths.size(0), dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, batch["score_response"], token_logps)
    rows = None
    if keep_logits:
        rows = HeadRows(hidden, head, torch.is_grad_enabled())
        if head.context_dependent:  # build now, inside the caller's adapter context
            rows.logits()
    return ResponseScores(
        logps=logps,
        lengths=lengths,
        token_logps=token_logps,
        token_response=batch["score_response"],
        rows=rows,
    )
