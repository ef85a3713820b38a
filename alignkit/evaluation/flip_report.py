"""From per-item predictions of an old and a new model to a negative-flip report, in one call.

Inputs (JSON Lines): a **flips file** (record kind ``flips``: ``id``, ``reference`` and ``old`` / ``new``
and/or ``old_score`` / ``new_score``, optional ``old_correct`` / ``new_correct``), or **two prediction
files**, old and new, each with ``id``, ``reference`` and ``prediction`` and/or ``correct`` and/or
``score``, joined on ``id``.

:func:`flip_report` runs the pipeline; each step is its own module:

* :mod:`~alignkit.evaluation.flip_readers`: read a flips file or a prediction file (``pyarrow.json``,
  row by row when a row is bad, so the error names file, row and field);
* :mod:`~alignkit.evaluation.flip_join`: join two prediction files on ``id``;
* :mod:`~alignkit.evaluation.flip_judge`: per-item correctness (given, or by a verifier: the match
  verifier's normalisation vectorised in Arrow) and whether the answer changed (NFR_mc);
* :mod:`~alignkit.evaluation.flip_summary`: metrics, bootstrap intervals, McNemar, the flipped items
  (:class:`FlipReport`);
* :mod:`~alignkit.evaluation.flip_render`: ``flips.json``, ``report.md``, ``flips.png`` and the terminal
  summary (:func:`write_report`, :func:`format_summary`).

The names of those modules are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.evaluation.flip_data import FlipData, FlipInputError, ModelResults, PredictionFile, texts
from alignkit.evaluation.flip_join import join_predictions, read_predictions
from alignkit.evaluation.flip_judge import DEFAULT_VERIFIER, answers_changed, judge, match_correct, verify_correct
from alignkit.evaluation.flip_readers import read_flips_file, read_prediction_file
from alignkit.evaluation.flip_render import format_summary, markdown_report, plot_report, summary_rows, write_report
from alignkit.evaluation.flip_summary import FlipReport, compute_report


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
    max_nfr: float | None = None,
    old_name: str | None = None,
    new_name: str | None = None,
) -> FlipReport:
    """Read (a flips file, or old + new prediction files), judge and compute, in one call. ``max_nfr``: the
    NFR budget whose verdict the report states; ``old_name`` / ``new_name``: what the report calls the models
    (default: the prediction files' names)."""
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
        settings={"verifier": verifier, "verifier_options": dict(verifier_options or {}), "max_nfr": max_nfr,
                  **({"old_name": old_name} if old_name else {}), **({"new_name": new_name} if new_name else {})},
    )


__all__ = [
    "FlipData",
    "FlipInputError",
    "FlipReport",
    "ModelResults",
    "PredictionFile",
    "answers_changed",
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
