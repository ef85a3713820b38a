"""Math answer verification with `math-verify`_: its extraction over the whole completion, the gold
answer parsed the same way, its comparison; a plain-number fast path that gives the same verdicts.

How a completion is judged (:class:`MathVerifier`), following math-verify's own design:

1. **The gold answer** (the problem's ``answer``, else its ``solution``) is parsed by
   ``math_verify.parse`` like a completion. A bare answer with no math delimiters is wrapped in
   ``$...$`` first (math-verify's documented form for a LaTeX gold such as ``\\sqrt{2}``), unless it is
   a plain number (``1,234``, ``0,5``, ``3/4``) or prose, which are parsed as written. A gold answer
   made only of words (``No``, ``Evelyn``, ``No such values``), which math-verify cannot parse, is
   compared as text instead (see 4).
2. **The completion** is parsed by ``math_verify.parse`` over its whole text with
   ``LatexExtractionConfig`` and ``ExprExtractionConfig`` and math-verify's priorities: ``\\boxed``
   first (``boxed_priority=0``, as in math-verify's own tests and TRL's accuracy reward), then the
   final-answer phrases ("final answer is", "answer:"), then the last LaTeX expression or number.
   All boxed values are taken (``boxed="all"``: ``\\boxed{1}, \\boxed{2}`` is the set ``{1, 2}``).
3. **The comparison** is ``math_verify.verify(gold, prediction)`` (gold first: it is not symmetric)
   with the options ``precision`` (its ``float_rounding``), ``strict`` and
   ``allow_set_relation_comp``. When nothing parses in the completion the verdict is
   ``Verdict(False, 0.0, "no answer")``: there is no fallback to some number in the text.
4. **Word answers**: the completion's last ``\\boxed{...}``, else its last "the answer is ..." /
   "answer: ..." / ``#### ...``, else the whole completion when it is one short line, compared with
   the gold case-, space-, ``$``- and ``\\text{}``-insensitively.

**Plain-number fast path.** SymPy makes math-verify cost ~0.3 ms even for ``The answer is 32.``
(``sympy.Number`` parses the extracted string as Python code) and milliseconds for ``$\\boxed{72}$``
(an ANTLR parse). :func:`plain_number` runs math-verify's own compiled extraction patterns
(``get_extraction_regexes``) in its order (priority groups; in a group the rightmost match first)
and takes the match it would try first; when that is a plain number it builds what math-verify would:
the number string of ``extract_expr``, or the LaTeX normalised by latex2sympy's ``normalize_latex``
as ``extract_latex`` does, when that is an integer, a decimal or ``\\frac{a}{b}`` (which latex2sympy
reads as ``Integer``, ``Float``, ``Rational``). A text with no ``$``, ``\\`` or ``[`` can match
none of the LaTeX patterns, so only the expression patterns run (microseconds). Two such numbers are
compared as math-verify compares two SymPy numbers (the extracted strings equal; integers and
fractions exactly; with a decimal, rounded to ``precision`` places), and only when the outcome is
certain: a percentage, an expression (``36 - 4``, ``\\sqrt{2}``), several values, more than 15
significant digits or a difference within rounding distance goes to math-verify.
``tests/test_verifiers_math.py`` checks the fast verdicts against math-verify's.

**Symbolic comparison without ``simplify`` when certain.** math-verify's last check of two
expressions is ``simplify(gold - pred).is_zero`` (5-80 ms). Inside ``verify`` here, a difference
that is a rational function over the rationals (polynomials: ``(x+7)^2`` against its expansion) or a
number that ``evalf`` certifies non-zero (``5\sqrt{3}`` against ``\sqrt{76}``) is decided exactly
instead, with the verdict ``simplify`` gives; anything else still goes to ``simplify``
(:mod:`alignkit.verifiers.math_zero`).

Protections kept:

* math-verify's own timeouts (``signal.alarm``) are off (``parsing_timeout=None``,
  ``timeout_seconds=None``): they would cancel the ``setitimer`` bound of
  :meth:`~alignkit.verifiers.base.Verifier.safe_verify`, which is the one bound, and a
  :class:`~alignkit.verifiers.base.VerifierTimeout` (a ``BaseException``) passes through
  math-verify's ``except Exception`` blocks.
* Python cannot interrupt one long C-level operation, such as the big-integer power SymPy evaluates
  for ``9^{9^{9}}``. Parsing is lazy, so parsed answers are inspected before comparison
  (:func:`too_big_to_evaluate`: huge or tower exponents, huge factorials) and such answers are
  compared by their extracted text only.

.. _math-verify: https://github.com/huggingface/Math-Verify
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from itertools import groupby

from alignkit.verifiers.base import Verdict, Verifier, completion_text, register_verifier
from alignkit.verifiers.math_zero import exact_shortcuts

__all__ = [
    "MathVerifier",
    "PlainNumber",
    "answers_match",
    "extract_answer",
    "gold_answer",
    "parse_number",
    "plain_number",
    "text_answer",
    "too_big_to_evaluate",
]

EXTRACTION_TARGETS = ("latex", "expr")
BOXED_MODES = ("all", "last", "none")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; they are off on purpose here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# ------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class MathOptions:
    """math-verify's settings as the verifier uses them (hashable: the parse caches key on them).

    ``extraction``: the extraction targets, ``"latex"`` (``LatexExtractionConfig``) and/or ``"expr"``
    (``ExprExtractionConfig``). ``boxed``: which ``\\boxed`` values a LaTeX match yields (``all``,
    ``last``, ``none``; latex2sympy's ``NormalizationConfig.boxed``). ``boxed_priority``: where
    ``\\boxed`` ranks among the patterns (0: before everything, math-verify's default is 50: after
    "final answer is"; -1: not looked for). ``precision``: decimal places numbers are rounded to
    when a float is compared (``float_rounding``). ``strict``: variables must match (``f(x)`` is not
    ``f(y)``) and sets are not tuples. ``allow_set_relation_comp``: a gold set may equal a predicted
    relation (``[-2, 7]`` and ``-2 <= x <= 7``); the other way round is always allowed.
    """

    extraction: tuple[str, ...] = EXTRACTION_TARGETS
    boxed: str = "all"
    boxed_priority: int = 0
    precision: int = 6
    strict: bool = True
    allow_set_relation_comp: bool = False

    def __post_init__(self):
        extraction = (self.extraction,) if isinstance(self.extraction, str) else tuple(self.extraction)
        object.__setattr__(self, "extraction", extraction)
        if not extraction or any(e not in EXTRACTION_TARGETS for e in extraction):
            raise ValueError(f"extraction must be a non-empty list of {EXTRACTION_TARGETS}, got {self.extraction!r}")
        if self.boxed not in BOXED_MODES:
            raise ValueError(f"boxed must be one of {BOXED_MODES}, got {self.boxed!r}")
        if not isinstance(self.precision, int) or isinstance(self.precision, bool) or self.precision < 0:
            raise ValueError(f"precision must be a non-negative integer (decimal places), got {self.precision!r}")
        if not isinstance(self.boxed_priority, int) or self.boxed_priority < -1:
            raise ValueError(f"boxed_priority must be an integer >= -1, got {self.boxed_priority!r}")


_DEFAULT_OPTIONS = MathOptions()


@lru_cache(maxsize=64)
def _extraction_config(options: MathOptions) -> tuple:
    """The math-verify extraction targets of ``options``."""
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    targets = []
    for target in options.extraction:
        if target == "latex":
            normalization = NormalizationConfig(
                basic_latex=True, units=True, malformed_operators=True, nits=True, boxed=options.boxed, equations=False
            )  # LatexExtractionConfig's own default, with the boxed mode
            targets.append(
                LatexExtractionConfig(boxed_match_priority=options.boxed_priority, normalization_config=normalization)
            )
        else:
            targets.append(ExprExtractionConfig())
    return tuple(targets)


# ------------------------------------------------------------------------------------ plain numbers

# None of math-verify's LaTeX patterns can match a text without these characters.
_LATEX_TRIGGER = re.compile(r"[$\\\[]")
_MAX_FAST_CHARS = 20_000  # longer texts take the time-bounded math-verify path
_MAX_FLOAT_DIGITS = 15  # sympy.Float's default precision


@dataclass(frozen=True)
class PlainNumber:
    """A plain number as math-verify extracts it: ``text`` is the string it keeps (the number string of
    its expression extraction, the normalised LaTeX of its LaTeX extraction), ``value`` the exact value,
    ``is_float`` whether SymPy holds it as a ``Float`` (a decimal; otherwise an ``Integer`` or
    ``Rational``)."""

    text: str
    value: Fraction
    is_float: bool


class _Undecided:
    """math-verify's answer depends on SymPy (an expression, a percentage, LaTeX other than a number)."""

    def __repr__(self):
        return "UNDECIDED"


UNDECIDED = _Undecided()


@lru_cache(maxsize=64)
def _pattern_groups(options: MathOptions, latex: bool) -> tuple:
    """math-verify's compiled extraction patterns for ``options``, grouped by priority in the order its
    ``parse`` tries them: ``((pattern, target), ...)`` per group. ``latex=False`` leaves out the LaTeX
    target's patterns (for a text none of them can match)."""
    from math_verify import LatexExtractionConfig
    from math_verify.parser import get_extraction_regexes

    targets = [t for t in _extraction_config(options) if latex or not isinstance(t, LatexExtractionConfig)]
    patterns = [(p, target, priority) for ps, target in get_extraction_regexes(targets) for p, priority in ps]
    patterns.sort(key=lambda x: x[2])
    return tuple(tuple((p, t) for p, t, _ in group) for _, group in groupby(patterns, key=lambda x: x[2]))


_LEADING_ZERO = re.compile(r"-0+[1-9]\d*")
_LATEX_INTEGER = re.compile(r"-?\d+")
_LATEX_DECIMAL = re.compile(r"-?(?:\d+\.\d+|\.\d+)")
_LATEX_FRACTION_NUMBER = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")


def _significant_digits(number: str) -> int:
    return len(number.lstrip("-").replace(".", "").lstrip("0"))


def _number_of(match: re.Match) -> PlainNumber | _Undecided:
    """What math-verify's ``extract_expr`` makes of a match, when that is a plain number."""
    groups = match.groupdict()
    integer = next((v for k, v in groups.items() if k.startswith("integer") and v), "")
    decimal = next((v for k, v in groups.items() if k.startswith("decimal") and v), "")
    if not (integer or decimal) or groups.get("percent"):
        return UNDECIDED  # an expression for parse_expr, or a percentage
    integer = integer.translate(str.maketrans("", "", ", ")).lstrip("0") or "0"
    text = f"{integer}{decimal.replace(',', '.')}"
    if _LEADING_ZERO.fullmatch(text):
        return UNDECIDED  # sympy.Number("-06") raises, and math-verify's whole parse then returns []
    if decimal and _significant_digits(text) > _MAX_FLOAT_DIGITS:
        return UNDECIDED  # sympy.Float would round it
    return PlainNumber(text, Fraction(text), bool(decimal))


def _latex_number_of(match: re.Match, target) -> PlainNumber | _Undecided:
    """What math-verify's ``extract_latex`` makes of a match, when it is one LaTeX number: the match's
    LaTeX normalised by latex2sympy's ``normalize_latex`` as math-verify normalises it, then read as
    latex2sympy reads ``12`` (``Integer``), ``1.5`` (``Float``) and ``\\frac{3}{4}`` (``Rational``)."""
    from latex2sympy2_extended.latex2sympy2 import normalize_latex

    groups = match.groupdict()
    found = [next(((v, k) for k, v in groups.items() if k.startswith(prefix) and v), None)
             for prefix in ["first_latex"] + [f"next{i}_latex" for i in range(1, 6)]]
    found = [f for f in found if f is not None]
    if len(found) != 1:
        return UNDECIDED  # several expressions: math-verify makes a set of them
    latex, name = found[0]
    if groups.get(f"{name.split('_')[0]}_percent"):
        return UNDECIDED
    config = target.normalization_config
    if name.split("_")[1] == "latexBoxed":
        config = dataclasses.replace(config, boxed="last")  # as math-verify does for a bare \boxed{...}
    text = normalize_latex(latex, config=config)
    if _LATEX_INTEGER.fullmatch(text):
        return PlainNumber(text, Fraction(int(text)), False)
    if _LATEX_DECIMAL.fullmatch(text) and _significant_digits(text) <= _MAX_FLOAT_DIGITS:
        return PlainNumber(text, Fraction(text), True)
    m = _LATEX_FRACTION_NUMBER.fullmatch(text)
    if m and int(m.group(3)) != 0:
        return PlainNumber(text, (-1 if m.group(1) else 1) * Fraction(int(m.group(2)), int(m.group(3))), False)
    return UNDECIDED


def plain_number(text: str, options: MathOptions | None = None) -> PlainNumber | _Undecided | None:
    """math-verify's parse of ``text`` when it is a plain number, computed without SymPy.

    Runs math-verify's own extraction patterns for ``options`` (default :class:`MathOptions`) in its
    order (priority groups; in a group the rightmost match first) and takes the match it would try
    first. Returns the :class:`PlainNumber` math-verify extracts there, ``None`` when no pattern
    matches (math-verify extracts nothing), or :data:`UNDECIDED` when only math-verify itself can
    tell: that match is an expression, a percentage, several expressions or LaTeX other than an
    integer, a decimal or an integer fraction, or the text is very long. A text without ``$``, ``\\``
    or ``[`` can match none of the LaTeX patterns, which are then not run.
    """
    options = options or _DEFAULT_OPTIONS
    if len(text) > _MAX_FAST_CHARS:
        return UNDECIDED
    for group in _pattern_groups(options, bool(_LATEX_TRIGGER.search(text))):
        # math-verify sorts a group's matches by (end, -start), descending and stable, and tries them in
        # that order: the first is the first match found with the largest key
        best, best_key, target = None, None, None
        for pattern, pattern_target in group:
            for m in pattern.finditer(text):
                key = (m.end(), -m.start())
                if best is None or key > best_key:
                    best, best_key, target = m, key, pattern_target
        if best is not None:
            match = best
            if hasattr(target, "normalization_config"):
                try:
                    return _latex_number_of(match, target)
                except Exception:  # normalisation failed: math-verify would handle (and report) it
                    return UNDECIDED
            return _number_of(match)
    return None


def _compare_plain(gold: PlainNumber, pred: PlainNumber, precision: int) -> bool | None:
    """math-verify's verdict on two plain numbers, or ``None`` when it is too close to call here.

    ``verify`` is true when the extracted strings are equal, or the SymPy numbers are: integers and
    fractions exactly; with a float, both rounded to ``precision`` decimal places (equal values are
    equal; values further apart than two units of the last place are not; between, it is SymPy's call).
    """
    if gold.text == pred.text:
        return True
    if not (gold.is_float or pred.is_float):
        return gold.value == pred.value
    if gold.value == pred.value:
        return True
    slack = Fraction(2, 10**precision) + Fraction(1, 10**12) * max(abs(gold.value), abs(pred.value))
    if abs(gold.value - pred.value) > slack:
        return False  # rounding moves each by at most half a unit of the last place
    return None


_PLAIN_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PLAIN_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\s*\\[dt]?frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def parse_number(value) -> Fraction | None:
    """``value`` as an exact number if it is a plain one (used by the ``match`` verifier's numeric mode).

    Plain: ``42``, ``-3.5``, ``1,234``, ``1e-3``, ``3/4``, ``\\frac{3}{4}`` (also ``\\dfrac``,
    ``\\tfrac``), optionally in ``$...$`` or followed by a sentence's period. Numbers (``int``,
    ``float``) are accepted too; ``bool``, NaN and infinities are not plain numbers. ``None`` for
    anything else.
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


# ------------------------------------------------------------------------------------ gold answers

_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
# what math-verify's expression patterns read as one number: 1,234.5 / 1 234 / 0,5 / -3 / 3/4 / 28%
_NUMBER_LIKE = re.compile(
    r"[-+\u2212]?(?:\d{1,3}(?:[ ,]\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)(?:\s*/\s*\d+)?\s*%?"
)
_LATEX_COMMAND = re.compile(r"\\[a-zA-Z]+")
_WORD = re.compile(r"[a-zA-Z]{3,}")
_MATH_WORDS = frozenset(
    ("sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh", "arcsin", "arccos", "arctan", "log", "exp")
    + ("sqrt", "lim", "max", "min", "gcd", "lcm", "mod", "pmod", "det", "inf", "infty", "frac", "dfrac", "cdot")
)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_WORD_ANSWER = re.compile(r"[A-Za-z][A-Za-z'\u2019\- ,.;:!?()]*")


_ENVIRONMENT = re.compile(r"\\(?:begin|end)\s*\{[a-zA-Z*]*\}")


def _is_prose(text: str) -> bool:
    """Whether ``text`` has words in it (outside LaTeX commands, environment names, ``\\text{}`` and
    function names such as ``sin``)."""
    stripped = _LATEX_COMMAND.sub(" ", _TEXT_WRAPPER.sub(" ", _ENVIRONMENT.sub(" ", text)))
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(stripped))


def _is_word_answer(gold: str) -> bool:
    """A gold answer made of words only (``No``, ``Evelyn``, ``It is not possible``), in no math delimiters."""
    if "$" in gold or "\\(" in gold or "\\[" in gold:
        return False
    text = _TEXT_WRAPPER.sub(r"\1", gold).strip()
    if not _WORD_ANSWER.fullmatch(text):
        return False
    if text.strip(" .!").casefold() == "no":
        return True
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(text))  # "ab" or "xy" stay math


def _gold_as_written(gold: str) -> bool:
    """Whether math-verify parses the gold text as written (else it is wrapped in ``$...$``)."""
    return bool(_DELIMITED.search(gold)) or bool(_NUMBER_LIKE.fullmatch(gold.strip())) or _is_prose(gold)


def _answer_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def gold_answer(problem: Mapping) -> str:
    """The text the gold answer is parsed from: the problem's ``answer``, else its ``solution``.

    ``ValueError`` naming the field when there is neither, or when ``answer`` is not text or a number.
    """
    answer = problem.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"the problem's 'answer' must be text or a number, got {type(answer).__name__}")
        return _answer_text(answer)
    solution = problem.get("solution")
    if isinstance(solution, str) and solution.strip():
        return solution
    raise ValueError("the math verifier needs the problem's 'answer' field (or a 'solution' to take it from)")


# ------------------------------------------------------------------------------------ math-verify


@lru_cache(maxsize=8192)
def _parse(text: str, options: MathOptions) -> tuple:
    """``math_verify.parse`` of a completion (cached: RL samples repeat), its own timeout off."""
    from math_verify import parse

    return tuple(parse(text, _extraction_config(options), parsing_timeout=None))


@lru_cache(maxsize=8192)
def _parse_gold(gold: str, options: MathOptions) -> tuple:
    """The gold answer parsed as math-verify parses a completion; bare LaTeX wrapped in ``$...$``."""
    if _gold_as_written(gold):
        return _parse(gold, options)
    wrapped = _parse(f"${gold}$", options)
    return wrapped if _has_expression(wrapped) else _parse(gold, options)


def _has_expression(parsed: Sequence) -> bool:
    return any(not isinstance(p, str) for p in parsed)


def _extracted_string(parsed: Sequence) -> str:
    """The string math-verify extracted (its fallback entry), for reasons and text comparison."""
    strings = [p for p in parsed if isinstance(p, str)]
    return strings[-1] if strings else str(parsed[0])


_MAX_EXPONENT = 10**5
_MAX_FACTORIAL = 10**4


def too_big_to_evaluate(parsed) -> bool:
    """Whether comparing this parsed answer could make SymPy build a huge integer, in C, past any timer.

    Power towers and powers with exponents above 10^5 (``9^{9^{9}}``, ``2^{1000000000}``) and
    factorials above 10^4! (``(10^{6})!``). math-verify parses lazily, so the check runs on the
    parse, before ``verify`` evaluates anything. ``parsed`` is one SymPy object or a parse list.
    """
    from sympy import Basic, Pow, postorder_traversal
    from sympy.functions.combinatorial.factorials import factorial, factorial2, subfactorial

    items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    for item in items:
        if not isinstance(item, Basic):
            continue
        for node in postorder_traversal(item):  # children first, so a tower is caught at its top
            if isinstance(node, Pow):
                size, limit = node.exp, _MAX_EXPONENT
            elif isinstance(node, (factorial, factorial2, subfactorial)):
                size, limit = node.args[0], _MAX_FACTORIAL
            else:
                continue
            if size.free_symbols and not size.is_Number:
                continue
            try:
                magnitude = abs(complex(size.evalf(5)))
            except (TypeError, ValueError, OverflowError):
                return True
            if not magnitude <= limit:
                return True
    return False


# ------------------------------------------------------------------------------------ word answers

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ANSWER_PHRASE = re.compile(r"(?:\bthe\s+(?:final\s+)?answer\s+is\b|\banswer\s*:)[ \t]*:?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_MAX_SHORT_ANSWER = 60


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
    for m in reversed(list(_BOXED_START.finditer(text))):
        content = _balanced_group(text, m.end() - 1)
        if content is not None and content.strip():
            return content.strip()
    return None


def _phrase_answer(text: str) -> str | None:
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        line = text[m.end() :].split("\n", 1)[0]
        end = _SENTENCE_END.search(line)
        answer = (line[: end.start()] if end else line).strip().strip("*_").strip().rstrip(".").strip()
        if answer:
            return answer
    return None


def text_answer(text: str, whole_line: bool = True) -> str | None:
    """A word answer's candidate in a completion: the last ``\\boxed{...}``, else the last "the answer
    is ..." / "answer: ..." (to the end of its sentence), else the last ``#### ...`` line, else (with
    ``whole_line``) the whole completion when it is one short line; ``None`` when there is none."""
    for candidate in (_last_boxed(text), _phrase_answer(text)):
        if candidate:
            return candidate
    gsm8k = [a for a in _GSM8K.findall(text) if a.strip()]
    if gsm8k:
        return gsm8k[-1].strip()
    stripped = text.strip()
    if whole_line and stripped and "\n" not in stripped and len(stripped) <= _MAX_SHORT_ANSWER:
        return stripped
    return None


def _normalized_words(text: str) -> str:
    """Casefolded, ``\\text{}``-style wrappers, ``$`` and braces dropped, spaces collapsed, end punctuation off."""
    for _ in range(3):
        text = _TEXT_WRAPPER.sub(r"\1", text)
    text = text.replace("$", " ").replace("\\(", " ").replace("\\)", " ").replace("{", "").replace("}", "")
    text = text.replace("\\,", " ").replace("~", " ").replace("\\ ", " ")
    return " ".join(text.casefold().split()).strip(" .,;:!?*\"'")


# ------------------------------------------------------------------------------------ the verifier


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


NO_ANSWER = "no answer"


@register_verifier("math")
class MathVerifier(Verifier):
    """Checks a math completion's final answer against the problem's gold ``answer`` with math-verify.

    Options (math-verify's, see :class:`MathOptions`): ``precision`` (decimal places floats are
    rounded to, default 6), ``strict`` (default true), ``allow_set_relation_comp`` (default false),
    ``boxed`` (``all`` boxed values, default, or the ``last``), ``boxed_priority`` (0: boxed first),
    ``extraction`` (``["latex", "expr"]``). ``fast_path`` (default true) decides plain numbers
    without SymPy, with the same verdicts. ``timeout`` (seconds) bounds one call, math-verify
    included; ``num_workers`` sets the process count of :meth:`verify_batch`.

    Verdict reasons: ``correct``, ``wrong answer: got X, expected Y``, ``no answer`` (nothing parses
    in the completion), ``timeout: ...``, ``error: ...``.
    """

    name = "math"
    problem_fields = (("answer",), ("solution",))  # the gold answer, or a solution to take it from
    parallel_min_items = 8  # the items sent to workers are the math-verify ones, a few ms each

    def __init__(
        self,
        timeout: float = 5.0,
        num_workers: int | None = None,
        *,
        precision: int = 6,
        strict: bool = True,
        allow_set_relation_comp: bool = False,
        boxed: str = "all",
        boxed_priority: int = 0,
        extraction: Sequence[str] = EXTRACTION_TARGETS,
        fast_path: bool = True,
    ):
        super().__init__(timeout=timeout, num_workers=num_workers)
        self.options = MathOptions(
            extraction=tuple(extraction) if not isinstance(extraction, str) else (extraction,),
            boxed=boxed,
            boxed_priority=boxed_priority,
            precision=precision,
            strict=strict,
            allow_set_relation_comp=allow_set_relation_comp,
        )
        self.fast_path = fast_path

    # ------------------------------------------------------------------ one item

    def verify(self, problem: Mapping, completion) -> Verdict:
        gold = gold_answer(problem)
        text = completion_text(completion)
        verdict = self.fast_verify(gold, text)
        if verdict is None:
            verdict = _judge(gold, text, self.options, problem.get("answer") is None)
        return verdict

    def same_answer(self, problem: Mapping, first, second) -> bool:
        """Whether two completions give the same answer: the first one's extracted answer taken as the
        gold and the second judged against it (both without an answer: the same)."""
        first, second = completion_text(first), completion_text(second)
        if first == second:
            return True
        answer = extract_answer(first, **dataclasses.asdict(self.options))
        if answer is None:
            return extract_answer(second, **dataclasses.asdict(self.options)) is None
        return self.verify({"answer": answer}, second).correct

    _WARM_UP = (
        (r"\frac{1}{2}", r"So $\boxed{\dfrac{2}{4}}$."),
        ("(1, 2)", r"The point is $(1, 2)$."),
        (r"\{1, 2\}", r"$\boxed{\{2, 1\}}$"),
        ("[0, 1)", r"$x \in [0,1)$"),
        (r"2\sqrt{2}", r"\boxed{\sqrt{8}}"),
        ("x^2+2x+1", r"$\boxed{(x+1)^2}$"),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"$\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}$"),
        (r"28\%", "28 percent"),
    )

    def warm_up(self) -> None:
        """Import math-verify and SymPy and run a few parses and comparisons (ANTLR's parser tables and
        SymPy's caches fill on first use: about 2 s), so forked workers start warm."""
        for gold, text in self._WARM_UP:
            _judge.__wrapped__(gold, text, self.options, False)

    def fast_verify(self, gold: str, text: str) -> Verdict | None:
        """The verdict without SymPy when both answers are plain numbers and the outcome is certain
        (:func:`plain_number`, :func:`_compare_plain`), else ``None``."""
        if not self.fast_path:
            return None
        gold_number = _plain_gold(gold, self.options)
        if not isinstance(gold_number, PlainNumber):
            return None
        pred_number = plain_number(text, self.options)
        if pred_number is None:
            return Verdict(False, 0.0, NO_ANSWER)
        if pred_number is UNDECIDED:
            return None
        correct = _compare_plain(gold_number, pred_number, self.options.precision)
        if correct is None:
            return None
        return _verdict(correct, pred_number.text, gold_number.text)

    # ------------------------------------------------------------------ batches

    def verify_batch(
        self, problems: Sequence[Mapping], completions: Sequence, *, num_workers: int | None = None
    ) -> list[Verdict]:
        """One verdict per pair, in order. A (gold, completion) pair that recurs (K samples of a problem
        often end alike) is judged once; plain numbers are decided here, serially (microseconds each: a
        worker process would cost more than it saves); the rest go to the warm worker pool."""
        texts, workers = self._batch_texts(problems, completions, num_workers)
        out: list[Verdict | None] = [None] * len(texts)
        first_of: dict[tuple, int] = {}  # (gold, text, gold from the solution) -> the first item with it
        copies: list[tuple[int, int]] = []
        rest = []
        for i, (problem, text) in enumerate(zip(problems, texts)):
            try:
                gold = gold_answer(problem)
            except ValueError:
                rest.append(i)  # a bad problem: the bounded path reports it
                continue
            key = (gold, text, problem.get("answer") is None)
            if key in first_of:
                copies.append((i, first_of[key]))
                continue
            first_of[key] = i
            try:
                out[i] = self.fast_verify(gold, text)
            except Exception:  # the bounded path gives the same verdict or names the error
                out[i] = None
            if out[i] is None:
                rest.append(i)
        if rest:
            verdicts = super().verify_batch([problems[i] for i in rest], [texts[i] for i in rest], num_workers=workers)
            for i, verdict in zip(rest, verdicts):
                out[i] = verdict
        for i, first in copies:
            out[i] = out[first]
        return out


@lru_cache(maxsize=65536)
def _plain_gold(gold: str, options: MathOptions) -> PlainNumber | _Undecided | None:
    """The gold answer as :func:`plain_number` reads the text math-verify parses it from (a bare LaTeX
    gold wrapped in ``$...$``); a word answer or a gold with nothing to extract is left to the full path."""
    if _is_word_answer(gold):
        return UNDECIDED
    number = plain_number(gold if _gold_as_written(gold) else f"${gold}$", options)
    return UNDECIDED if number is None else number


@lru_cache(maxsize=8192)
def _judge(gold: str, text: str, options: MathOptions, gold_from_solution: bool) -> Verdict:
    """The math-verify verdict (cached: an RL step's samples repeat; a timeout or error is not cached)."""
    if not gold_from_solution and _is_word_answer(gold):
        return _verify_words(gold, text)
    gold_parsed = _parse_gold(gold, options)
    if not gold_parsed:
        if gold_from_solution:
            raise ValueError("the problem has no 'answer' and no final answer could be found in its 'solution'")
        return _verify_words(gold, text)
    pred_parsed = _parse(text, options)
    if not pred_parsed:
        return Verdict(False, 0.0, NO_ANSWER)
    got, expected = _extracted_string(pred_parsed), _extracted_string(gold_parsed)
    if too_big_to_evaluate(gold_parsed) or too_big_to_evaluate(pred_parsed):
        return _verdict(got.strip() == expected.strip(), got, expected)  # never evaluated: compared as text
    from math_verify import verify

    with exact_shortcuts():  # simplify skipped where its answer is certain (same verdicts)
        correct = verify(
            list(gold_parsed),
            list(pred_parsed),
            float_rounding=options.precision,
            strict=options.strict,
            allow_set_relation_comp=options.allow_set_relation_comp,
            timeout_seconds=None,
        )
    return _verdict(correct, got, expected)


def _verify_words(gold: str, text: str) -> Verdict:
    got = text_answer(text)
    if got is None:
        return Verdict(False, 0.0, NO_ANSWER)
    return _verdict(_normalized_words(got) == _normalized_words(gold), got, gold)


def _verdict(correct: bool, got: str, expected: str) -> Verdict:
    if correct:
        return Verdict(True, 1.0, "correct")
    return Verdict(False, 0.0, f"wrong answer: got {_short(got)}, expected {_short(expected)}")


# ------------------------------------------------------------------------------------ helpers


def extract_answer(text: str, **options) -> str | None:
    """The final answer ``text`` commits to, as the string math-verify extracts (the number for a
    plain number, the normalised LaTeX otherwise; ``options`` as :class:`MathOptions`), else a word
    answer in ``\\boxed{}``, after "the answer is" or ``####`` (:func:`text_answer`), else ``None``."""
    options = MathOptions(**options)
    number = plain_number(text, options)
    if isinstance(number, PlainNumber):
        return number.text
    parsed = () if number is None else _parse(text, options)
    if parsed:
        return _extracted_string(parsed)
    return text_answer(text, whole_line=False)


def answers_match(gold, completion: str, **options) -> bool:
    """Whether ``completion`` (an answer or a whole solution) is judged to answer ``gold`` correctly,
    by :class:`MathVerifier` with ``options``."""
    return MathVerifier(**options).verify({"answer": gold}, completion).correct
