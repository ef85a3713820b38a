"""Sequence log-probabilities of many responses per prompt, in one batched forward.

``score_responses(model, batch)`` returns, for every response R in a batch built by
:class:`alignkit.data.collate.GroupCollator`, log π(y|x) = the SUM of its response-token log-probs
(prompt tokens never count), plus the per-token values for methods that weight tokens.

Two things keep it cheap:

* the ``shared_prompt`` layout runs a prompt through the model once for all its responses
  (block attention mask, position ids restarting after the prompt);
* the output head is applied only to the hidden states that predict response tokens: a forward
  pre-hook on the model's output embeddings gathers those rows before the projection, so the
  [batch, seq, vocab] logits tensor is never built. The model's own forward still runs end to end
  (through DDP / FSDP / DeepSpeed wrappers and any logit soft-capping after the head).

Reference log-probs come from the same function: call it on the same model inside
``disable_adapter()`` (LoRA), on a frozen reference model, or skip it with precomputed values.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

MODEL_INPUT_KEYS = ("input_ids", "position_ids", "attention_mask")


@dataclass
class ResponseScores:
    """Log-probs of R responses made of N scored tokens in total."""

    logps: torch.Tensor  # [R] summed response-token log-probs
    lengths: torch.Tensor  # [R] response token counts
    token_logps: torch.Tensor  # [N] per-token log-probs, in batch["score_response"] order
    token_response: torch.Tensor  # [N] response index of each token
    logits: torch.Tensor | None = None  # [N, V] when requested (KL terms)

    def mean_logps(self) -> torch.Tensor:
        """Length-normalised log-probs, log π(y|x) / |y|."""
        return self.logps / self.lengths.clamp(min=1)


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


@contextmanager
def head_on_rows(model: torch.nn.Module, flat_index: torch.Tensor):
    """Within the block, the model's output head sees only the hidden states at ``flat_index``.

    ``flat_index`` indexes the flattened [batch * seq] positions; the logits come back as [1, N, V].
    """
    head = extract_model_from_parallel(model).get_output_embeddings()

    def gather_rows(module, args):
        hidden = args[0]
        rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, flat_index)
        return (rows.unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather_rows)
    try:
        yield
    finally:
        handle.remove()


def model_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """The keyword arguments for the model's forward for either layout."""
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if "segment_ids" in batch:
        inner = extract_model_from_parallel(model)
        config = inner.config
        dtype = next(inner.parameters()).dtype
        if not dtype.is_floating_point:  # quantised storage: masks follow the compute dtype
            dtype = getattr(config, "dtype", None) or torch.float32
        inputs["attention_mask"] = block_attention_mask(batch["segment_ids"], config._attn_implementation, dtype)
    return inputs


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, without materialising the full log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def score_responses(
    model: torch.nn.Module,
    batch: dict,
    *,
    temperature: float = 1.0,
    keep_logits: bool = False,
) -> ResponseScores:
    """Summed and per-token response log-probs of every response in ``batch`` (one forward)."""
    with head_on_rows(model, batch["score_index"]):
        outputs = model(**model_inputs(model, batch), use_cache=False)
    logits = outputs.logits[0]
    if temperature != 1.0:
        logits = logits / temperature
    token_logps = selective_log_softmax(logits, batch["score_targets"])
    lengths = batch["response_lengths"]
    logps = torch.zeros(lengths.size(0), dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, batch["score_response"], token_logps)
    return ResponseScores(
        logps=logps,
        lengths=lengths,
        token_logps=token_logps,
        token_response=batch["score_response"],
        logits=logits if keep_logits else None,
    )

