"""The exact shortcuts for math-verify's ``simplify(gold - pred).is_zero`` (alignkit.verifiers.math_zero):
every verdict they decide is the one ``simplify`` gives, they decide the common cases, and math-verify
called outside the verifier runs unchanged."""

import random

import pytest
from sympy import E, Float, I, Integer, Matrix, Rational, pi, sin, sqrt, symbols

from alignkit.verifiers.math import MathVerifier
from alignkit.verifiers.math_zero import certain_zero, exact_shortcuts

x, y = symbols("x y")


def simplify_says(a, b) -> bool:
    """math-verify's own ``sympy_symbolic_eq``: ``simplify(a - b)`` is zero."""
    from math_verify.grader import MatrixBase, simplify

    try:
        difference = simplify(a - b)
    except Exception:
        return False
    if isinstance(difference, MatrixBase):
        return bool(difference.is_zero_matrix)
    return bool(difference.is_zero)


def _random_pair(rng: random.Random):
    """A (gold, prediction) pair of the kinds answers come in, equal about half the time."""
    a, b, c = rng.randint(1, 300), rng.randint(2, 23), rng.randint(2, 9)
    w = rng.choice([0, 0, 1])
    kind = rng.randrange(8)
    if kind == 0:  # a squared binomial and its expansion
        return (x + a) ** 2, x**2 + (2 * a + w) * x + a * a
    if kind == 1:  # a product of binomials in two symbols
        return (x + a) * (y - c), x * y - c * x + a * y - a * c - w
    if kind == 2:  # a rational function and its partial fractions
        return Rational(1, 1) / (x + a) - Rational(1, 1) / (x + a + 1), (1 + w) / ((x + a) * (x + a + 1))
    if kind == 3:  # a radical and its unsimplified form
        return c * sqrt(b), sqrt(c * c * b + w)
    if kind == 4:  # a sum of radicals
        return sqrt(b) + sqrt(b + 1), sqrt(2 * b + 1 + 2 * sqrt(b * (b + 1)) + w)
    if kind == 5:  # a rational and a nearby decimal
        return Rational(a, b), Float(a / b + w * 1e-3, 15)
    if kind == 6:  # pi and e
        return a * pi, a * Rational(355, 113) if w else a * pi + 0
    return E**c, Integer(round(float(E**c))) + w  # never equal


def test_decided_verdicts_are_simplifys():
    rng = random.Random(0)
    decided = 0
    for _ in range(400):
        gold, pred = _random_pair(rng)
        verdict = certain_zero(gold, pred)
        if verdict is None:
            continue
        decided += 1
        assert verdict is simplify_says(gold, pred), (gold, pred, verdict)
    assert decided >= 250  # polynomials, rational functions and non-zero numbers: most of them


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((x + 3) ** 2, x**2 + 6 * x + 9, True),
        ((x + 3) ** 2, x**2 + 6 * x + 10, False),
        (1 / (x + 1) - 1 / (x + 2), 1 / ((x + 1) * (x + 2)), True),
        (x / y, 2 * x / (2 * y), True),
        (35 * sqrt(21), sqrt(25726), False),  # close (0.003 apart), but certified non-zero
        (pi, Rational(355, 113), False),
        (Integer(3), Integer(3), True),
    ],
)
def test_certain_cases(a, b, expected):
    assert certain_zero(a, b) is expected
    assert simplify_says(a, b) is expected


@pytest.mark.parametrize(
    "a, b",
    [
        (sqrt(2 + sqrt(3)), (sqrt(6) + sqrt(2)) / 2),  # zero, but only simplify can show it
        (sin(x) ** 2 + sin(x + pi / 2) ** 2, Integer(1)),  # functions of symbols
        (sqrt(x) * sqrt(x + 1), sqrt(x**2 + x)),  # radicals of a symbol
        (sqrt(2) * x + sqrt(3) * x, (sqrt(2) + sqrt(3)) * x),  # irrational coefficients are simplify's
        (Matrix([[1, 2]]), Matrix([[1, 2]])),
        ((1 + I) ** 2, 2 * I),  # a number equal to zero: evalf cannot certify it
    ],
)
def test_undecided_cases_go_to_simplify(a, b):
    assert certain_zero(a, b) is None


def test_math_verify_runs_unchanged_outside_the_verifier(monkeypatch):
    """The replacement in math_verify.grader takes the shortcut only inside exact_shortcuts()."""
    from math_verify import grader, parse, verify

    with exact_shortcuts():
        pass  # installs the replacement
    gold, pred = parse("$(x+3)^2$"), parse("$x^2+6x+9$")
    calls = []
    original = grader.simplify
    monkeypatch.setattr(grader, "simplify", lambda e: calls.append(e) or original(e))
    assert verify(gold, pred)
    assert len(calls) == 1  # simplify ran: no shortcut outside the block
    with exact_shortcuts():
        assert verify(gold, pred)
    assert len(calls) == 1  # decided without simplify inside it


@pytest.mark.parametrize(
    "gold, completion",
    [
        ("(x+7)^2", r"So $\boxed{x^2+14x+49}$."),
        ("(x+7)^2", r"So $\boxed{x^2+14x+48}$."),
        (r"5\sqrt{3}", r"So $\boxed{\sqrt{75}}$."),
        (r"5\sqrt{3}", r"So $\boxed{\sqrt{76}}$."),
        (r"\frac{1}{x+1}-\frac{1}{x+2}", r"$\boxed{\frac{1}{(x+1)(x+2)}}$"),
        (r"\frac{\sqrt{6}+\sqrt{2}}{2}", r"$\boxed{\sqrt{2+\sqrt{3}}}$"),
    ],
)
def test_the_verifier_keeps_math_verifys_verdicts(gold, completion):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    targets = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    expected = verify(parse(f"${gold}$", targets), parse(completion, targets))
    assert MathVerifier(fast_path=False).verify({"answer": gold}, completion).correct is expected


def test_a_math_verify_without_the_function_runs_without_the_shortcut(monkeypatch):
    """A math-verify version without sympy_symbolic_eq: nothing is installed and nothing raises."""
    from math_verify import grader

    from alignkit.verifiers import math_zero

    monkeypatch.delattr(grader, "sympy_symbolic_eq")
    monkeypatch.setattr(math_zero, "_INSTALLED", {})
    with exact_shortcuts():
        assert not hasattr(grader, "sympy_symbolic_eq")
    assert math_zero._INSTALLED == {}
