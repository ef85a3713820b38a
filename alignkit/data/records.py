"""The record formats alignkit reads, and the check that a record matches one.

A record is one row: a ``dict``. Its ``prompt`` is either text (a ``str``) or a chat message list
``[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]``. Its responses
(``chosen``, ``rejected``, ``response`` and each item of ``samples``) are text or an assistant message
list ``[{"role": "assistant", "content": str}]``; a response must not be empty after ``.strip()``
(for a message list: its concatenated content).

Kinds (:data:`SCHEMAS`):

``preference``  ``prompt``, ``chosen``, ``rejected``
``negatives``   ``prompt``, ``rejected``; optional ``samples`` (a list of K responses)
``sft``         ``prompt``, ``response`` (forget and retain sets)
``problems``    ``prompt`` and ``answer`` (text or a finite number) and/or ``tests`` (text or a list
                of texts); optional ``solution`` (text)
``flips``       ``id`` (text or an integer), ``reference`` (any JSON value) and either ``old`` and
                ``new`` (predictions, any JSON value) or ``old_score`` and ``new_score`` (finite numbers:
                ``NaN``, ``Infinity`` and ``1e999`` are refused)

``perstep``     ``prompt``, ``response`` (text), ``values`` ([Q_0..Q_n]: success rates in [0, 1]); optional
                ``steps`` (texts that concatenate to ``response``, one fewer than ``values``) and
                ``chosen`` (a response)

A method may also declare a :class:`Schema` of its own over these fields and TRL's ``completion``
(a response) and ``label`` (a boolean), e.g. TRL's unpaired format ``prompt``, ``completion``,
``label``; :func:`get_schema` and the loaders take it in place of a kind's name.

A record may carry any other field (``id``, ``ref_logps``, ...): it is neither checked nor changed.
A field whose value is ``None`` counts as absent, as in an Arrow table where a row lacks a column.

TRL's dataset formats are read too: :func:`from_trl` turns such a row into the record above before it is
validated (the loaders call it), with errors that name the row's own fields:

* implicit prompt (``chosen`` / ``rejected`` as full conversations, or texts, sharing a prefix, no
  ``prompt``; or a text ``prompt`` beside conversational ones): the shared prefix is the ``prompt``, the
  rest the responses, as ``trl.extract_prompt`` splits them (preference and negatives kinds);
* ``messages`` (TRL's conversational language-modeling format, SFT): the trailing assistant messages are
  the ``response``, the messages before them the ``prompt`` (earlier assistant turns are context);
* prompt-completion (``prompt``, ``completion``) for SFT: ``completion`` is the ``response``;
* conversational preference (``prompt`` a message list, ``chosen`` / ``rejected`` assistant message lists)
  and TRL's unpaired ``prompt`` / ``completion`` / ``label`` (KTO's own schema) need no conversion.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

CHAT_ROLES = ("system", "user", "assistant", "tool")
RESPONSE_ROLES = ("assistant",)


class RecordError(ValueError):
    """A record that does not match its format, located by ``source``, ``row`` and ``field``.

    ``row`` is 1-based (the line number for JSON Lines files) or ``None`` when the problem is not
    in one row; ``field`` is a field name such as ``rejected``, ``prompt[2].role`` or ``samples[1]``,
    or ``None``. ``str(error)`` reads ``data/train.jsonl, row 7, field 'rejected': empty response``.
    """

    def __init__(self, source: str, row: int | None, field: str | None, message: str):
        self.source = str(source)
        self.row = row
        self.field = field
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = [self.source]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}"

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self):
        # keep the four attributes across pickling (datasets.map with num_proc, multiprocessing)
        return (type(self), (self.source, self.row, self.field, self.message))


@dataclass(frozen=True)
class Schema:
    """The fields of one record kind.

    ``required`` must all be present; ``optional`` are checked when present; ``one_of`` lists
    alternatives (each a tuple of fields) of which at least one must be present in full; ``check``
    (``check(record, source, row)``) checks what no single field can (fields that must agree).
    """

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()
    check: Callable[[dict, str, int | None], None] | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field this kind knows, in declaration order."""
        alternatives = tuple(f for group in self.one_of for f in group)
        return self.required + self.optional + tuple(dict.fromkeys(alternatives))


SCHEMAS: dict[str, Schema] = {
    schema.name: schema
    for schema in (
        Schema("preference", required=("prompt", "chosen", "rejected")),
        Schema("negatives", required=("prompt", "rejected"), optional=("samples",)),
        Schema("sft", required=("prompt", "response")),
        Schema("problems", required=("prompt",), optional=("solution",), one_of=(("answer",), ("tests",))),
        Schema("flips", required=("id", "reference"), one_of=(("old", "new"), ("old_score", "new_score"))),
    )
}


# ------------------------------------------------------------------------------------ text helpers


def is_conversational(value) -> bool:
    """Whether ``value`` is a chat message list (a non-empty list of dicts) rather than text."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def message_text(value) -> str:
    """The text of a prompt or response: the string itself, or a message list's content concatenated."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(message["content"] for message in value)
    raise TypeError(f"expected text or a list of chat messages, got {type(value).__name__}")


# ------------------------------------------------------------------------------------ field checks


def _type_name(value) -> str:
    return type(value).__name__


def _is_number(value) -> bool:
    if type(value) in (int, float):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _non_finite_name(value: float) -> str:
    """How JSON writes a non-finite number (Python's json reads ``NaN``, ``Infinity`` and ``1e999`` as these)."""
    if math.isnan(value):
        return "NaN"
    return "Infinity (or a number too large for a float, such as 1e999)" if value > 0 else "-Infinity"


def _check_messages(value: list, roles: tuple[str, ...], source: str, row: int, field: str) -> None:
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            problem = f"expected a message dict with 'role' and 'content', got {_type_name(message)}"
            raise RecordError(source, row, where, problem)
        role = message.get("role")
        if not isinstance(role, str):
            problem = "missing 'role'" if role is None else f"expected role to be str, got {_type_name(role)}"
            raise RecordError(source, row, f"{where}.role", problem)
        if role not in roles:
            raise RecordError(source, row, f"{where}.role", f"role {role!r} is not one of {', '.join(roles)}")
        content = message.get("content")
        if not isinstance(content, str):
            problem = (
                "missing 'content'" if content is None else f"expected content to be str, got {_type_name(content)}"
            )
            raise RecordError(source, row, f"{where}.content", problem)


def _check_prompt(value, source: str, row: int, field: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(source, row, field, "empty prompt")
        return
    if not isinstance(value, list):
        raise RecordError(source, row, field, f"expected str or a list of chat messages, got {_type_name(value)}")
    if not value:
        raise RecordError(source, row, field, "empty prompt (no messages)")
    _check_messages(value, CHAT_ROLES, source, row, field)
    if not message_text(value).strip():
        raise RecordError(source, row, field, "empty prompt (every message's content is blank)")


def _check_response(value, source: str, row: int, field: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(source, row, field, "empty response")
        return
    if not isinstance(value, list):
        raise RecordError(source, row, field, f"expected str or an assistant message list, got {_type_name(value)}")
    if not value:
        raise RecordError(source, row, field, "empty response (no messages)")
    _check_messages(value, RESPONSE_ROLES, source, row, field)
    if not message_text(value).strip():
        raise RecordError(source, row, field, "empty response")


def _check_samples(value, source: str, row: int, field: str) -> None:
    if not isinstance(value, list):
        raise RecordError(source, row, field, f"expected a list of responses, got {_type_name(value)}")
    if not value:
        raise RecordError(source, row, field, "empty list of samples (omit the field instead)")
    for index, sample in enumerate(value):
        _check_response(sample, source, row, f"{field}[{index}]")


def _check_answer(value, source: str, row: int, field: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(source, row, field, "empty answer")
    elif not _is_number(value):
        raise RecordError(source, row, field, f"expected str or a number, got {_type_name(value)}")
    elif not math.isfinite(value):  # JSON NaN, Infinity, 1e999
        raise RecordError(source, row, field, f"answer is {_non_finite_name(value)}, not a finite number")


def _check_tests(value, source: str, row: int, field: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(source, row, field, "empty tests")
        return
    if not isinstance(value, list):
        raise RecordError(source, row, field, f"expected str or a list of str, got {_type_name(value)}")
    if not value:
        raise RecordError(source, row, field, "empty list of tests")
    for index, test in enumerate(value):
        if not isinstance(test, str):
            raise RecordError(source, row, f"{field}[{index}]", f"expected str, got {_type_name(test)}")
        if not test.strip():
            raise RecordError(source, row, f"{field}[{index}]", "empty test")


def _check_text(value, source: str, row: int, field: str) -> None:
    if not isinstance(value, str):
        raise RecordError(source, row, field, f"expected str, got {_type_name(value)}")


def _check_id(value, source: str, row: int, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise RecordError(source, row, field, f"expected str or int, got {_type_name(value)}")


# |score| beyond this is refused: sums and differences of such scores (a report's means and deltas over up
# to 10^8 items) would overflow a float to Infinity, which JSON cannot hold
MAX_SCORE = 1e300


def _check_score(value, source: str, row: int, field: str) -> None:
    if not _is_number(value):
        raise RecordError(source, row, field, f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):  # JSON NaN, Infinity, -Infinity, 1e999
        raise RecordError(source, row, field, f"score is {_non_finite_name(value)}, not a finite number")
    if abs(value) > MAX_SCORE:
        raise RecordError(source, row, field, f"score {value:g} is beyond ±{MAX_SCORE:g}: means and differences of "
                                              "such scores overflow a float")


def _check_values(value, source: str, row: int, field: str) -> None:
    if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
        raise RecordError(source, row, field, "expected a list of numbers [Q_0, ..., Q_n]")
    for i, v in enumerate(value):
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise RecordError(source, row, f"{field}[{i}]", f"expected a success rate in [0, 1], got {v}")


def _check_steps(value, source: str, row: int, field: str) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise RecordError(source, row, field, "expected a non-empty list of texts")


def _check_label(value, source: str, row: int, field: str) -> None:
    if not isinstance(value, bool):
        raise RecordError(source, row, field, f"expected true or false, got {_type_name(value)}")


def _check_any(value, source: str, row: int, field: str) -> None:
    """Any JSON value (predictions, references)."""


_FIELD_CHECKS = {
    "prompt": _check_prompt,
    "chosen": _check_response,
    "rejected": _check_response,
    "response": _check_response,
    "samples": _check_samples,
    "answer": _check_answer,
    "tests": _check_tests,
    "solution": _check_text,
    "id": _check_id,
    "reference": _check_any,
    "old": _check_any,
    "new": _check_any,
    "old_score": _check_score,
    "new_score": _check_score,
    "score": _check_score,
    "values": _check_values,
    "steps": _check_steps,
    "completion": _check_response,
    "label": _check_label,
}


def _check_perstep(record: dict, source: str, row: int | None) -> None:
    """A per-step record's fields agree: a text response; given steps concatenate to it, one fewer than values."""
    if not isinstance(record["response"], str):
        raise RecordError(source, row, "response", "expected text (per-step records split the text into steps)")
    steps = record.get("steps")
    if steps is not None:
        if "".join(steps) != record["response"]:
            raise RecordError(source, row, "steps", "the steps do not concatenate to the response")
        check_step_values(record["values"], len(steps), source=source, row=row)


def check_step_values(values: list, num_steps: int, *, source: str, row: int | None) -> None:
    """``values`` holds Q_0..Q_n for ``num_steps`` = n steps."""
    if len(values) != num_steps + 1:
        raise RecordError(source, row, "values", f"expected {num_steps + 1} values (Q_0..Q_n for {num_steps} steps), "
                                                 f"got {len(values)}")


SCHEMAS["perstep"] = Schema("perstep", required=("prompt", "response", "values"), optional=("steps", "chosen"),
                            check=_check_perstep)


# ------------------------------------------------------------------------------------ validation


def check_field(name: str, value, *, source: str, row: int | None, field: str | None = None) -> None:
    """Check one non-null value as the record field ``name`` is checked (``prompt``, ``response``, ``answer``,
    ``id``, ``score``, ...); :class:`RecordError` naming ``source``, ``row`` and ``field`` (default ``name``)."""
    _FIELD_CHECKS[name](value, source, row, name if field is None else field)


def get_schema(kind: str | Schema) -> Schema:
    """The :class:`Schema` of ``kind`` (a schema is its own); ``ValueError`` naming the known kinds otherwise."""
    if isinstance(kind, Schema):
        return kind
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ValueError(f"unknown record kind {kind!r}; known kinds: {', '.join(sorted(SCHEMAS))}")
    return schema


def _describe(group: tuple[str, ...]) -> str:
    return " and ".join(repr(f) for f in group)


def _check_one_of(record: dict, schema: Schema, source: str, row: int) -> None:
    complete = [group for group in schema.one_of if all(record.get(f) is not None for f in group)]
    if complete:
        return
    choices = " or ".join(_describe(group) for group in schema.one_of)
    for group in schema.one_of:
        present = [f for f in group if record.get(f) is not None]
        if present:  # half an alternative: name the missing half
            missing = next(f for f in group if record.get(f) is None)
            problem = f"missing field (given {_describe(tuple(present))}); {schema.name} records need {choices}"
            raise RecordError(source, row, missing, problem)
    raise RecordError(source, row, None, f"{schema.name} records need {choices}; found none")


# ------------------------------------------------------------------------------------ TRL's formats


def _shared_prefix_length(chosen, rejected) -> tuple[int, bool]:
    """Where ``trl.extract_prompt`` splits a chosen/rejected pair with an implicit prompt, and whether the two
    differ there: the first position where they differ, moved back over a space that ends the shared text;
    when one is a prefix of the other, TRL's loop ends on the last position of the shorter one."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":  # TRL: the space goes with the responses
                idx -= 1
            return idx, True
    return idx, False


def _implicit_prompt(record: dict, source: str, row: int | None) -> dict:
    chosen, rejected = record["chosen"], record["rejected"]
    conversational = isinstance(chosen, list)
    if isinstance(rejected, list) != conversational or not isinstance(chosen, (str, list)):
        raise RecordError(source, row, "rejected", "implicit-prompt rows (no 'prompt') need 'chosen' and 'rejected' "
                                                   "in one format: both texts or both message lists")
    if conversational:
        for field in ("chosen", "rejected"):
            _check_messages(record[field], CHAT_ROLES, source, row, field)
    idx, differ = _shared_prefix_length(chosen, rejected)
    if idx == 0:
        if differ:
            problem = ("missing required field, and 'chosen' and 'rejected' share no prompt to take it from (TRL's "
                       "implicit-prompt format holds the whole conversation in both)")
        else:
            short = "rejected" if len(rejected) <= len(chosen) else "chosen"
            problem = (f"missing required field, and '{short}' holds nothing but the start of the other response: no "
                       "prompt and response to split it into")
        raise RecordError(source, row, "prompt", problem)
    if conversational:
        shared = f"messages 0..{idx - 1}"
        for field in ("chosen", "rejected"):
            for i, message in enumerate(record[field][idx:]):
                if message["role"] not in RESPONSE_ROLES:
                    raise RecordError(source, row, f"{field}[{idx + i}].role",
                                      f"role {message['role']!r} after the prompt shared by 'chosen' and 'rejected' "
                                      f"({shared}); the responses must be assistant messages only")
    out = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:], **out}


def _messages_sft(record: dict, source: str, row: int | None) -> dict:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        problem = "empty list of messages" if isinstance(messages, list) else \
            f"expected a list of chat messages, got {_type_name(messages)}"
        raise RecordError(source, row, "messages", problem)
    _check_messages(messages, CHAT_ROLES, source, row, "messages")
    start = len(messages)
    while start > 0 and messages[start - 1]["role"] in RESPONSE_ROLES:
        start -= 1
    if start == len(messages):
        raise RecordError(source, row, f"messages[{start - 1}].role",
                          f"a 'messages' row ends with the assistant's turn (the response); this one ends with "
                          f"role {messages[-1]['role']!r}")
    if start == 0:
        raise RecordError(source, row, "messages", "no prompt: every message is the assistant's")
    out = {k: v for k, v in record.items() if k not in ("messages", "prompt", "response")}
    return {"prompt": messages[:start], "response": messages[start:], **out}


def _holds_prompt(value) -> bool:
    """A conversation that starts with a prompt's turn (not an assistant response)."""
    return is_conversational(value) and value[0].get("role") not in RESPONSE_ROLES


def from_trl(record, kind: str | Schema, *, source: str, row: int | None):
    """``record`` as a ``kind`` record when it is in one of TRL's formats (see the module docstring), else
    ``record`` itself (the same object). :class:`RecordError` names the row's own fields when the TRL row
    cannot be converted (chosen and rejected share no prompt, a response holds a user turn, ...)."""
    if not isinstance(record, dict):
        return record
    schema = get_schema(kind)
    if "prompt" not in schema.required:
        return record
    prompt = record.get("prompt")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if ("chosen" in schema.fields or "rejected" in schema.fields) and chosen is not None and rejected is not None \
            and (prompt is None or (isinstance(prompt, str) and _holds_prompt(chosen) and _holds_prompt(rejected))):
        return _implicit_prompt(record, source, row)  # TRL's maybe_extract_prompt: a text prompt beside chats too
    if "response" in schema.required and prompt is None and record.get("messages") is not None:
        return _messages_sft(record, source, row)
    if "response" in schema.required and record.get("response") is None and record.get("completion") is not None \
            and "completion" not in schema.fields:
        out = {k: v for k, v in record.items() if k != "completion"}
        return {**out, "response": record["completion"]}
    return record


def validate_record(record: dict, kind: str, *, source: str, row: int | None) -> None:
    """Check that ``record`` is a valid ``kind`` record; raise :class:`RecordError` if not.

    Fields outside the schema are ignored. ``source`` and ``row`` only locate the error.
    """
    schema = get_schema(kind)
    if not isinstance(record, dict):
        raise RecordError(source, row, None, f"expected a record (a JSON object / dict), got {_type_name(record)}")
    for field in schema.required:
        value = record.get(field)
        if value is None:
            problem = "missing required field" if field not in record else "required field is null"
            raise RecordError(source, row, field, problem)
        _FIELD_CHECKS[field](value, source, row, field)
    if schema.one_of:
        _check_one_of(record, schema, source, row)
        for group in schema.one_of:
            for field in group:
                value = record.get(field)
                if value is not None:
                    _FIELD_CHECKS[field](value, source, row, field)
    for field in schema.optional:
        value = record.get(field)
        if value is not None:
            _FIELD_CHECKS[field](value, source, row, field)
    if schema.check is not None:
        schema.check(record, source, row)
