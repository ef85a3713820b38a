"""Load and validate records from JSONL, JSON, Parquet, ``datasets`` sources or Python lists.

``load_records(source, kind)`` returns a ``datasets.Dataset`` whose every row passed
:func:`~alignkit.data.records.validate_record`. JSONL is read by hand, line by line, so that a bad
byte, bad JSON or bad field is reported with the file name and the line number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from alignkit.data.records import RecordError, validate_record

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_jsonl(path: Path, kind: str) -> list[dict]:
    source = str(path)
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(source, line_no, None, f"not valid UTF-8 (byte offset {e.start} in the line)") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(source, line_no, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
            validate_record(record, kind, source=source, row=line_no)
            rows.append((line_no, record))
    if not rows:
        raise RecordError(source, None, None, "no records")
    return rows


def _read_json(path: Path, kind: str) -> list[tuple[int, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(str(path), None, None, f"not valid UTF-8 (byte offset {e.start})") from None
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return _read_jsonl(path, kind)  # JSON Lines with a .json suffix
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(str(path), None, None, f"invalid JSON: {e.msg} (line {e.lineno})") from None
    if not records:
        raise RecordError(str(path), None, None, "no records")
    for i, r in enumerate(records, start=1):
        validate_record(r, kind, source=str(path), row=i)
    return list(enumerate(records, start=1))


def _validate_dataset(ds: datasets.Dataset, kind: str, source: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise RecordError(source, None, None, "no records")
    for i, r in enumerate(ds, start=1):
        validate_record(r, kind, source=source, row=i)
    return ds


def _to_dataset(rows: list[tuple[int, dict]], source: str) -> datasets.Dataset:
    """Arrow needs one type per column: a text prompt in one row and messages in another cannot mix."""
    first_row, first = rows[0]
    for row, record in rows[1:]:
        for name, value in record.items():
            if name in first and value is not None and first[name] is not None:
                if isinstance(value, str) != isinstance(first[name], str) and (
                    isinstance(value, (str, list)) and isinstance(first[name], (str, list))
                ):
                    raise RecordError(
                        source, row, name,
                        f"is {type(value).__name__} but row {first_row} has {type(first[name]).__name__}: "
                        "a column must be all text or all chat messages",
                    )
    try:
        return datasets.Dataset.from_list([r for _, r in rows])
    except (ValueError, TypeError, datasets.arrow_writer.SchemaInferenceError) as e:  # pragma: no cover
        raise RecordError(source, None, None, f"rows do not share one schema: {e}") from None
    except Exception as e:  # pyarrow errors: mixed types within a column
        raise RecordError(source, None, None, f"rows do not share one schema: {e}") from None


def load_records(source, kind: str, *, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """Validated records of ``kind`` from a path, a ``datasets.Dataset``, a list of dicts or a hub id."""
    if isinstance(source, datasets.Dataset):
        return _validate_dataset(source, kind, "<datasets.Dataset>")
    if isinstance(source, datasets.DatasetDict):
        return _validate_dataset(source[split], kind, f"<datasets.DatasetDict[{split}]>")
    if isinstance(source, list):
        if not source:
            raise RecordError("<list>", None, None, "no records")
        for i, r in enumerate(source, start=1):
            validate_record(r, kind, source="<list>", row=i)
        return _to_dataset(list(enumerate(source, start=1)), "<list>")

    path = Path(os.fspath(source))
    text = str(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _to_dataset(_read_jsonl(path, kind), text)
        if suffix == ".json":
            return _to_dataset(_read_json(path, kind), text)
        if suffix == ".parquet":
            return _validate_dataset(datasets.Dataset.from_parquet(text), kind, text)
        raise RecordError(text, None, None, f"unsupported file type {suffix!r}; use one of {FILE_SUFFIXES}")
    if path.is_dir():
        ds = datasets.load_from_disk(text)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise RecordError(text, None, None, f"no split {split!r}; splits: {sorted(ds)}")
            ds = ds[split]
        return _validate_dataset(ds, kind, text)
    if os.sep in text or text.lower().endswith(FILE_SUFFIXES) or text.startswith("."):
        raise FileNotFoundError(f"no such data file or directory: {text}")
    return _validate_dataset(datasets.load_dataset(text, name, split=split), kind, text)
