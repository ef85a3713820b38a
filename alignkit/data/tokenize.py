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

Oversized rows cost no more than rows at the limit: no token can stand for more than
:func:`max_chars_per_token` characters, so a text longer than ``(limit + slack) ×`` that many characters
has more than ``limit`` tokens in its first that-many characters (checked by tokenizing only those).
A prompt over ``max_length`` that way (without ``max_prompt_length``) is refused before it is tokenized
whole; a prompt over ``max_prompt_length`` is tokenized from that many final characters, a response
from that many first characters, which gives the same kept tokens (BPE merges are local; the margin
of :data:`SLACK_TOKENS` tokens covers the cut). Where the short piece does not give enough tokens (a
tokenizer that drops characters, such as one that strips whitespace), the whole text is tokenized.
"""

from __future__ import annotations

import logging
import weakref

from alignkit.data.records import RecordError, is_conversational, message_text

logger = logging.getLogger(__name__)

SLACK_TOKENS = 16  # tokens beyond a limit that a cut text must still give (covers merges at the cut)
_MAX_CHARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def max_chars_per_token(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` stands for: the longest vocabulary entry (for
    byte-level BPE an entry has one character per byte, at least as many as the text it decodes to; for
    SentencePiece ``▁`` is the one space it stands for). Cached per tokenizer."""
    try:
        return _MAX_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    for token in getattr(tokenizer, "all_special_tokens", ()) or ():
        longest = max(longest, len(token))
    try:
        _MAX_CHARS[tokenizer] = longest
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return longest


def _cut(value, chars: int, keep: str):
    """``value`` (text or a message list) cut to ``chars`` characters of text, keeping its ``head`` or
    its ``tail`` (for messages: whole messages, and part of the one at the boundary)."""
    if isinstance(value, str):
        return value[:chars] if keep == "head" else value[-chars:]
    messages = list(value) if keep == "head" else list(reversed(value))
    out, left = [], chars
    for message in messages:
        content = message["content"]
        if len(content) >= left:
            content = content[:left] if keep == "head" else content[-left:]
            out.append({**message, "content": content})
            break
        out.append(message)
        left -= len(content)
    return out if keep == "head" else list(reversed(out))


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
    if max_length is not None:  # oversized rows: see the module docstring
        prompt, responses = _bounded_texts(tokenizer, prompt, responses, max_length, max_prompt_length,
                                           chat_kwargs, source, row, prompt_field)
    prompt_ids = _ids(tokenizer, prompt, **chat_kwargs)
    full = [_ids(tokenizer, _with_response(prompt, r, tokenizer.eos_token)) for r in responses]
    prompt_len = min([len(prompt_ids)] + [_common_prefix_length(prompt_ids, f) for f in full])
    if prompt_len < len(prompt_ids):
        logger.debug("prompt tokens merge with the response at the boundary (row %s); split where they diverge", row)
    response_ids = [f[prompt_len:] for f in full]
    prompt_ids = prompt_ids[:prompt_len]

    prompt_ids, response_ids = truncate_group(prompt_ids, response_ids, max_length=max_length,
                                              max_prompt_length=max_prompt_length, source=source, row=row,
                                              prompt_field=prompt_field)
    if not prompt_ids:
        raise RecordError(source, row, prompt_field, "prompt tokenizes to no tokens")
    for i, r in enumerate(response_ids):
        if not r:
            raise RecordError(source, row, None, f"response {i} tokenizes to no tokens")
    return {"prompt_ids": prompt_ids, "response_ids": response_ids}


def truncate_group(prompt_ids: list[int], response_ids: list[list[int]], *, max_length: int | None,
                   max_prompt_length: int | None, source: str = "<dataset>", row: int | None = None,
                   prompt_field: str = "prompt") -> tuple[list[int], list[list[int]]]:
    """The truncation of a tokenized group: a prompt longer than ``max_prompt_length`` keeps its end, each
    response is cut to what fits in ``max_length``; a prompt that leaves no room is a :class:`RecordError`."""
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
    return prompt_ids, response_ids


def prefix_token_ends(tokenizer, prompt, pieces: list[str], full_ids: list[int], prompt_len: int) -> list[int]:
    """For a response split into text ``pieces`` (steps), the end (exclusive) of each piece's tokens in
    response coordinates; the last is ``len(full_ids) − prompt_len`` (end-of-sequence / end-of-turn tokens
    belong to the last piece). ``full_ids`` are the tokens of prompt + whole response (:func:`tokenize_group`).
    A boundary is where the tokens of ``prompt + pieces[:i]`` stop agreeing with the full sequence, so a
    token merged across a boundary goes to the later piece."""
    ends, acc = [], ""
    total = len(full_ids) - prompt_len
    for piece in pieces[:-1]:
        acc += piece
        part = _ids(tokenizer, _with_response(prompt, acc, ""))
        end = _common_prefix_length(part, full_ids) - prompt_len
        ends.append(min(max(end, ends[-1] if ends else 0, 0), total))
    ends.append(total)
    return ends


def tokens_over(tokenizer, value, limit: int, **chat_kwargs) -> int | None:
    """A lower bound on the tokens of ``value`` (text or chat messages) when it is surely over ``limit``
    tokens, counted on its first ``(limit + SLACK_TOKENS) ×`` :func:`max_chars_per_token` characters only;
    ``None`` when it may fit (not tokenized then). What keeps an oversized row from being tokenized whole."""
    chars = len(message_text(value))
    budget = (limit + SLACK_TOKENS) * max_chars_per_token(tokenizer)
    if chars <= budget:
        return None
    tokens = len(_ids(tokenizer, _cut(value, budget, "head"), **chat_kwargs))
    return tokens if tokens >= limit + SLACK_TOKENS else None


def _bounded_texts(tokenizer, prompt, responses, max_length, max_prompt_length, chat_kwargs, source, row,
                   prompt_field):
    """The prompt and responses cut so that tokenizing them costs at most about ``max_length`` tokens
    each, with the same kept tokens; a prompt that cannot fit ``max_length`` is refused here."""
    per_token = max_chars_per_token(tokenizer)
    prompt_chars = len(message_text(prompt))
    if max_prompt_length is None:
        tokens = tokens_over(tokenizer, prompt, max_length, **chat_kwargs)
        if tokens is not None:
            raise RecordError(
                source, row, prompt_field,
                f"prompt has at least {tokens} tokens (in its first {(max_length + SLACK_TOKENS) * per_token:,} of "
                f"{prompt_chars:,} characters) and leaves no room for the response within max_length={max_length} "
                "(refused before tokenizing it whole; raise max_length or set max_prompt_length to keep its end)",
            )
    else:
        budget = (max_prompt_length + SLACK_TOKENS) * per_token
        if prompt_chars > budget:
            piece = _cut(prompt, budget, "tail")
            if len(_ids(tokenizer, piece, **chat_kwargs)) >= max_prompt_length + SLACK_TOKENS:
                prompt = piece  # only its last max_prompt_length tokens are kept, and they are in the piece
    budget = (max_length + SLACK_TOKENS) * per_token
    cut = [_cut(r, budget, "head") if len(message_text(r)) > budget else r for r in responses]
    for original, short in zip(responses, cut):
        if short is not original and len(_ids(tokenizer, message_text(short))) < max_length + SLACK_TOKENS:
            return prompt, responses  # a tokenizer that drops characters: tokenize the responses whole
    return prompt, cut
