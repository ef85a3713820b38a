"""The math verifier: answer extraction, number and symbolic equivalence, timeouts, parallel batches."""

import random
import signal
import time

import pytest

from alignkit.tasks.arithmetic import make_preference_pairs, make_problems
from alignkit.verifiers import Verdict, get_verifier
from alignkit.verifiers.math import (
    MathVerifier,
    answers_match,
    extract_answer,
    gold_answer,
    parse_number,
    symbolic_match,
)

# ------------------------------------------------------------------------------------ extraction

EXTRACTION_TABLE = [
    # boxed: the last one, balanced nested braces, \fbox, and boxed wins over everything else
    (r"so $x = \boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
    (r"first \boxed{1}, then corrected: \boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\fbox{7}", "7"),
    (r"The answer is 5. Actually \boxed{6}", "6"),
    (r"\boxed{\text{(B)}}", r"\text{(B)}"),
    (r"\boxed 9 is it", "9"),
    (r"unclosed \boxed{12 and then 13", "13"),  # a cut-off box is skipped: falls through to the last number
    # GSM8K
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    # "The answer is" / "answer:"; the last one; sentence end, not the decimal point
    ("The answer is 1,234.", "1,234"),
    ("the answer is 3. No wait, THE ANSWER IS 4.", "4"),
    ("The final answer is 3.5. Let me double-check: 1 + 1 = 2", "3.5"),
    ("Answer: -3/4", "-3/4"),
    ("The answer is:\n\n42", "42"),
    (r"The answer is $\frac{1}{2}$.", r"$\frac{1}{2}$"),
    ("**The answer is 17.**", "17"),
    # last number: negatives, decimals, thousands, fractions, Unicode minus; "-" after a digit is a minus sign
    ("x = 3, y = -5", "-5"),
    ("it costs 2.50 dollars", "2.50"),
    ("a total of 12,500 people", "12,500"),
    ("the ratio is 3 / 4", "3/4"),
    ("the value is \u22127", "-7"),
    ("10-4 leaves 6 or 10-4", "4"),
    ("no digits anywhere", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", EXTRACTION_TABLE)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_arithmetic_solutions_extract_their_answer():
    for problem in make_problems(50, seed=3):
        assert extract_answer(problem["solution"]) == problem["answer"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42),
        ("-3.5", -3.5),
        ("1,234", 1234),
        ("3/4", 0.75),
        ("$7$", 7),
        ("12.", 12),
        (r"\frac{3}{4}", 0.75),
        (r"-\dfrac{1}{8}", -0.125),
        (5, 5),
        (0.25, 0.25),
    ],
)
def test_parse_number_plain(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text", [r"\frac{x}{2}", r"\sqrt{2}", "x+1", "1/0", r"\frac{1}{0}", "1,23", "two", True, float("nan"), None]
)
def test_parse_number_rejects_non_plain(text):
    assert parse_number(text) is None


# ------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize(
    "gold, pred, same",
    [
        ("1234", "1,234", True),
        (1234, "1234.0", True),
        ("0.75", "3/4", True),
        ("1000000", "1000000.0000001", True),  # within the relative tolerance 1e-6
        ("1000000", "1000002", False),
        ("-5", "5", False),
        (r"\frac{1}{2}", "0.5", True),  # integer LaTeX fractions are plain numbers too
        (r"\frac{1}{2}", r"\dfrac{2}{4}", True),
        # the rest needs math-verify; bare LaTeX gold answers still parse (they are wrapped in $...$)
        (r"\frac{1}{2}", r"\frac{x}{2x}", True),
        (r"\frac{\sqrt{3}}{2}", r"\sin(\pi/3)", True),
        (r"\sqrt{2}", r"\sqrt 2", True),
        (r"\sqrt{2}", "1.41", False),
        (r"\pi", r"\pi", True),
        ("n!", r"n!", True),
        (r"\{1, 2\}", r"\{2, 1\}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        # word answers fall back to a case-insensitive comparison
        ("No", "no", True),
        ("Yes", "no", False),
    ],
)
def test_answers_match(gold, pred, same):
    assert answers_match(gold, pred) is same


def test_plain_numbers_never_call_math_verify(monkeypatch):
    import math_verify

    def fail(*args, **kwargs):
        raise AssertionError("math-verify called on plain numbers")

    monkeypatch.setattr(math_verify, "parse", fail)
    monkeypatch.setattr(math_verify, "verify", fail)
    assert answers_match("1,234", "1234") and not answers_match("7", "-7") and answers_match(32, "32.")
    assert answers_match(r"\frac{1}{2}", "0.5") and answers_match("0.75", r"$\frac{6}{8}$")


def test_math_verify_gets_gold_first(monkeypatch):
    """math-verify is not symmetric: gold (1,2) vs predicted 1<x<2 is false, the other way round true."""
    import math_verify

    calls = []
    real_verify = math_verify.verify

    def spy(gold, target, **kwargs):
        calls.append((gold, target))
        return real_verify(gold, target, **kwargs)

    monkeypatch.setattr(math_verify, "verify", spy)
    symbolic_match.cache_clear()
    verifier = MathVerifier()
    assert not verifier.verify({"answer": "(1,2)"}, r"so \boxed{1<x<2}").correct
    assert verifier.verify({"answer": "1<x<2"}, r"so \boxed{(1,2)}").correct
    # each call got the gold's parse first: [sympy object, the string it came from]
    assert [(gold[-1], target[-1]) for gold, target in calls] == [("(1,2)", "1<x<2"), ("1<x<2", "(1,2)")]


def test_math_verify_sets_no_alarm_of_its_own(monkeypatch):
    """Its signal.alarm would cancel the verifier's own timer, so its timeouts are turned off."""
    import math_verify

    alarms, calls = [], []
    real_verify = math_verify.verify
    monkeypatch.setattr(signal, "alarm", lambda seconds: alarms.append(seconds) or 0)
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: calls.append(k) or real_verify(*a, **k))
    symbolic_match.cache_clear()
    verdict = MathVerifier(timeout=5.0).safe_verify({"answer": r"2\sqrt{2}"}, r"\boxed{\sqrt{8}}")
    assert verdict.correct and alarms == []
    assert calls == [{"timeout_seconds": None}]


# ------------------------------------------------------------------------------------ verdicts


def test_verdicts_and_reasons():
    verifier = get_verifier("math")
    assert isinstance(verifier, MathVerifier)
    solution = "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\nThe answer is 32."
    assert verifier.verify({"answer": "32"}, solution) == Verdict(True, 1.0, "correct")
    assert verifier.verify({"answer": 32}, "The answer is 32.") == Verdict(True, 1.0, "correct")
    assert verifier.verify({"answer": "32"}, "The answer is 31.") == Verdict(
        False, 0.0, "wrong answer: got 31, expected 32"
    )
    assert verifier.verify({"answer": "32"}, "I am not sure.") == Verdict(False, 0.0, "no answer found")
    assert verifier.verify({"answer": r"\frac{1}{2}"}, r"\boxed{0.5}") == Verdict(True, 1.0, "correct")


def test_gold_answer_sources():
    assert gold_answer({"answer": 12}) == "12"
    assert gold_answer({"answer": 2.0}) == "2"
    assert gold_answer({"answer": " 7 "}) == "7"
    assert gold_answer({"prompt": "p", "solution": "3 + 4 = 7\nThe answer is 7."}) == "7"
    with pytest.raises(ValueError, match="'answer'"):
        gold_answer({"prompt": "p"})
    with pytest.raises(ValueError, match="'solution'"):
        gold_answer({"prompt": "p", "solution": "I do not know"})
    # through safe_verify the missing field becomes an error verdict that names it
    verdict = MathVerifier().safe_verify({"prompt": "p"}, "The answer is 3.")
    assert not verdict.correct and verdict.reason.startswith("error: ValueError") and "'answer'" in verdict.reason


# ------------------------------------------------------------------------------------ time bounds

NESTED_FRACTION = r"\boxed{" + r"\frac{1}{" * 60 + "2" + "}" * 60 + "}"  # seconds-to-minutes in latex2sympy


def test_pathological_input_times_out():
    verifier = MathVerifier(timeout=0.5)
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
    """SymPy evaluates these in C, where no timer can stop it; they are never handed to it."""
    start = time.perf_counter()
    verdict = MathVerifier(timeout=1.0).safe_verify({"answer": "1"}, rf"\boxed{{{answer}}}")
    assert not verdict.correct and verdict.reason.startswith("wrong answer")
    assert time.perf_counter() - start < 1.0
    # an identical power tower still matches (string comparison)
    assert MathVerifier().verify({"answer": answer}, rf"\boxed{{{answer}}}").correct


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


def test_verify_batch_parallel_equals_serial():
    problems, completions = mixed_batch(260, seed=11)
    assert len(problems) == 260 + 26 + 13
    verifier = MathVerifier()
    serial = [verifier.safe_verify(p, c) for p, c in zip(problems, completions)]
    parallel = verifier.verify_batch(problems, completions, num_workers=2)
    assert parallel == serial
    reasons = {v.reason.split(":")[0] for v in serial}
    assert reasons == {"correct", "wrong answer", "no answer found"}
    # the arithmetic ones agree with how they were made
    for problem, completion, verdict in zip(problems[:260], completions[:260], serial):
        assert verdict.correct == (completion == problem["solution"])
