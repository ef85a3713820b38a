"""Turn a record's prompt and responses into token ids: one prompt, any number of responses.

Every method in alignkit trains on *response groups*: a prompt with one response (NPO, SFT), two
(DPO), or K + 1 (D²O). A tokenized group is ``{"prompt_ids": [...], "response_ids": [[...], ...]}``.

Conventions follow TRL so that a dataset gives the same tokens in both libraries:

* text prompt: ``tokenizer(prompt)``; each response is tokenized as ``tokenizer(prompt + response + eos)``
  and split where it diverges from the prompt's tokens (BPE may merge across the boundary);
* chat prompt (list of messages): the prompt is rendered with ``add_generation_prompt=True``, each
  response as the assistant turn of the full conversation, split the same way (the template's
  end-of-turn tokens belong to the response).

Truncation: a prompt longer than ``max_prompt_length`` keeps its end; responses are cut to what fits
in ``max_length``. A prompt that leaves no room for a response is a :class:`RecordError`, not a
silent drop.
"""

from __future__ import annotations

import logging

from alignkit.data.records import RecordError, is_conversational, message_text

logger = logging.getLogger(__name__)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _ids(tokenizer, value, **chat_kwargs) -> list[int]:
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=False, **chat_kwargs)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and value.startswith(bos):  # an already rendered chat prompt: no second BOS
        return tokenizer(value, add_special_tokens=False)["input_ids"]
    return tokenizer(value)["input_ids"]


def _with_response(prompt, response, eos_token: str):
    """The prompt followed by the response, in the prompt's format (text or messages)."""
    if isinstance(prompt, list):
        text = message_text(response)
        return prompt + [{"role": "assistant", "content": text}]
    text = message_text(response)
    if eos_token and not text.endswith(eos_token):
        text = text + eos_token
    return prompt + text


def tokenize_group(
    tokenizer,
    prompt,
    responses: list,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    source: str = "<dataset>",
    row: int | None = None,
    prompt_field: str = "prompt",
) -> dict:
    """Token ids of one prompt and its responses: ``{"prompt_ids", "response_ids"}``.

    Raises :class:`RecordError` (naming ``source``, ``row`` and the prompt field) when the prompt
    leaves no room for a response within ``max_length``.
    """
    if is_conversational(prompt) and not getattr(tokenizer, "chat_template", None):
        raise RecordError(source, row, prompt_field, "chat-message prompt but the tokenizer has no chat template")
    chat_kwargs = {"add_generation_prompt": True} if isinstance(prompt, list) else {}
    prompt_ids = _ids(tokenizer, prompt, **chat_kwargs)
    full = [_ids(tokenizer, _with_response(prompt, r, tokenizer.eos_token)) for r in responses]
    prompt_len = min([len(prompt_ids)] + [_common_prefix_length(prompt_ids, f) for f in full])
    if prompt_len < len(prompt_ids):
        logger.debug("prompt tokens merge with the response at the boundary (row %s); split where they diverge", row)
    response_ids = [f[prompt_len:] for f in full]
    prompt_ids = prompt_ids[:prompt_len]

    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room <= 0:
            raise RecordError(
                source,
                row,
                prompt_field,
                f"prompt has {len(prompt_ids)} tokens and leaves no room for the response within "
                f"max_length={max_length} (raise max_length or set max_prompt_length)",
            )
        response_ids = [r[:room] for r in response_ids]
    if not prompt_ids:
        raise RecordError(source, row, prompt_field, "prompt tokenizes to no tokens")
    for i, r in enumerate(response_ids):
        if not r:
            raise RecordError(source, row, None, f"response {i} tokenizes to no tokens")
    return {"prompt_ids": prompt_ids, "response_ids": response_ids}
