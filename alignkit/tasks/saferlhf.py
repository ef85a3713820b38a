"""PKU-SafeRLHF as negatives records: the unsafe responses, for D²O (or an NPO forget set).

PKU-SafeRLHF (Ji et al. 2024, "PKU-SafeRLHF", arXiv:2406.15513; hub ``PKU-Alignment/PKU-SafeRLHF``, also the
older ``PKU-Alignment/PKU-SafeRLHF-30K`` / ``-10K``) rows hold a ``prompt``, two responses ``response_0`` /
``response_1`` and the safety labels ``is_response_0_safe`` / ``is_response_1_safe``. The D²O paper trains
on exactly this kind of data: the human-labelled harmful responses, with no positives. Every distinct
unsafe response becomes one record::

    {"prompt": [{"role": "user", "content": <prompt>}], "rejected": <unsafe response>}

(``chat=False`` keeps the prompt as text). Convert once, then point a recipe at the file::

    python -m alignkit.tasks.saferlhf --source PKU-Alignment/PKU-SafeRLHF --split train \\
        --out data/saferlhf_negatives/train.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from alignkit.data.records import RecordError

RESPONSE_FIELDS = (("response_0", "is_response_0_safe"), ("response_1", "is_response_1_safe"))


def saferlhf_negatives(rows: Iterable[dict], *, chat: bool = True, max_per_prompt: int | None = None,
                       source: str = "<PKU-SafeRLHF>") -> list[dict]:
    """Negatives records from PKU-SafeRLHF rows: each distinct unsafe, non-empty response of a prompt
    (at most ``max_per_prompt`` per prompt, in the order met). Rows lacking the fields raise a
    :class:`RecordError` naming the row and field."""
    seen: dict[str, set[str]] = {}
    records = []
    for row_number, row in enumerate(rows, start=1):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecordError(source, row_number, "prompt", "expected non-empty text")
        for response_field, safe_field in RESPONSE_FIELDS:
            if safe_field not in row or response_field not in row:
                missing = safe_field if safe_field not in row else response_field
                raise RecordError(source, row_number, missing, "missing field (not PKU-SafeRLHF format)")
            response = row[response_field]
            if row[safe_field] or not isinstance(response, str) or not response.strip():
                continue
            done = seen.setdefault(prompt, set())
            if response in done or (max_per_prompt is not None and len(done) >= max_per_prompt):
                continue
            done.add(response)
            records.append({"prompt": [{"role": "user", "content": prompt}] if chat else prompt, "rejected": response})
    return records


def load_saferlhf_rows(source: str, split: str = "train", name: str | None = None) -> list[dict]:
    """Rows from a JSON Lines file or a hub dataset id (``datasets.load_dataset``)."""
    path = Path(source)
    if path.exists():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import datasets

    return datasets.load_dataset(source, name, split=split).to_list()


def main(argv=None):
    parser = argparse.ArgumentParser(description="PKU-SafeRLHF -> negatives records (JSONL) for D2O.")
    parser.add_argument("--source", default="PKU-Alignment/PKU-SafeRLHF", help="hub id or a JSONL file")
    parser.add_argument("--split", default="train")
    parser.add_argument("--name", default=None, help="hub dataset configuration")
    parser.add_argument("--out", required=True)
    parser.add_argument("--text_prompts", action="store_true", help="keep prompts as text (default: chat messages)")
    parser.add_argument("--max_per_prompt", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    a = parser.parse_args(argv)
    from alignkit.negatives import write_jsonl

    rows = load_saferlhf_rows(a.source, a.split, a.name)
    records = saferlhf_negatives(rows, chat=not a.text_prompts, max_per_prompt=a.max_per_prompt, source=a.source)
    records = records[: a.limit] if a.limit else records
    write_jsonl(records, a.out)
    prompts = len({json.dumps(r["prompt"]) for r in records})
    print(f"{len(rows)} rows -> {len(records)} negatives on {prompts} prompts -> {a.out}")


if __name__ == "__main__":
    main()
