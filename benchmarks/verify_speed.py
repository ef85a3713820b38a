"""Verifier throughput on this machine: math answers/s and code programs/s, as a Markdown table.

    python benchmarks/verify_speed.py [--math-n 20000] [--latex-fraction 0.1] [--code-n 200]

Math workload: synthetic arithmetic completions (:mod:`alignkit.tasks.arithmetic`; half the gold
solution, half a solution with one slip) mixed with LaTeX answers in different but equivalent (or
wrong) forms: integer fractions and decimals, which are plain numbers (the fast path), and radicals
and polynomials, which need math-verify, half each. No (gold, completion) LaTeX pair occurs twice,
and the parse caches are cleared before each configuration, which gets fresh items.
It runs with ``num_workers`` 1 (serial, in this process) and 2 (worker processes; the pool start is
included in the time). The "RL batch" row draws 8 samples per problem, so answers recur as they do
in an RL step (the math-verify parses and judgements are cached). Rows for the arithmetic-only and
LaTeX-only workloads show the two paths' costs apart.

Code workload (when a ``code`` verifier is registered): small Python functions in a ```python
fenced block, three assert tests each, a quarter of them buggy.

Targets on 2 CPU cores: >= 2,000 math answers/s, >= 20 code programs/s.
"""

from __future__ import annotations

import argparse
import os
import random
import time

MATH_TARGET = 2000.0
CODE_TARGET = 20.0


# ------------------------------------------------------------------------------------ workloads


def arithmetic_items(n: int, seed: int) -> tuple[list[dict], list[str]]:
    """``n`` arithmetic problems, each with its gold solution or a one-slip wrong one (half each)."""
    from alignkit.tasks.arithmetic import ArithmeticSpec, make_preference_pairs

    rng = random.Random(seed)
    pairs = make_preference_pairs(n, seed=seed, spec=ArithmeticSpec(min_steps=2, max_steps=5, max_operand=20))
    problems = [{"prompt": p["prompt"], "answer": p["answer"]} for p in pairs]
    completions = [p["chosen"] if rng.random() < 0.5 else p["rejected"] for p in pairs]
    return problems, completions


def _latex_item(rng: random.Random) -> tuple[str, str]:
    """A (gold answer, completion) pair in LaTeX, 30% of them wrong."""
    a = rng.randint(2, 2000)
    b = rng.choice([2, 3, 5, 6, 7, 10, 11, 13, 14, 15, 17, 19, 21, 22, 23])  # square-free
    k = rng.randint(2, 9)
    wrong = int(rng.random() < 0.3)
    kind = rng.randrange(4)
    if kind == 0:  # fraction vs an unreduced fraction
        gold, pred = rf"\frac{{{a}}}{{{b}}}", rf"\frac{{{a * k}}}{{{b * k + wrong}}}"
    elif kind == 1:  # a radical vs its unsimplified form
        gold, pred = rf"{a}\sqrt{{{b}}}", rf"\sqrt{{{a * a * b + wrong}}}"
    elif kind == 2:  # a squared binomial vs its expansion
        gold, pred = f"(x+{a})^2", f"x^2+{2 * a + wrong}x+{a * a}"
    else:  # a fraction vs a decimal
        gold, pred = rf"\frac{{{a}}}{{8}}", f"{a / 8 + wrong:g}"
    return gold, f"Simplifying, we get $\\boxed{{{pred}}}$."


def latex_items(n: int, seed: int) -> tuple[list[dict], list[str]]:
    """``n`` LaTeX items, no (gold, completion) pair twice; ``seed`` tells configurations apart."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    problems, completions = [], []
    while len(problems) < n:
        gold, completion = _latex_item(rng)
        if (gold, completion) in seen:
            continue
        seen.add((gold, completion))
        problems.append({"prompt": f"latex {seed}-{len(problems)}", "answer": gold})
        completions.append(completion)
    return problems, completions


def mixed_items(n: int, latex_fraction: float, seed: int) -> tuple[list[dict], list[str]]:
    n_latex = round(n * latex_fraction)
    p1, c1 = arithmetic_items(n - n_latex, seed)
    p2, c2 = latex_items(n_latex, seed)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    problems, completions = p1 + p2, c1 + c2
    return [problems[i] for i in order], [completions[i] for i in order]


def rl_batch_items(n: int, latex_fraction: float, seed: int, samples: int = 8) -> tuple[list[dict], list[str]]:
    """``n`` completions as an RL step makes them: ``samples`` per problem, answers often repeated.

    Each sample of a mixed-workload problem is that problem's completion (right or wrong) or one of
    two fixed wrong ones, so the same answer strings recur, as they do when a policy samples K times.
    """
    rng = random.Random(seed)
    n_problems = max(1, n // samples)
    base_problems, right = mixed_items(n_problems, latex_fraction, seed)
    problems, completions = [], []
    for problem, completion in zip(base_problems, right):
        gold = problem["answer"]
        wrong = [f"The answer is {gold}1.", f"So $\\boxed{{{gold}+1}}$."]
        for _ in range(samples):
            problems.append(problem)
            completions.append(completion if rng.random() < 0.5 else rng.choice(wrong))
    return problems, completions


# (function name, a right program, a buggy program, test inputs, the right outputs' function)
CODE_TASKS = [
    (
        "add",
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return a - b\n",
        [(1, 2), (0, 0), (-3, 5)],
        lambda a, b: a + b,
    ),
    (
        "square",
        "def square(x):\n    return x * x\n",
        "def square(x):\n    return x + x\n",
        [(3,), (0,), (-4,)],
        lambda x: x * x,
    ),
    (
        "is_palindrome",
        "def is_palindrome(s):\n    return s == s[::-1]\n",
        "def is_palindrome(s):\n    return s == s[::1]\n",
        [("abba",), ("abc",), ("",)],
        lambda s: s == s[::-1],
    ),
    (
        "fib",
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n    return a\n",
        [(1,), (7,), (10,)],
        lambda n: [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55][n],
    ),
]


def code_items(n: int, seed: int) -> tuple[list[dict], list[str]]:
    """``n`` (problem with assert tests, fenced-program completion) pairs, a quarter buggy."""
    rng = random.Random(seed)
    problems, completions = [], []
    for i in range(n):
        name, good, bad, cases, fn = CODE_TASKS[i % len(CODE_TASKS)]
        tests = [f"assert {name}({', '.join(map(repr, args))}) == {fn(*args)!r}" for args in cases]
        program = bad if rng.random() < 0.25 else good
        problems.append({"prompt": f"Write {name}.", "tests": tests})
        completions.append(f"Here is my solution.\n\n```python\n{program}```\n")
    return problems, completions


# ------------------------------------------------------------------------------------ timing


def _clear_caches() -> None:
    from math_verify import parser

    from alignkit.verifiers import math as math_verifier_module

    math_verifier_module._mv_parse.cache_clear()
    math_verifier_module.symbolic_match.cache_clear()
    for name in ("parse_latex_cached", "parse_expr_cached"):
        cached = getattr(parser, name, None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()


def timed(verifier, problems, completions, workers: int) -> tuple[float, list]:
    start = time.perf_counter()
    verdicts = verifier.verify_batch(problems, completions, num_workers=workers)
    return time.perf_counter() - start, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--math-n", type=int, default=20000, help="math answers per configuration")
    parser.add_argument("--latex-fraction", type=float, default=0.1, help="share of LaTeX answers in the mix")
    parser.add_argument("--code-n", type=int, default=200, help="code programs per configuration")
    args = parser.parse_args()

    from alignkit.verifiers import get_verifier, registered_verifiers

    rows = []
    math_verifier = get_verifier("math")
    timed(math_verifier, *latex_items(20, seed=999), workers=1)  # import SymPy/math-verify outside the timing
    _clear_caches()

    seed = 0
    workloads = [
        (f"math, mixed ({1 - args.latex_fraction:.0%} arithmetic, {args.latex_fraction:.0%} LaTeX)", "mixed"),
        ("math, RL batch (8 samples/problem, same mix)", "rl"),
        ("math, arithmetic only", "arithmetic"),
        ("math, LaTeX only", "latex"),
    ]
    for label, kind in workloads:
        for workers in (1, 2):
            seed += 1
            if kind == "mixed":
                items = mixed_items(args.math_n, args.latex_fraction, seed)
            elif kind == "rl":
                items = rl_batch_items(args.math_n, args.latex_fraction, seed)
            elif kind == "arithmetic":
                items = arithmetic_items(args.math_n, seed)
            else:
                items = latex_items(max(200, args.math_n // 10), seed)
            _clear_caches()  # no configuration reuses another's parses
            seconds, verdicts = timed(math_verifier, *items, workers)
            correct = sum(v.correct for v in verdicts)
            target = f">= {MATH_TARGET:,.0f}" if kind in ("mixed", "rl") else ""
            rows.append((label, workers, len(verdicts), correct, seconds, len(verdicts) / seconds, target))

    code_note = None
    if "code" in registered_verifiers():
        code_verifier = get_verifier("code")
        timed(code_verifier, *code_items(4, seed=999), workers=1)
        for workers in (1, 2):
            seed += 1
            seconds, verdicts = timed(code_verifier, *code_items(args.code_n, seed), workers)
            correct = sum(v.correct for v in verdicts)
            rows.append(
                (
                    "code programs",
                    workers,
                    len(verdicts),
                    correct,
                    seconds,
                    len(verdicts) / seconds,
                    f">= {CODE_TARGET:,.0f}",
                )
            )
    else:
        code_note = "code: skipped, no 'code' verifier is registered (alignkit/verifiers/code.py is missing)"

    print(f"Verifier throughput, {os.cpu_count()} CPU cores\n")
    print("| workload | num_workers | items | judged correct | seconds | items/s | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, workers, n, correct, seconds, rate, target in rows:
        print(f"| {label} | {workers} | {n:,} | {correct:,} | {seconds:.2f} | {rate:,.0f} | {target} |")
    if code_note:
        print(f"\n{code_note}")


if __name__ == "__main__":
    main()
