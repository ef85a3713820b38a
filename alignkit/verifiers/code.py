"""The ``code`` verifier: run the completion's Python program against the problem's tests, sandboxed.

A problem's ``tests`` is either a list of snippets (usually ``assert`` statements) or one text test
program. The program checked is the completion's code (:func:`extract_program`) followed by the
tests: the code runs first, then each test runs in the code's namespace, so tests can call the
functions it defines. A list of tests costs one process, not one per test: a generated harness runs
each snippet in ``try``/``except`` and reports through a private pipe with a per-run nonce, so the
program cannot print its way to a pass (see :mod:`alignkit.verifiers.sandbox`).

Verdict: ``correct`` iff the program exits 0, every test passes and no limit is hit; ``score`` is the
fraction of tests passed for a list (1 or 0 for a text test program or no tests), and 0 when a limit
was hit; ``reason`` names the limit (``"limit: wall_time"``, ``"limit: network (socket.connect ...)"``),
the first failing test, or the exception that stopped the program.

Without ``tests``: the program must exit 0 and, when the problem has an ``answer``, print it (compared
after stripping trailing whitespace). A problem may give the program's standard input as ``stdin``.

By default the code runs under the module name ``__alignkit_solution__`` when there are tests, so its
``if __name__ == "__main__":`` block (which often reads standard input) does not run; the tests run
as ``__main__``. Set ``skip_main_guard=False`` for plain concatenation semantics.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from alignkit.verifiers.base import Verdict, Verifier, completion_text, register_verifier
from alignkit.verifiers.sandbox import TAG, SandboxResult, run_sandboxed

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
    """Runs the completion's program and the problem's tests in :func:`run_sandboxed`.

    ``cpu_seconds``, ``wall_seconds`` (the per-call ``timeout``; ``timeout=`` is accepted as an
    alias), ``memory_mb``, ``max_output_bytes`` and ``file_size_mb`` are the sandbox limits of one
    program; ``num_workers`` (default: the CPU count) is how many programs :meth:`verify_batch` runs
    at once. ``isolation`` and ``python`` are passed to :func:`run_sandboxed`.
    """

    name = "code"

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
        isolation: str = "auto",
        python: str = sys.executable,
        skip_main_guard: bool = True,
    ):
        wall = float(timeout if timeout is not None else wall_seconds)
        if wall <= 0 or cpu_seconds <= 0:
            raise ValueError("cpu_seconds and wall_seconds must be positive")
        super().__init__(timeout=wall, num_workers=num_workers)
        self.cpu_seconds = float(cpu_seconds)
        self.memory_mb = int(memory_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.file_size_mb = int(file_size_mb)
        self.isolation = isolation
        self.python = python
        self.skip_main_guard = skip_main_guard

    @property
    def wall_seconds(self) -> float:
        return self.timeout

    # ------------------------------------------------------------------ one program

    def run(self, problem: Mapping, completion) -> tuple[SandboxResult, list[str] | None]:
        """The sandbox result for one (problem, completion) and the test snippets it ran."""
        program = extract_program(completion_text(completion))
        tests = problem.get("tests")
        if tests is None:
            checks = None
        elif isinstance(tests, str):
            checks = [tests]
        elif isinstance(tests, Sequence):
            checks = [t if isinstance(t, str) else str(t) for t in tests]
        else:
            raise TypeError(f"a problem's tests are text or a list of texts, got {type(tests).__name__}")
        stdin = problem.get("stdin")
        result = run_sandboxed(
            program,
            stdin=stdin if isinstance(stdin, str) else "",
            cpu_seconds=self.cpu_seconds,
            wall_seconds=self.timeout,
            memory_mb=self.memory_mb,
            file_size_mb=self.file_size_mb,
            max_output_bytes=self.max_output_bytes,
            python=self.python,
            checks=checks,
            main_name="__alignkit_solution__" if checks and self.skip_main_guard else "__main__",
            isolation=self.isolation,
        )
        return result, checks

    def verify(self, problem: Mapping, completion) -> Verdict:
        result, checks = self.run(problem, completion)
        return self.judge(problem, result, checks)

    def judge(self, problem: Mapping, result: SandboxResult, checks: list[str] | None) -> Verdict:
        """The verdict for a sandbox result (see the module docstring)."""
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

        if checks is None:
            if result.returncode != 0:
                return Verdict(False, 0.0, self._crash_reason(result))
            answer = problem.get("answer")
            if answer is not None:
                expected, got = _normalize_output(str(answer)), _normalize_output(result.stdout)
                if expected != got:
                    return Verdict(False, 0.0, f"wrong output: expected {_short(expected, 60)!r}, got {_short(got, 60)!r}")
                return Verdict(True, 1.0, "ok: output matches the answer")
            return Verdict(True, 1.0, "ok: ran without error (no tests)")

        if result.checks is None:
            if result.returncode != 0:
                return Verdict(False, 0.0, self._crash_reason(result))
            return Verdict(False, 0.0, "no test report: the program exited before the tests ran")

        total = len(result.checks)
        passed = sum(c.passed for c in result.checks)
        text_program = isinstance(problem.get("tests"), str)
        all_passed = passed == total
        correct = all_passed and result.returncode == 0
        if text_program or total == 0:
            score = 1.0 if correct else 0.0
        else:
            score = passed / total
        if correct:
            return Verdict(True, score, f"ok: {passed}/{total} tests passed" if not text_program else "ok: the test program passed")
        if not all_passed:
            i, failed = next((i, c) for i, c in enumerate(result.checks) if not c.passed)
            error = failed.error_type or "error"
            if failed.error:
                error += f": {_short(failed.error, 120)}"
            if text_program:
                return Verdict(False, score, f"test program failed: {error}")
            return Verdict(False, score, f"test {i + 1} of {total} failed ({_short(checks[i], 80)}): {error}")
        return Verdict(False, score, f"exit status {result.returncode}")

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
        except Exception as e:  # a verifier bug must not lose the batch
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
