"""Chat by default: how a text prompt reaches a model that has a chat template.

An instruct model such as SmolLM2-135M-Instruct answers a raw text prompt with an immediate end-of-turn
token (on the arithmetic task 95 of 128 completions were empty). So wherever alignkit reads prompts from a
source (recipes, ``alignkit rollout``, eval suites, the quickstart), a text prompt becomes a chat
conversation when the tokenizer has a chat template, with an optional system message first; raw text only
when asked (``chat: false``). The conversion happens once, on the records: rollouts, pairs and negatives
written from them carry the messages, and the trainers tokenize them with the template (TRL's convention
for conversational data), so what is sampled and what is trained on are the same tokens.

``chat`` takes ``auto`` (chat if the tokenizer has a template), ``true`` or ``false``.
"""

from __future__ import annotations

from collections.abc import Iterable

from alignkit.data.records import is_conversational

CHAT_MODES = ("auto", "true", "false")


def chat_mode(value) -> str:
    """``chat`` as one of :data:`CHAT_MODES` (booleans and their spellings accepted)."""
    text = str(value).strip().lower()
    aliases = {"yes": "true", "on": "true", "1": "true", "no": "false", "off": "false", "0": "false", "none": "false"}
    text = aliases.get(text, text)
    if text not in CHAT_MODES:
        raise ValueError(f"chat must be one of {CHAT_MODES} (or a boolean), got {value!r}")
    return text


def use_chat(tokenizer, chat="auto") -> bool:
    """Whether prompts go to this tokenizer as chat messages. ``chat: true`` with a tokenizer that has no
    template is an error; ``auto`` needs the tokenizer to decide (``true`` / ``false`` do not)."""
    mode = chat_mode(chat)
    if tokenizer is None:
        if mode == "auto":
            raise ValueError("chat: auto needs the tokenizer to decide whether prompts are chat messages")
        return mode == "true"
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "true" and not has_template:
        raise ValueError("chat: true but the tokenizer has no chat template")
    return has_template and mode != "false"


def as_chat(prompt, system_prompt: str | None = None) -> list[dict]:
    """A prompt as chat messages: text becomes one user message; a system message is put first when
    ``system_prompt`` is given and the conversation has none."""
    messages = list(prompt) if is_conversational(prompt) else [{"role": "user", "content": prompt}]
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def format_prompt(prompt, tokenizer, chat="auto", system_prompt: str | None = None):
    """One prompt as the model should see it: chat messages (:func:`as_chat`) when :func:`use_chat`, else
    unchanged (a conversational prompt stays a conversation)."""
    return as_chat(prompt, system_prompt) if use_chat(tokenizer, chat) else prompt


def format_records(records, tokenizer, chat="auto", system_prompt: str | None = None, field: str = "prompt"):
    """Records (a list of dicts or a ``datasets.Dataset``) with their prompts formatted by
    :func:`format_prompt`. Records without the field pass through; nothing changes when chat is off."""
    if records is None or not use_chat(tokenizer, chat):
        return records
    if hasattr(records, "map") and hasattr(records, "column_names"):  # a datasets.Dataset
        if field not in records.column_names:
            return records
        return records.map(lambda r: {field: as_chat(r[field], system_prompt)}, desc="Chat-formatting prompts")
    return [_with_chat(r, field, system_prompt) for r in _as_list(records)]


def _with_chat(record: dict, field: str, system_prompt: str | None) -> dict:
    if field not in record:
        return record
    return {**record, field: as_chat(record[field], system_prompt)}


def _as_list(records: Iterable) -> list:
    return records if isinstance(records, list) else list(records)
