"""The metrics of a judged comparison: :class:`FlipReport` and :func:`compute_report`.

Confidence intervals of the discrete metrics and of NFR / PFR of scores come from
:func:`~alignkit.evaluation.flips.flip_count_bootstrap` (the item bootstrap drawn as multinomial category
counts: exact, and O(resamples) for any number of items); the mean score change uses an item bootstrap
for small inputs and the normal approximation for large ones (the report says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from alignkit.evaluation.flip_data import FlipData, FlipInputError, bools, take, texts
from alignkit.evaluation.flips import (
    flip_count_bootstrap,
    flip_metrics,
    mcnemar_from_counts,
    score_flip_bootstrap,
    score_flip_metrics,
)


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
        return {key: take(self.data.ids, indices) for key, indices in self.id_indices().items()}

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
            changed = ~bools(pc.equal(texts(data.old.prediction), texts(data.new.prediction)))  # not judged: raw
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
    summary["models"] = model_names(data, summary["settings"])
    max_nfr = summary["settings"].get("max_nfr")
    if max_nfr is not None:  # the gate of alignkit flips --max-nfr: its verdict is part of the report
        regressed = int(negative.size if basis == "discrete" else regressions.size)
        summary["gate"] = {"max_nfr": float(max_nfr), "nfr": summary["nfr"], "basis": basis,
                           "passed": bool(summary["nfr"] <= max_nfr), "regressed": regressed, "items": n}
    return FlipReport(summary, data, negative, positive, regressions)


def _model_name(path: str | None) -> str | None:
    """A model's name from a path: a directory's last part, a file's name without ``.jsonl`` and a trailing
    ``_predictions`` / ``.predictions``."""
    if not path:
        return None
    name = Path(str(path)).name or str(path)
    for suffix in (".jsonl", ".json", ".ndjson"):
        name = name.removesuffix(suffix)
    for suffix in ("_predictions", ".predictions", "-predictions"):
        name = name.removesuffix(suffix)
    return name or str(path)


def model_names(data: FlipData, settings: dict) -> dict[str, str]:
    """What the report calls the old and the new model: ``old_name`` / ``new_name`` when given, else the
    models of a model-mode run (with their adapters), else the prediction files' names, else old / new."""
    out = {}
    for side in ("old", "new"):
        name = settings.get(f"{side}_name")
        if not name and settings.get(f"{side}_model"):
            adapter = settings.get(f"{side}_adapter")
            name = str(settings[f"{side}_model"]) + (f" + {adapter}" if adapter else "")
        out[side] = name or _model_name(data.sources.get(side)) or side
    if out["old"] == out["new"]:  # two files of one name in different directories
        out = {side: f"{side}: {name}" for side, name in out.items()}
    return out
