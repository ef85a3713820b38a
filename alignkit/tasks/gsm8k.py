"""GSM8K-format data (``question``, ``answer`` ending in ``#### N``) as problems records.

Works on the hub dataset (``openai/gsm8k``, configuration ``main``) and on local JSONL / Parquet files
with the same two fields. Each record becomes::

    {"id", "prompt": [{"role": "user", "content": question + instruction}],
     "answer": "72", "solution": "...reasoning...\\nThe answer is 72."}

Calculator annotations (``<<48/2=24>>``) are removed from the solution, and its final ``#### N`` line
becomes "The answer is N." so that gold solutions used as DPO ``chosen`` responses end the way the
instruction asks the model to end.
"""

from __future__ import annotations

import re

from alignkit.data.records import RecordError

INSTRUCTION = "\nSolve the problem step by step, then end with a line 'The answer is N.'"
_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_problem(record: dict, *, index: int = 0, source: str = "<gsm8k>", instruction: str = INSTRUCTION) -> dict:
    """One GSM8K record as a problems record; a malformed one raises :class:`RecordError`."""
    for name in ("question", "answer"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise RecordError(source, index + 1, name, "missing or empty (GSM8K format needs 'question' and 'answer')")
    reasoning, sep, final = record["answer"].rpartition("####")
    if not sep or not final.strip():
        raise RecordError(source, index + 1, "answer", "no '#### N' final answer")
    gold = final.strip().replace(",", "")
    steps = _CALC.sub("", reasoning).strip()
    return {
        "id": record.get("id", index),
        "prompt": [{"role": "user", "content": record["question"].strip() + instruction}],
        "answer": gold,
        "solution": f"{steps}\nThe answer is {gold}.",
    }


def load_gsm8k(source: str = "openai/gsm8k", *, split: str = "train", name: str | None = "main", limit: int | None = None):
    """Problems records from a local GSM8K-format file or a hub dataset id."""
    from pathlib import Path

    import datasets

    path = Path(source)
    if path.exists():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        raw = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        raw = datasets.load_dataset(source, name, split=split)
    if limit:
        raw = raw.select(range(min(limit, len(raw))))
    return [gsm8k_problem(r, index=i, source=source) for i, r in enumerate(raw)]
