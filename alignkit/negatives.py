"""From problems to training records: sample on-policy responses, verify them, build negatives.

The pipeline every trainer can feed on::

    rows  = sample_rollouts(engine, problems, n=8, sampling=SamplingConfig(...))   # rollout rows
    rows  = verify_rollouts(rows, get_verifier("math"))                             # + verdicts
    pairs = preference_pairs(rows)            # DPO records: a correct vs an incorrect response
    negs  = negative_records(rows)            # D²O / NPO records: the incorrect responses
    print(RolloutStats.of(rows).format())     # accuracy, all-wrong / all-right prompts, reasons

A *rollout row* is the problem record (every field kept) plus ``completions``: a list of
``{"text", "token_ids", "logprobs", "finish_reason", "stop_string"}``; verification adds
``correct``, ``score`` and ``reason`` to each completion. Rows are plain dicts, written and read as
JSON Lines (:func:`write_jsonl`, :func:`read_rollouts`), so ``alignkit rollout`` and
``alignkit verify`` can run as separate steps, on separate machines, before ``alignkit train``.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Sequence

from alignkit.cache import write_jsonl  # noqa: F401  (the one atomic JSON Lines writer; re-exported)
from alignkit.data.records import RecordError, check_field, is_conversational
from alignkit.rollout.base import RolloutEngine, SamplingConfig
from alignkit.verifiers.base import Verifier

logger = logging.getLogger(__name__)

VERDICT_FIELDS = ("correct", "score", "reason")


# ------------------------------------------------------------------------------------ sample, verify


def sample_rollouts(
    engine: RolloutEngine,
    problems: Sequence[dict],
    n: int,
    sampling: SamplingConfig | None = None,
    *,
    prompt_field: str = "prompt",
    keep_token_data: bool = True,
) -> list[dict]:
    """``n`` completions of every problem, as rollout rows (problem fields kept, ``completions`` added).

    ``keep_token_data=False`` drops ``token_ids`` and ``logprobs`` from the rows, so no log-probs are
    requested from the engine either."""
    prompts = [p[prompt_field] for p in problems]
    if not keep_token_data and (sampling is None or sampling.logprobs):
        sampling = replace(sampling or SamplingConfig(), logprobs=False)
    groups = engine.generate(prompts, n=n, sampling=sampling)
    rows = []
    for problem, group in zip(problems, groups):
        completions = []
        for c in group:
            d = c.to_dict()
            if not keep_token_data:
                d.pop("token_ids"), d.pop("logprobs")
            completions.append(d)
        rows.append({**problem, "completions": completions})
    return rows


def _line_numbers(rows: Sequence[dict], row_numbers: Sequence[int] | None) -> Sequence[int]:
    return row_numbers if row_numbers is not None else range(1, len(rows) + 1)


def _check_rollout_rows(rows: Sequence[dict], source: str, row_numbers: Sequence[int] | None = None) -> None:
    for i, row in zip(_line_numbers(rows, row_numbers), rows):
        if not isinstance(row, dict):
            raise RecordError(source, i, None, f"expected a JSON object, got {type(row).__name__}")
        completions = row.get("completions")
        if not isinstance(completions, list) or not completions:
            raise RecordError(source, i, "completions", "expected a non-empty list of completions")
        for j, c in enumerate(completions):
            text = c.get("text") if isinstance(c, dict) else c
            if not isinstance(text, str):
                raise RecordError(source, i, f"completions[{j}].text", "expected text")


PROBLEM_FIELDS = ("answer", "tests", "solution")


def check_problems(rows: Sequence[dict], verifier: Verifier, *, source: str = "<rollouts>",
                   row_numbers: Sequence[int] | None = None) -> None:
    """Check that every row is a problem ``verifier`` can judge: the gold fields it holds are well formed
    (``answer``: text or a finite number; ``tests``; ``solution``) and it has the ones the verifier needs
    (:attr:`~alignkit.verifiers.base.Verifier.problem_fields`). A row without its gold answer is a
    :class:`RecordError` naming the file, row and field, never a row of wrong answers."""
    needs = tuple(getattr(verifier, "problem_fields", ()) or ())
    for i, row in zip(_line_numbers(rows, row_numbers), rows):
        for name in PROBLEM_FIELDS:
            if row.get(name) is not None:
                check_field(name, row[name], source=source, row=i)
        if needs and not any(all(row.get(f) is not None for f in group) for group in needs):
            wanted = " or ".join(" and ".join(repr(f) for f in group) for group in needs)
            missing = next(f for f in needs[0] if row.get(f) is None)
            problem = "missing field" if missing not in row else "field is null"
            raise RecordError(
                source, i, missing,
                f"{problem}: the {getattr(verifier, 'name', 'chosen')} verifier judges completions against {wanted}, "
                "and a row without its gold answer cannot be verified",
            )


def verify_rollouts(
    rows: Sequence[dict], verifier: Verifier, *, num_workers: int | None = None, source: str = "<rollouts>",
    row_numbers: Sequence[int] | None = None,
) -> list[dict]:
    """The rows with a verdict (``correct``, ``score``, ``reason``) on every completion; one batched call.

    Every row is checked first (:func:`check_problems`): a bad row raises :class:`RecordError` naming
    ``source`` and its row (``row_numbers[i]``, e.g. the line numbers of a JSONL file; default ``i + 1``)."""
    _check_rollout_rows(rows, source, row_numbers)
    check_problems(rows, verifier, source=source, row_numbers=row_numbers)
    problems, texts, where = [], [], []
    for i, row in enumerate(rows):
        for j, c in enumerate(row["completions"]):
            problems.append(row)
            texts.append(c["text"] if isinstance(c, dict) else c)
            where.append((i, j))
    verdicts = verifier.verify_batch(problems, texts, num_workers=num_workers)
    out = [{**row, "completions": [dict(c) if isinstance(c, dict) else {"text": c} for c in row["completions"]]} for row in rows]
    for (i, j), v in zip(where, verdicts):
        out[i]["completions"][j].update(correct=bool(v.correct), score=float(v.score), reason=v.reason)
    return out


def _require_verdicts(rows: Sequence[dict], source: str = "<rollouts>") -> None:
    _check_rollout_rows(rows, source)
    for i, row in enumerate(rows, start=1):
        for j, c in enumerate(row["completions"]):
            if not isinstance(c, dict) or not isinstance(c.get("correct"), bool):
                raise RecordError(source, i, f"completions[{j}].correct", "not verified (run alignkit verify first)")


# ------------------------------------------------------------------------------------ statistics


@dataclass
class RolloutStats:
    """What a verified rollout looks like: how often it is right, and how it fails."""

    prompts: int = 0
    completions: int = 0
    correct: int = 0
    all_wrong: int = 0  # prompts with no correct completion (need a gold fallback for DPO)
    all_right: int = 0  # prompts with no incorrect completion (no negative to learn from)
    mixed: int = 0
    finish_reasons: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)  # failure categories ("wrong answer", "limit", ...)
    seconds: float | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.completions if self.completions else 0.0

    @property
    def pass_at_n(self) -> float:
        """Share of prompts with at least one correct completion."""
        return (self.prompts - self.all_wrong) / self.prompts if self.prompts else 0.0

    @classmethod
    def of(cls, rows: Sequence[dict], seconds: float | None = None) -> "RolloutStats":
        _require_verdicts(rows)
        s = cls(seconds=seconds)
        finish, reasons = Counter(), Counter()
        for row in rows:
            flags = [c["correct"] for c in row["completions"]]
            s.prompts += 1
            s.completions += len(flags)
            s.correct += sum(flags)
            s.all_wrong += not any(flags)
            s.all_right += all(flags)
            s.mixed += any(flags) and not all(flags)
            for c in row["completions"]:
                finish[c.get("finish_reason", "unknown")] += 1
                if not c["correct"]:
                    reasons[str(c.get("reason", "")).split(":")[0].strip() or "incorrect"] += 1
        s.finish_reasons, s.reasons = dict(finish), dict(reasons.most_common())
        return s

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "pass_at_n": self.pass_at_n}

    def format(self) -> str:
        lines = [
            f"prompts {self.prompts}, completions {self.completions}, correct {self.correct} "
            f"(accuracy {self.accuracy:.1%}, pass@n {self.pass_at_n:.1%})",
            f"prompts all wrong {self.all_wrong}, all right {self.all_right}, mixed {self.mixed}",
            "finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())),
        ]
        if self.reasons:
            lines.append("why incorrect: " + ", ".join(f"{k} {v}" for k, v in self.reasons.items()))
        if self.seconds is not None:
            rate = self.completions / self.seconds if self.seconds > 0 else float("inf")
            lines.append(f"time {self.seconds:.2f}s ({rate:.3g} completions/s)")  # .3g: 0.4/s is not "0/s"
        return "\n".join(lines)


DEGENERATE_SHARE = 0.5  # warn when more than this share of completions is empty or cut at the length limit


def completion_warnings(rows: Sequence[dict], where: str = "rollouts") -> list[str]:
    """Loud warnings for rollouts that cannot be judged fairly: most completions empty (typically a raw-text
    prompt sent to an instruct model, which ends its turn at once) or most cut at ``max_new_tokens``.
    Logged at WARNING level and returned (empty list when the rollouts look sane)."""
    completions = [c for row in rows for c in row.get("completions", [])]
    total = len(completions)
    if not total:
        return []
    empty = sum(not str(c.get("text", "")).strip() for c in completions)
    cut = sum(c.get("finish_reason") == "length" for c in completions)
    out = []
    if empty > DEGENERATE_SHARE * total:
        out.append(f"{where}: {empty} of {total} completions are empty: the model ended its answer at once. "
                   "An instruct model given a raw-text prompt does this; send chat prompts (chat: auto/true).")
    if cut > DEGENERATE_SHARE * total:
        out.append(f"{where}: {cut} of {total} completions stopped at max_new_tokens, so their final answers are "
                   "missing; raise max_new_tokens or check the stop/end-of-turn token.")
    for message in out:
        logger.warning(message)
    return out


# ------------------------------------------------------------------------------------ records


def distinct_completions(completions: Iterable[dict]) -> list[dict]:
    """The completions with non-blank, distinct texts, first occurrence kept, in order."""
    seen, out = set(), []
    for c in completions:
        if c["text"].strip() and c["text"] not in seen:
            seen.add(c["text"])
            out.append(c)
    return out


def _carry(row: dict, exclude: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in exclude and k != "completions"}


def preference_pairs(
    rows: Sequence[dict],
    *,
    pairs_per_prompt: int = 1,
    fallback: str = "solution",
    seed: int = 0,
    prompt_field: str = "prompt",
) -> list[dict]:
    """DPO records from verified rows: a correct on-policy response (``chosen``) vs an incorrect one.

    Up to ``pairs_per_prompt`` distinct incorrect responses per prompt, each with a correct one
    (drawn without replacement while they last). A prompt with no correct response uses the gold
    ``solution`` as ``chosen`` when ``fallback="solution"`` (and is skipped when ``"none"`` or when it
    has no solution); a prompt with no incorrect response gives no pair. ``chosen_source`` says which.
    Other problem fields (``id``, ``answer``, ...) are carried over.
    """
    if fallback not in ("solution", "none"):
        raise ValueError(f"fallback must be 'solution' or 'none', got {fallback!r}")
    _require_verdicts(rows)
    rng = random.Random(seed)
    out = []
    for row in rows:
        wrong = distinct_completions(c for c in row["completions"] if not c["correct"])
        right = distinct_completions(c for c in row["completions"] if c["correct"])
        if not wrong:
            continue
        rng.shuffle(wrong)
        rng.shuffle(right)
        if right:
            chosen = [(c["text"], "policy") for c in right]
        elif fallback == "solution" and isinstance(row.get("solution"), str) and row["solution"].strip():
            chosen = [(row["solution"], "solution")]
        else:
            continue
        base = _carry(row, (prompt_field, "chosen", "rejected"))
        for k, rejected in enumerate(wrong[:pairs_per_prompt]):
            text, source = chosen[k % len(chosen)]
            out.append({**base, "prompt": row[prompt_field], "chosen": text, "rejected": rejected["text"], "chosen_source": source})
    return out


def negative_records(
    rows: Sequence[dict], *, samples: str = "none", max_per_prompt: int | None = None, prompt_field: str = "prompt"
) -> list[dict]:
    """Negatives-only records (``prompt``, ``rejected``) for D²O or an NPO forget set.

    Every distinct incorrect completion becomes a record. ``samples`` attaches the prompt's other
    completions as D²O reference samples: ``"all"`` (every completion: right when the rollout came from
    the reference model), ``"correct"`` (only verified-correct ones) or ``"none"``.
    """
    if samples not in ("none", "all", "correct"):
        raise ValueError(f"samples must be 'none', 'all' or 'correct', got {samples!r}")
    _require_verdicts(rows)
    out = []
    for row in rows:
        wrong = distinct_completions(c for c in row["completions"] if not c["correct"])[:max_per_prompt]
        base = _carry(row, (prompt_field, "rejected", "samples"))
        for c in wrong:
            record = {**base, "prompt": row[prompt_field], "rejected": c["text"]}
            if samples != "none":
                pool = [s["text"] for s in row["completions"] if samples == "all" or s["correct"]]
                if pool:
                    record["samples"] = pool
            out.append(record)
    return out


# ------------------------------------------------------------------------------------ files


def read_numbered_prompt_rows(path: str | os.PathLike, prompt_field: str = "prompt") -> list[tuple[int, dict]]:
    """``(line number, row)`` of the JSONL rows that each carry a prompt (text or chat messages); a file
    without rows, a bad line or a bad prompt raises :class:`RecordError` naming the file, line and field."""
    from alignkit.data.loading import read_json_lines

    source = str(path)
    rows = []
    for line_no, row in read_json_lines(path):
        if not isinstance(row, dict):
            raise RecordError(source, line_no, None, f"expected a JSON object, got {type(row).__name__}")
        prompt = row.get(prompt_field)
        if prompt is None:
            raise RecordError(source, line_no, prompt_field, "missing field")
        if prompt_field == "prompt":  # text, or chat messages with known roles and text content
            check_field("prompt", prompt, source=source, row=line_no)
        elif not (isinstance(prompt, str) and prompt.strip()) and not is_conversational(prompt):
            raise RecordError(source, line_no, prompt_field, "expected non-empty text or a list of chat messages")
        rows.append((line_no, row))
    if not rows:
        raise RecordError(source, None, None, "no rows (the file is empty)")
    return rows


def read_prompt_rows(path: str | os.PathLike, prompt_field: str = "prompt") -> list[dict]:
    """JSONL rows that each carry a prompt (text or chat messages); errors name the line and field."""
    return [row for _, row in read_numbered_prompt_rows(path, prompt_field)]


def read_numbered_rollouts(path: str | os.PathLike, *, verified: bool = False) -> tuple[list[dict], list[int]]:
    """Rollout rows from a JSONL file and their line numbers; a bad line or row raises :class:`RecordError`."""
    source = str(path)
    numbered = read_numbered_prompt_rows(path)
    rows, lines = [row for _, row in numbered], [line for line, _ in numbered]
    _check_rollout_rows(rows, source, lines)
    if verified:
        _require_verdicts(rows, source)
    return rows, lines


def read_rollouts(path: str | os.PathLike, *, verified: bool = False) -> list[dict]:
    """Rollout rows from a JSONL file; a bad line or row raises :class:`RecordError` naming it."""
    return read_numbered_rollouts(path, verified=verified)[0]


# ------------------------------------------------------------------------------------ one call


def build_negatives(
    engine: RolloutEngine,
    verifier: Verifier,
    problems: Sequence[dict],
    *,
    n: int = 8,
    sampling: SamplingConfig | None = None,
    num_workers: int | None = None,
) -> tuple[list[dict], RolloutStats]:
    """Sample ``n`` responses per problem, verify them: ``(verified rows, statistics)``."""
    start = time.perf_counter()
    rows = verify_rollouts(sample_rollouts(engine, problems, n, sampling), verifier, num_workers=num_workers)
    return rows, RolloutStats.of(rows, seconds=time.perf_counter() - start)
