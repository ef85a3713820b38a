"""Batch response groups into tensors for :mod:`alignkit.scoring`.

Four layouts, chosen by ``layout``:

``"padded"``
    One row per (prompt, response) pair, right-padded: the prompt is repeated for every response.
    Works with every attention implementation.

``"shared_prompt"``
    One row per *group*: ``prompt, response_1, response_2, ...`` with a block attention pattern
    (each response sees the prompt and its own earlier tokens, not the other responses) and
    position ids that restart after the prompt for each response. The prompt goes through the
    model once, however many responses it has: with K responses and a prompt P tokens long, this
    saves (K - 1)·P token forwards per group. Needs an attention implementation that accepts a
    4D mask (``sdpa`` or ``eager``). Its attention is dense over the whole packed row
    (P + ΣK responses)², so long responses cost more attention than the prompt tokens saved.

``"prompt_kv"``
    Two batches: the B prompts (``prompt_input_ids`` / ``prompt_attention_mask``, right-padded) and the
    R responses (``input_ids`` / ``attention_mask`` / ``position_ids``, right-padded, positions continuing
    after their prompt's real length). The scorer runs the prompts once with a KV cache and the responses
    against their prompt's cached keys and values (:func:`alignkit.scoring.prompt_kv_hidden_states`): the
    token forwards of ``shared_prompt`` with the attention of ``padded`` (each response attends to its
    prompt and its own tokens only), for the price of a second forward call.

``"auto"`` (the default)
    The ``prompt_kv`` tensors, marked ``layout_auto``: the scorer, which knows the model, scores each batch
    in the layout :func:`layout_costs` rates cheapest among those the model can run
    (:func:`alignkit.scoring.scoring_layout`), re-laying the batch out (:func:`relayout`) when that is
    ``padded`` or ``shared_prompt``. The rule, with tokens computed T (padding included), attention area A
    (query × key pairs computed) and hidden size h::

        cost = T + A / (3·h)   (+ 80·(384 / h)² token forwards for prompt_kv's second forward call)

        padded         T = R·L,          A = R·L²,                 L = max_r (P + n_r)
        shared_prompt  T = B·L,          A = B·L²,                 L = max_g (P_g + Σ_r n_r)
        prompt_kv      T = B·Lp + R·Lr,  A = B·Lp² + R·Lr·(Lp + Lr), Lp = max P, Lr = max n

    So: ``padded`` when no prompt is shared (one response per group) or the prompts are short;
    ``prompt_kv`` when prompts are shared and the packed rows would be long; ``shared_prompt`` for short
    packed rows of a small model, where one forward call beats two. A model that cannot reuse a cache
    with gradients (gradient checkpointing in training, sliding-window or hybrid layers) leaves out
    ``prompt_kv``; an attention without 4D masks leaves out ``shared_prompt``. An explicit ``prompt_kv``
    on such a model falls back the same way.

Every layout describes the tokens to score the same way, so the scorer does not care which was used:

* ``score_index`` [N]: flat index of the hidden state that predicts each response token: row * seq_len
  + position in ``padded`` / ``shared_prompt``; in ``prompt_kv`` an index into the prompt batch's
  flattened positions [B * Lp] followed by the response batch's [R * Lr],
* ``score_targets`` [N]: the response token itself,
* ``score_response`` [N]: which response (0..R-1, group-major order) the token belongs to,
* ``response_group`` [R], ``response_lengths`` [R].

Extra float fields (``extra_fields``: name -> kind) are collated when every example carries them:
``response`` fields (one number per response, e.g. the precomputed ``ref_logps``) are flattened to [R],
``group`` fields (one number per example) become [B], ``token`` fields (one list of numbers per response,
as long as its ``response_ids``) are flattened to [N], in ``score_targets`` order, in every layout. A
method declares its own (:attr:`alignkit.trainers.base.AlignTrainer.extra_fields`); ``ref_logps`` is
always one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

LAYOUTS = ("auto", "padded", "shared_prompt", "prompt_kv")
EXTRA_FIELD_KINDS = ("response", "group", "token")
BASE_EXTRA_FIELDS = {"ref_logps": "response"}  # the precomputed reference log-probs (alignkit.trainers.base)
# keys that depend on the layout (everything else in a batch is the same in every layout)
LAYOUT_KEYS = ("input_ids", "position_ids", "attention_mask", "segment_ids", "prompt_input_ids",
               "prompt_attention_mask", "score_index", "layout_auto")
# The cost model of ``auto`` (:func:`layout_costs`), in token forwards of the model:
# an attention key costs 1 / (ATTENTION_KEYS_PER_TOKEN · hidden) of a token forward per query, and
# prompt_kv's second forward (its fixed per-call work, the cache gather, the 2D mask) costs
# PROMPT_KV_OVERHEAD_TOKENS · (384 / hidden)² token forwards (per-call work does not grow with the model's
# width, a token forward grows with its square). Both fitted on one CPU thread to the 14M-parameter
# benchmark model (hidden 384, 6 layers): DPO and D²O steps at 4:1 / 1:1 and 64:64 … 256:256.
ATTENTION_KEYS_PER_TOKEN = 3.0
PROMPT_KV_OVERHEAD_TOKENS = 80.0


def layout_costs(prompt_lengths: list[int], response_lengths: list[list[int]], hidden_size: int) -> dict[str, float]:
    """Estimated forward cost of groups (prompt lengths P_g, response lengths n_gr) in each layout, in token
    forwards: tokens computed (padding included) + attention area / (ATTENTION_KEYS_PER_TOKEN · hidden)
    (+ prompt_kv's second-forward overhead), with row length L:

    * ``padded``: R rows of L = max(P_g + n_gr); area R·L²;
    * ``shared_prompt``: B rows of L = max(P_g + Σ_r n_gr); area B·L² (dense over the packed row);
    * ``prompt_kv``: B prompt rows of Lp = max P_g and R response rows of Lr = max n_gr; area
      B·Lp² + R·Lr·(Lp + Lr).
    """
    rows = sum(len(ns) for ns in response_lengths)
    groups = len(prompt_lengths)
    per_key = 1.0 / (ATTENTION_KEYS_PER_TOKEN * hidden_size)
    padded = max(p + n for p, ns in zip(prompt_lengths, response_lengths) for n in ns)
    shared = max(p + sum(ns) for p, ns in zip(prompt_lengths, response_lengths))
    lp, lr = max(prompt_lengths), max(n for ns in response_lengths for n in ns)
    return {
        "padded": rows * padded + rows * padded**2 * per_key,
        "shared_prompt": groups * shared + groups * shared**2 * per_key,
        "prompt_kv": (groups * lp + rows * lr + (groups * lp**2 + rows * lr * (lp + lr)) * per_key
                      + PROMPT_KV_OVERHEAD_TOKENS * (384.0 / hidden_size) ** 2),
    }


def is_prompt_kv_batch(batch: dict) -> bool:
    return "prompt_input_ids" in batch


def group_lengths(batch: dict) -> tuple[list[int], list[list[int]]]:
    """Prompt lengths [B] and per-group response lengths of a ``prompt_kv`` batch."""
    prompt_lengths = batch["prompt_attention_mask"].sum(1).tolist()
    responses: list[list[int]] = [[] for _ in prompt_lengths]
    for g, n in zip(batch["response_group"].tolist(), batch["response_lengths"].tolist()):
        responses[g].append(n)
    return prompt_lengths, responses


def prompt_kv_examples(batch: dict) -> list[dict]:
    """The groups (``prompt_ids``, ``response_ids`` token lists) of a ``prompt_kv`` batch."""
    prompt_lengths = batch["prompt_attention_mask"].sum(1).tolist()
    prompts = batch["prompt_input_ids"].tolist()
    examples = [{"prompt_ids": prompts[g][:p], "response_ids": []} for g, p in enumerate(prompt_lengths)]
    responses = batch["input_ids"].tolist()
    for r, (g, n) in enumerate(zip(batch["response_group"].tolist(), batch["response_lengths"].tolist())):
        examples[g]["response_ids"].append(responses[r][:n])
    return examples


def relayout(batch: dict, layout: str, pad_token_id: int = 0) -> dict:
    """A ``prompt_kv`` batch in another layout (``padded`` or ``shared_prompt``): the same groups, fields and
    score order; only the model inputs and ``score_index`` change. Tensors stay on the batch's device."""
    if not is_prompt_kv_batch(batch):
        raise ValueError("relayout takes a prompt_kv batch")
    device = batch["input_ids"].device
    rebuilt = GroupCollator(pad_token_id, layout)(prompt_kv_examples(batch))
    out = {k: v for k, v in batch.items() if k not in LAYOUT_KEYS}
    out.update({k: rebuilt[k].to(device) for k in LAYOUT_KEYS if k in rebuilt})
    return out


@dataclass
class GroupCollator:
    """Collate tokenized groups (``prompt_ids``, ``response_ids``) into one of the layouts, with the float
    ``extra_fields`` (name -> ``response`` | ``group`` | ``token``; ``ref_logps`` always included)."""

    pad_token_id: int
    layout: str = "auto"
    pad_to_multiple_of: int | None = None
    extra_fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {LAYOUTS}")
        self.extra_fields = {**BASE_EXTRA_FIELDS, **dict(self.extra_fields)}
        for name, kind in self.extra_fields.items():
            if kind not in EXTRA_FIELD_KINDS:
                raise ValueError(f"extra field {name!r}: kind {kind!r} is not one of {EXTRA_FIELD_KINDS}")

    def _padded_len(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else ((n + m - 1) // m) * m

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        for i, ex in enumerate(examples):
            if not ex["prompt_ids"]:
                raise ValueError(f"example {i}: prompt_ids is empty (the first response token needs a prompt token)")
            for j, resp in enumerate(ex["response_ids"]):
                if not resp:
                    raise ValueError(f"example {i}: response_ids[{j}] is empty")
        if self.layout in ("prompt_kv", "auto"):
            batch = self._prompt_kv(examples)
            if self.layout == "auto":  # the scorer picks the layout (alignkit.scoring.scoring_layout)
                batch["layout_auto"] = torch.ones(1, dtype=torch.bool)
        else:
            batch = self._rows(examples, self.layout)
        group_sizes = [len(ex["response_ids"]) for ex in examples]
        batch["response_lengths"] = torch.tensor([len(r) for ex in examples for r in ex["response_ids"]],
                                                 dtype=torch.long)
        batch["score_targets"] = torch.tensor([t for ex in examples for r in ex["response_ids"] for t in r],
                                              dtype=torch.long)
        batch["score_response"] = torch.repeat_interleave(
            torch.arange(len(batch["response_lengths"])), batch["response_lengths"])
        batch["response_group"] = torch.repeat_interleave(
            torch.arange(len(examples)), torch.tensor(group_sizes, dtype=torch.long))
        self._extra_fields(examples, batch)
        return batch

    def _rows(self, examples: list[dict], layout: str) -> dict[str, torch.Tensor]:
        """``padded`` (one row per response) or ``shared_prompt`` (one row per group)."""
        if layout == "padded":
            rows = [(ex["prompt_ids"], [resp]) for ex in examples for resp in ex["response_ids"]]
        else:
            rows = [(ex["prompt_ids"], list(ex["response_ids"])) for ex in examples]
        seq_len = self._padded_len(max(len(p) + sum(len(r) for r in rs) for p, rs in rows))

        input_ids = torch.full((len(rows), seq_len), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
        # -1 pad, 0 prompt, j + 1 for the j-th response of the row
        segment_ids = torch.full((len(rows), seq_len), -1, dtype=torch.long)
        score_index = []
        for row, (prompt, responses) in enumerate(rows):
            p = len(prompt)
            input_ids[row, :p] = torch.tensor(prompt)
            position_ids[row, :p] = torch.arange(p)
            segment_ids[row, :p] = 0
            start = p
            for j, resp in enumerate(responses):
                n = len(resp)
                input_ids[row, start : start + n] = torch.tensor(resp)
                position_ids[row, start : start + n] = torch.arange(p, p + n)
                segment_ids[row, start : start + n] = j + 1
                base = row * seq_len
                # token 0 is predicted by the last prompt token, token t > 0 by token t - 1
                score_index.append(base + p - 1)
                score_index.extend(range(base + start, base + start + n - 1))
                start += n
        batch = {"input_ids": input_ids, "position_ids": position_ids,
                 "score_index": torch.tensor(score_index, dtype=torch.long)}
        if layout == "padded":
            batch["attention_mask"] = (segment_ids >= 0).long()
        else:
            batch["segment_ids"] = segment_ids
        return batch

    def _prompt_kv(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Prompts [B, Lp] and responses [R, Lr], both right-padded (see the module docstring)."""
        prompt_len = self._padded_len(max(len(ex["prompt_ids"]) for ex in examples))
        responses = [(g, r) for g, ex in enumerate(examples) for r in ex["response_ids"]]
        response_len = self._padded_len(max(len(r) for _, r in responses))
        prompt_input_ids = torch.full((len(examples), prompt_len), self.pad_token_id, dtype=torch.long)
        prompt_attention_mask = torch.zeros((len(examples), prompt_len), dtype=torch.long)
        for g, ex in enumerate(examples):
            prompt_input_ids[g, : len(ex["prompt_ids"])] = torch.tensor(ex["prompt_ids"])
            prompt_attention_mask[g, : len(ex["prompt_ids"])] = 1
        input_ids = torch.full((len(responses), response_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(responses), response_len), dtype=torch.long)
        position_ids = torch.zeros((len(responses), response_len), dtype=torch.long)
        score_index = []
        response_base = len(examples) * prompt_len
        for r, (g, resp) in enumerate(responses):
            p, n = len(examples[g]["prompt_ids"]), len(resp)
            input_ids[r, :n] = torch.tensor(resp)
            attention_mask[r, :n] = 1
            position_ids[r] = torch.arange(p, p + response_len)
            # token 0 is predicted by the group's last prompt token (pass 1), token t > 0 by token t - 1 (pass 2)
            score_index.append(g * prompt_len + p - 1)
            score_index.extend(range(response_base + r * response_len, response_base + r * response_len + n - 1))
        return {"prompt_input_ids": prompt_input_ids, "prompt_attention_mask": prompt_attention_mask,
                "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "score_index": torch.tensor(score_index, dtype=torch.long)}

    def _extra_fields(self, examples: list[dict], batch: dict) -> None:
        for name, kind in self.extra_fields.items():
            if not all(name in ex and ex[name] is not None for ex in examples):
                continue
            if kind == "group":
                batch[name] = torch.tensor([float(ex[name]) for ex in examples], dtype=torch.float32)
            elif kind == "response":
                for i, ex in enumerate(examples):
                    if len(ex[name]) != len(ex["response_ids"]):
                        raise ValueError(f"example {i}: {name} must hold one value per response")
                batch[name] = torch.tensor([v for ex in examples for v in ex[name]], dtype=torch.float32)
            else:
                values = []
                for ex in examples:
                    if len(ex[name]) != len(ex["response_ids"]) or any(
                        len(w) != len(r) for w, r in zip(ex[name], ex["response_ids"])
                    ):
                        raise ValueError(f"{name} must hold one value per response token of every response")
                    for w in ex[name]:
                        values.extend(w)
                batch[name] = torch.tensor(values, dtype=torch.float32)
