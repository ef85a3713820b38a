"""Judging outside the program: the plain-data encoding, the report parser, and the test planner.

The planner's verdicts are checked against a direct re-computation: each (program, test) pair is run
the ordinary way, in this process (the programs here are ours), and the test must pass outside
exactly when it passes there. The steps are evaluated in-process too (with the encoding round trip),
so these tests need no sandbox and take well under a second; the end-to-end runs are in
``test_sandbox.py`` and ``test_hostile_corpus.py``.
"""

from __future__ import annotations

import collections
import contextlib
import decimal
import enum
import fractions
import io
import math
import sys
import types

import pytest

from alignkit.verifiers.code_judge import plan_tests
from alignkit.verifiers.sandbox import Step, StepResult, _parse_report
from alignkit.verifiers.sandbox_child import MalformedResult, UnsupportedResult, decode_values, encode_value


def roundtrip(value):
    tokens: list[str] = []
    encode_value(value, tokens)
    assert all(" " not in t and t for t in tokens)
    decoded, end = decode_values(tokens, 0)
    assert end == len(tokens)
    return decoded


# ------------------------------------------------------------------------------------ values


def repr_id(value) -> str:
    text = type(value).__name__ + ":" + (repr(value) if not isinstance(value, int) or value.bit_length() < 64 else "big")
    return text[:40]


@pytest.mark.parametrize("value", [
    None, True, False, 0, 1, -1, 255, -(2**20000), 2**200, 0.0, -0.0, 1.5, -2.75e-300, math.inf, -math.inf,
    1 + 2j, "", "abc", "ünïcødé ✓", "line\nbreak and spaces", "\udc80surrogate", b"", b"\x00\xff", bytearray(b"ab"),
    [], (), {}, set(), frozenset(), [1, [2, [3, []]]], (1, "a", None), {"k": [1, 2], 3: (4, 5), (1, 2): None},
    {1, 2, (3, 4)}, frozenset({"x"}), fractions.Fraction(-3, 7), decimal.Decimal("3.1400"),
    [{"a": {1: [frozenset({2})]}}] * 3,
], ids=repr_id)
def test_plain_values_round_trip_with_their_types(value):
    got = roundtrip(value)
    assert got == value and type(got) is type(value)
    if isinstance(value, float):
        assert math.copysign(1, got) == math.copysign(1, value)


def test_nan_and_nested_types():
    assert math.isnan(roundtrip(math.nan))
    got = roundtrip([(1,), [1], {1: (2,)}])
    assert [type(x) for x in got] == [tuple, list, dict] and type(got[2][1]) is tuple


def test_subclasses_become_their_base_types():
    class Color(enum.IntEnum):
        RED = 1

    Point = collections.namedtuple("Point", "x y")

    class Text(str):
        def __eq__(self, other):  # lies; the base value is what is sent
            return True

        __hash__ = str.__hash__

    cases = [
        (Color.RED, 1, int), (Point(1, 2), (1, 2), tuple), (Text("a"), "a", str),
        (collections.OrderedDict(a=1), {"a": 1}, dict), (collections.Counter("aab"), {"a": 2, "b": 1}, dict),
        (collections.defaultdict(list, k=[1]), {"k": [1]}, dict),
    ]
    for value, plain, kind in cases:
        got = roundtrip(value)
        assert got == plain and type(got) is kind, value


def test_numpy_scalars_are_python_numbers():
    np = pytest.importorskip("numpy")
    assert roundtrip(np.int64(7)) == 7 and type(roundtrip(np.int64(7))) is int
    assert type(roundtrip(np.float32(0.5))) is float and type(roundtrip(np.bool_(True))) is bool
    with pytest.raises(UnsupportedResult, match="numpy.ndarray"):
        roundtrip(np.arange(3))


def test_what_is_not_plain_data_is_refused():
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    with pytest.raises(UnsupportedResult, match="only plain data"):
        roundtrip(AlwaysEqual())
    with pytest.raises(UnsupportedResult):
        roundtrip([1, object()])
    with pytest.raises(UnsupportedResult):
        roundtrip(iter([1]))
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="too large"):
        encode_value(cyclic, [], budget=10_000)
    with pytest.raises(ValueError, match="too large"):
        encode_value(list(range(10_001)), [], budget=10_000)


@pytest.mark.parametrize("tokens", [
    [], ["L2", "i1"], ["x"], ["i"], ["i-"], ["i12g"], ["dnotafloat"], ["s0"], ["S1", "L0"], ["D1", "L0", "n"],
    ["L99999999", "n"], ["L1a"], ["nn"], ["q1/0"], ["m" + "zz".encode().hex()],
])
def test_malformed_values_are_rejected(tokens):
    with pytest.raises(MalformedResult):
        decode_values(tokens, 0)


def test_report_parsing_is_strict():
    ok = _parse_report(b"H\nB network 736f636b6574\nR V i5 P F417373657274696f6e4572726f72.\nX 0\n", 3)
    assert ok.started and ok.exit_status == 0 and ok.problem is None
    assert ok.blocked == ("network: socket",)
    assert ok.steps == (StepResult(True, 5), StepResult(True), StepResult(False, None, "AssertionError", ""))
    # two reports (the program wrote one too), a wrong count, a garbage line, a stray report
    assert _parse_report(b"H\nR V i5\nR V i5\n", 1).problem == "more than one test report"
    assert _parse_report(b"H\nR V i5 V i6\n", 1).problem == "a malformed test report"
    assert _parse_report(b"H\nR V L2 i1\n", 1).problem == "a malformed test report"
    assert _parse_report(b"H\nhello\nR V i5\n", 1).problem == "a malformed report line"
    assert _parse_report(b"H\nR P\n", None).problem == "a test report where none was asked for"
    assert _parse_report(b"H\n", 1).steps is None


# ------------------------------------------------------------------------------------ the planner


@contextlib.contextmanager
def as_main():
    """A fresh module installed as ``__main__`` (``unittest.main()`` looks its tests up there)."""
    module = types.ModuleType("__alignkit_solution__")
    saved, saved_argv = sys.modules["__main__"], sys.argv
    sys.modules["__main__"], sys.argv = module, ["main.py"]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # unittest's report
            yield module.__dict__
    finally:
        sys.modules["__main__"], sys.argv = saved, saved_argv


def simulate(program: str, plan) -> list[StepResult]:
    """Run the program and the plan's steps in this process, as the sandbox child does."""
    with as_main() as g:
        return _simulate(program, plan, g)


def _simulate(program: str, plan, g: dict) -> list[StepResult]:
    exec(compile(program, "main.py", "exec"), g)
    g["__name__"] = "__main__"
    out = []
    for step in plan.steps:
        try:
            if step.kind == "exec":
                try:
                    exec(step.source, g)
                except SystemExit as e:
                    if e.code not in (None, 0, False):
                        raise
                out.append(StepResult(True))
                continue
            value = eval(step.source, g)
            if step.kind == "truth":
                value = bool(value)
            out.append(StepResult(True, roundtrip(value)))
        except BaseException as e:  # noqa: BLE001  (what the child reports)
            out.append(StepResult(False, None, type(e).__name__, str(e)))
    return out


def passes_in_process(program: str, test: str) -> bool:
    """The direct re-computation: the program, then the test, in one namespace."""
    with as_main() as g:
        return _passes(program, test, g)


def _passes(program: str, test: str, g: dict) -> bool:
    exec(compile(program, "main.py", "exec"), g)
    g["__name__"] = "__main__"
    try:
        exec(test, g)
    except SystemExit as e:
        return e.code in (None, 0, False)
    except BaseException:  # noqa: BLE001
        return False
    return True


PROGRAMS = {
    "right": "import math\ndef add(a, b):\n    return a + b\ndef area(r):\n    return math.pi * r * r\n"
             "def uniq(xs):\n    return sorted(set(xs))\ndef find(xs, x):\n    return xs.index(x) if x in xs else None\n"
             "def words(s):\n    return s.split()\ndef is_even(n):\n    return n % 2 == 0\ndef pair(n):\n    return (n, n + 1)\n"
             "def gen(n):\n    return (i for i in range(n))\ndef table(n):\n    return {i: i * i for i in range(n)}\n",
    "wrong": "import math\ndef add(a, b):\n    return a - b\ndef area(r):\n    return 3.0 * r * r\n"
             "def uniq(xs):\n    return list(xs)\ndef find(xs, x):\n    return -1\n"
             "def words(s):\n    return s.split(',')\ndef is_even(n):\n    return True\ndef pair(n):\n    return [n, n + 1]\n"
             "def gen(n):\n    return iter(range(n + 1))\ndef table(n):\n    return {i: i for i in range(n)}\n",
}

OUTSIDE_TESTS = [
    "assert add(2, 3) == 5",
    "assert 5 == add(2, 3)",
    "assert add(2, 2) != 5",
    "assert add(1, 1) < 3 and add(1, 1) >= 2",
    "assert 0 < add(1, 2) <= 3",
    "assert add(1, 2) in (3, 4)",
    "assert 3 not in [add(0, 1), add(1, 1)]",
    "assert find([1, 2], 5) is None",
    "assert is_even(4) is True",
    "assert is_even(3) is False",
    "assert not is_even(7)",
    "assert is_even(2) or is_even(3)",
    "assert abs(area(1) - 3.14159) < 1e-3",
    "assert abs(3.14159 - area(1)) <= 1e-3",
    "import math\nassert math.isclose(area(2), 12.566370614359172)",
    "from math import isclose\nassert isclose(area(1), 3.1416, rel_tol=1e-4)",
    "assert round(area(1), 2) == 3.14",
    "assert sorted(uniq([3, 1, 3])) == [1, 3]",
    "assert len(uniq([1, 1, 2])) == 2",
    "assert isinstance(pair(1), tuple)",
    "assert type(add(1, 1)) == int",
    "assert pair(3) == (3, 4)",
    "assert list(gen(3)) == [0, 1, 2]",
    "assert sum(gen(4)) == 6",
    "assert table(3) == {0: 0, 1: 1, 2: 4}",
    "assert words('a b  c') == ['a', 'b', 'c']",
    "assert add(10**30, 1) == 1000000000000000000000000000001",
    "assert add(0.1, 0.2) == 0.30000000000000004",
    "assert add(-1, 1) == 0, 'zero'",
    "assert add(2, 3) - 5 == 0",
    "assert -add(2, 3) == -5",
    "expected = [1, 2, 3]\nassert uniq([3, 2, 1, 1]) == expected",
    "data = [5, 5, 6]\nassert uniq(data) == [5, 6]",
    "assert (lambda: add(1, 1))() == 2",
    "assert sorted(uniq([2, 1]), key=lambda v: -v) == [2, 1]",
]


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("test", OUTSIDE_TESTS)
def test_outside_verdicts_equal_in_process_verdicts(program, test):
    plan = plan_tests([test])
    assert plan.outside, (test, plan.steps)
    outcome = plan.judge(simulate(PROGRAMS[program], plan))[0]
    assert outcome.passed == passes_in_process(PROGRAMS[program], test), (test, outcome)
    assert outcome.outside


def test_expected_values_never_reach_the_sandbox():
    tests = ["assert add(2, 3) == 51234", "assert abs(area(1) - 2.71828) < 1e-3", "assert 987654 == add(1, 1)",
             "assert find([1, 2], 2) in (4242, 4343)", "assert round(area(1), 4) == 3.1416"]
    plan = plan_tests(tests)
    sources = " ".join(s.source for s in plan.steps)
    for secret in ("51234", "2.71828", "987654", "4242", "4343", "3.1416", "1e-3", "0.001"):
        assert secret not in sources
    assert [s.source for s in plan.steps] == ["add(2, 3)", "area(1)", "add(1, 1)", "find([1, 2], 2)", "area(1)"]


TEST_PROGRAMS = [
    # unittest, with the assertions the planner takes apart
    "import unittest\n\nclass TestAll(unittest.TestCase):\n    def test_a(self):\n        self.assertEqual(add(1, 2), 3)\n"
    "        self.assertNotEqual(add(1, 1), 3)\n        self.assertTrue(is_even(2))\n        self.assertFalse(is_even(1))\n"
    "    def test_b(self):\n        self.assertAlmostEqual(area(1), 3.14159, places=4)\n"
    "        self.assertAlmostEqual(area(1), 3.1, delta=0.1)\n        self.assertIn(3, uniq([3, 1]))\n"
    "        self.assertIsNone(find([], 1))\n        self.assertIsNotNone(find([1], 1))\n"
    "        self.assertCountEqual(uniq([2, 1]), [1, 2])\n        self.assertListEqual(uniq([1]), [1])\n"
    "        self.assertGreater(add(2, 2), 3)\n        self.assertIsInstance(pair(1), tuple)\n\n"
    "if __name__ == '__main__':\n    unittest.main()\n",
    "from unittest import TestCase, main\nclass T(TestCase):\n    def test_x(self):\n        self.assertEqual(words('a b'), ['a', 'b'])\nmain()\n",
    # HumanEval's shape
    "METADATA = {'author': 'x'}\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, -1) == -2\n\ncheck(add)\n",
    # asserts, ended by sys.exit(0)
    "import sys\nassert add(1, 1) == 2\nassert table(2) == {0: 0, 1: 1}\nsys.exit(0)\n",
    "from sys import exit\nassert pair(0) == (0, 1)\nexit()\nassert False\n",
    # a main guard around the calls
    "def check(f):\n    assert f([2, 2]) == [2]\nif __name__ == '__main__':\n    check(uniq)\n",
]


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("test", TEST_PROGRAMS)
def test_test_programs_are_taken_apart_and_agree(program, test):
    plan = plan_tests(test)
    assert plan.outside and plan.text_program, plan.steps
    outcome = plan.judge(simulate(PROGRAMS[program], plan))[0]
    assert outcome.passed == passes_in_process(PROGRAMS[program], test), (program, outcome)


IN_PROCESS_TESTS = [
    "for i in range(3):\n    assert add(i, 0) == i",
    "x = add(1, 2)\nassert x == 3",
    "def helper():\n    return add(1, 1)\nassert helper() == 2",
    "assert add(1, 1) is 2",
    "import unittest\nclass T(unittest.TestCase):\n    def setUp(self):\n        self.x = 1\n    def test(self):\n"
    "        self.assertEqual(add(self.x, 1), 2)\nunittest.main()\n",
    "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        with self.assertRaises(TypeError):\n"
    "            add(1, 'a')\nunittest.main()\n",
    "assert (x := add(1, 1)) == 2",
    # comparisons that would happen inside the sandbox, with the expected value there
    "assert all(add(i, 0) == i for i in range(3))",
    "assert (add(1, 1) == 2) is True",
    "import operator\nassert operator.eq(add(1, 1), 2)",
]


@pytest.mark.filterwarnings("ignore:.*with a literal:SyntaxWarning")
@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("test", IN_PROCESS_TESTS)
def test_what_cannot_be_taken_apart_runs_inside_and_says_so(program, test):
    plan = plan_tests([test])
    assert not plan.outside and [s.kind for s in plan.steps] == ["exec"]
    outcome = plan.judge(simulate(PROGRAMS[program], plan))[0]
    assert outcome.passed == passes_in_process(PROGRAMS[program], test) and not outcome.outside
    refused = plan_tests([test], allow_in_process=False)
    assert refused.steps == [] and refused.judge([])[0].error_type == "NotJudgeable"


def test_constants_used_by_an_in_process_test_reach_it_and_lose_the_outside_mark():
    plan = plan_tests(["expected = [1, 2]", "assert uniq([2, 1]) == expected", "for x in expected:\n    assert x in uniq([1, 2])"])
    assert [s.kind for s in plan.steps] == ["exec", "eval", "exec"]
    assert [t.outside for t in plan.tests] == [True, False, False]
    outcomes = plan.judge(simulate(PROGRAMS["right"], plan))
    assert [o.passed for o in outcomes] == [True, True, True]


def test_failures_name_what_the_program_returned():
    plan = plan_tests(["assert add(2, 3) == 5", "assert area(1) > 100", "assert find([1], 7) == 0"])
    outcomes = plan.judge(simulate(PROGRAMS["wrong"], plan))
    assert [(o.passed, o.error_type, o.error) for o in outcomes] == [
        (False, "AssertionError", "got add(2, 3) = -1"),
        (False, "AssertionError", "got area(1) = 3.0"),
        (False, "AssertionError", "got find([1], 7) = -1"),
    ]
    plan = plan_tests(["assert add(1) == 1", "def f(:", "assert 1 / 0 == add(1, 1)"])
    outcomes = plan.judge(simulate(PROGRAMS["right"], plan))
    assert [(o.passed, o.error_type) for o in outcomes] == [
        (False, "TypeError"), (False, "SyntaxError"), (False, "ZeroDivisionError")]


def test_parent_side_arithmetic_is_bounded():
    plan = plan_tests(["assert add(2, 0) ** 10**9 == 1", "assert 'x' * add(10**9, 0) == ''"])
    outcomes = plan.judge([StepResult(True, 2), StepResult(True, 10**9)])
    assert [o.error_type for o in outcomes] == ["OverflowError", "OverflowError"]


def test_step_kinds_are_checked():
    with pytest.raises(ValueError):
        Step("run", "x")
