"""The ``code`` verifier: run the completion's Python program against the problem's tests, and judge
the results outside the program.

A problem's ``tests`` is either a list of snippets (usually ``assert`` statements; each is one test)
or one text test program (one test). The program checked is the completion's code
(:func:`extract_program`); the tests then run against its namespace in the same sandboxed process,
but they are taken apart first (:mod:`alignkit.verifiers.code_judge`): the sandbox evaluates the
program's side of each assertion (``add(2, 3)``) and returns plain data, and this process compares
it with the expected value, which never enters the sandbox. A test that cannot be taken apart (a
loop, a helper, ``assertRaises``...) runs inside the program's process, whose report is its own
word: such verdicts say so (``"... (1 of 3 tests judged inside the program, which could forge
them)"``), and ``in_process_tests=False`` refuses them instead.

Verdict: ``correct`` iff every test passes and no limit is hit; ``score`` is the fraction of tests
passed for a list (1 or 0 for a text test program or no tests), and 0 when a limit was hit;
``reason`` names the limit (``"limit: wall_time"``, ``"limit: network (socket.connect ...)"``), the
first failing test with what the program returned, or the exception that stopped the program.
``SystemExit(0)`` at the program's top level (or ``unittest.main()``/``sys.exit(0)`` ending a test
program) is a normal end, and output on stderr does not matter.

Without ``tests``: the program must exit 0 and, when the problem has an ``answer``, print it
(compared here after stripping trailing whitespace). A problem may give the program's standard input
as ``stdin``.

By default the code runs under the module name ``__alignkit_solution__`` when there are tests, so its
``if __name__ == "__main__":`` block (which often reads standard input) does not run; the tests run
as ``__main__``. Set ``skip_main_guard=False`` for plain concatenation semantics.

``isolation`` (see :mod:`alignkit.verifiers.sandbox`): ``"strict"`` (the kernel boundary or
nothing; the level for RL rollouts), ``"auto"`` (the boundary where it works, else no boundary with
a warning, and every verdict made without it ends with ``[isolation: none, ...]``), ``"none"``
(trusted code only).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from alignkit.verifiers.base import Verdict, Verifier, completion_text, register_verifier
from alignkit.verifiers.code_judge import TestPlan, plan_tests
from alignkit.verifiers.sandbox import ISOLATION_LEVELS, TAG, SandboxResult, resolve_isolation, run_sandboxed

__all__ = ["CodeVerifier", "extract_program"]

_PYTHON_LANGS = {"", "python", "py", "python3", "py3", "pycon"}
_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
_OPEN_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n", re.M)
_TAG_RE = re.compile(re.escape(TAG) + r": blocked (\w+): ([^\n]*)")


def extract_program(completion: str) -> str:
    """The last ```` ```python ```` (or ```` ```py ````, or bare ```` ``` ````) fenced block of
    ``completion``; an unclosed python fence at the end (a completion cut short) gives the text after
    it; otherwise the whole text."""
    blocks = [m.group(2) for m in _FENCE_RE.finditer(completion) if m.group(1).lower() in _PYTHON_LANGS]
    if blocks:
        return blocks[-1]
    fences = list(_OPEN_FENCE_RE.finditer(completion))
    if fences and fences[-1].group(1).lower() in _PYTHON_LANGS and len(fences) % 2 == 1:
        return completion[fences[-1].end() :]
    return completion


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _last_error_line(stderr: str) -> str:
    for line in reversed(stderr.splitlines()):
        if line.strip():
            return _short(line.strip(), 200)
    return ""


def _normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


class CodeVerifier(Verifier):
    """Runs the completion's program in :func:`run_sandboxed` and judges the problem's tests.

    ``cpu_seconds``, ``wall_seconds`` (the per-call ``timeout``; ``timeout=`` is accepted as an
    alias), ``memory_mb``, ``max_output_bytes``, ``file_size_mb`` and ``max_processes`` (tasks:
    processes and threads) are the sandbox limits of one program; ``num_workers`` (default: the CPU
    count) is how many programs :meth:`verify_batch` runs at once. ``isolation`` is ``"strict"``,
    ``"auto"`` or ``"none"`` (``"strict"`` raises :class:`~alignkit.verifiers.sandbox.SandboxUnavailableError`
    here, at construction, where the kernel boundary does not work). ``in_process_tests=False``
    fails tests that cannot be judged outside the program instead of running them inside it.
    """

    name = "code"
    problem_fields = (("tests",), ("answer",))  # tests, or the expected stdout

    def __init__(
        self,
        cpu_seconds: float = 5.0,
        wall_seconds: float = 10.0,
        memory_mb: int = 512,
        max_output_bytes: int = 64_000,
        num_workers: int | None = None,
        *,
        timeout: float | None = None,
        file_size_mb: int = 16,
        max_processes: int = 16,
        isolation: str = "auto",
        python: str = sys.executable,
        skip_main_guard: bool = True,
        in_process_tests: bool = True,
    ):
        wall = float(timeout if timeout is not None else wall_seconds)
        if wall <= 0 or cpu_seconds <= 0:
            raise ValueError("cpu_seconds and wall_seconds must be positive")
        if isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation is one of {ISOLATION_LEVELS}, got {isolation!r}")
        super().__init__(timeout=wall, num_workers=num_workers)
        self.cpu_seconds = float(cpu_seconds)
        self.memory_mb = int(memory_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.file_size_mb = int(file_size_mb)
        self.max_processes = int(max_processes)
        self.isolation = isolation
        self.python = python
        self.skip_main_guard = skip_main_guard
        self.in_process_tests = bool(in_process_tests)
        if isolation == "strict":
            resolve_isolation("strict", python)  # refuse now, not at every verdict

    @property
    def wall_seconds(self) -> float:
        return self.timeout

    # ------------------------------------------------------------------ one program

    def plan(self, problem: Mapping) -> TestPlan | None:
        """How the problem's tests are run and judged (``None`` without tests)."""
        tests = problem.get("tests")
        if tests is None:
            return None
        if not isinstance(tests, (str, Sequence)):
            raise TypeError(f"a problem's tests are text or a list of texts, got {type(tests).__name__}")
        return plan_tests(tests, allow_in_process=self.in_process_tests)

    def run(self, problem: Mapping, completion) -> tuple[SandboxResult, TestPlan | None]:
        """The sandbox result for one (problem, completion) and the plan its tests were run by."""
        program = extract_program(completion_text(completion))
        plan = self.plan(problem)
        stdin = problem.get("stdin")
        result = run_sandboxed(
            program,
            stdin=stdin if isinstance(stdin, str) else "",
            cpu_seconds=self.cpu_seconds,
            wall_seconds=self.timeout,
            memory_mb=self.memory_mb,
            file_size_mb=self.file_size_mb,
            max_processes=self.max_processes,
            max_output_bytes=self.max_output_bytes,
            python=self.python,
            steps=plan.steps if plan is not None else None,
            main_name="__alignkit_solution__" if plan is not None and plan.tests and self.skip_main_guard else "__main__",
            isolation=self.isolation,
        )
        return result, plan

    def verify(self, problem: Mapping, completion) -> Verdict:
        result, plan = self.run(problem, completion)
        return self.judge(problem, result, plan)

    def judge(self, problem: Mapping, result: SandboxResult, plan: TestPlan | None) -> Verdict:
        """The verdict for a sandbox result (see the module docstring)."""
        verdict = self._judge(problem, result, plan)
        if result.fallback is not None:
            verdict = Verdict(verdict.correct, verdict.score,
                              f"{verdict.reason} [isolation: none, the kernel boundary is unavailable: {result.fallback}]")
        return verdict

    def _judge(self, problem: Mapping, result: SandboxResult, plan: TestPlan | None) -> Verdict:
        if result.limit_hit is not None:
            detail = ""
            for item in result.blocked:
                kind, _, what = item.partition(": ")
                if kind == result.limit_hit:
                    detail = f" ({_short(what, 120)})"
                    break
            else:  # refused imports are not reported on the pipe (libraries probe for them)
                m = _TAG_RE.search(result.stderr)
                if m and m.group(1) == result.limit_hit:
                    detail = f" ({_short(m.group(2), 120)})"
            return Verdict(False, 0.0, f"limit: {result.limit_hit}{detail}")

        if plan is None:
            if result.returncode != 0:
                return Verdict(False, 0.0, self._crash_reason(result))
            answer = problem.get("answer")
            if answer is not None:
                expected, got = _normalize_output(str(answer)), _normalize_output(result.stdout)
                if expected != got:
                    return Verdict(False, 0.0, f"wrong output: expected {_short(expected, 60)!r}, got {_short(got, 60)!r}")
                return Verdict(True, 1.0, "ok: output matches the answer")
            return Verdict(True, 1.0, "ok: ran without error (no tests)")

        if result.steps is None:
            if result.report_problem:
                return Verdict(False, 0.0, f"error: {result.report_problem}")
            if result.returncode != 0:
                return Verdict(False, 0.0, self._crash_reason(result))
            return Verdict(False, 0.0, "no test report: the program exited before the tests ran")

        outcomes = plan.judge(result.steps)
        total = len(outcomes)
        passed = sum(o.passed for o in outcomes)
        inside = sum(not o.outside for o in outcomes)
        correct = passed == total
        score = (1.0 if correct else 0.0) if plan.text_program or total == 0 else passed / total
        if plan.text_program:
            note = " (judged inside the program, which could forge it)" if inside else ""
        else:
            note = f" ({inside} of {total} tests judged inside the program, which could forge them)" if inside else ""
        if correct:
            what = "the test program passed" if plan.text_program else f"{passed}/{total} tests passed"
            return Verdict(True, score, f"ok: {what}{note}")
        i, failed = next((i, o) for i, o in enumerate(outcomes) if not o.passed)
        error = failed.error_type or "error"
        if failed.error:
            error += f": {_short(failed.error, 200)}"
        if plan.text_program:
            return Verdict(False, score, f"test program failed: {error}{note}")
        return Verdict(False, score, f"test {i + 1} of {total} failed ({_short(plan.tests[i].label, 80)}): {error}{note}")

    @staticmethod
    def _crash_reason(result: SandboxResult) -> str:
        line = _last_error_line(result.stderr)
        if result.returncode < 0:
            return f"error: killed by signal {-result.returncode}"
        return f"error: {line}" if line else f"error: exit status {result.returncode}"

    # ------------------------------------------------------------------ batches

    def safe_verify(self, problem: Mapping, completion) -> Verdict:
        """``verify`` with exceptions turned into incorrect verdicts. No ``SIGALRM`` timer: the
        sandbox bounds each program's wall time itself, and this runs in threads."""
        try:
            return self.verify(problem, completion_text(completion))
        except Exception as e:  # a verifier bug, or a sandbox that cannot start, must not lose the batch
            return Verdict(False, 0.0, f"error: {type(e).__name__}: {e}")

    def verify_batch(
        self, problems: Sequence[Mapping], completions: Sequence, *, num_workers: int | None = None
    ) -> list[Verdict]:
        """One verdict per (problem, completion) pair, in order; ``num_workers`` programs at a time
        (threads: each program is a sandboxed subprocess already)."""
        texts, workers = self._batch_texts(problems, completions, num_workers)
        workers = max(1, min(workers, len(texts)))
        if workers <= 1:
            return [self.safe_verify(p, t) for p, t in zip(problems, texts)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-verifier") as pool:
            return list(pool.map(self.safe_verify, problems, texts))


register_verifier("code", CodeVerifier)
