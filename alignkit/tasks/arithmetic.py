"""Synthetic multi-step arithmetic: problems, step-by-step solutions, gold answers, wrong solutions.

A problem is a chain of operations on a running value::

    prompt:   "Start with 7. Add 5. Multiply by 3. Subtract 4. What is the result?"
    solution: "7 + 5 = 12\\n12 * 3 = 36\\n36 - 4 = 32\\nThe answer is 32."
    answer:   "32"

A *wrong* solution makes one arithmetic slip at a chosen step and then computes the remaining steps
correctly from the wrong value, so its final answer is wrong and its first bad step is known. That is
the structure the per-step methods need (the first pit is the slip), and it gives DPO pairs with a
well-defined preferred side.

Everything is generated from a seed, offline, in milliseconds; a tiny model can learn the task on CPU.

**The chat variant** (:func:`make_chat_problems`, sources ``synthetic:arithmetic_chat_*``) is the task for
real instruct models: two-step problems asked as a chat with a system instruction and one worked example
(:func:`chat_prompt`). SmolLM2-135M-Instruct answers 38% of them right greedily (64 held-out problems),
with varied mistakes (skipped or invented steps, wrong sums, a missing final line), so its own samples
hold both correct and incorrect answers. Training and held-out problems come from disjoint halves of the
problem space (:func:`is_held_out`, a hash of the prompt), whatever the sizes and seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

OPERATIONS = {
    "add": ("Add {x}.", "+", lambda a, b: a + b),
    "sub": ("Subtract {x}.", "-", lambda a, b: a - b),
    "mul": ("Multiply by {x}.", "*", lambda a, b: a * b),
}


@dataclass(frozen=True)
class ArithmeticSpec:
    """Difficulty knobs of the task."""

    min_steps: int = 2
    max_steps: int = 3
    max_start: int = 9
    max_operand: int = 9
    max_multiplier: int = 3
    operations: tuple[str, ...] = ("add", "sub", "mul")
    nonnegative: bool = False  # subtract at most the running value: no negative intermediate results


def _solution_lines(start: int, ops: list[tuple[str, int]], slip_at: int | None, slip: int) -> tuple[list[str], int]:
    value = start
    lines = []
    for i, (name, x) in enumerate(ops):
        _, symbol, fn = OPERATIONS[name]
        result = fn(value, x)
        if i == slip_at:
            result += slip
        lines.append(f"{value} {symbol} {x} = {result}")
        value = result
    return lines, value


def make_problem(rng: random.Random, spec: ArithmeticSpec = ArithmeticSpec()) -> dict:
    """One problem record: ``prompt``, ``solution``, ``answer`` (str) and ``steps`` (solution lines)."""
    start = rng.randint(1, spec.max_start)
    n_steps = rng.randint(spec.min_steps, spec.max_steps)
    ops, value = [], start
    for _ in range(n_steps):
        name = rng.choice(spec.operations)
        if spec.nonnegative and name == "sub":
            x = rng.randint(1, min(spec.max_operand, value)) if value >= 1 else None
            if x is None:  # nothing to subtract from 0: add instead
                name, x = "add", rng.randint(1, spec.max_operand)
        else:
            x = rng.randint(2, spec.max_multiplier) if name == "mul" else rng.randint(1, spec.max_operand)
        ops.append((name, x))
        value = OPERATIONS[name][2](value, x)
    prompt = " ".join([f"Start with {start}."] + [OPERATIONS[n][0].format(x=x) for n, x in ops] + ["What is the result?"])
    lines, value = _solution_lines(start, ops, None, 0)
    return {
        "prompt": prompt,
        "solution": "\n".join(lines + [f"The answer is {value}."]),
        "answer": str(value),
        "steps": lines,
        "_start": start,
        "_ops": ops,
    }


def make_wrong_solution(problem: dict, rng: random.Random) -> tuple[str, int]:
    """A solution with one slip; returns ``(text, index of the first wrong step)``."""
    ops = problem["_ops"]
    slip_at = rng.randrange(len(ops))
    slip = rng.choice([-2, -1, 1, 2])
    lines, value = _solution_lines(problem["_start"], ops, slip_at, slip)
    return "\n".join(lines + [f"The answer is {value}."]), slip_at


def _public(problem: dict) -> dict:
    return {k: v for k, v in problem.items() if not k.startswith("_")}


def _distinct_problems(rng: random.Random, n: int, spec: ArithmeticSpec):
    """Yield ``n`` problems with distinct prompts, drawn from ``rng``."""
    seen, draws = set(), 0
    while len(seen) < n:
        draws += 1
        if draws > 50 * n:
            raise ValueError(f"cannot draw {n} distinct problems from {spec}")
        p = make_problem(rng, spec)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            yield p


def make_problems(n: int, seed: int = 0, spec: ArithmeticSpec = ArithmeticSpec()) -> list[dict]:
    """``n`` problem records (``prompt``, ``solution``, ``answer``, ``steps``), distinct prompts."""
    return [_public(p) for p in _distinct_problems(random.Random(seed), n, spec)]


def make_preference_pairs(n: int, seed: int = 0, spec: ArithmeticSpec = ArithmeticSpec()) -> list[dict]:
    """``n`` preference records: the gold solution as ``chosen``, a one-slip solution as ``rejected``.

    Each record also carries ``answer`` and ``first_error_step`` (0-based) for analysis.
    """
    rng = random.Random(seed)
    out = []
    for p in _distinct_problems(rng, n, spec):
        wrong, slip_at = make_wrong_solution(p, rng)
        out.append(
            {
                "prompt": p["prompt"],
                "chosen": p["solution"],
                "rejected": wrong,
                "answer": p["answer"],
                "first_error_step": slip_at,
            }
        )
    return out


# ------------------------------------------------------------------------------ the chat variant

TWO_STEPS = ArithmeticSpec(min_steps=2, max_steps=2, nonnegative=True)
CHAT_SYSTEM = "Solve the problem step by step, one operation per line. End with: The answer is N."
CHAT_EXAMPLE = ("Start with 4. Add 3. Multiply by 2. What is the result?", "4 + 3 = 7\n7 * 2 = 14\nThe answer is 14.")
HELD_OUT_SHARE = 5  # one prompt in 5 is held out


def chat_prompt(question: str) -> list[dict]:
    """The chat an instruct model gets: the instruction as a system message, one worked example as a
    previous turn, then the question."""
    example_q, example_a = CHAT_EXAMPLE
    return [
        {"role": "system", "content": CHAT_SYSTEM},
        {"role": "user", "content": example_q},
        {"role": "assistant", "content": example_a},
        {"role": "user", "content": question},
    ]


def is_held_out(question: str) -> bool:
    """Whether a problem belongs to the held-out part of the problem space (a stable hash of its text),
    so evaluation problems are never training problems, whatever sizes and seeds are drawn."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELD_OUT_SHARE == 0 or question == CHAT_EXAMPLE[0]


def _chat_problems(n: int, seed: int, split: str, spec: ArithmeticSpec):
    """Yield ``n`` distinct problems (with their private fields) of one part of the problem space."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng, seen, draws = random.Random(seed), set(), 0
    while len(seen) < n:
        draws += 1
        if draws > 200 * n:
            raise ValueError(f"cannot draw {n} distinct {split} problems from {spec}")
        p = make_problem(rng, spec)
        question = p["prompt"]
        if question in seen or question == CHAT_EXAMPLE[0] or is_held_out(question) != (split == "heldout"):
            continue
        seen.add(question)
        yield {**p, "prompt": chat_prompt(question), "question": question}


def make_chat_problems(n: int, seed: int = 0, split: str = "train", spec: ArithmeticSpec = TWO_STEPS) -> list[dict]:
    """``n`` problem records of the chat variant from the ``train`` or ``heldout`` part of the problem
    space: ``prompt`` (chat messages, :func:`chat_prompt`), ``question`` (its text), ``solution``,
    ``answer``, ``steps``."""
    return [_public(p) for p in _chat_problems(n, seed, split, spec)]


def make_chat_preference_pairs(n: int, seed: int = 0, split: str = "train", spec: ArithmeticSpec = TWO_STEPS) -> list[dict]:
    """Offline DPO pairs of the chat variant: the gold solution as ``chosen`` against a one-slip solution
    as ``rejected`` (``first_error_step`` says where it slips)."""
    rng = random.Random(seed + 1)
    out = []
    for p in _chat_problems(n, seed, split, spec):
        wrong, slip_at = make_wrong_solution(p, rng)
        out.append({"prompt": p["prompt"], "chosen": p["solution"], "rejected": wrong, "answer": p["answer"],
                    "first_error_step": slip_at})
    return out


def corpus(n: int = 400, seed: int = 1234) -> list[str]:
    """Text for training the tiny tokenizer: prompts and solutions of the task."""
    texts = []
    for p in make_problems(n, seed=seed, spec=ArithmeticSpec(min_steps=1, max_steps=4)):
        texts.append(p["prompt"])
        texts.append(p["solution"])
    return texts
