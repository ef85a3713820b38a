"""Verifier throughput on this machine: math answers/s and code programs/s, as a Markdown table.

    python benchmarks/verify_speed.py [--math-n 20000] [--latex-fraction 0.1] [--code-n 200] [--rows mixed,rl,...]

Each row is timed by wall clock and by CPU time of every process involved (this one plus its worker
processes, read from ``/proc``), because other load on the machine distorts wall time. Rows run with
``num_workers`` 1 (serial, in this process) and 2 (worker processes). The worker pool is started and
warmed before the timing, as it stays warm across the calls of a training run; parse caches are
cleared and the pool restarted before each configuration, which gets fresh items.

Math workloads:

* **mixed**: synthetic arithmetic completions (:mod:`alignkit.tasks.arithmetic`; half the gold
  solution, half a solution with one slip) mixed with short LaTeX answers (``--latex-fraction``).
* **RL batch**: the same mix, 8 samples per problem, answers recurring as they do when a policy samples
  K times (the parses and judgements are cached).
* **arithmetic** / **GSM8K-style**: plain numbers only ("The answer is N." / a final ``#### N`` line),
  the plain-number path, which must stay at >= 10,000 answers/s per process.
* **LaTeX**: short answers in different but equivalent (or wrong) LaTeX forms: integer fractions
  and decimals, radicals, polynomials, in ``$\\boxed{...}$``.
* **LaTeX-heavy**: MATH-style solutions (several sentences of inline LaTeX, then a boxed answer) whose
  answers are fractions, radicals, tuples, intervals, sets, matrices, percentages, currency, degrees
  or several boxed values, against golds written differently; 30% wrong.

No (gold, completion) LaTeX pair occurs twice within a configuration.

Code workload (when a ``code`` verifier is registered): small Python functions in a ```python
fenced block, three assert tests each, a quarter of them buggy, judged outside the program. Rows at
``isolation="strict"`` (the kernel boundary, the level for RL rollouts) with 1, 2 and 4 workers (each
program's wall time is mostly process start-up latency, so more workers than cores still helps), and
at ``"none"`` with 2 for comparison. Their CPU time is this process plus every sandboxed program as
its cgroup counts it (bwrap does not pass its children's CPU time on to ``getrusage``).

Targets on 2 CPU cores: >= 2,000 math answers/s (mixed and RL batch, 2 workers), >= 10,000 plain-number
answers/s per process, >= 20 code programs/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import time

MATH_TARGET = 2000.0
PLAIN_TARGET = 10000.0
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


def gsm8k_items(n: int, seed: int) -> tuple[list[dict], list[str]]:
    """Arithmetic items written as GSM8K solutions: the steps in prose, then a final ``#### N`` line."""
    problems, completions = arithmetic_items(n, seed)
    out = []
    for text in completions:
        lines = text.splitlines()
        answer = lines[-1].removeprefix("The answer is ").rstrip(".")
        steps = " ".join(f"Then {line}." if i else f"First, {line}." for i, line in enumerate(lines[:-1]))
        out.append(f"{steps} So the result is {answer} in the end.\n#### {answer}")
    return problems, out


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
    return _unique_items(n, seed, _latex_item, "latex")


def _latex_heavy_item(rng: random.Random) -> tuple[str, str]:
    """A (gold answer, MATH-style completion) pair: inline LaTeX reasoning, then a boxed answer; 30% wrong."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    w = int(rng.random() < 0.3)
    kind = rng.randrange(10)
    if kind == 0:  # a fraction, unreduced
        gold, answer = rf"\frac{{{a}}}{{{b}}}", rf"\dfrac{{{a * c}}}{{{b * c + w}}}"
    elif kind == 1:  # a radical
        gold, answer = rf"{c}\sqrt{{{b}}}", rf"\sqrt{{{c * c * b + w}}}"
    elif kind == 2:  # a point / tuple
        gold, answer = rf"\left({a}, \frac{{{b}}}{{2}}\right)", rf"({a + w}, {b / 2:g})"
    elif kind == 3:  # an interval
        gold, answer = rf"[{a}, {a + b})", rf"[{a},{a + b + w})"
    elif kind == 4:  # a set of roots
        gold, answer = rf"\{{{a}, -{b}\}}", rf"\{{-{b}, {a + w}\}}"
    elif kind == 5:  # a matrix
        gold = rf"\begin{{pmatrix}} {a} & {b} \\\\ {c} & 1 \end{{pmatrix}}"
        answer = rf"\begin{{pmatrix}} {a} & {b} \\\\ {c + w} & 1 \end{{pmatrix}}"
    elif kind == 6:  # a percentage
        gold, answer = rf"{a}\%", rf"{a + w}\%"
    elif kind == 7:  # currency
        gold, answer = f"{a}.{b:02d}", rf"\${a + w}.{b:02d}"
    elif kind == 8:  # degrees
        gold, answer = rf"{a}^\circ", rf"{a + w}^{{\circ}}"
    else:  # several boxed answers
        gold = f"{a}, {a + b}"
        return gold, (
            rf"The equation $(x - {a})(x - {a + b}) = 0$ has two roots, and both satisfy $x > 1$. "
            rf"So $x = \boxed{{{a + b + w}}}$ or $x = \boxed{{{a}}}$."
        )
    return gold, (
        rf"Let $u = {a}$ and $v = {b}$, so that $u + v = {a + b}$ and $uv = {a * b}$. "
        rf"Substituting into $f(x) = x^2 - (u+v)x + uv$ gives $f({c}) = {c * c - (a + b) * c + a * b}$, "
        rf"and simplifying the remaining terms, we find that the answer is $\boxed{{{answer}}}$."
    )


def latex_heavy_items(n: int, seed: int) -> tuple[list[dict], list[str]]:
    """``n`` MATH-style LaTeX items (see :func:`_latex_heavy_item`), no pair twice."""
    return _unique_items(n, seed, _latex_heavy_item, "latex-heavy")


def _unique_items(n: int, seed: int, make, name: str) -> tuple[list[dict], list[str]]:
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    problems, completions = [], []
    while len(problems) < n:
        gold, completion = make(rng)
        if (gold, completion) in seen:
            continue
        seen.add((gold, completion))
        problems.append({"prompt": f"{name} {seed}-{len(problems)}", "answer": gold})
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


#: (isolation, num_workers) of the code rows; the target applies to strict with 2 workers on 2 cores
CODE_CONFIGS = (("strict", 1), ("strict", 2), ("strict", 4), ("none", 2))


def code_rows(n: int, seed: int) -> tuple[list[tuple], list[str]]:
    """The code rows (see the module docstring) and notes on levels that could not run here."""
    from alignkit.verifiers import get_verifier
    from alignkit.verifiers.sandbox import SandboxUnavailableError

    rows, notes = [], []
    for isolation, workers in CODE_CONFIGS:
        try:
            verifier = get_verifier("code", isolation=isolation)
        except SandboxUnavailableError as e:
            if not notes:
                notes.append(f"code, isolation={isolation}: not run: {e}")
            continue
        sandbox_cpu: list[float] = []
        run = verifier.run

        def counted_run(problem, completion, run=run, sandbox_cpu=sandbox_cpu):
            result, plan = run(problem, completion)
            sandbox_cpu.append(result.cpu_s)
            return result, plan

        verifier.run = counted_run
        verifier.verify_batch(*code_items(4, seed=999), num_workers=1)  # the boundary probe, outside the timing
        sandbox_cpu.clear()
        seed += 1
        items = code_items(n, seed)
        own = time.process_time()
        start = time.perf_counter()
        verdicts = verifier.verify_batch(*items, num_workers=workers)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - own + sum(sandbox_cpu)
        correct = sum(v.correct for v in verdicts)
        target = f">= {CODE_TARGET:,.0f}" if (isolation, workers) == ("strict", 2) else ""
        rows.append((f"code programs, isolation={isolation}", workers, len(verdicts), correct, seconds, cpu, target))
    return rows, notes


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
    """Empty the math verifier's and math-verify's parse caches in this process, and close the worker pool."""
    import functools

    from math_verify import parser

    from alignkit.verifiers import base
    from alignkit.verifiers import math as math_verifier_module

    for module in (math_verifier_module, parser):
        for value in vars(module).values():
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()
    close = getattr(base, "close_worker_pools", None)
    if close is not None:
        close()


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuClock:
    """CPU time of this process and of its child processes: live ones from /proc, exited ones from getrusage."""

    def __init__(self):
        self.children = {p.pid: _proc_cpu(p.pid) for p in multiprocessing.active_children()}
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.exited = usage.ru_utime + usage.ru_stime
        self.own = time.process_time()

    def elapsed(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = sum(_proc_cpu(p.pid) - self.children.get(p.pid, 0.0) for p in multiprocessing.active_children())
        return time.process_time() - self.own + usage.ru_utime + usage.ru_stime - self.exited + live


def timed(verifier, problems, completions, workers: int) -> tuple[float, float, list]:
    clock = CpuClock()
    start = time.perf_counter()
    verdicts = verifier.verify_batch(problems, completions, num_workers=workers)
    return time.perf_counter() - start, clock.elapsed(), verdicts


MATH_ROWS = {
    "mixed": "math, mixed ({arith:.0%} arithmetic, {latex:.0%} LaTeX)",
    "rl": "math, RL batch (8 samples/problem, same mix)",
    "arithmetic": "math, plain numbers: arithmetic (\"The answer is N.\")",
    "gsm8k": "math, plain numbers: GSM8K-style (#### N)",
    "latex": "math, LaTeX only (short boxed answers)",
    "latex_heavy": "math, LaTeX-heavy (MATH-style solutions)",
}


def math_workload(kind: str, n: int, latex_fraction: float, seed: int):
    if kind == "mixed":
        return mixed_items(n, latex_fraction, seed)
    if kind == "rl":
        return rl_batch_items(n, latex_fraction, seed)
    if kind == "arithmetic":
        return arithmetic_items(n, seed)
    if kind == "gsm8k":
        return gsm8k_items(n, seed)
    if kind == "latex":
        return latex_items(max(200, n // 10), seed)
    return latex_heavy_items(max(200, n // 10), seed)


def math_target(kind: str, workers: int) -> str:
    if kind in ("mixed", "rl") and workers == 2:
        return f">= {MATH_TARGET:,.0f}"
    if kind in ("arithmetic", "gsm8k") and workers == 1:
        return f">= {PLAIN_TARGET:,.0f} per process"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--math-n", type=int, default=20000, help="math answers per configuration")
    parser.add_argument("--latex-fraction", type=float, default=0.1, help="share of LaTeX answers in the mix")
    parser.add_argument("--code-n", type=int, default=200, help="code programs per configuration")
    parser.add_argument("--rows", default=",".join(MATH_ROWS) + ",code",
                        help="comma-separated rows to run: " + ", ".join(MATH_ROWS) + ", code")
    args = parser.parse_args()
    wanted = set(args.rows.split(","))

    from alignkit.verifiers import get_verifier, registered_verifiers

    rows = []
    math_verifier = get_verifier("math")
    timed(math_verifier, *latex_items(20, seed=999), workers=1)  # import SymPy/math-verify outside the timing

    seed = 0
    for kind, label in MATH_ROWS.items():
        if kind not in wanted:
            continue
        label = label.format(arith=1 - args.latex_fraction, latex=args.latex_fraction)
        for workers in (1, 2):
            seed += 1
            items = math_workload(kind, args.math_n, args.latex_fraction, seed)
            _clear_caches()  # no configuration reuses another's parses
            if workers > 1:  # start and warm the pool outside the timing, as in a training run
                timed(math_verifier, *latex_items(400, seed=10_000 + seed), workers=workers)
            seconds, cpu, verdicts = timed(math_verifier, *items, workers)
            correct = sum(v.correct for v in verdicts)
            rows.append((label, workers, len(verdicts), correct, seconds, cpu, math_target(kind, workers)))

    code_note = None
    if "code" not in wanted:
        pass
    elif "code" in registered_verifiers():
        more, notes = code_rows(args.code_n, seed)
        rows += more
        code_note = "\n".join(notes) or None
    else:
        code_note = "code: skipped, no 'code' verifier is registered (alignkit/verifiers/code.py is missing)"

    print(f"Verifier throughput, {os.cpu_count()} CPU cores (CPU s: this process and its workers)\n")
    print("| workload | num_workers | items | judged correct | wall s | items/s | CPU s | items/CPU-s | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, workers, n, correct, seconds, cpu, target in rows:
        per_cpu = f"{n / cpu:,.0f}" if cpu > 0 else "-"
        print(f"| {label} | {workers} | {n:,} | {correct:,} | {seconds:.2f} | {n / seconds:,.0f} | {cpu:.2f} | "
              f"{per_cpu} | {target} |")
    if code_note:
        print(f"\n{code_note}")


if __name__ == "__main__":
    main()
