"""Two prediction files (old model, new model) joined on ``id`` into one :class:`FlipData`.

Ids are compared as text, so ``7`` and ``"7"`` are the same item; the join keeps the old file's order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkit.data.records import RecordError
from alignkit.evaluation.flip_data import Column, FlipData, ModelResults, PredictionFile, bools, take, texts
from alignkit.evaluation.flip_readers import id_keys, key_permutation, read_prediction_file, unique_id_keys


def join_predictions(old: PredictionFile, new: PredictionFile) -> FlipData:
    """Join two prediction files on ``id`` (old file's order). Errors name the file and row of an id
    missing from the other file or duplicated, and of a reference that differs between the files."""
    old_keys, new_keys = id_keys(old.ids), id_keys(new.ids)
    order = None
    if len(old_keys) == len(new_keys) and pc.all(pc.equal(old_keys, new_keys)).as_py():
        unique_id_keys(old, old_keys)  # same ids in the same order (so the new ids are distinct too)
    elif (order := key_permutation(old_keys, new_keys)) is None:
        unique_id_keys(old, old_keys)
        if len(new_keys) > len(old_keys):  # a duplicated id, or one the old file lacks
            unique_id_keys(new, new_keys)
            j = int(np.flatnonzero(~bools(pc.is_in(new_keys, value_set=old_keys)))[0])
            raise RecordError(new.source, new.line(j), "id", f"id {new_keys[j].as_py()!r} is not in {old.source}")
        pos = pc.index_in(old_keys, value_set=new_keys)
        if pos.null_count:
            i = int(np.flatnonzero(bools(pc.is_null(pos)))[0])
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
    same = bools(pc.equal(texts(old.reference), texts(new_ref)))
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        j = i if order is None else int(order[i])
        old_value, new_value = take(old.reference, [i])[0], take(new_ref, [i])[0]
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
