"""String and number matching: the verifier for short-answer tasks that need no symbolic math.

``MatchVerifier(mode=...)`` compares a candidate taken from the completion with the problem's
``answer``:

``exact``       the candidate equals ``str(answer)`` character for character
``normalized``  equal after casefolding, collapsing whitespace and dropping trailing punctuation
                (``"  Paris. "`` matches ``"paris"``)
``regex``       ``answer`` is a regular expression; it must match the whole candidate
                (``search=True``: anywhere in it)
``numeric``     both are plain numbers (``1,234``, ``-2.5``, ``3/4``) equal within ``abs_tol`` or
                ``rel_tol``

The candidate is the whole completion (``extract="none"``), its last non-empty line
(``"last_line"``), or the final answer :func:`alignkit.verifiers.math.extract_answer` finds
(``"answer"``: the answer math-verify extracts, else a word answer in ``\\boxed{}``, after "the answer
is" or ``####``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import lru_cache

from alignkit.verifiers.base import Verdict, Verifier, completion_text, register_verifier
from alignkit.verifiers.math import extract_answer, parse_number

MODES = ("exact", "normalized", "regex", "numeric")
EXTRACTS = ("none", "last_line", "answer")

_TRAILING_PUNCTUATION = ".,;:!?\u3002"
_ASCII_TRAILING_PUNCTUATION = "".join(c for c in _TRAILING_PUNCTUATION if c.isascii())


def normalize(text: str) -> str:
    """Casefolded, whitespace collapsed to single spaces, stripped, trailing punctuation dropped."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING_PUNCTUATION).rstrip()


def normalize_arrow(strings):
    """:func:`normalize` of an Arrow string array whose strings are ASCII, vectorised (``pyarrow.compute``).

    ``utf8_split_whitespace`` splits on exactly the ASCII characters ``str.split()`` splits on (with the
    \\x1c-\\x1f separators); it keeps empty edge pieces, which the trim removes. Beyond ASCII, casefolding
    is not lowercasing: give non-ASCII strings to :func:`normalize`.
    """
    import pyarrow.compute as pc

    arr = pc.ascii_lower(strings)
    arr = pc.binary_join(pc.utf8_split_whitespace(arr), " ")
    arr = pc.ascii_trim(arr, characters=" ")
    arr = pc.ascii_rtrim(arr, characters=_ASCII_TRAILING_PUNCTUATION)
    return pc.ascii_rtrim(arr, characters=" ")


def last_line(text: str) -> str | None:
    """The last line of ``text`` that is not blank, stripped; ``None`` when every line is blank."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return None


def candidate(text: str, extract: str) -> str | None:
    """The part of completion ``text`` to compare, per ``extract`` (``None``: nothing found)."""
    if extract == "none":
        return text
    if extract == "last_line":
        return last_line(text)
    if extract == "answer":
        return extract_answer(text)
    raise ValueError(f"unknown extract {extract!r}; choose one of {', '.join(EXTRACTS)}")


@lru_cache(maxsize=1024)
def _compile(pattern: str, ignore_case: bool) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as e:
        raise ValueError(f"the problem's 'answer' is not a valid regular expression {pattern!r}: {e}") from None


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@register_verifier("match")
class MatchVerifier(Verifier):
    """Compares a completion (or an answer extracted from it) with the problem's ``answer``.

    ``mode``: ``exact`` | ``normalized`` | ``regex`` | ``numeric`` (see the module docstring).
    ``extract``: ``none`` | ``last_line`` | ``answer``. ``search`` (regex mode) accepts a match
    anywhere instead of a full match; ``ignore_case`` (regex mode) compiles the pattern with
    ``re.IGNORECASE``. ``abs_tol`` / ``rel_tol`` (numeric mode) are :func:`math.isclose`'s.
    """

    name = "match"
    problem_fields = (("answer",),)

    def __init__(
        self,
        mode: str = "normalized",
        extract: str = "none",
        *,
        search: bool = False,
        ignore_case: bool = False,
        abs_tol: float = 1e-9,
        rel_tol: float = 1e-6,
        timeout: float = 5.0,
        num_workers: int | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown match mode {mode!r}; choose one of {', '.join(MODES)}")
        if extract not in EXTRACTS:
            raise ValueError(f"unknown extract {extract!r}; choose one of {', '.join(EXTRACTS)}")
        if abs_tol < 0 or rel_tol < 0:
            raise ValueError(f"tolerances must be >= 0, got abs_tol={abs_tol}, rel_tol={rel_tol}")
        super().__init__(timeout=timeout, num_workers=num_workers)
        self.mode = mode
        self.extract = extract
        self.search = search
        self.ignore_case = ignore_case
        self.abs_tol = abs_tol
        self.rel_tol = rel_tol

    def verify(self, problem: Mapping, completion: str) -> Verdict:
        answer = problem.get("answer")
        if answer is None:
            raise ValueError("the match verifier needs the problem's 'answer' field")
        got = candidate(completion, self.extract)
        if got is None:
            return Verdict(False, 0.0, "no answer found")
        if self.mode == "regex":
            return self._verify_regex(str(answer), got)
        if self.mode == "numeric":
            return self._verify_numeric(answer, got)
        expected = str(answer)
        same = got == expected if self.mode == "exact" else normalize(got) == normalize(expected)
        return _verdict(same, got, expected)

    def same_answer(self, problem: Mapping, first, second) -> bool:
        """The two completions' candidates compared as a candidate is compared with the answer: as they
        are (``exact``), as numbers (``numeric``, when both are numbers) or after :func:`normalize`
        (otherwise). Neither has a candidate: the same."""
        a = candidate(completion_text(first), self.extract)
        b = candidate(completion_text(second), self.extract)
        if a is None or b is None:
            return a is None and b is None
        if self.mode == "exact":
            return a == b
        if self.mode == "numeric":
            x, y = parse_number(a), parse_number(b)
            if x is not None and y is not None:
                return x == y or math.isclose(x, y, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return normalize(a) == normalize(b)

    def _verify_regex(self, pattern: str, got: str) -> Verdict:
        compiled = _compile(pattern, self.ignore_case)
        found = compiled.search(got) if self.search else compiled.fullmatch(got)
        if found:
            return Verdict(True, 1.0, "correct")
        how = "nothing matches" if self.search else "no full match for"
        return Verdict(False, 0.0, f"wrong answer: {how} /{_short(pattern, 40)}/ in {_short(got)}")

    def _verify_numeric(self, answer, got: str) -> Verdict:
        expected = parse_number(answer)
        if expected is None:
            raise ValueError(f"numeric mode needs a numeric 'answer', got {answer!r}")
        value = parse_number(got)
        if value is None:
            return Verdict(False, 0.0, f"not a number: {_short(got)}")
        same = value == expected or math.isclose(value, expected, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return _verdict(same, got, str(answer))


def _verdict(correct: bool, got: str, expected: str) -> Verdict:
    if correct:
        return Verdict(True, 1.0, "correct")
    return Verdict(False, 0.0, f"wrong answer: got {_short(got)}, expected {_short(expected)}")
