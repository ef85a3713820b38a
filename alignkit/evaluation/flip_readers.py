"""Readers of the negative-flip inputs (JSON Lines): a flips file, or one model's prediction file.

* a **flips file** (record kind ``flips``): ``id``, ``reference`` and ``old`` / ``new`` (predictions,
  any JSON value) and/or ``old_score`` / ``new_score`` (finite numbers); optional ``old_correct`` /
  ``new_correct`` (booleans);
* a **prediction file**: ``id``, ``reference`` and ``prediction`` and/or ``correct`` (boolean) and/or
  ``score`` (finite number); two of them are joined on ``id`` by :mod:`alignkit.evaluation.flip_join`.

Files are read with ``pyarrow.json`` first; only when that fast read fails or finds a value the row-by-row
validation might reject is the file re-read row by row (:func:`alignkit.data.loading.read_json_lines`), so
that the :class:`~alignkit.data.records.RecordError` names the file, the row (line number) and the field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from alignkit.data.loading import read_json_lines
from alignkit.data.records import MAX_SCORE, RecordError, check_field
from alignkit.evaluation.flip_data import Column, FlipData, ModelResults, PredictionFile, bools, texts

logger = logging.getLogger(__name__)

FLIPS_FIELDS = ("id", "reference", "old", "new", "old_score", "new_score", "old_correct", "new_correct")
PREDICTION_FIELDS = ("id", "reference", "prediction", "correct", "score")


class _SlowPath(Exception):
    """The fast read cannot vouch for the file: re-read it row by row."""


# ------------------------------------------------------------------------------------ fast read


def _read_arrow(path: str) -> pa.Table:
    try:
        table = pajson.read_json(path, read_options=pajson.ReadOptions(block_size=4 << 20))
    except pa.ArrowException as e:  # a parse error or a column whose type changes: let the rows speak
        raise _SlowPath(str(e)) from None
    if table.num_rows == 0:
        raise _SlowPath("no rows")
    return table


# value columns the fast path takes as they are; a float column is read row by row, since Arrow turns
# 2 into 2.0 when a column mixes integers and floats, which would change the text form
_PLAIN = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_boolean)


def _column(table: pa.Table, name: str, kind: str) -> pa.Array | None:
    """Column ``name`` checked for ``kind`` (``id``, ``value``, ``score``, ``bool``); ``None`` if absent.

    Anything the row-by-row validation might reject (a null, a non-finite score: Arrow reads ``NaN`` and
    ``Infinity``, which JSON does not have; text that is not valid UTF-8, which Arrow reads without checking;
    an unexpected type such as a timestamp Arrow inferred from a date-like string) raises :class:`_SlowPath`,
    so that the row-by-row read names the row.
    """
    if name not in table.column_names:
        return None
    col = table[name].combine_chunks()
    if col.null_count:
        raise _SlowPath(f"nulls in {name}")
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            col.validate(full=True)  # UTF-8 of every value
        except pa.ArrowInvalid as e:
            raise _SlowPath(f"{name}: {e}") from None
    if kind == "id":
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
    elif kind == "value":
        ok = any(test(t) for test in _PLAIN)
    elif kind == "score":
        ok = pa.types.is_integer(t) or pa.types.is_floating(t)
        if ok and pa.types.is_floating(t) and not pc.all(pc.is_finite(col)).as_py():
            raise _SlowPath(f"NaN or Infinity in {name}")
        if ok and len(col) and pc.max(pc.abs(col)).as_py() > MAX_SCORE:
            raise _SlowPath(f"a score beyond ±{MAX_SCORE:g} in {name}")
    elif kind == "bool":
        ok = pa.types.is_boolean(t)
    else:  # pragma: no cover
        raise ValueError(kind)
    if not ok:
        raise _SlowPath(f"type {t} of {name}")
    return col


def _floats(col: pa.Array | None) -> np.ndarray | None:
    return None if col is None else col.to_numpy(zero_copy_only=False).astype(np.float64)


def _fast_flips(path: str) -> FlipData:
    table = _read_arrow(path)
    ids = _column(table, "id", "id")
    reference = _column(table, "reference", "value")
    cols = {f: _column(table, f, "value") for f in ("old", "new")}
    cols.update({f: _column(table, f, "score") for f in ("old_score", "new_score")})
    cols.update({f: _column(table, f, "bool") for f in ("old_correct", "new_correct")})
    if ids is None or reference is None:
        raise _SlowPath("id or reference missing")
    for a, b in (("old", "new"), ("old_score", "new_score"), ("old_correct", "new_correct")):
        if (cols[a] is None) != (cols[b] is None):
            raise _SlowPath(f"{a} / {b} half present")
    if cols["old"] is None and cols["old_score"] is None:
        raise _SlowPath("no predictions or scores")
    return FlipData(
        ids=ids,
        reference=reference,
        old=ModelResults(cols["old"], None if cols["old_correct"] is None else bools(cols["old_correct"]), _floats(cols["old_score"])),
        new=ModelResults(cols["new"], None if cols["new_correct"] is None else bools(cols["new_correct"]), _floats(cols["new_score"])),
        sources={"flips": path},
    )


def _fast_side(path: str) -> PredictionFile:
    table = _read_arrow(path)
    ids = _column(table, "id", "id")
    reference = _column(table, "reference", "value")
    prediction = _column(table, "prediction", "value")
    correct = _column(table, "correct", "bool")
    score = _column(table, "score", "score")
    if ids is None or reference is None or (prediction is None and correct is None and score is None):
        raise _SlowPath("fields missing")
    results = ModelResults(prediction, None if correct is None else bools(correct), _floats(score))
    return PredictionFile(path, ids, reference, results)


# ------------------------------------------------------------------------------------ slow read


def _check_bool(value, source: str, row: int, name: str) -> None:
    if not isinstance(value, bool):
        raise RecordError(source, row, name, f"expected true or false, got {type(value).__name__}")


def _same_fields(rows: list[tuple[int, dict]], fields: Sequence[str], source: str) -> list[str]:
    """The known fields some row has; every row must have all of them (not null)."""
    present = [f for f in fields if any(row.get(f) is not None for _, row in rows)]
    for f in present:
        for line, row in rows:
            if row.get(f) is None:
                first = next(n for n, r in rows if r.get(f) is not None)
                raise RecordError(
                    source, line, f, f"missing field (row {first} has it; every row needs the same fields)"
                )
    return present


def _read_rows(path: str, kind: str | None) -> list[tuple[int, dict]]:
    rows = read_json_lines(path, kind)
    if not rows:
        raise RecordError(path, None, None, "no records")
    for line, row in rows:
        if not isinstance(row, dict):
            raise RecordError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
    return rows


def _scores(rows, name: str) -> np.ndarray:
    return np.array([row[name] for _, row in rows], dtype=np.float64)


def _slow_flips(path: str) -> FlipData:
    rows = _read_rows(path, "flips")  # validates id, reference, old/new or old_score/new_score
    for line, row in rows:
        for name in ("old_correct", "new_correct"):
            if row.get(name) is not None:
                _check_bool(row[name], path, line, name)
    present = _same_fields(rows, FLIPS_FIELDS, path)
    for a, b in (("old", "new"), ("old_score", "new_score"), ("old_correct", "new_correct")):
        if (a in present) != (b in present):
            missing = b if a in present else a
            raise RecordError(path, rows[0][0], missing, f"missing field ({a!r} and {b!r} come together)")

    def col(name):
        return [row[name] for _, row in rows] if name in present else None

    def flags(name):
        return np.array(col(name), dtype=bool) if name in present else None

    return FlipData(
        ids=col("id"),
        reference=col("reference"),
        old=ModelResults(col("old"), flags("old_correct"), _scores(rows, "old_score") if "old_score" in present else None),
        new=ModelResults(col("new"), flags("new_correct"), _scores(rows, "new_score") if "new_score" in present else None),
        sources={"flips": path},
    )


def _slow_side(path: str) -> PredictionFile:
    rows = _read_rows(path, None)
    for line, row in rows:
        for name in ("id", "reference"):
            if row.get(name) is None:
                raise RecordError(path, line, name, "missing required field" if name not in row else "required field is null")
        check_field("id", row["id"], source=path, row=line)
        if all(row.get(f) is None for f in ("prediction", "correct", "score")):
            raise RecordError(path, line, None, "prediction records need 'prediction', 'correct' or 'score'; found none")
        if row.get("correct") is not None:
            _check_bool(row["correct"], path, line, "correct")
        if row.get("score") is not None:
            check_field("score", row["score"], source=path, row=line)
    present = _same_fields(rows, PREDICTION_FIELDS, path)

    def col(name):
        return [row[name] for _, row in rows] if name in present else None

    results = ModelResults(
        col("prediction"),
        np.array(col("correct"), dtype=bool) if "correct" in present else None,
        _scores(rows, "score") if "score" in present else None,
    )
    return PredictionFile(path, col("id"), col("reference"), results, lines=np.array([line for line, _ in rows]))


# ------------------------------------------------------------------------------------ reading


def _check_exists(path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such prediction file: {path}")


def read_flips_file(path: str | Path) -> FlipData:
    """A flips file (``id``, ``reference``, ``old``/``new`` and/or ``old_score``/``new_score``, optional
    ``old_correct``/``new_correct``). A malformed row raises :class:`RecordError` naming file, row and
    field; so does a duplicated id."""
    path = str(path)
    _check_exists(path)
    try:
        data = _fast_flips(path)
    except _SlowPath as why:
        logger.debug("%s: row-by-row read (%s)", path, why)
        data = _slow_flips(path)
    unique_id_keys(PredictionFile(path, data.ids, data.reference, data.old))
    return data


def read_prediction_file(path: str | Path) -> PredictionFile:
    """One model's prediction file (``id``, ``reference``, ``prediction`` / ``correct`` / ``score``)."""
    path = str(path)
    _check_exists(path)
    try:
        return _fast_side(path)
    except _SlowPath as why:
        logger.debug("%s: row-by-row read (%s)", path, why)
        return _slow_side(path)


# ------------------------------------------------------------------------------------ ids


def id_keys(col: Column) -> pa.Array:
    """Ids as text, the join key."""
    if isinstance(col, pa.Array):
        return texts(col)
    return pa.array([v if isinstance(v, str) else str(v) for v in col], pa.string())


def _is_increasing(col: Column) -> bool:
    if not isinstance(col, pa.Array) or len(col) < 2:
        return len(col) < 2
    return bool(pc.all(pc.less(col.slice(0, len(col) - 1), col.slice(1))).as_py())


_MAX_KEY_WORDS = 8  # keys up to 64 bytes are hashed in NumPy; longer ones go to Arrow's hash kernels


class KeyHashes:
    """64-bit hashes of string keys with the keys' bytes (zero-padded 8-byte words) and lengths, so that
    keys with equal hashes can be checked for equality: distinct hashes mean distinct keys."""

    def __init__(self, keys: pa.Array):
        n = len(keys)
        _, offsets_buf, data_buf = keys.buffers()
        wide = pa.types.is_large_string(keys.type)
        offsets = np.frombuffer(offsets_buf, np.int64 if wide else np.int32, count=n + 1, offset=keys.offset * (8 if wide else 4))
        self.lengths = np.diff(offsets)
        width = int(self.lengths.max()) if n else 0
        k = max(1, (width + 7) // 8)
        data = np.frombuffer(data_buf, np.uint8)[offsets[0] : offsets[-1]] if n and data_buf is not None else np.zeros(0, np.uint8)
        mat = np.zeros((n, 8 * k), np.uint8)
        if n and int(self.lengths.min()) == width:
            mat[:, :width] = data.reshape(n, width)
        elif n:
            mat[np.arange(8 * k) < self.lengths[:, None]] = data
        self.words = mat.view(np.uint64)
        h = self.lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for j in range(k):  # splitmix64-style mixing of each word
            h ^= self.words[:, j]
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(29)
        self.hashes = h

    @staticmethod
    def of(keys: pa.Array) -> KeyHashes | None:
        """The hashes of ``keys`` (a null-free Arrow string array), or ``None`` for keys too long to hash here."""
        if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)) or keys.null_count:
            return None
        if len(keys) and pc.max(pc.binary_length(keys)).as_py() > 8 * _MAX_KEY_WORDS:
            return None
        return KeyHashes(keys)

    def sorted_distinct(self) -> np.ndarray | None:
        """The argsort of the hashes when they are all distinct (so the keys are), else ``None``."""
        order = np.argsort(self.hashes)
        h = self.hashes[order]
        return None if len(h) > 1 and bool((h[1:] == h[:-1]).any()) else order


def key_permutation(old_keys: pa.Array, new_keys: pa.Array) -> np.ndarray | None:
    """``order`` with ``new_keys[order] == old_keys``, when the old keys are distinct and the new keys are
    the same keys in another order; ``None`` otherwise (or when the keys are too long to hash here): the
    caller then finds out what is wrong with Arrow's ``index_in``. Sorts 64-bit hashes of the keys
    (about a quarter of ``index_in``'s CPU time on a million short ids) and checks the matched keys byte
    for byte."""
    if len(old_keys) != len(new_keys):
        return None
    a, b = KeyHashes.of(old_keys), KeyHashes.of(new_keys)
    if a is None or b is None or a.words.shape[1] != b.words.shape[1]:
        return None
    sa, sb = a.sorted_distinct(), np.argsort(b.hashes)
    if sa is None or not np.array_equal(a.hashes[sa], b.hashes[sb]):
        return None
    order = np.empty(len(sa), np.int64)
    order[sa] = sb
    if not (np.array_equal(a.lengths, b.lengths[order]) and np.array_equal(a.words, np.take(b.words, order, axis=0))):
        return None  # a hash collision
    return order


def _distinct(keys: pa.Array) -> bool:
    hashed = KeyHashes.of(keys)
    if hashed is not None and hashed.sorted_distinct() is not None:
        return True
    return len(pc.unique(keys)) == len(keys)


def unique_id_keys(side: PredictionFile, keys: pa.Array | None = None) -> pa.Array:
    """The side's join keys; a :class:`RecordError` at the second occurrence of a duplicated id."""
    keys = id_keys(side.ids) if keys is None else keys
    if _is_increasing(side.ids) or _distinct(keys):
        return keys
    first = pc.index_in(keys, value_set=keys).to_numpy(zero_copy_only=False)
    dup = int(np.flatnonzero(first != np.arange(len(keys)))[0])
    value = keys[dup].as_py()
    raise RecordError(
        side.source, side.line(dup), "id", f"duplicate id {value!r} (first at row {side.line(int(first[dup]))})"
    )
