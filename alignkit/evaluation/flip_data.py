"""The data of a negative-flip comparison: per-item results of an old and a new model, and the column helpers.

A column is a pyarrow array (the fast read, :mod:`alignkit.evaluation.flip_readers`) or a Python list (the
row-by-row read); predictions and references are compared by their text form (:func:`text_form`: a string
as is, any other JSON value as its JSON text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Column = pa.Array | list  # a pyarrow array from the fast read, a Python list from the row-by-row one


class FlipInputError(ValueError):
    """Inputs that cannot be compared (no correctness and no scores for both models, say)."""


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
            self.lines = nonblank_line_numbers(self.source)
        return int(self.lines[index])


# ------------------------------------------------------------------------------------ column helpers


def pylist(col: Column) -> list:
    """A column as a Python list."""
    return col.to_pylist() if isinstance(col, (pa.Array, pa.ChunkedArray)) else list(col)


def take(col: Column, indices) -> list:
    """The values at ``indices``, as a Python list."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(col, pa.Array):
        return col.take(pa.array(indices)).to_pylist()
    return [col[i] for i in indices.tolist()]


def text_form(value) -> str:
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
    return pa.array([text_form(v) for v in col], pa.string())


def bools(arr) -> np.ndarray:
    """A null-free Arrow boolean array as a writable NumPy bool array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return pc.cast(arr, pa.uint8()).to_numpy(zero_copy_only=False).astype(bool)


def nonblank_line_numbers(path: str) -> np.ndarray:
    """1-based line numbers of the non-blank lines of a file (row k of a fast read is line [k])."""
    lines = Path(path).read_bytes().split(b"\n")
    return np.array([i for i, raw in enumerate(lines, start=1) if raw.strip()], dtype=np.int64)
