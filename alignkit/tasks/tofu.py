"""TOFU-format data (Maini et al. 2024; hub ``locuslab/TOFU``) as forget/retain records and evaluation items.

A TOFU row has ``question`` and ``answer``; the ``*_perturbed`` subsets add ``paraphrased_answer`` and
``perturbed_answer`` (a list of wrong answers). Subsets (the hub's configurations, or ``<split>.json``
files in a local directory): ``forget01/05/10`` and ``retain99/95/90`` for training,
``forget01/05/10_perturbed``, ``retain_perturbed``, ``real_authors_perturbed`` and
``world_facts_perturbed`` for evaluation (the last two: ``answer`` and ``perturbed_answer``, the other
options, with no paraphrase).

* :func:`load_tofu_records` -> ``sft`` records ``{"id", "prompt": [{"role": "user", "content": question}],
  "response": answer}`` (a chat prompt: TOFU models are chat models);
* :func:`load_tofu_eval_items` -> items for :mod:`alignkit.evaluation.unlearning` (``forgetNN`` reads
  ``forgetNN_perturbed``, ``retainNN`` reads ``retain_perturbed``, ``real_authors`` / ``world_facts``
  read ``real_authors_perturbed`` / ``world_facts_perturbed``, as open-unlearning's TOFU evaluation does).

A malformed row raises :class:`~alignkit.data.records.RecordError` naming the file (or hub subset), the
row and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignkit.data.records import RecordError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def _read_json_rows(path: Path) -> list[tuple[int, object]]:
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise RecordError(str(path), None, None, f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    rows = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise RecordError(str(path), line_no, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    return rows


def read_tofu_rows(source: str, subset: str) -> tuple[list[tuple[int, object]], str]:
    """``([(row number, row)], source name)`` of one TOFU subset: a local file, ``DIR/<subset>.json(l)`` /
    ``.parquet``, or the hub dataset ``source`` with configuration ``subset``."""
    path = Path(source).expanduser()
    if path.is_dir():
        candidates = [path / f"{subset}{suffix}" for suffix in FILE_SUFFIXES]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            names = ", ".join(c.name for c in candidates)
            raise FileNotFoundError(f"no TOFU subset {subset!r} in {path} (looked for {names})")
        path = found
    if path.is_file():
        if path.suffix == ".parquet":
            import datasets

            table = datasets.Dataset.from_parquet(str(path))
            return list(enumerate(table.to_list(), start=1)), str(path)
        rows = _read_json_rows(path)
        if not rows:
            raise RecordError(str(path), None, None, "no records (the file is empty)")
        return rows, str(path)
    if source.startswith((".", "/", "~")) or source.endswith(FILE_SUFFIXES):
        raise FileNotFoundError(f"no such TOFU file or directory: {source}")
    import datasets

    dataset = datasets.load_dataset(source, subset, split="train")
    return list(enumerate(dataset.to_list(), start=1)), f"{source}[{subset}]"


def _text(row, field: str, source: str, number: int) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        if value is None:
            problem = "missing"
        else:
            problem = "empty" if isinstance(value, str) else f"expected text, got {type(value).__name__}"
        raise RecordError(source, number, field, f"{problem} (a TOFU row needs 'question' and 'answer' text)")
    return value


def _check_row(row, source: str, number: int) -> dict:
    if not isinstance(row, dict):
        raise RecordError(source, number, None, f"expected a JSON object, got {type(row).__name__}")
    return row


def tofu_prompt(question: str, chat: bool = True):
    """The prompt a TOFU question becomes: one user message (``chat``), or the text itself."""
    return [{"role": "user", "content": question}] if chat else question


def load_tofu_records(source: str, subset: str, *, chat: bool = True) -> list[dict]:
    """``sft`` records (``id``, ``prompt``, ``response``) of a TOFU subset (``forget10``, ``retain90``, ...)."""
    rows, name = read_tofu_rows(source, subset)
    out = []
    for number, row in rows:
        row = _check_row(row, name, number)
        question, answer = _text(row, "question", name, number), _text(row, "answer", name, number)
        out.append({"id": f"{subset}-{number}", "prompt": tofu_prompt(question, chat), "response": answer})
    return out


def eval_subset(split: str) -> str:
    """The TOFU subset that evaluates a split: ``forgetNN`` -> ``forgetNN_perturbed``,
    ``retainNN`` -> ``retain_perturbed``, ``real_authors`` / ``world_facts`` -> ``..._perturbed``."""
    if split.endswith("_perturbed"):
        return split
    if re.fullmatch(r"forget\d+", split):
        return f"{split}_perturbed"
    if re.fullmatch(r"retain\d*", split):
        return "retain_perturbed"
    if split in ("real_authors", "world_facts"):
        return f"{split}_perturbed"
    return split


def load_tofu_eval_items(source: str, split: str, *, chat: bool = True) -> list[dict]:
    """Evaluation items (``id``, ``prompt``, ``answer``, ``paraphrased_answer``, ``perturbed_answer``) of a split;
    a row with a paraphrase needs perturbed answers, a row of an option split (real authors, world facts)
    has perturbed answers only."""
    subset = eval_subset(split)
    rows, name = read_tofu_rows(source, subset)
    out = []
    for number, row in rows:
        row = _check_row(row, name, number)
        item = {
            "id": f"{subset}-{number}",
            "prompt": tofu_prompt(_text(row, "question", name, number), chat),
            "answer": _text(row, "answer", name, number),
        }
        if row.get("paraphrased_answer") is not None:
            item["paraphrased_answer"] = _text(row, "paraphrased_answer", name, number)
        if row.get("paraphrased_answer") is not None or row.get("perturbed_answer") is not None:
            perturbed = row.get("perturbed_answer")
            if isinstance(perturbed, str):
                perturbed = [perturbed]
            texts = isinstance(perturbed, list) and all(isinstance(p, str) and p.strip() for p in perturbed)
            if not texts or not perturbed:
                raise RecordError(name, number, "perturbed_answer", "expected a non-empty list of non-empty texts")
            item["perturbed_answer"] = perturbed
        out.append(item)
    return out
