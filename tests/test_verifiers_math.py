"""The math verifier: math-verify's extraction and comparison, each answer category checked against
math-verify itself, the plain-number fast path against math-verify, options, time bounds, batches."""

import random
import signal
import time
from fractions import Fraction

import pytest

from alignkit.tasks.arithmetic import make_preference_pairs, make_problems
from alignkit.verifiers import Verdict, get_verifier
from alignkit.verifiers.math import (
    UNDECIDED,
    MathVerifier,
    PlainNumber,
    answers_match,
    extract_answer,
    gold_answer,
    parse_number,
    plain_number,
    too_big_to_evaluate,
)


def math_verify_says(gold: str, completion: str, *, boxed_priority: int = 0, **verify_options) -> bool:
    """math-verify's own verdict: the gold and the completion parsed with the verifier's extraction
    targets (LaTeX with boxed first, expressions), ``verify(gold, prediction)``."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    targets = [LatexExtractionConfig(boxed_match_priority=boxed_priority), ExprExtractionConfig()]
    return verify(parse(gold, targets), parse(completion, targets), **verify_options)


# ------------------------------------------------------------------------------------ categories

# (gold as math-verify reads it, completion, expected verdict); every row is also math-verify's verdict
MATRIX = r"$\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}$"
CATEGORIES = {
    "latex fractions": [
        (r"$\frac{1}{3}$", r"So the probability is $\dfrac{1}{3}$.", True),
        (r"$\frac{1}{3}$", r"The answer is $\boxed{\frac{2}{6}}$", True),
        (r"$\frac{1}{3}$", r"$\boxed{0.333333}$", True),  # floats are rounded to 6 places
        (r"$\frac{1}{3}$", r"$\boxed{0.33}$", False),
        (r"$\frac{1}{3}$", r"We get $\frac13$", True),  # malformed \frac13
        (r"$\frac{1}{3}$", r"Thus $\boxed{3}$", False),  # the old last-number fallback read $\dfrac{1}{3}$ as 3
        (r"$-\frac{7}{4}$", r"$x = -\tfrac{7}{4}$", True),
        ("$2$", r"$\frac{1+\sqrt5}{2}$", False),  # once accepted: the last number of the fraction
    ],
    "tuples": [
        (r"$(1, \frac{9}{2})$", r"The point is $(1, 4.5)$.", True),  # once read as 4.5
        (r"$(1, \frac{9}{2})$", r"The point is $\boxed{(4.5, 1)}$.", False),
        (r"$(6,31,-1)$", r"we find $(p,q,r) = \boxed{(6,31,-1)}.$", True),
    ],
    "intervals": [
        (r"$[0,1)$", r"$x \in [0,1)$", True),
        (r"$(0,9)$", r"$\boxed{[0,9)}$", False),
        (r"$(2,12) \cup (12,102)$", r"$x \in \boxed{(2,12) \cup (12,102)}$", True),
        ("$1$", r"$-[0,1)$", False),  # once accepted: its last number
    ],
    "sets": [
        (r"$\{1, 2\}$", r"$\boxed{\{2, 1\}}$", True),
        (r"$\{1, 2\}$", r"$\boxed{\{1, 3\}}$", False),
        (r"$\{1\pm\sqrt{5},-2\}$", r"so the answer is $\boxed{\{1\pm\sqrt{5},-2\}}.$", True),
    ],
    "matrices": [  # a boxed matrix was once rejected even against the identical gold ("pmatrix" read as prose)
        (MATRIX, rf"\boxed{{{MATRIX[1:-1]}}}", True),
        (MATRIX, r"\boxed{\begin{pmatrix} 0 & 3 \\ 0 & 1 \end{pmatrix}}", False),
        (r"$\begin{pmatrix} \frac{1}{2} \\ 3 \end{pmatrix}$", r"$\boxed{\begin{pmatrix} 0.5 \\ 3 \end{pmatrix}}$", True),
    ],
    "currency": [
        ("18.90", r"The total is \boxed{\$18.90}", True),  # an escaped \$ is not a math delimiter
        ("18.90", r"\boxed{\$18.80}", False),
        ("1000.99", r"It costs $1,000.99", True),
        ("1000.99", "the number is not 10 which is 1,000.99€", True),
    ],
    "percentages": [
        (r"$28\%$", "28 percent", True),
        (r"$28\%$", r"a total loss of $\boxed{28\%}$.", True),
        (r"$28\%$", r"$\boxed{0.28}$", True),  # 28% is 0.28
        (r"$28\%$", r"$\boxed{27\%}$", False),
    ],
    "units": [
        (r"$15\mbox{ cm}^2$", r"the area is $\boxed{15\mbox{ cm}^2}$", True),
        (r"$90^\circ$", r"$\boxed{90^\circ}$", True),
        ("1000.99", "so the number is 10 which is 1,000.99m²", True),
        (r"$1/3$", r"$\frac{1}{3} \text{meters}$", True),
        (r"$15\mbox{ cm}^2$", r"the area is $\boxed{16\mbox{ cm}^2}$", False),
    ],
    "thousands separators": [
        ("7425000", "7,425,000", True),
        ("1000", "1 000", True),
        (r"$14{,}916$", r"Therefore, $\boxed{14{,}916}$ is our answer.", True),
        ("0,111", "0.111", True),  # a decimal comma; once read as 111
        ("111", "0,111", False),
    ],
    "several boxed answers": [
        (r"$\boxed{1}\boxed{2}$", r"$\boxed{1,2}$", True),
        (r"$-2, 1$", r"The integer roots are $\boxed{1}$ and $\boxed{-2}$.", True),  # once only the last box
        (r"$-2, 1$", r"The integer roots are $\boxed{1}$ and $\boxed{-3}$.", False),
    ],
    "text answers": [
        (r"$\text{Evelyn}$", r"Therefore, $\boxed{\text{Evelyn}}$ is our answer.", True),
        (r"$\text{Evelyn}$", r"Therefore, $\boxed{\text{Briana}}$ is our answer.", False),
        (r"$\text{(B)}$", r"$\boxed{B}$", True),
    ],
}
CATEGORY_ROWS = [(name, *row) for name, rows in CATEGORIES.items() for row in rows]


@pytest.mark.parametrize("category, gold, completion, expected", CATEGORY_ROWS)
def test_categories_agree_with_math_verify(category, gold, completion, expected):
    verdict = MathVerifier().verify({"answer": gold}, completion)
    assert verdict.correct is expected, verdict
    assert math_verify_says(gold, completion) is expected


@pytest.mark.parametrize(
    "gold, wrapped, completion, expected",
    [
        # bare LaTeX golds (no delimiters) are parsed as math-verify's docs write them: in $...$
        (r"\frac{1}{2}", r"$\frac{1}{2}$", r"\boxed{0.5}", True),
        (r"\sqrt{2}", r"$\sqrt{2}$", r"so $x = \sqrt 2$", True),
        ("x^2+2x+1", "$x^2+2x+1$", r"$\boxed{(x+1)^2}$", True),
        ("n!", "$n!$", r"$\boxed{n!}$", True),
        (r"\pi", r"$\pi$", r"$\boxed{\pi}$", True),
        (r"\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}", r"$\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}$",
         r"\boxed{\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}}", True),  # "pmatrix" once counted as prose
        ("2, 3", "$2, 3$", r"so $x = \boxed{3}$ or $x = \boxed{2}$", True),
        ("(1,2)", "$(1,2)$", r"\boxed{1<x<2}", False),  # gold first: math-verify is not symmetric
        ("1<x<2", "$1<x<2$", r"\boxed{(1,2)}", True),
        # plain numbers as written: math-verify's expression extraction reads the separators
        ("1,234", "1,234", "#### 1234", True),
        ("0,5", "0,5", "The answer is 0.5.", True),
    ],
)
def test_bare_gold_answers(gold, wrapped, completion, expected):
    assert MathVerifier().verify({"answer": gold}, completion).correct is expected
    assert math_verify_says(wrapped, completion) is expected


@pytest.mark.parametrize(
    "gold, completion, expected",
    [
        ("No", "no", True),
        ("No", "The answer is no.", True),
        ("Yes", "After checking every case, the answer is: No.", False),
        ("Evelyn", r"Therefore, $\boxed{\text{Evelyn}}$ is our answer.", True),
        ("It is not possible", r"So \boxed{\text{it is not possible}}.", True),
        ("It is not possible", "#### it is possible", False),
        (r"\text{Evelyn}", "The final answer is Evelyn.", True),
    ],
)
def test_word_answers(gold, completion, expected):
    """Gold answers made of words only, which math-verify cannot parse, are compared as text."""
    assert MathVerifier().verify({"answer": gold}, completion).correct is expected


def test_no_answer_is_never_a_guess():
    verifier = MathVerifier()
    assert verifier.verify({"answer": "32"}, "I am not sure.") == Verdict(False, 0.0, "no answer")
    assert verifier.verify({"answer": r"\frac{1}{3}"}, "I give up.") == Verdict(False, 0.0, "no answer")
    assert verifier.verify({"answer": "Yes"}, "Let me think about this.\nIt depends on the case.") == Verdict(
        False, 0.0, "no answer"
    )
    # math-verify reads a number in the text as the last expression: that is its design, not a fallback
    assert not verifier.verify({"answer": "3"}, "AZYUK2A").correct
    assert not math_verify_says("3", "AZYUK2A")


# ------------------------------------------------------------------------------------ verdicts and reasons


def test_verdicts_and_reasons():
    verifier = get_verifier("math")
    assert isinstance(verifier, MathVerifier)
    solution = "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\nThe answer is 32."
    assert verifier.verify({"answer": "32"}, solution) == Verdict(True, 1.0, "correct")
    assert verifier.verify({"answer": 32}, "The answer is 32.") == Verdict(True, 1.0, "correct")
    assert verifier.verify({"answer": "32"}, "The answer is 31.") == Verdict(
        False, 0.0, "wrong answer: got 31, expected 32"
    )
    assert verifier.verify({"answer": r"\frac{1}{2}"}, r"\boxed{0.5}") == Verdict(True, 1.0, "correct")
    assert verifier.verify({"answer": r"\frac{1}{2}"}, r"\boxed{\frac{1}{3}}") == Verdict(
        False, 0.0, r"wrong answer: got \frac{1}{3}, expected \frac{1}{2}"
    )


def test_gold_answer_sources():
    assert gold_answer({"answer": 12}) == "12"
    assert gold_answer({"answer": 2.0}) == "2"
    assert gold_answer({"answer": " 7 "}) == "7"
    solution = "3 + 4 = 7\nThe answer is 7."
    assert gold_answer({"prompt": "p", "solution": solution}) == solution  # parsed like a completion
    assert MathVerifier().verify({"prompt": "p", "solution": solution}, r"so \boxed{7}").correct
    with pytest.raises(ValueError, match="'answer'"):
        gold_answer({"prompt": "p"})
    with pytest.raises(ValueError, match="'answer' must be text or a number"):
        gold_answer({"answer": [1, 2]})
    # through safe_verify a bad problem becomes an error verdict that names the field
    verdict = MathVerifier().safe_verify({"prompt": "p"}, "The answer is 3.")
    assert not verdict.correct and verdict.reason.startswith("error: ValueError") and "'answer'" in verdict.reason
    verdict = MathVerifier().safe_verify({"prompt": "p", "solution": "I do not know"}, "The answer is 3.")
    assert verdict.reason.startswith("error: ValueError") and "'solution'" in verdict.reason


def test_arithmetic_solutions_are_judged_by_their_answer():
    verifier = MathVerifier()
    for pair in make_preference_pairs(50, seed=3):
        assert verifier.verify(pair, pair["chosen"]).correct
        assert not verifier.verify(pair, pair["rejected"]).correct


def test_extract_answer():
    assert extract_answer("7 + 5 = 12\nThe answer is 12.") == "12"
    assert extract_answer("First 48/2 = 24.\n#### 1,234") == "1234"
    assert extract_answer(r"so $x = \boxed{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer(r"So $\dfrac{1}{3}$ of them.") == r"\frac{1}{3}"  # not "3"
    assert extract_answer("The answer is no.") == "no"  # a word answer
    assert extract_answer("") is None and extract_answer("Let me think.\nIt depends on the case.") is None
    for problem in make_problems(20, seed=3):
        assert extract_answer(problem["solution"]) == problem["answer"]


@pytest.mark.parametrize(
    "text, value",
    [("42", 42), ("-3.5", -3.5), ("1,234", 1234), ("3/4", 0.75), ("$7$", 7), ("12.", 12), (r"\frac{3}{4}", 0.75),
     (r"-\dfrac{1}{8}", -0.125), (5, 5), (0.25, 0.25)],
)
def test_parse_number_plain(text, value):
    """The match verifier's numeric mode still uses parse_number."""
    assert parse_number(text) == value


@pytest.mark.parametrize("text", [r"\frac{x}{2}", r"\sqrt{2}", "x+1", "1/0", "1,23", "two", True, float("nan"), None])
def test_parse_number_rejects_non_plain(text):
    assert parse_number(text) is None


# ------------------------------------------------------------------------------------ the plain-number fast path


def _number_strings(rng: random.Random) -> str:
    kind = rng.randrange(9)
    n = rng.choice([rng.randint(0, 9), rng.randint(10, 999), rng.randint(1000, 10**7), rng.randint(10**7, 10**18)])
    sign = "-" if rng.random() < 0.2 else ""
    if kind == 0:
        return f"{sign}{n}"
    if kind == 1:
        return f"{sign}{n:,}"  # thousands commas
    if kind == 2:
        return f"{sign}{n:,}".replace(",", " ")
    if kind == 3:
        return f"{sign}{n % 10**6}.{rng.randint(0, 10**rng.randint(1, 8)):0{rng.randint(1, 8)}d}"
    if kind == 4:
        return f"{sign}0{n % 1000}"  # a leading zero
    if kind == 5:
        return f"{n % 1000},{rng.randint(0, 99):02d}"  # a decimal comma
    if kind == 6:
        return f".{rng.randint(1, 9999)}"
    if kind == 7:
        return f"{n % 100}%"
    return f"{n % 100} - {rng.randint(1, 9)}"  # an expression


def _near(number: str, rng: random.Random) -> str:
    """A number string equal to ``number`` in another form, or within / just beyond rounding distance."""
    try:
        value = float(number.replace(",", "").replace(" ", ""))
    except ValueError:
        return number
    step = rng.choice([0, 0, 1e-7, 4e-7, 5e-7, 6e-7, 1e-6, 1.5e-6, 2e-6, 3e-6, 1e-3, 1])
    form = rng.choice(["{:.1f}", "{:.6f}", "{:.8f}", "{:g}", "{:.0f}", "{:.7f}"])
    return form.format(value + rng.choice([-1, 1]) * step)


TEMPLATES = [
    "The answer is {}.", "{}", "#### {}", "So we get {} apples in total.", "Final answer: {}",
    "x = 3 + 4 = {}", "The final answer is {}. I hope it is correct.", "First 12 * 3 = 36.\nThen {} remain.",
    "answer {} = 7", "It costs €{}.", "We have 3 cases and {} ways",
]
LATEX_TEMPLATES = [
    r"So the answer is $\boxed{{{}}}$.", r"$ {} $", r"Thus \[ x = {} \]", r"We get \( {} \) in the end.",
    r"$\boxed{{{}}}$ apples, and $3$ pears", r"The final answer is $\boxed{{{}}}$. I hope it is correct.",
    r"First $12 \cdot 3 = 36$, then {} remain.", r"\boxed{{{}}}", r"so $x = {}$ and $y = 2$",
]


def _latex_number(rng: random.Random) -> str:
    a, b = rng.randint(-50, 400), rng.randint(1, 64)
    return rng.choice([rf"\frac{{{a}}}{{{b}}}", rf"\dfrac{{{a}}}{{{b}}}", rf"-\frac{{{abs(a)}}}{{{b}}}", f"{a / b:.6g}",
                       f"{a / b:.3f}", str(a), rf"\tfrac{{{a}}}{{{b}}}", f"{a}.0", rf"\frac{{{a * 2}}}{{{b * 2}}}"])


def _case(rng: random.Random) -> tuple[str, str]:
    """A (gold as math-verify reads it, completion) pair of plain numbers, in text or in LaTeX."""
    if rng.random() < 0.5:
        gold = _number_strings(rng)
        pred = rng.choice([_near(gold, rng), _number_strings(rng), gold])
        return gold, rng.choice(TEMPLATES).format(pred)
    gold = _latex_number(rng)
    pred = rng.choice([gold, _latex_number(rng), _near(gold, rng) if "frac" not in gold else gold])
    gold = rng.choice([f"${gold}$", gold if "\\" not in gold else f"${gold}$", rf"$\boxed{{{gold}}}$"])
    return gold, rng.choice(LATEX_TEMPLATES + TEMPLATES).format(pred)


def test_fast_path_gives_math_verify_verdicts():
    """Every verdict the fast path decides is math-verify's (same extraction, same comparison)."""
    rng = random.Random(0)
    verifier = MathVerifier()
    decided = 0
    pairs = 600
    for _ in range(pairs):
        gold, completion = _case(rng)
        fast = verifier.fast_verify(gold, completion)
        if fast is None:
            continue
        decided += 1
        assert fast.correct is math_verify_says(gold, completion), (gold, completion, fast)
    assert decided >= 0.6 * pairs  # and the fast path decides most of them


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 32.", PlainNumber("32", 32, False)),
        ("#### 1,234", PlainNumber("1234", 1234, False)),
        ("so 0,5 of it", PlainNumber("0.5", Fraction(1, 2), True)),
        ("The answer is 007.", PlainNumber("7", 7, False)),
        ("no digits", None),
        ("36 - 4", UNDECIDED),  # an expression: math-verify parses it with SymPy
        ("28%", UNDECIDED),  # a percentage
        (r"$\frac{1}{2}$", PlainNumber(r"\frac{1}{2}", 0.5, False)),  # LaTeX numbers: its normalised LaTeX
        (r"So $\boxed{\dfrac{6}{-4}}$.", UNDECIDED),  # only the forms latex2sympy is known to read
        (r"So $x = \boxed{35.625}$.", PlainNumber("35.625", 35.625, True)),
        (r"\boxed{\$18.90}", PlainNumber("18.90", Fraction("18.9"), True)),
        (r"$\boxed{28\%}$", UNDECIDED),
        (r"$\sqrt{2}$", UNDECIDED),
        (r"$\boxed{1}, \boxed{2}$", UNDECIDED),  # a set
        ("see [1] for details", PlainNumber("1", 1, False)),  # " [1] " is LaTeX for math-verify
        ("0.1234567890123456", UNDECIDED),  # beyond sympy.Float's 15 digits
        ("so -06 it is", UNDECIDED),  # sympy.Number("-06") raises: math-verify then parses nothing at all
    ],
)
def test_plain_number(text, expected):
    assert plain_number(text) == expected


def test_plain_numbers_never_reach_sympy(monkeypatch):
    import math_verify

    def fail(*args, **kwargs):
        raise AssertionError("math-verify called on plain numbers")

    monkeypatch.setattr(math_verify, "parse", fail)
    monkeypatch.setattr(math_verify, "verify", fail)
    verifier = MathVerifier()
    problems = [{"answer": str(i)} for i in range(300)]
    completions = [f"{i} + 0 = {i}\nThe answer is {i + (i % 3 == 0)}." for i in range(300)]
    verdicts = verifier.verify_batch(problems, completions, num_workers=2)  # decided here: no pool either
    assert [v.correct for v in verdicts] == [i % 3 != 0 for i in range(300)]
    assert answers_match("1,234", "#### 1234") and not answers_match("7", "-7") and answers_match(32, "32.")


def test_plain_numbers_are_fast():
    problems = [{"answer": str(i)} for i in range(5000)]
    completions = [f"{i} * 2 = {2 * i}\n{2 * i} - {i} = {i}\nThe answer is {i + (i % 2)}." for i in range(5000)]
    verifier = MathVerifier()
    start = time.process_time()
    verifier.verify_batch(problems, completions, num_workers=1)
    rate = len(problems) / (time.process_time() - start)
    assert rate > 10_000, f"{rate:,.0f} plain-number answers per CPU second"


# ------------------------------------------------------------------------------------ options


def test_options_are_math_verify_options():
    # strict: variables matter
    assert not MathVerifier().verify({"answer": "$f(x)$"}, "$f(y)$").correct
    assert MathVerifier(strict=False).verify({"answer": "$f(x)$"}, "$f(y)$").correct
    # precision: decimal places floats are rounded to
    assert not MathVerifier().verify({"answer": r"$\frac{1}{3}$"}, "0.3333$").correct
    assert MathVerifier(precision=4).verify({"answer": r"$\frac{1}{3}$"}, "0.3333$").correct
    assert not MathVerifier().verify({"answer": "2.5"}, "2.5001").correct
    assert MathVerifier(precision=3).verify({"answer": "2.5"}, "2.5001").correct
    # set-relation comparison: a gold set against a predicted relation only when allowed
    assert not MathVerifier().verify({"answer": r"$x \in [-2,7]$"}, r"$-2 \le x \le 7$").correct
    assert MathVerifier(allow_set_relation_comp=True).verify({"answer": r"$x \in [-2,7]$"}, r"$-2 \le x \le 7$").correct
    # several boxed answers: all of them (a set), or only the last
    two = r"$\boxed{2} \text{ is what I first thought but it is wrong so the result is } \boxed{3}$"
    assert MathVerifier().verify({"answer": "2, 3"}, two).correct
    assert not MathVerifier(boxed="last").verify({"answer": "2, 3"}, two).correct
    assert MathVerifier(boxed="last").verify({"answer": "3"}, two).correct
    assert MathVerifier(boxed="last").verify({"answer": "2, 3"}, r"$\boxed{2}$ and $\boxed{3}$").correct  # two envs
    # boxed priority: boxed first (default) or after "final answer is" (math-verify's default 50)
    text = r"We get $\boxed{4}$. Checking again, the final answer is $5$."
    assert MathVerifier().verify({"answer": "4"}, text).correct
    assert MathVerifier(boxed_priority=50).verify({"answer": "5"}, text).correct
    # extraction targets
    assert not MathVerifier(extraction=["latex"]).verify({"answer": "$9$"}, "Answer $ \n 9 \n $").correct
    assert MathVerifier(extraction=["latex", "expr"]).verify({"answer": "$9$"}, "Answer $ \n 9 \n $").correct
    with pytest.raises(ValueError, match="extraction"):
        MathVerifier(extraction=["words"])
    with pytest.raises(ValueError, match="boxed"):
        MathVerifier(boxed="first")
    with pytest.raises(ValueError, match="precision"):
        MathVerifier(precision=-1)
    assert get_verifier("math", precision=2, strict=False).options.precision == 2


def test_math_verify_gets_gold_first(monkeypatch):
    """math-verify is not symmetric: gold (1,2) vs predicted 1<x<2 is false, the other way round true."""
    import math_verify

    calls = []
    real_verify = math_verify.verify

    def spy(gold, target, **kwargs):
        calls.append((gold[-1], target[-1]))
        return real_verify(gold, target, **kwargs)

    monkeypatch.setattr(math_verify, "verify", spy)
    verifier = MathVerifier()
    assert not verifier.verify({"answer": "(1,2)"}, r"so \boxed{1<x<2}").correct
    assert verifier.verify({"answer": "1<x<2"}, r"so \boxed{(1,2)}").correct
    assert calls == [("(1,2)", "1<x<2"), ("1<x<2", "(1,2)")]  # the extracted strings, gold first


def test_math_verify_sets_no_alarm_of_its_own(monkeypatch):
    """Its signal.alarm would cancel the verifier's own timer, so its timeouts are turned off."""
    import math_verify

    alarms, parse_calls, verify_calls = [], [], []
    real_parse, real_verify = math_verify.parse, math_verify.verify
    monkeypatch.setattr(signal, "alarm", lambda seconds: alarms.append(seconds) or 0)
    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: parse_calls.append(k) or real_parse(*a, **k))
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: verify_calls.append(k) or real_verify(*a, **k))
    verdict = MathVerifier(timeout=5.0).safe_verify({"answer": r"2\sqrt{3}"}, r"\boxed{\sqrt{12}}")
    assert verdict.correct and alarms == []
    assert parse_calls and all(k["parsing_timeout"] is None for k in parse_calls)
    assert [k["timeout_seconds"] for k in verify_calls] == [None]


# ------------------------------------------------------------------------------------ same answer (NFR_mc)


def test_same_answer_compares_answers_not_wording():
    verifier = MathVerifier()
    problem = {"answer": "4"}
    firsts = ["2 + 3 = 5\nThe answer is 5.", r"So $\boxed{\frac{1}{2}}$.", "The answer is 3.", "I give up.",
              r"\boxed{(1,2)}", "The answer is no.", "I give up."]
    seconds = [r"So the total is $\boxed{5}$.", "#### 0.5", "The answer is 7.", "No idea.\nSorry.",
               r"$(2,1)$", "No.", "The answer is 4."]
    expected = [True, True, False, True, False, True, False]
    assert [verifier.same_answer(problem, a, b) for a, b in zip(firsts, seconds)] == expected
    assert verifier.same_answer_batch([problem] * 7, firsts, seconds, num_workers=1) == expected
    assert verifier.same_answer_batch([problem] * 70, firsts * 10, seconds * 10, num_workers=2) == expected * 10
    # a verifier that reads no answers compares the texts
    from alignkit.verifiers.base import CallableVerifier
    from alignkit.verifiers.match import MatchVerifier

    assert CallableVerifier(lambda p, c: True).same_answer_batch([problem] * 2, ["a", "b"], ["a", "B"]) == [True, False]
    assert MatchVerifier().same_answer(problem, " Paris. ", "paris")
    assert not MatchVerifier(mode="exact").same_answer(problem, " Paris. ", "paris")
    assert MatchVerifier(mode="numeric", extract="answer").same_answer(problem, "The answer is 1,234.", "#### 1234")
    with pytest.raises(ValueError, match="2 problems, 1 first and 2 second"):
        verifier.same_answer_batch([problem] * 2, ["a"], ["a", "b"])


# ------------------------------------------------------------------------------------ time bounds

NESTED_FRACTION = r"\boxed{" + r"\frac{1}{" * 60 + "2" + "}" * 60 + "}"  # seconds-to-minutes in latex2sympy


def test_pathological_input_times_out():
    verifier = MathVerifier(timeout=0.5)
    verifier.warm_up()
    start = time.perf_counter()
    verdict = verifier.safe_verify({"answer": "1"}, NESTED_FRACTION)
    elapsed = time.perf_counter() - start
    assert verdict == Verdict(False, 0.0, "timeout: verification took more than 0.5s")
    assert elapsed < 2.0
    # the timer is gone afterwards, and the verifier still works
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert verifier.safe_verify({"answer": r"\frac{1}{2}"}, r"\boxed{\frac{2}{4}}").correct


@pytest.mark.parametrize("answer", [r"9^{9^{9}}", "9^9^9", r"2^{1000000000}", r"(10^{6})!"])
def test_uninterruptible_big_numbers_are_refused_quickly(answer):
    """SymPy evaluates these in C, where no timer can stop it; parsed answers like these are never compared."""
    verifier = MathVerifier(timeout=1.0)
    verifier.warm_up()
    start = time.perf_counter()
    verdict = verifier.safe_verify({"answer": "1"}, rf"\boxed{{{answer}}}")
    assert not verdict.correct and verdict.reason.startswith("wrong answer")
    assert time.perf_counter() - start < 1.0
    # an identical power tower still matches (compared as extracted text)
    assert verifier.verify({"answer": answer}, rf"\boxed{{{answer}}}").correct


def test_too_big_to_evaluate():
    from math_verify import parse

    assert too_big_to_evaluate(parse(r"$9^{9^{9}}$")) and too_big_to_evaluate(parse(r"$(10^{6})!$"))
    assert not too_big_to_evaluate(parse(r"$2^{10} + 5!$")) and not too_big_to_evaluate(parse("$x^{n^2}$"))


# ------------------------------------------------------------------------------------ batches


def mixed_batch(n_arithmetic: int, seed: int) -> tuple[list[dict], list[str]]:
    """Arithmetic completions (right and wrong), LaTeX answers, and completions with no answer."""
    rng = random.Random(seed)
    problems, completions = [], []
    for pair in make_preference_pairs(n_arithmetic, seed=seed):
        problems.append({"prompt": pair["prompt"], "answer": pair["answer"], "solution": pair["chosen"]})
        completions.append(pair["chosen"] if rng.random() < 0.5 else pair["rejected"])
    for i in range(n_arithmetic // 10):
        a, b = rng.randint(1, 40), rng.randint(2, 40)
        k = rng.choice([1, 2, 3])
        problems.append({"prompt": f"q{i}", "answer": rf"\frac{{{a}}}{{{b}}}"})
        completions.append(rf"Hence \boxed{{\frac{{{a * k}}}{{{b * k + (i % 3 == 0)}}}}}")
    for i in range(n_arithmetic // 20):
        problems.append({"prompt": f"r{i}", "answer": "3"})
        completions.append("I cannot solve this.")
    return problems, completions


def test_recurring_pairs_are_judged_once(monkeypatch):
    """K samples of a problem often end alike: each distinct (gold, completion) goes to math-verify once."""
    import math_verify

    calls = []
    real_verify = math_verify.verify
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: calls.append(1) or real_verify(*a, **k))
    problems = [{"prompt": f"p{i // 8}", "answer": rf"{i // 8 + 2}\sqrt{{2}}"} for i in range(48)]
    completions = [rf"So $\boxed{{\sqrt{{{2 * (i // 8 + 2) ** 2 + (i % 2)}}}}}$." for i in range(48)]
    verdicts = MathVerifier().verify_batch(problems, completions, num_workers=1)
    assert [v.correct for v in verdicts] == [i % 2 == 0 for i in range(48)]
    assert len(calls) == 12  # 6 problems x 2 distinct completions


def test_verify_batch_parallel_equals_serial():
    problems, completions = mixed_batch(260, seed=11)
    assert len(problems) == 260 + 26 + 13
    verifier = MathVerifier()
    serial = [verifier.safe_verify(p, c) for p, c in zip(problems, completions)]
    parallel = verifier.verify_batch(problems, completions, num_workers=2)
    assert parallel == serial
    assert {v.reason.split(":")[0] for v in serial} == {"correct", "wrong answer", "no answer"}
    # the arithmetic ones agree with how they were made
    for problem, completion, verdict in zip(problems[:260], completions[:260], serial):
        assert verdict.correct == (completion == problem["solution"])
