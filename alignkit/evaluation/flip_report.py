"""From per-item predictions of an old and a new model to a negative-flip report.

Inputs (JSON Lines):

* a **flips file** (record kind ``flips``): ``id``, ``reference`` and ``old`` / ``new`` (predictions,
  any JSON value) and/or ``old_score`` / ``new_score`` (numbers); optional ``old_correct`` /
  ``new_correct`` (booleans);
* or **two prediction files**, old and new, each with ``id``, ``reference`` and ``prediction`` and/or
  ``correct`` (boolean) and/or ``score`` (number), joined on ``id`` (ids compared as text, so ``7`` and
  ``"7"`` are the same item).

Correctness of a discrete prediction: the row's ``*_correct`` / ``correct`` boolean when given,
otherwise the prediction checked against ``reference`` by a verifier (default ``match`` in
``normalized`` mode; a ``reference`` that is a JSON object is passed to the verifier as the whole
problem record, anything else as its ``answer``). Exact and normalised matching run vectorised in
Arrow; any other verifier goes through :meth:`~alignkit.verifiers.base.Verifier.verify_batch`.
Predictions and references are compared by their text form (a string as is, any other JSON value
as its JSON text). NFR_mc counts a new wrong prediction whose *answer* changed: the verifier decides
that too (:meth:`~alignkit.verifiers.base.Verifier.same_answer_batch`: the math verifier compares the
answers it extracts, ``match`` compares as it matches, normalised by default), so the same wrong
answer worded differently is no flip; raw text equality is used only for exact-match data.

Speed: files are read with ``pyarrow.json`` and every check and metric is vectorised (Arrow compute,
NumPy). Only when the fast read fails or finds a bad value is the file re-read row by row
(:func:`alignkit.data.loading.read_json_lines`), so that the :class:`~alignkit.data.records.RecordError`
names the file, the row (line number) and the field. Confidence intervals of the discrete metrics
and of NFR / PFR of scores come from :func:`~alignkit.evaluation.flips.flip_count_bootstrap` (the item
bootstrap drawn as multinomial category counts: exact, and O(resamples) for any number of items);
the mean score change uses an item bootstrap for small inputs and the normal approximation for
large ones (the report says which).

Outputs (:func:`write_report`): ``flips.json`` (metrics, intervals, McNemar p-value, counts,
settings, the ids of every flipped item), ``report.md`` (summary table and the first ``show`` flipped
items with id, reference, old and new) and ``flips.png`` (matplotlib, skipped with a warning when
matplotlib is missing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkit.data.records import RecordError
from alignkit.evaluation.flips import (
    flip_count_bootstrap,
    flip_metrics,
    mcnemar_from_counts,
    score_flip_bootstrap,
    score_flip_metrics,
)

logger = logging.getLogger(__name__)

Column = pa.Array | list  # a pyarrow array from the fast read, a Python list from the row-by-row one

FLIPS_FIELDS = ("id", "reference", "old", "new", "old_score", "new_score", "old_correct", "new_correct")
PREDICTION_FIELDS = ("id", "reference", "prediction", "correct", "score")
DEFAULT_VERIFIER = "match"
VECTORISED_MATCH_MODES = ("exact", "normalized")


class FlipInputError(ValueError):
    """Inputs that cannot be compared (no correctness and no scores for both models, say)."""


class _SlowPath(Exception):
    """The fast read cannot vouch for the file: re-read it row by row."""


# ------------------------------------------------------------------------------------ data


@dataclass
class ModelResults:
    """One model's per-item results, index-aligned with :attr:`FlipData.ids`; any part may be missing."""

    prediction: Column | None = None
    correct: np.ndarray | None = None
    score: np.ndarray | None = None


@dataclass
class FlipData:
    """Per-item results of the old and the new model on the same items."""

    ids: Column
    reference: Column | None
    old: ModelResults
    new: ModelResults
    sources: dict[str, str] = field(default_factory=dict)
    correctness: str = "given"
    changed: np.ndarray | None = None  # per item: the new answer differs from the old one (set by judge)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PredictionFile:
    """One prediction file as read: columns plus where each row came from."""

    source: str
    ids: Column
    reference: Column
    results: ModelResults
    lines: np.ndarray | None = None  # line number of each row (None: row k is the k-th non-blank line)

    def line(self, index: int) -> int:
        if self.lines is None:
            self.lines = _nonblank_line_numbers(self.source)
        return int(self.lines[index])


# ------------------------------------------------------------------------------------ column helpers


def _pylist(col: Column) -> list:
    return col.to_pylist() if isinstance(col, (pa.Array, pa.ChunkedArray)) else list(col)


def _take(col: Column, indices) -> list:
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(col, pa.Array):
        return col.take(pa.array(indices)).to_pylist()
    return [col[i] for i in indices.tolist()]


def _text(value) -> str:
    """The text form a prediction or reference is compared by."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def texts(col: Column) -> pa.Array:
    """A column's text form as an Arrow string array (strings as is, other values as JSON text)."""
    if isinstance(col, pa.Array):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            return col
        if pa.types.is_integer(col.type):
            return pc.cast(col, pa.string())
        col = col.to_pylist()
    return pa.array([_text(v) for v in col], pa.string())


def _bools(arr) -> np.ndarray:
    """A null-free Arrow boolean array as a writable NumPy bool array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return pc.cast(arr, pa.uint8()).to_numpy(zero_copy_only=False).astype(bool)


def _nonblank_line_numbers(path: str) -> np.ndarray:
    """1-based line numbers of the non-blank lines of a file (row k of a fast read is line [k])."""
    lines = Path(path).read_bytes().split(b"\n")
    return np.array([i for i, raw in enumerate(lines, start=1) if raw.strip()], dtype=np.int64)


# ------------------------------------------------------------------------------------ fast read


def _read_arrow(path: str) -> pa.Table:
    import pyarrow.json as pajson

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

    Anything the row-by-row validation might reject (a null, a NaN score, an unexpected type such as a
    timestamp Arrow inferred from a date-like string) raises :class:`_SlowPath`.
    """
    if name not in table.column_names:
        return None
    col = table[name].combine_chunks()
    if col.null_count:
        raise _SlowPath(f"nulls in {name}")
    t = col.type
    if kind == "id":
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
    elif kind == "value":
        ok = any(test(t) for test in _PLAIN)
    elif kind == "score":
        ok = pa.types.is_integer(t) or pa.types.is_floating(t)
        if ok and pa.types.is_floating(t) and pc.any(pc.is_nan(col)).as_py():
            raise _SlowPath(f"NaN in {name}")
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
        old=ModelResults(cols["old"], None if cols["old_correct"] is None else _bools(cols["old_correct"]), _floats(cols["old_score"])),
        new=ModelResults(cols["new"], None if cols["new_correct"] is None else _bools(cols["new_correct"]), _floats(cols["new_score"])),
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
    results = ModelResults(prediction, None if correct is None else _bools(correct), _floats(score))
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
    from alignkit.data.loading import read_json_lines

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

    def bools(name):
        return np.array(col(name), dtype=bool) if name in present else None

    return FlipData(
        ids=col("id"),
        reference=col("reference"),
        old=ModelResults(col("old"), bools("old_correct"), _scores(rows, "old_score") if "old_score" in present else None),
        new=ModelResults(col("new"), bools("new_correct"), _scores(rows, "new_score") if "new_score" in present else None),
        sources={"flips": path},
    )


def _slow_side(path: str) -> PredictionFile:
    from alignkit.data.records import _check_id, _check_score

    rows = _read_rows(path, None)
    for line, row in rows:
        for name in ("id", "reference"):
            if row.get(name) is None:
                raise RecordError(path, line, name, "missing required field" if name not in row else "required field is null")
        _check_id(row["id"], path, line, "id")
        if all(row.get(f) is None for f in ("prediction", "correct", "score")):
            raise RecordError(path, line, None, "prediction records need 'prediction', 'correct' or 'score'; found none")
        if row.get("correct") is not None:
            _check_bool(row["correct"], path, line, "correct")
        if row.get("score") is not None:
            _check_score(row["score"], path, line, "score")
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
    _check_unique(PredictionFile(path, data.ids, data.reference, data.old))
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


def _keys(col: Column) -> pa.Array:
    """Ids as text, the join key."""
    if isinstance(col, pa.Array):
        return texts(col)
    return pa.array([v if isinstance(v, str) else str(v) for v in col], pa.string())


def _is_increasing(col: Column) -> bool:
    if not isinstance(col, pa.Array) or len(col) < 2:
        return len(col) < 2
    return bool(pc.all(pc.less(col.slice(0, len(col) - 1), col.slice(1))).as_py())


def _check_unique(side: PredictionFile, keys: pa.Array | None = None) -> pa.Array:
    """The side's join keys; a :class:`RecordError` at the second occurrence of a duplicated id."""
    keys = _keys(side.ids) if keys is None else keys
    if _is_increasing(side.ids) or len(pc.unique(keys)) == len(keys):
        return keys
    first = pc.index_in(keys, value_set=keys).to_numpy(zero_copy_only=False)
    dup = int(np.flatnonzero(first != np.arange(len(keys)))[0])
    value = keys[dup].as_py()
    raise RecordError(
        side.source, side.line(dup), "id", f"duplicate id {value!r} (first at row {side.line(int(first[dup]))})"
    )


def join_predictions(old: PredictionFile, new: PredictionFile) -> FlipData:
    """Join two prediction files on ``id`` (old file's order). Errors name the file and row of an id
    missing from the other file or duplicated, and of a reference that differs between the files."""
    old_keys, new_keys = _check_unique(old), _keys(new.ids)
    if len(old_keys) == len(new_keys) and pc.all(pc.equal(old_keys, new_keys)).as_py():
        order = None  # same ids in the same order (so the new ids are distinct too)
    else:
        if len(new_keys) > len(old_keys):  # a duplicated id, or one the old file lacks
            _check_unique(new, new_keys)
            j = int(np.flatnonzero(~_bools(pc.is_in(new_keys, value_set=old_keys)))[0])
            raise RecordError(new.source, new.line(j), "id", f"id {new_keys[j].as_py()!r} is not in {old.source}")
        pos = pc.index_in(old_keys, value_set=new_keys)
        if pos.null_count:
            i = int(np.flatnonzero(_bools(pc.is_null(pos)))[0])
            raise RecordError(old.source, old.line(i), "id", f"id {old_keys[i].as_py()!r} is not in {new.source}")
        # as many new rows as old, each distinct old id found: the positions are a permutation, so the
        # new ids are distinct as well
        order = pos.to_numpy(zero_copy_only=False).astype(np.int64)
    new_ref = new.reference
    new_results = new.results
    if order is not None:
        new_ref = _reorder(new_ref, order)
        new_results = ModelResults(
            None if new_results.prediction is None else _reorder(new_results.prediction, order),
            None if new_results.correct is None else new_results.correct[order],
            None if new_results.score is None else new_results.score[order],
        )
    same = _bools(pc.equal(texts(old.reference), texts(new_ref)))
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        j = i if order is None else int(order[i])
        old_value, new_value = _take(old.reference, [i])[0], _take(new_ref, [i])[0]
        raise RecordError(
            new.source, new.line(j), "reference",
            f"{new_value!r} differs from {old_value!r} in {old.source} row {old.line(i)} (id {old_keys[i].as_py()!r}); "
            "the two files must hold the same items",
        )
    return FlipData(
        ids=old.ids, reference=old.reference, old=old.results, new=new_results,
        sources={"old": old.source, "new": new.source},
    )


def _reorder(col: Column, order: np.ndarray) -> Column:
    if isinstance(col, pa.Array):
        return col.take(pa.array(order))
    return [col[i] for i in order]


def read_predictions(old_path: str | Path, new_path: str | Path) -> FlipData:
    """Two prediction files joined on ``id``."""
    return join_predictions(read_prediction_file(old_path), read_prediction_file(new_path))


# ------------------------------------------------------------------------------------ correctness


_TRAILING = ".,;:!?"


def _normalize_ascii(arr: pa.Array) -> pa.Array:
    """:func:`alignkit.verifiers.match.normalize` on ASCII strings, in Arrow.

    ``utf8_split_whitespace`` splits on exactly the ASCII characters ``str.split()`` splits on (with
    the \\x1c-\\x1f separators); it keeps empty edge pieces, which the trim removes.
    """
    arr = pc.ascii_lower(arr)
    arr = pc.binary_join(pc.utf8_split_whitespace(arr), " ")
    arr = pc.ascii_trim(arr, characters=" ")
    arr = pc.ascii_rtrim(arr, characters=_TRAILING)
    return pc.ascii_rtrim(arr, characters=" ")


def _ascii(arr: pa.Array) -> np.ndarray:
    return _bools(pc.string_is_ascii(arr))


def match_correct(predictions, references: pa.Array, mode: str = "normalized"):
    """Per-item verdicts of the ``match`` verifier (``exact`` or ``normalized``, whole completion), vectorised.

    ``predictions`` is one Arrow string array (returns one bool array) or a list of them, e.g. the old
    and the new model's (returns a list; the references are normalised once for all). Same answers as
    :class:`~alignkit.verifiers.match.MatchVerifier`: items equal as they are need no normalising; the
    rest are normalised in Arrow when ASCII and by the verifier's own
    :func:`~alignkit.verifiers.match.normalize` otherwise (casefolding is not lowercasing beyond ASCII).
    """
    if mode not in VECTORISED_MATCH_MODES:
        raise ValueError(f"vectorised matching supports modes {VECTORISED_MATCH_MODES}, got {mode!r}")
    single = isinstance(predictions, (pa.Array, pa.ChunkedArray))
    preds = [predictions] if single else list(predictions)
    results = [_bools(pc.equal(p, references)) for p in preds]
    if mode == "normalized":
        need = np.zeros(len(references), dtype=bool)
        for r in results:
            need |= ~r
        union = np.flatnonzero(need)
        if union.size:
            ref_norm = _normalize_ascii(references.take(pa.array(union, pa.int64())))
            ref_ascii = _ascii(references.take(pa.array(union, pa.int64())))
            slot = np.cumsum(need) - 1  # item index -> position in union
            for p, correct in zip(preds, results):
                rest = np.flatnonzero(~correct)
                if rest.size:
                    _normalized_equal(p, rest, ref_norm, ref_ascii, slot[rest], correct, references)
    return results[0] if single else results


def _normalized_equal(pred, rest, ref_norm, ref_ascii, slots, correct, references) -> None:
    """Fill ``correct[rest]``: normalised prediction equals normalised reference."""
    take = pa.array(rest, pa.int64())
    p = pred.take(take)
    both_ascii = _ascii(p) & ref_ascii[slots]
    correct[rest] = _bools(pc.equal(_normalize_ascii(p), ref_norm.take(pa.array(slots, pa.int64())))) & both_ascii
    other = np.flatnonzero(~both_ascii)
    if other.size:
        from alignkit.verifiers.match import normalize

        ps, rs = _take(p, other), _take(references, rest[other])
        correct[rest[other]] = [normalize(a) == normalize(b) for a, b in zip(ps, rs)]


def _vectorisable(name: str, options: dict) -> str | None:
    """The match mode if this verifier can run vectorised, else ``None``."""
    if name != "match" or options.get("extract", "none") != "none":
        return None
    mode = options.get("mode", "normalized")
    return mode if mode in VECTORISED_MATCH_MODES else None


def _problem(reference) -> dict:
    return dict(reference) if isinstance(reference, dict) else {"answer": reference}


def verify_correct(
    predictions: Column,
    references: Column,
    verifier: str = DEFAULT_VERIFIER,
    verifier_options: dict | None = None,
    *,
    num_workers: int | None = None,
    progress: bool = True,
    chunk: int = 20_000,
) -> np.ndarray:
    """Per-item correctness of ``predictions`` against ``references`` by the named verifier."""
    from alignkit.verifiers import get_verifier

    options = dict(verifier_options or {})
    checker = get_verifier(verifier, **options)  # fails early on a bad name or option
    mode = _vectorisable(verifier, options)
    if mode is not None and isinstance(references, list) and any(isinstance(v, dict) for v in references):
        mode = None  # whole problem records as references: the verifier reads their fields
    if mode is not None:
        return match_correct(texts(predictions), texts(references), mode)
    from tqdm.auto import tqdm

    preds = [_text(v) for v in _pylist(predictions)]
    problems = [_problem(v) for v in _pylist(references)]
    out = np.zeros(len(preds), dtype=bool)
    starts = range(0, len(preds), chunk)
    for start in tqdm(starts, desc=f"verify ({verifier})", unit="chunk", disable=not progress or len(starts) < 2):
        verdicts = checker.verify_batch(problems[start : start + chunk], preds[start : start + chunk], num_workers=num_workers)
        out[start : start + len(verdicts)] = [v.correct for v in verdicts]
    return out


def judge(
    data: FlipData,
    verifier: str = DEFAULT_VERIFIER,
    verifier_options: dict | None = None,
    *,
    num_workers: int | None = None,
    progress: bool = True,
) -> FlipData:
    """``data`` with per-item correctness for both models: given booleans are kept, predictions without
    them are checked against the reference by ``verifier``. Score-only data is returned as is."""
    options = dict(verifier_options or {})
    results = {"old": data.old, "new": data.new}
    todo = [side for side, r in results.items() if r.correct is None and r.prediction is not None]
    if not todo:
        return dataclasses.replace(data, changed=answers_changed(data, verifier, options, num_workers=num_workers))
    if data.reference is None:
        raise FlipInputError(f"{' and '.join(todo)} predictions need references to be judged")
    mode = _vectorisable(verifier, options)
    if mode is not None and len(todo) == 2 and not (
        isinstance(data.reference, list) and any(isinstance(v, dict) for v in data.reference)
    ):
        from alignkit.verifiers import get_verifier

        get_verifier(verifier, **options)  # fails on a bad option as the row-by-row path would
        verdicts = match_correct([texts(results[s].prediction) for s in todo], texts(data.reference), mode)
    else:
        verdicts = [
            verify_correct(results[s].prediction, data.reference, verifier, options, num_workers=num_workers, progress=progress)
            for s in todo
        ]
    for side, correct in zip(todo, verdicts):
        results[side] = dataclasses.replace(results[side], correct=correct)
    data = dataclasses.replace(data, changed=answers_changed(data, verifier, options, num_workers=num_workers))
    what = f"verifier {verifier}" + (f" ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")
    if len(todo) == 2:
        how = what
    else:
        given = "old" if todo == ["new"] else "new"
        how = f"{given}: given; {todo[0]}: {what}"
    return dataclasses.replace(data, old=results["old"], new=results["new"], correctness=how)


def answers_changed(
    data: FlipData, verifier: str = DEFAULT_VERIFIER, verifier_options: dict | None = None, *,
    num_workers: int | None = None,
) -> np.ndarray | None:
    """Per item, whether the new prediction's answer differs from the old one's as ``verifier`` reads
    answers (NFR_mc's "changed"); ``None`` without predictions of both models. ``match`` in ``exact``
    or ``normalized`` mode on whole predictions runs vectorised (exact: the raw text); any other
    verifier through its :meth:`~alignkit.verifiers.base.Verifier.same_answer_batch`."""
    if data.old.prediction is None or data.new.prediction is None:
        return None
    options = dict(verifier_options or {})
    references = data.reference if data.reference is not None else [None] * len(data)
    records = isinstance(references, list) and any(isinstance(v, dict) for v in references)
    mode = _vectorisable(verifier, options)
    if mode is not None and not records:
        return ~match_correct(texts(data.new.prediction), texts(data.old.prediction), mode)
    from alignkit.verifiers import get_verifier

    checker = get_verifier(verifier, **options)
    problems = [_problem(v) for v in _pylist(references)]
    old, new = [_text(v) for v in _pylist(data.old.prediction)], [_text(v) for v in _pylist(data.new.prediction)]
    return ~np.asarray(checker.same_answer_batch(problems, old, new, num_workers=num_workers), dtype=bool)


# ------------------------------------------------------------------------------------ report


@dataclass
class FlipReport:
    """Everything the report files hold. ``summary`` is flips.json without the id lists."""

    summary: dict
    data: FlipData
    negative: np.ndarray  # item indices of negative flips (old right, new wrong)
    positive: np.ndarray  # item indices of positive flips
    regressions: np.ndarray  # item indices with score delta < -threshold

    @property
    def nfr(self) -> float:
        """The headline NFR: of the discrete verdicts when there are any, else of the scores."""
        return self.summary["nfr"]

    def id_indices(self) -> dict[str, np.ndarray]:
        """Item indices of the flipped items, by the flips.json key of their id list."""
        lists = {}
        if "discrete" in self.summary:
            lists["negative_flip_ids"] = self.negative
            lists["positive_flip_ids"] = self.positive
        if "scores" in self.summary:
            lists["score_regression_ids"] = self.regressions
        return lists

    def id_lists(self) -> dict[str, list]:
        """The ids of the flipped items (negative / positive flips, score regressions)."""
        return {key: _take(self.data.ids, indices) for key, indices in self.id_indices().items()}

    def to_dict(self) -> dict:
        return {**self.summary, **self.id_lists()}


def _pair(ci) -> list[float]:
    return [float(ci[0]), float(ci[1])]


def _scores_are_verdicts(data: FlipData) -> bool:
    return all(np.array_equal(r.score, r.correct.astype(np.float64)) for r in (data.old, data.new))


def compute_report(
    data: FlipData,
    *,
    threshold: float = 0.0,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    settings: dict | None = None,
    nfr_basis: str = "auto",
) -> FlipReport:
    """Metrics, intervals and flipped items of judged ``data`` (see :func:`judge`).

    ``nfr_basis`` picks the headline NFR (the one ``--max-nfr`` gates): ``discrete`` (per-item
    correctness), ``scores`` (score flips beyond ``threshold``) or ``auto`` (discrete when there is
    per-item correctness, else scores).
    """
    if nfr_basis not in ("auto", "discrete", "scores"):
        raise ValueError(f"nfr_basis must be auto, discrete or scores, got {nfr_basis!r}")
    n = len(data)
    summary: dict[str, Any] = {"items": n, "sources": dict(data.sources)}
    summary["settings"] = {
        **(settings or {}),
        "correctness": data.correctness,
        "threshold": threshold,
        "bootstrap": bootstrap,
        "confidence": confidence,
        "seed": seed,
    }
    empty = np.zeros(0, dtype=np.int64)
    negative = positive = regressions = empty
    discrete = data.old.correct is not None and data.new.correct is not None
    methods = []
    if discrete:
        old, new = data.old.correct, data.new.correct
        changed = data.changed  # the answers compared by the verifier (judge)
        if changed is None and data.old.prediction is not None and data.new.prediction is not None:
            changed = ~_bools(pc.equal(texts(data.old.prediction), texts(data.new.prediction)))  # not judged: raw
        metrics = flip_metrics(old, new, changed=changed)
        negative, positive = np.flatnonzero(old & ~new), np.flatnonzero(~old & new)
        ci = flip_count_bootstrap(old, new, changed, samples=bootstrap, confidence=confidence, seed=seed) if bootstrap else {}
        kept_right = int(np.count_nonzero(old & new))
        summary["discrete"] = {
            **metrics.to_dict(),
            "counts": {
                "kept_correct": kept_right,
                "negative_flips": int(negative.size),
                "positive_flips": int(positive.size),
                "kept_wrong": n - kept_right - int(negative.size) - int(positive.size),
            },
            "ci": {k: _pair(v) for k, v in ci.items()},
            "mcnemar": mcnemar_from_counts(negative.size, positive.size),
        }
        if bootstrap:
            methods.append(
                f"discrete metrics: percentile bootstrap, {bootstrap} item resamples drawn as multinomial category "
                "counts (exact for these count statistics, any n)"
            )
    scores = data.old.score is not None and data.new.score is not None
    if scores and discrete and _scores_are_verdicts(data):
        scores = False  # 0/1 scores equal to the verdicts: score flips would repeat the discrete ones
        summary["settings"]["scores"] = "equal to the 0/1 verdicts for both models: reported as discrete flips only"
    if scores:
        s = score_flip_metrics(data.old.score, data.new.score, threshold)
        delta = data.new.score - data.old.score
        regressions = np.flatnonzero(delta < -threshold)
        entry = {**s.to_dict(), "mean_delta": float(delta.mean()) if n else 0.0,
                 "regressions": int(regressions.size), "gains": int(np.count_nonzero(delta > threshold))}
        if bootstrap:
            ci, how = score_flip_bootstrap(data.old.score, data.new.score, threshold, samples=bootstrap,
                                           confidence=confidence, seed=seed)
            entry["ci"] = {k: _pair(v) for k, v in ci.items()}
            methods.append(f"score NFR / PFR: multinomial count bootstrap ({bootstrap}); mean score delta: {how}")
        summary["scores"] = entry
    if "discrete" not in summary and "scores" not in summary:
        raise FlipInputError(
            "nothing to compare: the inputs give neither correctness (or predictions to judge) for both models "
            "nor scores for both"
        )
    summary["settings"]["ci_method"] = "; ".join(methods) if methods else "none (bootstrap = 0)"
    basis = ("discrete" if discrete else "scores") if nfr_basis == "auto" else nfr_basis
    if basis not in summary:
        raise FlipInputError(f"nfr_basis {nfr_basis!r}: the inputs give no {basis} results for both models")
    summary["nfr"] = summary[basis]["nfr"]
    summary["nfr_basis"] = basis
    return FlipReport(summary, data, negative, positive, regressions)


def flip_report(
    *,
    predictions: str | Path | None = None,
    old: str | Path | None = None,
    new: str | Path | None = None,
    verifier: str = DEFAULT_VERIFIER,
    verifier_options: dict | None = None,
    threshold: float = 0.0,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    num_workers: int | None = None,
    nfr_basis: str = "auto",
) -> FlipReport:
    """Read (a flips file, or old + new prediction files), judge and compute, in one call."""
    if predictions is not None:
        if old is not None or new is not None:
            raise FlipInputError("give either a flips file or old and new prediction files, not both")
        data = read_flips_file(predictions)
    elif old is not None and new is not None:
        data = read_predictions(old, new)
    else:
        raise FlipInputError("give a flips file, or both old and new prediction files")
    data = judge(data, verifier, verifier_options, num_workers=num_workers)
    return compute_report(
        data, threshold=threshold, bootstrap=bootstrap, confidence=confidence, seed=seed, nfr_basis=nfr_basis,
        settings={"verifier": verifier, "verifier_options": dict(verifier_options or {})},
    )


# ------------------------------------------------------------------------------------ writing


def _json_array(col: Column, indices: np.ndarray) -> str:
    """``json.dumps(ids)`` of the selected ids, built in Arrow when they are integers or plain strings."""
    if isinstance(col, pa.Array) and indices.size:
        picked = col.take(pa.array(indices, pa.int64()))
        if pa.types.is_integer(col.type):
            return "[" + _join(pc.cast(picked, pa.string()), ", ") + "]"
        is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        if is_text and not pc.any(pc.match_substring_regex(picked, r'["\\\x00-\x1f]')).as_py():  # nothing to escape
            return '["' + _join(picked, '", "') + '"]'
    return json.dumps(_take(col, indices), ensure_ascii=False)


def _join(strings: pa.Array, separator: str) -> str:
    one_list = pa.ListArray.from_arrays(pa.array([0, len(strings)], pa.int32()), strings.cast(pa.string()))
    return pc.binary_join(one_list, separator)[0].as_py()


def _json_text(report: FlipReport) -> str:
    """flips.json: the summary indented, each id list on one line."""
    body = json.dumps(report.summary, indent=2, ensure_ascii=False)
    lists = report.id_indices()
    if not lists:
        return body + "\n"
    parts = [f'  "{key}": {_json_array(report.data.ids, indices)}' for key, indices in lists.items()]
    return body[: body.rindex("}")].rstrip() + ",\n" + ",\n".join(parts) + "\n}\n"


def _cell(value, limit: int = 120) -> str:
    text = _text(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def summary_rows(report: FlipReport) -> list[tuple[str, str, str]]:
    """(metric, value, interval) rows of the summary table."""
    s = report.summary
    rows: list[tuple[str, str, str]] = [("items", f"{s['items']:,}", "")]
    if "discrete" in s:
        d, ci = s["discrete"], s["discrete"].get("ci", {})
        rows += [
            ("accuracy old", _fmt(d["accuracy_old"]), _fmt_ci(ci.get("accuracy_old"))),
            ("accuracy new", _fmt(d["accuracy_new"]), _fmt_ci(ci.get("accuracy_new"))),
            ("accuracy delta", f"{d['accuracy_delta']:+.4f}", _fmt_ci(ci.get("accuracy_delta"))),
            ("NFR (negative flip rate)", _fmt(d["nfr"]), _fmt_ci(ci.get("nfr"))),
            ("PFR (positive flip rate)", _fmt(d["pfr"]), _fmt_ci(ci.get("pfr"))),
            ("NFR multi-class", _fmt(d["nfr_mc"]), _fmt_ci(ci.get("nfr_mc"))),
            ("NFI (negative flip impact)", _fmt(d["nfi"]), _fmt_ci(ci.get("nfi"))),
            ("BTC (backward trust compat.)", _fmt(d["btc"]), _fmt_ci(ci.get("btc"))),
            ("negative / positive flips", f"{d['negative_flips']:,} / {d['positive_flips']:,}", ""),
            ("McNemar p-value", f"{d['mcnemar']['p_value']:.4g}", ""),
        ]
    if "scores" in s:
        sc, ci = s["scores"], s["scores"].get("ci", {})
        rows += [
            ("mean score old", _fmt(sc["mean_old"]), ""),
            ("mean score new", _fmt(sc["mean_new"]), ""),
            ("mean score delta", f"{sc['mean_delta']:+.4f}", _fmt_ci(ci.get("mean_delta"))),
            (f"score NFR (delta < {-sc['threshold'] + 0.0:g})", _fmt(sc["nfr"]), _fmt_ci(ci.get("nfr"))),
            (f"score PFR (delta > {sc['threshold']:g})", _fmt(sc["pfr"]), _fmt_ci(ci.get("pfr"))),
            ("mean gain / mean regression", f"{sc['mean_gain']:.4f} / {sc['mean_regression']:.4f}", ""),
        ]
    return rows


def format_summary(report: FlipReport) -> str:
    """A plain-text summary table for the terminal."""
    rows = summary_rows(report)
    level = report.summary["settings"]["confidence"]
    header = ("metric", "value", f"{level:.0%} CI" if report.summary["settings"]["bootstrap"] else "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]}".rstrip()]
    lines.append("-" * (sum(widths) + 4))
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


def _item_table(report: FlipReport, indices: np.ndarray, show: int, with_delta: bool = False) -> list[str]:
    data = report.data
    picked = indices[:show]
    ids = _take(data.ids, picked)
    refs = _take(data.reference, picked) if data.reference is not None else [None] * len(picked)
    if data.old.prediction is not None and data.new.prediction is not None:
        olds, news = _take(data.old.prediction, picked), _take(data.new.prediction, picked)
    else:
        olds, news = [None] * len(picked), [None] * len(picked)
    head = "| id | reference | old | new |" + (" old score | new score | delta |" if with_delta else "")
    rule = "| --- | --- | --- | --- |" + (" ---: | ---: | ---: |" if with_delta else "")
    lines = [head, rule]
    for k, i in enumerate(picked):
        row = f"| {_cell(ids[k])} | {_cell(refs[k])} | {_cell(olds[k]) if olds[k] is not None else ''} | " \
              f"{_cell(news[k]) if news[k] is not None else ''} |"
        if with_delta:
            o, nw = data.old.score[i], data.new.score[i]
            row += f" {o:.4g} | {nw:.4g} | {nw - o:+.4g} |"
        lines.append(row)
    return lines


def markdown_report(report: FlipReport, show: int = 50, plot_name: str | None = "flips.png") -> str:
    """report.md: summary table, settings, and the first ``show`` flipped items of each kind."""
    s = report.summary
    sources = ", ".join(f"{k}: `{v}`" for k, v in s["sources"].items())
    lines = ["# Negative flip report", "", f"{s['items']:,} items ({sources}); correctness: {s['settings']['correctness']}.", ""]
    lines += ["## Summary", "", "| metric | value | interval |", "| --- | ---: | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    st = s["settings"]
    lines += ["", f"Intervals: {st['confidence']:.0%}, {st['ci_method']}. McNemar: exact two-sided binomial test "
              "on the discordant items (negative vs positive flips)." if "discrete" in s else
              f"Intervals: {st['confidence']:.0%}, {st['ci_method']}.", ""]
    if plot_name:
        lines += [f"![flip counts]({plot_name})", ""]
    if "discrete" in s:
        for title, indices in (("Negative flips (old right, new wrong)", report.negative),
                               ("Positive flips (old wrong, new right)", report.positive)):
            shown = min(show, indices.size)
            lines += [f"## {title}: {indices.size:,} items" + (f", first {shown}" if shown < indices.size else ""), ""]
            lines += (_item_table(report, indices, show) if indices.size else ["None."]) + [""]
    if "scores" in s:
        delta = report.data.new.score[report.regressions] - report.data.old.score[report.regressions]
        k = min(show, delta.size)
        if k and k < delta.size:
            top = np.argpartition(delta, k - 1)[:k]
        else:
            top = np.arange(delta.size)
        top = top[np.argsort(delta[top], kind="stable")]
        lines += [f"## Score regressions (delta < {-s['scores']['threshold'] + 0.0:g}): {delta.size:,} items"
                  + (f", the {k} largest" if k < delta.size else ", largest first"), ""]
        lines += (_item_table(report, report.regressions[top], show, with_delta=True) if k else ["None."]) + [""]
    return "\n".join(lines)


def plot_report(report: FlipReport, path: str | Path) -> Path | None:
    """flips.png: the four flip counts (and a histogram of score deltas); ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: flips.png skipped (pip install matplotlib)", stacklevel=2)
        return None
    s = report.summary
    panels = [p for p in ("discrete", "scores") if p in s]
    fig = Figure(figsize=(5.5 * len(panels), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for k, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), k)
        if panel == "discrete":
            c = s["discrete"]["counts"]
            names = ["kept correct", "negative flips", "positive flips", "kept wrong"]
            values = [c["kept_correct"], c["negative_flips"], c["positive_flips"], c["kept_wrong"]]
            bars = ax.bar(names, values, color=["#4c9f70", "#d1495b", "#2e86ab", "#9e9e9e"])
            for bar, v in zip(bars, values):
                ax.annotate(f"{v:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("items")
            ax.set_title(f"NFR {s['discrete']['nfr']:.4f}, PFR {s['discrete']['pfr']:.4f}")
            ax.tick_params(axis="x", labelsize=8)
        else:
            delta = report.data.new.score - report.data.old.score
            counts, edges = np.histogram(delta, bins=50)
            ax.stairs(counts, edges, fill=True, color="#2e86ab")
            t = s["scores"]["threshold"]
            for x in {-t, t}:
                ax.axvline(x, color="#d1495b", linestyle="--", linewidth=1)
            ax.set_xlabel("score delta (new - old)")
            ax.set_ylabel("items")
            ax.set_title(f"score NFR {s['scores']['nfr']:.4f}, PFR {s['scores']['pfr']:.4f}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def write_report(report: FlipReport, out_dir: str | Path, *, show: int = 50, plot: bool = True) -> dict[str, Path]:
    """Write flips.json, report.md and flips.png into ``out_dir``; the paths written, by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "flips.json"}
    paths["json"].write_text(_json_text(report), encoding="utf-8")
    png = plot_report(report, out / "flips.png") if plot else None
    if png is not None:
        paths["png"] = png
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown_report(report, show, "flips.png" if png is not None else None), encoding="utf-8")
    return paths


__all__ = [
    "FlipData",
    "FlipInputError",
    "FlipReport",
    "ModelResults",
    "PredictionFile",
    "compute_report",
    "flip_report",
    "format_summary",
    "join_predictions",
    "judge",
    "markdown_report",
    "match_correct",
    "plot_report",
    "read_flips_file",
    "read_prediction_file",
    "read_predictions",
    "summary_rows",
    "texts",
    "verify_correct",
    "write_report",
]
