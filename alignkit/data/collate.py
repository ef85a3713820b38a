"""Batch response groups into tensors for :mod:`alignkit.scoring`.

Two layouts, chosen by ``layout``:

``"padded"``
    One row per (prompt, response) pair, right-padded: the prompt is repeated for every response.
    Works with every attention implementation.

``"shared_prompt"``
    One row per *group*: ``prompt, response_1, response_2, ...`` with a block attention pattern
    (each response sees the prompt and its own earlier tokens, not the other responses) and
    position ids that restart after the prompt for each response. The prompt goes through the
    model once, however many responses it has: with K responses and a prompt P tokens long, this
    saves (K - 1)·P token forwards per group. Needs an attention implementation that accepts a
    4D mask (``sdpa`` or ``eager``).

Both layouts describe the tokens to score the same way, so the scorer does not care which was used:

* ``score_index`` [N]: flat index (row * seq_len + position) of the hidden state that predicts each
  response token,
* ``score_targets`` [N]: the response token itself,
* ``score_response`` [N]: which response (0..R-1, group-major order) the token belongs to,
* ``response_group`` [R], ``response_lengths`` [R].

Extra per-response float fields present in every example (``ref_logps``, ``is_negative``) are flattened
to [R]; per-group float fields (``rejected_share``, one number per example) become [B].
Extra per-token float fields (``token_weights``: one list of floats per response, as long as its
``response_ids``) are flattened to [N], in ``score_targets`` order, in both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("padded", "shared_prompt")
PER_RESPONSE_FLOAT_FIELDS = ("ref_logps", "is_negative")
PER_GROUP_FLOAT_FIELDS = ("rejected_share",)
PER_TOKEN_FLOAT_FIELDS = ("token_weights",)


@dataclass
class GroupCollator:
    """Collate tokenized groups (``prompt_ids``, ``response_ids``) into one of the two layouts."""

    pad_token_id: int
    layout: str = "shared_prompt"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {LAYOUTS}")

    def _padded_len(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else ((n + m - 1) // m) * m

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.layout == "padded":
            rows = [
                (ex["prompt_ids"], [resp]) for ex in examples for resp in ex["response_ids"]
            ]
        else:
            rows = [(ex["prompt_ids"], list(ex["response_ids"])) for ex in examples]
        seq_len = self._padded_len(max(len(p) + sum(len(r) for r in rs) for p, rs in rows))

        input_ids = torch.full((len(rows), seq_len), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
        # -1 pad, 0 prompt, j + 1 for the j-th response of the row
        segment_ids = torch.full((len(rows), seq_len), -1, dtype=torch.long)
        score_index, score_targets, score_response, lengths = [], [], [], []
        response = 0
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
                score_targets.extend(resp)
                score_response.extend([response] * n)
                lengths.append(n)
                response += 1
                start += n

        group_sizes = [len(ex["response_ids"]) for ex in examples]
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "score_index": torch.tensor(score_index, dtype=torch.long),
            "score_targets": torch.tensor(score_targets, dtype=torch.long),
            "score_response": torch.tensor(score_response, dtype=torch.long),
            "response_lengths": torch.tensor(lengths, dtype=torch.long),
            "response_group": torch.repeat_interleave(
                torch.arange(len(examples)), torch.tensor(group_sizes, dtype=torch.long)
            ),
        }
        if self.layout == "padded":
            batch["attention_mask"] = (segment_ids >= 0).long()
        else:
            batch["segment_ids"] = segment_ids
        for name in PER_RESPONSE_FLOAT_FIELDS:
            if all(name in ex and ex[name] is not None for ex in examples):
                batch[name] = torch.tensor([v for ex in examples for v in ex[name]], dtype=torch.float32)
        for name in PER_GROUP_FLOAT_FIELDS:
            if all(name in ex and ex[name] is not None for ex in examples):
                batch[name] = torch.tensor([float(ex[name]) for ex in examples], dtype=torch.float32)
        for name in PER_TOKEN_FLOAT_FIELDS:
            if all(name in ex and ex[name] is not None for ex in examples):
                values = []
                for ex in examples:
                    if len(ex[name]) != len(ex["response_ids"]) or any(
                        len(w) != len(r) for w, r in zip(ex[name], ex["response_ids"])
                    ):
                        raise ValueError(f"{name} must hold one value per response token of every response")
                    for w in ex[name]:
                        values.extend(w)
                batch[name] = torch.tensor(values, dtype=torch.float32)
        return batch
