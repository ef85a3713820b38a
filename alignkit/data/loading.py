"""Load records of one kind from a file, a ``datasets`` object, a Python list or the Hub, validated.

``load_records(source, kind)`` returns a ``datasets.Dataset`` whose every row passed
:func:`~alignkit.data.records.validate_record`. Sources:

* ``.jsonl`` / ``.json``: JSON Lines, one record per line (blank lines skipped); a ``.json`` file may
  instead hold one top-level list of records. Read by hand, so a bad byte, bad JSON or bad field
  is reported with the file and the line number (for a top-level list: the item number);
* ``.parquet``: one record per table row;
* a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict`` directory: its ``split``);
* a ``datasets.Dataset`` (or ``DatasetDict``: its ``split``) or a ``list`` of dicts;
* anything else: a Hub dataset id, loaded with ``datasets.load_dataset(source, name, split=split)``.

For files, ``datasets`` and lists, ``row`` in a :class:`~alignkit.data.records.RecordError` is
1-based: the line number for JSON Lines, the row index + 1 otherwise.

Rows in TRL's dataset formats (implicit prompt, ``messages``, prompt-completion SFT) are converted to
alignkit records first (:func:`~alignkit.data.records.from_trl`), row by row, with the same file, row and
field in every error.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from alignkit.data.records import RecordError, from_trl, get_schema, is_conversational, validate_record

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES

# Columns that hold text or chat messages: arrow needs one of the two per column.
FORMAT_FIELDS = ("prompt", "chosen", "rejected", "response", "samples")

# "name" or "namespace/name": what a Hub dataset id looks like (anything else is a local path).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_VALIDATE_BATCH = 1024
# Deeper JSON is refused with a RecordError: Python's json parser and every recursive walk of a value
# (validation, arrow conversion, json.dumps) would otherwise end in a RecursionError; records are a few
# levels deep (a chat prompt: list > message > text), any-JSON fields such as a flip's reference rarely more.
MAX_NESTING = 100
_ARROW_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


# ------------------------------------------------------------------------------------ JSON files


def _decode_line(raw: bytes, source: str, line_no: int, line_start: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start]
        raise RecordError(
            source,
            line_no,
            None,
            f"not valid UTF-8: byte 0x{bad:02x} at byte offset {line_start + e.start} of the file "
            f"(byte {e.start + 1} of the line); save the file as UTF-8",
        ) from None


def _nesting_exceeds(value, limit: int) -> bool:
    """Whether lists/dicts nest more than ``limit`` levels in ``value`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _check_nesting(record, source: str, row: int | None) -> None:
    if not isinstance(record, (dict, list)) or not _nesting_exceeds(record, MAX_NESTING):
        return
    field = None
    if isinstance(record, dict):
        field = next((k for k, v in record.items() if isinstance(v, (dict, list)) and _nesting_exceeds(v, MAX_NESTING - 1)),
                     None)
    raise RecordError(source, row, field, f"JSON nested more than {MAX_NESTING} levels deep")


def _parse_json(text: str, source: str, row: int | None, where: str = "") -> object:
    """``json.loads`` with its errors as :class:`RecordError` (bad syntax; nesting too deep to parse)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if where == "file" else f"column {e.colno}"
        raise RecordError(source, row, None, f"invalid JSON: {e.msg} ({at})") from None
    except RecursionError:
        raise RecordError(source, row, None, f"JSON nested more than {MAX_NESTING} levels deep "
                                             "(too deep to parse)") from None
    return value


def read_json_lines(path, kind: str | None = None) -> list[tuple[int, object]]:
    """``(line number, record)`` for every non-blank line of a JSON Lines file; a bad line raises
    :class:`RecordError` naming the file and line. ``kind`` also validates each record's fields."""
    return _read_json_lines(Path(path).read_bytes(), str(path), kind)


def _read_json_lines(data: bytes, source: str, kind: str | None) -> list[tuple[int, object]]:
    """``(line number, record)`` for every non-blank line, each validated (when ``kind`` is given)."""
    rows = []
    offset = 0
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        line_start, offset = offset, offset + len(raw) + 1
        text = _decode_line(raw, source, line_no, line_start)
        if not text.strip():
            continue
        record = _parse_json(text, source, line_no)
        _check_nesting(record, source, line_no)
        if kind is not None:
            record = from_trl(record, kind, source=source, row=line_no)
            validate_record(record, kind, source=source, row=line_no)
        rows.append((line_no, record))
    return rows


def _read_json_list(data: bytes, source: str, kind: str) -> list[tuple[int, object]]:
    """``(item number, record)`` for a file holding one top-level JSON list, each validated."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(
            source, None, None, f"not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} (line {line})"
        ) from None
    records = _parse_json(text, source, None, where="file")
    rows = []
    for row, record in enumerate(records, start=1):
        _check_nesting(record, source, row)
        record = from_trl(record, kind, source=source, row=row)
        validate_record(record, kind, source=source, row=row)
        rows.append((row, record))
    return rows


def _read_json_file(path: Path, source: str, kind: str) -> list[tuple[int, object]]:
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if path.suffix.lower() == ".json" and data.lstrip()[:1] == b"[":
        rows = _read_json_list(data, source, kind)
    else:
        try:
            rows = _read_json_lines(data, source, kind)
        except RecordError as error:
            raise _explain_json_object(data, error) from None
    if not rows:
        raise RecordError(source, None, None, "no records (the file is empty)")
    return rows


def _explain_json_object(data: bytes, error: RecordError) -> RecordError:
    """A pretty-printed JSON object fails as JSON Lines on its first line: say what the file holds."""
    if error.row is None or not error.message.startswith("invalid JSON"):
        return error
    try:
        whole = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return error
    if isinstance(whole, dict):
        return RecordError(
            error.source, None, None,
            "the file holds one JSON object spread over lines; expected JSON Lines (one record per line) "
            "or a top-level list of records",
        )
    return error


# ------------------------------------------------------------------------------------ rows -> Dataset


def _shape(value) -> str | None:
    """A coarse type name, as arrow sees it: which values can share a column."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        if is_conversational(value) and "role" in value[0]:
            return "chat messages"
        inner = next((s for s in map(_shape, value) if s is not None), None)
        return f"list of {inner}" if inner else "empty list"
    return type(value).__name__


def _compatible(a: str, b: str) -> bool:
    if a == b:
        return True
    lists = ("list", "chat messages", "empty list")
    return "empty list" in (a, b) and a.startswith(lists) and b.startswith(lists)


def _shape_conflict(numbered_values, skip: tuple[str, ...] = ()) -> tuple[int, str, int, str] | None:
    """``(first_row, first_shape, row, shape)`` for the first value whose shape is incompatible with the
    first value that has a shape (``None`` values and shapes in ``skip`` are passed over), else ``None``."""
    first_row, first_shape = None, None
    for row, value in numbered_values:
        shape = _shape(value)
        if shape is None or shape in skip:
            continue
        if first_shape is None:
            first_row, first_shape = row, shape
        elif not _compatible(shape, first_shape):
            return first_row, first_shape, row, shape
    return None


def _mixed_format_error(rows: list[tuple[int, dict]], source: str) -> RecordError | None:
    """The first row whose text-or-chat field has the other format than the first row that has it."""
    for field in FORMAT_FIELDS:
        conflict = _shape_conflict(((row, record.get(field)) for row, record in rows), skip=("empty list",))
        if conflict is not None:
            first_row, first_shape, row, shape = conflict
            return RecordError(
                source, row, field,
                f"column mixes formats: row {first_row} holds {first_shape}, this row holds {shape}; "
                "a column must be all text or all chat messages",
            )
        if field == "samples":
            for row, record in rows:  # inside one row's list of samples
                shapes = [_shape(s) for s in record.get(field) or ()]
                for index, shape in enumerate(shapes):
                    if shape != shapes[0]:
                        return RecordError(
                            source, row, f"{field}[{index}]",
                            f"samples mix formats: samples[0] holds {shapes[0]}, this one {shape}; "
                            "all samples must be text or all chat messages",
                        )
    return None


def _columns(rows: list[tuple[int, dict]]) -> dict[str, list]:
    """Column lists over the union of the rows' fields (a field a row lacks is ``None`` there)."""
    names = {}
    for _, record in rows:
        for name in record:
            names.setdefault(name, None)
    return {name: [record.get(name) for _, record in rows] for name in names}


def _first_mismatch(name: str, values: list, row_numbers: list[int], source: str) -> RecordError:
    """The first row whose ``name`` has a different type than the first row that has the field."""
    conflict = _shape_conflict(zip(row_numbers, values))
    if conflict is not None:
        first_row, first_shape, row, shape = conflict
        return RecordError(
            source, row, name,
            f"column holds {first_shape} in row {first_row} but {shape} here; a column needs one type",
        )
    return RecordError(source, None, name, "the values of this field cannot share one column (one type per column)")


def _with_json_columns(columns: dict[str, list], row_numbers: list[int], source: str) -> datasets.Dataset:
    """Store each column that has no single arrow type (any-JSON fields such as a flip's ``reference``,
    or an extra field) as JSON: every value JSON-encoded here so it decodes back unchanged."""
    json_feature = getattr(datasets, "Json", None)  # datasets >= 4.7
    features = {}
    for name, values in columns.items():
        try:
            features[name] = datasets.Dataset.from_dict({name: values}).features[name]
        except _ARROW_ERRORS:
            if json_feature is None:
                raise _first_mismatch(name, values, row_numbers, source) from None
            columns[name] = [None if v is None else json.dumps(v) for v in values]
            features[name] = json_feature()
    try:
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    except _ARROW_ERRORS as error:
        raise RecordError(source, None, None, f"the rows cannot form one table: {error}") from None


def _rows_to_dataset(rows: list[tuple[int, dict]], source: str) -> datasets.Dataset:
    """A Dataset of validated records. A text/chat column must hold one format in every row; any
    other field whose type varies across rows is stored as JSON and reads back unchanged."""
    columns = _columns(rows)
    try:
        return datasets.Dataset.from_dict(columns)
    except _ARROW_ERRORS:
        mixed = _mixed_format_error(rows, source)
        if mixed is not None:
            raise mixed from None
    return _with_json_columns(columns, [row for row, _ in rows], source)


# ------------------------------------------------------------------------------------ other sources


def _from_trl_dataset(dataset: datasets.Dataset, kind: str, source: str) -> datasets.Dataset:
    """``dataset`` with its rows converted from TRL's formats (:func:`~alignkit.data.records.from_trl`) when its
    first row is in one; the converted rows all have the first converted row's fields."""
    first = dataset.with_format(None)[0]
    converted = from_trl(first, kind, source=source, row=1)
    if converted is first:
        return dataset
    names = list(converted)

    def convert(record, index):
        out = from_trl(dict(record), kind, source=source, row=index + 1)  # map passes a lazy mapping
        return {name: out.get(name) for name in names}

    return dataset.with_format(None).map(convert, with_indices=True, remove_columns=dataset.column_names,
                                         keep_in_memory=True, load_from_cache_file=False,
                                         desc=f"TRL format -> {get_schema(kind).name} records")


def _validate_dataset(dataset: datasets.Dataset, kind: str, source: str) -> datasets.Dataset:
    if len(dataset) == 0:
        raise RecordError(source, None, None, "no records")
    dataset = _from_trl_dataset(dataset, kind, source)
    row = 0
    for batch in dataset.with_format(None).iter(batch_size=_VALIDATE_BATCH):
        names = list(batch)
        for values in zip(*batch.values()):
            row += 1
            validate_record(dict(zip(names, values)), kind, source=source, row=row)
    return dataset


def _pick_split(dataset_dict: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if split not in dataset_dict:
        raise RecordError(source, None, None, f"no split {split!r}; available splits: {', '.join(dataset_dict)}")
    return dataset_dict[split]


def _read_parquet(path: Path) -> datasets.Dataset:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise RecordError(str(path), None, None, f"not a readable Parquet file ({e})") from None
    features = datasets.Features.from_arrow_schema(table.schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def _looks_like_path(source) -> bool:
    if isinstance(source, os.PathLike):
        return True
    text = str(source)
    return text.lower().endswith(FILE_SUFFIXES) or "\\" in text or not _HUB_ID.match(text)


def _load_path(path: Path, source: str, kind: str, split: str) -> datasets.Dataset:
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, source)
        return _validate_dataset(loaded, kind, source)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _rows_to_dataset(_read_json_file(path, source, kind), source)
    if suffix in PARQUET_SUFFIXES:
        return _validate_dataset(_read_parquet(path), kind, source)
    raise ValueError(
        f"{source}: unsupported file type {suffix or '(no suffix)'!r}; expected one of "
        f"{', '.join(FILE_SUFFIXES)} or a directory written by Dataset.save_to_disk"
    )


_SOURCE_TAG = "alignkit source: "


def record_source(dataset) -> str | None:
    """The file (or Hub id) a ``Dataset`` returned by :func:`load_records` was read from, kept through
    ``Dataset.map`` (it rides in ``info.description``), so that a later error can name the file; ``None``
    for anything else."""
    info = getattr(dataset, "info", None)
    description = getattr(info, "description", None) or ""
    return description[len(_SOURCE_TAG):] if description.startswith(_SOURCE_TAG) else None


def _tagged(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    if not (getattr(dataset.info, "description", None) or "") or record_source(dataset) is not None:
        dataset.info.description = _SOURCE_TAG + source
    return dataset


def load_records(source, kind: str, *, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """Records of ``kind`` from ``source``, every row validated; see the module docstring for sources.

    Raises :class:`~alignkit.data.records.RecordError` naming the source, row and field of the first
    bad record, ``ValueError`` for an unknown ``kind``, ``FileNotFoundError`` for a missing local path.
    A dataset read from a file or the Hub remembers where from (:func:`record_source`).
    """
    get_schema(kind)
    if isinstance(source, datasets.Dataset):
        return _validate_dataset(source, kind, record_source(source) or "<datasets.Dataset>")
    if isinstance(source, datasets.DatasetDict):
        source_name = "<datasets.DatasetDict>"
        return _validate_dataset(_pick_split(source, split, source_name), kind, source_name)
    if isinstance(source, list):
        if not source:
            raise RecordError("<list>", None, None, "no records")
        rows = [(row, from_trl(record, kind, source="<list>", row=row)) for row, record in enumerate(source, start=1)]
        for row, record in rows:
            validate_record(record, kind, source="<list>", row=row)
        return _rows_to_dataset(rows, "<list>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source must be a path, a Hub dataset id, a datasets.Dataset or a list of dicts; "
            f"got {type(source).__name__}"
        )

    source_name = os.fspath(source)
    path = Path(source_name).expanduser()
    if path.exists():
        return _tagged(_load_path(path, source_name, kind, split), source_name)
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such data file or directory: {source_name}")
    dataset = datasets.load_dataset(source_name, name, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = _pick_split(dataset, split, source_name)
    return _tagged(_validate_dataset(dataset, kind, source_name), source_name)


def load_records_of_kinds(source, kinds, *, split: str = "train", name: str | None = None):
    """``(records, kind)``: ``source`` loaded as the first of ``kinds`` (names or schemas; one kind or a tuple)
    whose fields its first row has. A first row without a kind's required fields (or without any of its
    alternatives) does not match that kind; any other bad row is the :class:`RecordError` of the kind it matched. No kind matching is one error
    that lists what each kind missed."""
    kinds = tuple(kinds) if isinstance(kinds, (tuple, list)) else (kinds,)
    missed = []
    for kind in kinds:
        try:
            return load_records(source, kind, split=split, name=name), kind
        except RecordError as error:
            schema = get_schema(kind)
            first_row = error.row in (1, None)
            shape = first_row and ((error.field in schema.required and "missing" in error.message)
                                   or (error.field is None and error.message.endswith("found none")))
            if len(kinds) == 1 or not shape:
                raise
            missed.append(f"{schema.name}: " + (f"field {error.field!r} {error.message}" if error.field else error.message))
    where = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    raise RecordError(where, 1, None, "the records are none of the kinds " + ", ".join(get_schema(k).name for k in kinds)
                      + " (" + "; ".join(missed) + ")")
