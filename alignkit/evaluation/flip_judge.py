"""Per-item correctness of the old and new predictions, and whether an answer changed (NFR_mc).

Correctness of a discrete prediction: the row's ``*_correct`` / ``correct`` boolean when given,
otherwise the prediction checked against ``reference`` by a verifier (default ``match`` in
``normalized`` mode; a ``reference`` that is a JSON object is passed to the verifier as the whole
problem record, anything else as its ``answer``). Exact and normalised matching run vectorised in
Arrow (:func:`alignkit.verifiers.match.normalize_arrow`, the match verifier's own normalisation);
any other verifier goes through :meth:`~alignkit.verifiers.base.Verifier.verify_batch`. NFR_mc counts a
new wrong prediction whose *answer* changed: the verifier decides that too
(:meth:`~alignkit.verifiers.base.Verifier.same_answer_batch`: the math verifier compares the answers it
extracts, ``match`` compares as it matches, normalised by default), so the same wrong answer worded
differently is no flip; raw text equality is used only for exact-match data.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from alignkit.evaluation.flip_data import Column, FlipData, FlipInputError, bools, pylist, take, text_form, texts
from alignkit.verifiers import get_verifier
from alignkit.verifiers.match import normalize, normalize_arrow

DEFAULT_VERIFIER = "match"
VECTORISED_MATCH_MODES = ("exact", "normalized")


def _ascii(arr: pa.Array) -> np.ndarray:
    return bools(pc.string_is_ascii(arr))


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
    results = [bools(pc.equal(p, references)) for p in preds]
    if mode == "normalized":
        need = np.zeros(len(references), dtype=bool)
        for r in results:
            need |= ~r
        union = np.flatnonzero(need)
        if union.size:
            ref_union = references.take(pa.array(union, pa.int64()))
            ref_norm, ref_ascii = normalize_arrow(ref_union), _ascii(ref_union)
            slot = np.cumsum(need) - 1  # item index -> position in union
            for p, correct in zip(preds, results):
                rest = np.flatnonzero(~correct)
                if rest.size:
                    _normalized_equal(p, rest, ref_norm, ref_ascii, slot[rest], correct, references)
    return results[0] if single else results


def _normalized_equal(pred, rest, ref_norm, ref_ascii, slots, correct, references) -> None:
    """Fill ``correct[rest]``: normalised prediction equals normalised reference."""
    p = pred.take(pa.array(rest, pa.int64()))
    both_ascii = _ascii(p) & ref_ascii[slots]
    correct[rest] = bools(pc.equal(normalize_arrow(p), ref_norm.take(pa.array(slots, pa.int64())))) & both_ascii
    other = np.flatnonzero(~both_ascii)
    if other.size:
        ps, rs = take(p, other), take(references, rest[other])
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
    options = dict(verifier_options or {})
    checker = get_verifier(verifier, **options)  # fails early on a bad name or option
    mode = _vectorisable(verifier, options)
    if mode is not None and isinstance(references, list) and any(isinstance(v, dict) for v in references):
        mode = None  # whole problem records as references: the verifier reads their fields
    if mode is not None:
        return match_correct(texts(predictions), texts(references), mode)
    preds = [text_form(v) for v in pylist(predictions)]
    problems = [_problem(v) for v in pylist(references)]
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
        get_verifier(verifier, **options)  # fails on a bad option as the row-by-row path would
        predictions = [texts(results[s].prediction) for s in todo]
        verdicts = match_correct(predictions, texts(data.reference), mode)
        changed = _changed_by_verdicts(*predictions, *verdicts, mode)
    else:
        verdicts = [
            verify_correct(results[s].prediction, data.reference, verifier, options, num_workers=num_workers, progress=progress)
            for s in todo
        ]
        changed = answers_changed(data, verifier, options, num_workers=num_workers)
    for side, correct in zip(todo, verdicts):
        results[side] = dataclasses.replace(results[side], correct=correct)
    data = dataclasses.replace(data, changed=changed)
    what = f"verifier {verifier}" + (f" ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")
    if len(todo) == 2:
        how = what
    else:
        given = "old" if todo == ["new"] else "new"
        how = f"{given}: given; {todo[0]}: {what}"
    return dataclasses.replace(data, old=results["old"], new=results["new"], correctness=how)


def _changed_by_verdicts(old: pa.Array, new: pa.Array, old_correct: np.ndarray, new_correct: np.ndarray, mode: str) -> np.ndarray:
    """:func:`answers_changed` for ``match`` (``mode``) when both sides' verdicts come from
    :func:`match_correct` against the same references. Matching is equality of the text (``exact``) or of
    its normalised form, so two correct answers are the same answer and a correct and a wrong one differ:
    only the items both models got wrong are compared."""
    changed = old_correct != new_correct
    both_wrong = np.flatnonzero(~old_correct & ~new_correct)
    if both_wrong.size:
        idx = pa.array(both_wrong, pa.int64())
        changed[both_wrong] = ~match_correct(new.take(idx), old.take(idx), mode)
    return changed


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
    checker = get_verifier(verifier, **options)
    problems = [_problem(v) for v in pylist(references)]
    old, new = [text_form(v) for v in pylist(data.old.prediction)], [text_form(v) for v in pylist(data.new.prediction)]
    return ~np.asarray(checker.same_answer_batch(problems, old, new, num_workers=num_workers), dtype=bool)
