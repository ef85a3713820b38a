"""Record schemas and row validation (DESIGN.md §4).

A record is a dict. ``prompt`` is a text string or a chat message list
``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]``. Response fields are a string
or an assistant message list and must not be empty. Extra fields are kept untouched.

=============  =====================================================================
kind           fields
=============  =====================================================================
``preference``  ``prompt``, ``chosen``, ``rejected``
``negatives``   ``prompt``, ``rejected``; optional ``samples`` (K reference responses)
``sft``         ``prompt``, ``response`` (NPO forget and retain sets)
``problems``    ``prompt`` and ``answer`` or ``tests``; optional ``solution``
``flips``       ``id``, ``reference`` and ``old``/``new`` or ``old_score``/``new_score``
=============  =====================================================================

Every failure is a :class:`RecordError` naming the source, the row (1-based; the line for JSONL)
and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")
RESPONSE_FIELDS = ("chosen", "rejected", "response", "solution")


class RecordError(ValueError):
    """A malformed record: ``source``, ``row`` (1-based), ``field`` and what is wrong."""

    def __init__(self, source: str, row: int | None, field: str | None, message: str):
        self.source, self.row, self.field, self.message = source, row, field, message
        where = [str(source)]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass(frozen=True)
class Schema:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()  # at least one alternative must be fully present


SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in (
        Schema("preference", ("prompt", "chosen", "rejected")),
        Schema("negatives", ("prompt", "rejected"), optional=("samples",)),
        Schema("sft", ("prompt", "response")),
        Schema("problems", ("prompt",), optional=("solution",), one_of=(("answer",), ("tests",))),
        Schema("flips", ("id", "reference"), one_of=(("old", "new"), ("old_score", "new_score"))),
    )
}


def is_conversational(value) -> bool:
    """True for a chat message list."""
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def message_text(value) -> str:
    """The text of a string, or the concatenated contents of a message list."""
    if isinstance(value, str):
        return value
    return "".join(m.get("content") or "" for m in value)


def _type_name(value) -> str:
    return type(value).__name__


def _check_messages(value: list, field: str, source: str, row: int, assistant_only: bool) -> None:
    if not value:
        raise RecordError(source, row, field, "empty message list")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(source, row, f"{field}[{i}]", f"expected a message dict, got {_type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise RecordError(source, row, f"{field}[{i}].role", f"expected one of {ROLES}, got {role!r}")
        if assistant_only and role != "assistant":
            raise RecordError(source, row, f"{field}[{i}].role", f"a response message must be 'assistant', got {role!r}")
        if not isinstance(content, str):
            raise RecordError(source, row, f"{field}[{i}].content", f"expected str, got {_type_name(content)}")


def _check_text_or_messages(value, field: str, source: str, row: int, response: bool) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(source, row, field, "empty response" if response else "empty prompt")
        return
    if isinstance(value, list):
        _check_messages(value, field, source, row, assistant_only=response)
        if not message_text(value).strip():
            raise RecordError(source, row, field, "empty response" if response else "empty prompt")
        return
    raise RecordError(source, row, field, f"expected str or list of messages, got {_type_name(value)}")


def validate_record(record, kind: str, *, source: str, row: int | None) -> None:
    """Raise :class:`RecordError` if ``record`` is not a valid ``kind`` record."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; known kinds: {sorted(SCHEMAS)}")
    schema = SCHEMAS[kind]
    if not isinstance(record, dict):
        raise RecordError(source, row, None, f"expected a JSON object, got {_type_name(record)}")
    for name in schema.required:
        if name not in record or record[name] is None:
            raise RecordError(source, row, name, "missing required field")
    if schema.one_of and not any(all(record.get(f) is not None for f in alt) for alt in schema.one_of):
        options = " or ".join("+".join(alt) for alt in schema.one_of)
        raise RecordError(source, row, "/".join(f for alt in schema.one_of for f in alt), f"needs {options}")

    if "prompt" in schema.required:
        _check_text_or_messages(record["prompt"], "prompt", source, row, response=False)
    for name in RESPONSE_FIELDS:
        if name in record and record[name] is not None and (name in schema.required or name in schema.optional):
            _check_text_or_messages(record[name], name, source, row, response=True)
    if kind == "negatives" and record.get("samples") is not None:
        samples = record["samples"]
        if not isinstance(samples, list) or not samples:
            raise RecordError(source, row, "samples", f"expected a non-empty list of responses, got {samples!r:.40}")
        for i, s in enumerate(samples):
            _check_text_or_messages(s, f"samples[{i}]", source, row, response=True)
    if kind == "problems":
        answer, tests = record.get("answer"), record.get("tests")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise RecordError(source, row, "answer", f"expected str or number, got {_type_name(answer)}")
        if tests is not None and not (isinstance(tests, str) or (isinstance(tests, list) and all(isinstance(t, str) for t in tests))):
            raise RecordError(source, row, "tests", f"expected str or list of str, got {_type_name(tests)}")
    if kind == "flips":
        if not isinstance(record["id"], (str, int)):
            raise RecordError(source, row, "id", f"expected str or int, got {_type_name(record['id'])}")
        for name in ("old_score", "new_score"):
            v = record.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RecordError(source, row, name, f"expected a number, got {_type_name(v)}")
