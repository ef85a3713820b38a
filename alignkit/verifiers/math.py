"""Math answer verification: pull the final answer out of a completion and compare it with the gold one.

:func:`extract_answer` finds the answer a completion commits to, in this order of priority:

1. the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced, so ``\\boxed{\\frac{1}{2}}`` works;
2. the last GSM8K-style ``#### N`` line;
3. the last "The answer is N" / "answer: N" (case-insensitive), up to the end of that sentence;
4. the last number in the text (integers, decimals, negatives, ``1,234``, ``3/4``).

:func:`answers_match` compares a gold and a predicted answer. When both are plain numbers (the
synthetic-arithmetic and GSM8K case, the bulk of RL rollouts) it compares them exactly, or within a
relative tolerance, with no symbolic machinery: that path runs tens of thousands of times a second.
Anything else (LaTeX, expressions, sets, intervals) goes to `math-verify`_, which parses both sides
to SymPy and compares them symbolically.

math-verify quirks handled here (math-verify 0.9):

* ``verify(gold, pred)`` is not symmetric (gold first): gold ``(1,2)`` against predicted ``1<x<2``
  is false, the other way round true.
* Bare LaTeX such as ``\\sqrt{2}``, ``\\pi`` or ``n!`` does not parse at all unless it is wrapped in
  ``$...$``; prose such as ``No`` parses as the product ``n*o`` once wrapped. So short, math-looking
  answers are wrapped, prose is parsed as it is (math-verify then finds the expression in it).
* Its own timeouts use ``signal.alarm``, which shares the process's one real-time timer with the
  ``setitimer`` that :meth:`Verifier.safe_verify` uses to bound a call: nesting them cancels the
  outer bound. They are turned off here (``parsing_timeout=None``, ``timeout_seconds=None``), and
  the one bound is the verifier's ``timeout``.
* It catches ``Exception`` all over, so a timeout must not be an ``Exception`` to get through it
  (:class:`~alignkit.verifiers.base.VerifierTimeout` is a ``BaseException`` for this reason).
* Python cannot interrupt one long C-level operation, such as the big-integer power SymPy evaluates
  for ``9^{9^{9}}`` (minutes). Such answers are refused before parsing (:func:`_too_big_to_evaluate`).

.. _math-verify: https://github.com/huggingface/Math-Verify
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from functools import lru_cache

from alignkit.verifiers.base import Verdict, Verifier, register_verifier

__all__ = [
    "MathVerifier",
    "answers_match",
    "extract_answer",
    "gold_answer",
    "last_number",
    "numbers_close",
    "parse_number",
    "symbolic_match",
]

# ------------------------------------------------------------------------------------ extraction

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_GSM8K = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ANSWER_PHRASE = re.compile(r"(?:\bthe\s+(?:final\s+)?answer\s+is\b|\banswer\s*:)[ \t]*:?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
# a number not glued to a word on its left; "-" only as a sign (not after a digit, letter or bracket)
_NUMBER = re.compile(
    r"(?<![\w.])(?:(?<![\w)\]}])-)?"
    r"(?:\d+[ \t]*/[ \t]*\d+(?![\d.,]\d)"  # a fraction 3/4
    r"|\d{1,3}(?:,\d{3})+(?![\d])(?:\.\d+)?"  # 1,234 or 1,234.5
    r"|\d+(?:\.\d+)?"  # 12 or 12.5
    r"|\.\d+)"  # .5
)


def _balanced_group(text: str, open_at: int) -> str | None:
    """The text inside the brace group whose ``{`` is at ``open_at``; ``None`` if it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        if ch == "{" and text[i - 1] != "\\":
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``)."""
    for m in reversed(list(_BOXED_START.finditer(text))):
        if m.group(1):
            content = _balanced_group(text, m.start(1))
        else:  # "\boxed 5": the next token
            token = re.match(r"\s*([^\s$]+)", text[m.end() :])
            content = token.group(1) if token else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_phrase_answer(rest: str) -> str:
    """The answer after "The answer is": that line, up to the end of its sentence, unadorned."""
    line = rest.split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    if end:
        line = line[: end.start()]
    return line.strip().strip("*_").strip().rstrip(".").strip()


def last_number(text: str) -> str | None:
    """The last number in ``text`` as written (``-3``, ``1,234``, ``2.5``, ``3/4``), or ``None``."""
    last = None
    for last in _NUMBER.finditer(text.replace("\u2212", "-")):
        pass
    return re.sub(r"[ \t]+", "", last.group(0)) if last else None


def extract_answer(text: str) -> str | None:
    """The final answer ``text`` commits to, as a raw string, or ``None`` (see the module docstring)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    gsm8k = [a for a in _GSM8K.findall(text) if a.strip()]
    if gsm8k:
        return gsm8k[-1].strip().rstrip(".").strip()
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        answer = _clean_phrase_answer(text[m.end() :])
        if answer:
            return answer
    return last_number(text)


# ------------------------------------------------------------------------------------ plain numbers

_PLAIN_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PLAIN_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\s*\\[dt]?frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def parse_number(value) -> Fraction | None:
    """``value`` as an exact number if it is a plain one.

    Plain: ``42``, ``-3.5``, ``1,234``, ``1e-3``, ``3/4``, ``\\frac{3}{4}`` (also ``\\dfrac``,
    ``\\tfrac``), optionally in ``$...$`` or followed by a sentence's period.

    Returns ``None`` for anything else (LaTeX, expressions, words), which then needs math-verify.
    Numbers (``int``, ``float``) are accepted too; ``bool``, NaN and infinities are not plain numbers.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    s = value.strip().replace("\u2212", "-")
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    if s.endswith(".") and not s.endswith(".."):  # "42." at the end of a sentence
        s = s[:-1].rstrip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_DECIMAL.fullmatch(s):
        return Fraction(s)
    m = _PLAIN_FRACTION.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _LATEX_FRACTION.fullmatch(s)
    if m and int(m.group(3)) != 0:
        sign = -1 if m.group(1) == "-" else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3)))
    return None


def numbers_close(gold: Fraction, pred: Fraction, rel_tol: float = 1e-6) -> bool:
    """Exactly equal, or equal within ``rel_tol`` of the larger magnitude."""
    if gold == pred:
        return True
    return abs(gold - pred) <= Fraction(rel_tol) * max(abs(gold), abs(pred))


# ------------------------------------------------------------------------------------ math-verify


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; they are off on purpose here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

_LATEX_COMMAND = re.compile(r"\\[a-zA-Z]+")
_WORD = re.compile(r"[a-zA-Z]{3,}")
_MATH_WORDS = frozenset(
    ("sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh", "arcsin", "arccos", "arctan", "log", "exp")
    + ("sqrt", "lim", "max", "min", "gcd", "lcm", "mod", "pmod", "det", "inf", "infty")
)
_HUGE_EXPONENT = re.compile(
    r"\^\s*\{?\s*\(?\s*\d{6,}"  # x^{123456}
    r"|\^\s*\{[^{}]*\^|\^\s*\(?\s*\d+\s*\^"  # power towers 9^{9^{9}}, 9^9^9, 9^(9^9)
    r"|\d{6,}\s*\)?\s*!|\(\s*\d+\s*\^\s*\{?\s*\d+\s*\}?\s*\)\s*!"  # factorials (123456)! and (10^{6})!
    r"|\*\*\s*\d{6,}"
)
_MAX_SYMBOLIC_CHARS = 1000


def _is_prose(text: str) -> bool:
    """Whether ``text`` has words in it (outside LaTeX commands and function names such as ``sin``)."""
    stripped = _LATEX_COMMAND.sub(" ", text)
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(stripped))


def _too_big_to_evaluate(text: str) -> bool:
    """Power towers, huge exponents or factorials: SymPy evaluates these in C, past any timeout."""
    return len(text) > _MAX_SYMBOLIC_CHARS or bool(_HUGE_EXPONENT.search(text))


def _has_math_delimiters(text: str) -> bool:
    return "$" in text or "\\(" in text or "\\[" in text or "\\boxed" in text


@lru_cache(maxsize=8192)
def _mv_parse(text: str) -> tuple:
    """math-verify's parse of an answer string (cached: the same gold answer is checked K times)."""
    from math_verify import parse

    if not _has_math_delimiters(text) and not _is_prose(text):
        parsed = parse(f"${text}$", parsing_timeout=None)
        if parsed:
            return tuple(parsed)
    return tuple(parse(text, parsing_timeout=None))


def _normalized_text(text: str) -> str:
    return " ".join(text.casefold().replace("$", " ").split()).rstrip(".").strip()


@lru_cache(maxsize=65536)
def symbolic_match(gold: str, pred: str) -> bool:
    """math-verify's judgement of ``pred`` against ``gold`` (strings), gold first.

    When either side cannot be parsed (a yes/no or a word answer), falls back to comparing the two
    strings case- and whitespace-insensitively. Cached: K samples of one problem often repeat an answer.
    """
    from math_verify import verify

    if _too_big_to_evaluate(gold) or _too_big_to_evaluate(pred):
        return _normalized_text(gold) == _normalized_text(pred)
    gold_parsed, pred_parsed = _mv_parse(gold), _mv_parse(pred)
    if not gold_parsed or not pred_parsed:
        return _normalized_text(gold) == _normalized_text(pred)
    return verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None)


def answers_match(gold, pred: str, rel_tol: float = 1e-6) -> bool:
    """Whether predicted answer ``pred`` equals ``gold`` (a string or a number).

    Both plain numbers: exact comparison (within ``rel_tol``), no math-verify call. Otherwise
    :func:`symbolic_match`.
    """
    gold_number, pred_number = parse_number(gold), parse_number(pred)
    if gold_number is not None and pred_number is not None:
        return numbers_close(gold_number, pred_number, rel_tol)
    return symbolic_match(_answer_text(gold), pred)


# ------------------------------------------------------------------------------------ the verifier


def _answer_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def gold_answer(problem: Mapping) -> str:
    """The problem's gold answer as text: its ``answer``, else the answer its ``solution`` ends with."""
    answer = problem.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"the problem's 'answer' must be text or a number, got {type(answer).__name__}")
        return _answer_text(answer)
    solution = problem.get("solution")
    if solution is not None:
        extracted = extract_answer(str(solution))
        if extracted is None:
            raise ValueError("the problem has no 'answer' and no final answer could be found in its 'solution'")
        return extracted
    raise ValueError("the math verifier needs the problem's 'answer' field (or a 'solution' to take it from)")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@register_verifier("math")
class MathVerifier(Verifier):
    """Checks the final answer of a math completion against the problem's gold ``answer``.

    ``rel_tol`` is the relative tolerance for plain numbers. ``timeout`` (seconds) bounds one call,
    math-verify included; ``num_workers`` sets the process count of :meth:`verify_batch`.
    """

    name = "math"

    def __init__(self, timeout: float = 5.0, num_workers: int | None = None, rel_tol: float = 1e-6):
        super().__init__(timeout=timeout, num_workers=num_workers)
        self.rel_tol = rel_tol

    def verify(self, problem: Mapping, completion: str) -> Verdict:
        gold = gold_answer(problem)
        predicted = extract_answer(completion)
        if predicted is None:
            return Verdict(False, 0.0, "no answer found")
        if answers_match(gold, predicted, self.rel_tol):
            return Verdict(True, 1.0, "correct")
        return Verdict(False, 0.0, f"wrong answer: got {_short(predicted)}, expected {_short(gold)}")
