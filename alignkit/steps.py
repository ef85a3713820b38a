"""Steps of a response and their Monte Carlo values: the credit assignment of per-step negatives.

Setlur et al. 2024, "RL on Incorrect Synthetic Data Scales the Efficiency of LLM Math Reasoning by
Eight-Fold" (arXiv:2406.14532), §5: an incorrect response ŷ is split into steps ŷ_1..ŷ_n, and the value
of each prefix ŷ_1..ŷ_i is estimated by rolling the model out from it.

Segmentation (:func:`segment_steps`) returns character spans that tile the text exactly
(``"".join(text[a:b] for a, b in spans) == text``), so a prefix is always ``text[:spans[i-1][1]]``:

``newline``   one step per line; the line break (``\\n``, ``\\r\\n`` or ``\\r``) ends its step, blank lines join
              the step before them, a last line without a newline is a step (the "The answer is N." line);
``step``      a step starts at each ``Step k:`` marker at the start of a line (any k, ``Step 10:`` too; case
              and spaces around the colon are free); text before the first marker is its own step unless
              it is blank; a trailing answer line stays in the last step;
``sentence``  a step ends after ``.``, ``!`` or ``?`` (and closing quotes/brackets) followed by white space,
              or at a line break; the white space belongs to the step it follows;
any other     a regular expression (text or compiled) whose matches END steps (kept with the step before).

In every mode a piece that is only white space is merged into the step before it (into the next one at
the very start), so no step is blank and nothing is lost.

Step values (:func:`estimate_step_values`). For prefix i = 0..n (i = 0 is the bare prompt),
Q_i = success rate of M continuations sampled from ``render_prompt(prompt) + prefix_i`` and verified on
``prefix_i + continuation``. With best-of-K (``best_of=K``, K = 5 in the paper) a continuation is M groups
of K samples and a group succeeds if any of its K succeeds, so Q_i estimates the success of the best-of-K
policy from that state. The full response is a finished state: Q_n is its own verdict (0 for an incorrect
response) and is not sampled. Every prefix of every response goes to the engine in ONE ``generate`` call
with ``n = M·K`` per prompt; identical (prompt, prefix) states (the bare prompt and shared first steps of
the samples of a problem) are sampled once. A :class:`StepValueCost` reports what it cost.

Advantage A_i = Q_i − Q_{i−1} (i = 1..n): how much step i changed the chance of success.

Per-step records (:func:`build_perstep_records`): problems -> on-policy samples (rollout engine) -> verdicts
(verifier) -> the distinct incorrect samples (up to ``negatives_per_problem`` per problem) -> their step
values (one batched generate call) -> the records :class:`~alignkit.trainers.perstep.PerStepTrainer` reads
(the ``perstep`` kind of :mod:`alignkit.data.records`)::

    {"prompt", "response", "steps": [...], "values": [Q_0..Q_n], "first_pit": c or None,
     "chosen": a correct solution or None, "chosen_source": "policy" | "solution" | None, ...problem fields}

``chosen`` is a distinct on-policy correct sample of the same problem (cycled over the negatives), else the
gold ``solution``.

First pit (:func:`first_pit`): the first step after which success is least likely,
c = min{ i ≥ 1 : Q_i = min_{j ≥ 1} Q_j }, counted only when it is a drop, Q_c < Q_0 (ties between steps:
the earliest; ties up to ``tol``). If no step lowers the value below the bare prompt's (flat values, or
all zero, as for a problem the model never solves) there is no pit and :func:`first_pit` returns ``None``:
no step of the response is to blame more than the start (first-pit DPO skips it or uses it whole, see
``PerStepConfig.no_pit``; the advantage-weighted form gives its steps the advantages as they are).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

from tqdm.auto import tqdm

from alignkit.cache import canonical_json
from alignkit.negatives import RolloutStats, distinct_completions, sample_rollouts, verify_rollouts
from alignkit.rollout.base import Prompt, RolloutEngine, SamplingConfig, prompt_token_ids, render_prompt

logger = logging.getLogger(__name__)

STEP_SPLITS = ("newline", "step", "sentence")
_NEWLINE = re.compile(r"\r\n|\n|\r")
_STEP_MARKER = re.compile(r"^[ \t]*step[ \t]*\d+[ \t]*:", re.IGNORECASE | re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?:[ \t]+|\r\n|\n|\r)+|\r\n|\n|\r")


# ------------------------------------------------------------------------------------ segmentation


def _merge_blank(cuts: list[int], text: str) -> list[tuple[int, int]]:
    """Spans from cut points (0 < c < len), with white-space-only pieces merged into a neighbour."""
    bounds = [0] + sorted({c for c in cuts if 0 < c < len(text)}) + [len(text)]
    spans: list[list[int]] = []
    for a, b in pairwise(bounds):
        if spans and not text[a:b].strip():
            spans[-1][1] = b  # blank piece: joins the step before it
        elif spans and not text[spans[-1][0] : spans[-1][1]].strip():
            spans[-1][1] = b  # a blank first piece joins the first real step
        else:
            spans.append([a, b])
    return [(a, b) for a, b in spans]


def segment_steps(text: str, split: str | re.Pattern = "newline") -> list[tuple[int, int]]:
    """Character spans ``[(start, end), ...]`` of the steps of ``text``; they tile it exactly.

    ``split``: ``newline``, ``step``, ``sentence`` or a regular expression whose matches end a step (see
    the module docstring). An empty text has no steps; a text that is only white space is one step.
    """
    if not text:
        return []
    if isinstance(split, str) and split == "step":
        cuts = [m.start() for m in _STEP_MARKER.finditer(text)]
        return _merge_blank(cuts, text)
    if isinstance(split, str) and split == "newline":
        pattern = _NEWLINE
    elif isinstance(split, str) and split == "sentence":
        pattern = _SENTENCE_END
    elif isinstance(split, re.Pattern):
        pattern = split
    elif isinstance(split, str):
        try:
            pattern = re.compile(split)
        except re.error as e:
            raise ValueError(f"step split {split!r} is neither one of {STEP_SPLITS} nor a valid regex: {e}") from e
    else:
        raise TypeError(f"split must be one of {STEP_SPLITS}, a regex string or a compiled pattern, got {type(split).__name__}")
    cuts = [m.end() for m in pattern.finditer(text) if m.end() > m.start()]
    return _merge_blank(cuts, text)


def split_steps(text: str, split: str | re.Pattern = "newline") -> list[str]:
    """The step texts of ``text`` (``"".join(split_steps(t)) == t``)."""
    return [text[a:b] for a, b in segment_steps(text, split)]


def prefixes(steps: Sequence[str]) -> list[str]:
    """Prefix texts ŷ_1..ŷ_i for i = 0..n (``""`` first)."""
    out, acc = [""], ""
    for s in steps:
        acc += s
        out.append(acc)
    return out


# ------------------------------------------------------------------------------------ values


def advantages(values: Sequence[float]) -> list[float]:
    """A_i = Q_i − Q_{i−1} for i = 1..n, from ``values`` = [Q_0, ..., Q_n]."""
    return [float(b) - float(a) for a, b in pairwise(values)]


def first_pit(values: Sequence[float], tol: float = 1e-9) -> int | None:
    """The first pit c (1-based step index) of ``values`` = [Q_0, ..., Q_n], or ``None`` without a drop.

    c is the earliest step whose value equals (within ``tol``) the lowest value of any step 1..n, provided
    that lowest value is below Q_0 by more than ``tol``; the rejected prefix of first-pit DPO is steps 1..c.
    """
    if len(values) < 2:
        return None
    lowest = min(values[1:])
    if not lowest < values[0] - tol:
        return None
    return next(i for i in range(1, len(values)) if values[i] <= lowest + tol)


@dataclass
class StepValueCost:
    """What estimating the step values cost."""

    responses: int = 0
    prefixes: int = 0  # states asked for (i = 0..n-1 of every response; finished states are not sampled)
    unique_prefixes: int = 0  # distinct (prompt, prefix) states actually sampled
    continuations: int = 0  # sequences generated = unique_prefixes · M · K
    tokens_generated: int = 0
    seconds: float = 0.0
    verify_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        rate = self.tokens_generated / self.seconds if self.seconds > 0 else 0.0
        return (f"step values: {self.responses} responses, {self.prefixes} prefixes ({self.unique_prefixes} unique), "
                f"{self.continuations} continuations, {self.tokens_generated} tokens generated, "
                f"{self.seconds:.1f}s ({rate:.0f} tok/s; verification {self.verify_seconds:.1f}s)")


@dataclass
class StepValues:
    """The step values of one response."""

    steps: list[str]
    values: list[float]  # Q_0..Q_n
    successes: list[int] = field(default_factory=list)  # successful continuations (groups) per sampled prefix

    @property
    def advantages(self) -> list[float]:
        return advantages(self.values)

    @property
    def first_pit(self) -> int | None:
        return first_pit(self.values)


def _state_key(prompt: Prompt, prefix: str) -> tuple[str, str]:
    return canonical_json(prompt), prefix


def continuation_prompt(tokenizer, prompt: Prompt, prefix: str) -> str:
    """The text an engine continues for a prefix: the rendered prompt (chat template with the generation
    prompt) followed by the prefix, as one TEXT prompt, so nothing (no end-of-turn, no new turn) is
    inserted between the prompt and the prefix. Engines tokenize text prompts with ``tokenizer(text)``;
    :func:`check_continuation_tokens` checks that this gives the training tokens."""
    return render_prompt(tokenizer, prompt) + prefix


def check_continuation_tokens(tokenizer, prompt: Prompt, prefix: str = "") -> None:
    """Raise ``ValueError`` when the engine's tokens of ``continuation_prompt(prompt, prefix)`` do not start
    with the trainers' prompt tokens (e.g. a tokenizer that adds a BOS token to an already rendered chat
    template, giving two BOS tokens), i.e. when continuations would be sampled from another state than the
    one the model is trained on."""
    trained = prompt_token_ids(tokenizer, prompt)
    engine = prompt_token_ids(tokenizer, continuation_prompt(tokenizer, prompt, prefix))
    # the last prompt token may merge with the prefix (BPE); compare all but it
    head = trained[:-1]
    if engine[: len(head)] != head:
        raise ValueError(
            "the rollout engine would see other prompt tokens for a prefix continuation than the trainers use "
            f"(first tokens {engine[:8]} vs {trained[:8]}); the tokenizer probably adds special tokens to the "
            "rendered prompt text"
        )


def estimate_step_values(
    engine: RolloutEngine,
    verifier,
    problems: Sequence[dict],
    responses: Sequence[str],
    *,
    tokenizer,
    num_rollouts: int = 4,
    best_of: int = 1,
    sampling: SamplingConfig | None = None,
    split: str | re.Pattern = "newline",
    steps: Sequence[Sequence[str]] | None = None,
    final_values: Sequence[float] | None = None,
    num_workers: int | None = None,
    prompt_field: str = "prompt",
    progress: bool = True,
) -> tuple[list[StepValues], StepValueCost]:
    """Monte Carlo step values of ``responses[j]`` (a response to ``problems[j]``), see the module docstring.

    ``steps`` gives the step texts directly (else ``split`` segments each response). ``final_values`` is
    the value of each full response (its verdict; default: verified here). ``num_rollouts`` = M and
    ``best_of`` = K: M·K continuations per distinct state in one ``engine.generate`` call.
    Returns ``(values per response, cost)``; the cost is also logged.
    """
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    if num_rollouts < 1 or best_of < 1:
        raise ValueError(f"num_rollouts and best_of must be >= 1, got {num_rollouts} and {best_of}")
    start = time.perf_counter()
    cost = StepValueCost(responses=len(responses))
    all_steps = [list(s) for s in steps] if steps is not None else [split_steps(r, split) for r in responses]
    for j, (s, r) in enumerate(zip(all_steps, responses)):
        if "".join(s) != r:
            raise ValueError(f"response {j}: its steps do not concatenate to the response")

    # the distinct states to sample: (prompt, prefix) of prefixes 0..n-1
    states: dict[tuple[str, str], int] = {}
    state_problem: list[dict] = []
    state_text: list[str] = []
    where: list[list[int]] = []
    for problem, s in zip(problems, all_steps):
        idx = []
        for prefix in prefixes(s)[:-1]:
            cost.prefixes += 1
            key = _state_key(problem[prompt_field], prefix)
            if key not in states:
                states[key] = len(states)
                state_problem.append(problem)
                state_text.append(prefix)
            idx.append(states[key])
        where.append(idx)
    cost.unique_prefixes = len(states)
    n = num_rollouts * best_of
    success_groups: list[int] = []
    if states:
        if tokenizer is not None:  # the engine must continue exactly the state the trainer scores
            check_continuation_tokens(tokenizer, state_problem[0][prompt_field], state_text[-1])
        engine_prompts = [continuation_prompt(tokenizer, p[prompt_field], t) for p, t in zip(state_problem, state_text)]
        logger.info("step values: sampling %d states x %d continuations in one call", len(states), n)
        groups = engine.generate(engine_prompts, n=n, sampling=sampling)
        if len(groups) != len(engine_prompts) or any(len(g) != n for g in groups):
            raise RuntimeError("the rollout engine returned a different number of completions than asked for")
        cost.continuations = len(states) * n
        cost.tokens_generated = sum(len(c.token_ids) for g in groups for c in g)
        verify_start = time.perf_counter()
        check_problems = [p for p, g in zip(state_problem, groups) for _ in g]
        check_texts = [t + c.text for t, g in zip(state_text, groups) for c in g]
        verdicts = verifier.verify_batch(check_problems, check_texts, num_workers=num_workers)
        cost.verify_seconds = time.perf_counter() - verify_start
        flags = [bool(v.correct) for v in verdicts]
        for s in tqdm(range(len(states)), desc="step values", disable=not progress or len(states) < 1000):
            row = flags[s * n : (s + 1) * n]
            success_groups.append(sum(any(row[g * best_of : (g + 1) * best_of]) for g in range(num_rollouts)))

    if final_values is None:
        verdicts = verifier.verify_batch(list(problems), list(responses), num_workers=num_workers)
        final_values = [1.0 if v.correct else 0.0 for v in verdicts]
    out = []
    for s, idx, final in zip(all_steps, where, final_values):
        succ = [success_groups[i] for i in idx]
        out.append(StepValues(steps=s, values=[k / num_rollouts for k in succ] + [float(final)], successes=succ))
    cost.seconds = time.perf_counter() - start
    logger.info(cost.format())
    return out, cost


# ------------------------------------------------------------------------------------ per-step records

_DROP = ("completions", "prompt", "response", "steps", "values", "first_pit", "chosen", "chosen_source")


def build_perstep_records(
    engine: RolloutEngine,
    verifier,
    problems: Sequence[dict],
    *,
    tokenizer,
    samples_per_problem: int = 8,
    negatives_per_problem: int = 8,
    sampling: SamplingConfig | None = None,
    value_sampling: SamplingConfig | None = None,
    num_rollouts: int = 4,
    best_of: int = 1,
    split="newline",
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Per-step records for ``problems`` (see the module docstring) and a report
    ``{"rollouts": RolloutStats dict, "step_values": StepValueCost dict, "records": count, ...}``."""
    start = time.perf_counter()
    rows = verify_rollouts(sample_rollouts(engine, problems, samples_per_problem, sampling, keep_token_data=False),
                           verifier, num_workers=num_workers)
    stats = RolloutStats.of(rows, seconds=time.perf_counter() - start)
    logger.info("per-step records: on-policy samples\n%s", stats.format())
    negatives, owners, chosen = [], [], []
    for row in rows:
        distinct = distinct_completions(row["completions"])
        right = [c["text"] for c in distinct if c["correct"]]
        wrong = [c["text"] for c in distinct if not c["correct"]][:negatives_per_problem]
        for k, text in enumerate(wrong):
            negatives.append(text)
            owners.append(row)
            if right:
                chosen.append((right[k % len(right)], "policy"))
            elif isinstance(row.get("solution"), str) and row["solution"].strip():
                chosen.append((row["solution"], "solution"))
            else:
                chosen.append((None, None))
    values, cost = estimate_step_values(
        engine, verifier, owners, negatives, tokenizer=tokenizer, num_rollouts=num_rollouts, best_of=best_of,
        sampling=value_sampling or sampling, split=split, final_values=[0.0] * len(negatives),
        num_workers=num_workers, progress=progress,
    ) if negatives else ([], StepValueCost())
    records = []
    for row, text, sv, (chosen_text, source) in zip(owners, negatives, values, chosen):
        base = {k: v for k, v in row.items() if k not in _DROP}
        records.append({**base, "prompt": row["prompt"], "response": text, "steps": sv.steps, "values": sv.values,
                        "first_pit": first_pit(sv.values), "chosen": chosen_text, "chosen_source": source})
    pits = sum(r["first_pit"] is not None for r in records)
    report = {
        "rollouts": stats.to_dict(),
        "step_values": cost.to_dict(),
        "records": len(records),
        "with_pit": pits,
        "with_chosen": sum(r["chosen"] is not None for r in records),
        "seconds": time.perf_counter() - start,
    }
    logger.info("per-step records: %d negatives (%d with a first pit) from %d problems; %s", len(records), pits,
                len(problems), cost.format())
    return records, report
