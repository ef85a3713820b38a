"""The match verifier's modes, custom callables as verifiers, and the verifier registry."""

import logging
import os

import pytest

from alignkit.verifiers import Verdict, Verifier, base, get_verifier, register_verifier, registered_verifiers
from alignkit.verifiers.base import CallableVerifier, to_verdict
from alignkit.verifiers.match import MatchVerifier, candidate, normalize


@pytest.fixture
def registry():
    """The verifier registry, restored after the test (tests register throwaway names)."""
    registered_verifiers()  # load the built-ins first, so that they survive the restore
    saved = dict(base._REGISTRY)
    yield base._REGISTRY
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


# ------------------------------------------------------------------------------------ match modes


def test_exact_is_character_for_character():
    verifier = MatchVerifier(mode="exact")
    assert verifier.verify({"answer": "Paris"}, "Paris") == Verdict(True, 1.0, "correct")
    assert verifier.verify({"answer": "Paris"}, "paris") == Verdict(
        False, 0.0, "wrong answer: got paris, expected Paris"
    )
    assert not verifier.verify({"answer": "Paris"}, "Paris\n").correct
    assert verifier.verify({"answer": 42}, "42").correct  # a numeric answer compares as its text


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("paris", True),
        ("  PARIS.  ", True),
        ("Paris!", True),
        ("Paris ?", True),
        ("Paris, France", False),
        ("Pari", False),
    ],
)
def test_normalized(completion, correct):
    assert MatchVerifier(mode="normalized").verify({"answer": "Paris"}, completion).correct is correct


def test_normalize_collapses_whitespace_and_trailing_punctuation():
    assert normalize("  New\t York \n City ;.") == "new york city"
    assert normalize("STRASSE") == normalize("straße")  # casefold, not lower


def test_regex_fullmatch_and_search():
    problem = {"answer": r"\d+ (apples|pears)"}
    full = MatchVerifier(mode="regex")
    assert full.verify(problem, "12 apples").correct
    verdict = full.verify(problem, "I count 12 apples")
    assert not verdict.correct and verdict.reason.startswith("wrong answer: no full match for")
    assert MatchVerifier(mode="regex", search=True).verify(problem, "I count 12 apples").correct
    assert not MatchVerifier(mode="regex", search=True).verify(problem, "I count 12 APPLES").correct
    assert MatchVerifier(mode="regex", search=True, ignore_case=True).verify(problem, "I count 12 APPLES").correct
    with pytest.raises(ValueError, match="not a valid regular expression"):
        full.verify({"answer": "(unclosed"}, "x")


def test_numeric_tolerances():
    default = MatchVerifier(mode="numeric")
    assert default.verify({"answer": 1234}, "1,234").correct
    assert default.verify({"answer": "0.75"}, "3/4").correct
    assert default.verify({"answer": 1e6}, "1000000.5").correct  # rel_tol 1e-6
    assert not default.verify({"answer": 1e6}, "1000002").correct
    assert default.verify({"answer": 0}, "1e-10").correct  # abs_tol 1e-9
    assert not MatchVerifier(mode="numeric", abs_tol=0.0, rel_tol=0.0).verify({"answer": 0}, "1e-10").correct
    assert MatchVerifier(mode="numeric", abs_tol=0.1).verify({"answer": 3.14159}, "3.1").correct
    assert default.verify({"answer": 5}, "five") == Verdict(False, 0.0, "not a number: five")
    with pytest.raises(ValueError, match="numeric 'answer'"):
        default.verify({"answer": "five"}, "5")


def test_extract_options():
    text = "Let me think.\nThe answer is 7.\n\nFinal: 7 apples\n"
    assert candidate(text, "none") == text
    assert candidate(text, "last_line") == "Final: 7 apples"
    assert candidate(text, "answer") == "7"
    assert candidate(r"so \boxed{12}", "answer") == "12"
    assert candidate("\n \n", "last_line") is None
    assert MatchVerifier(mode="numeric", extract="answer").verify({"answer": 7}, text).correct
    assert MatchVerifier(mode="normalized", extract="last_line").verify({"answer": "final: 7 apples"}, text).correct
    assert MatchVerifier(mode="numeric", extract="answer").verify({"answer": 7}, "no idea") == Verdict(
        False, 0.0, "no answer found"
    )


def test_bad_options_and_missing_answer():
    with pytest.raises(ValueError, match="unknown match mode"):
        MatchVerifier(mode="fuzzy")
    with pytest.raises(ValueError, match="unknown extract"):
        MatchVerifier(extract="first_line")
    with pytest.raises(ValueError, match="tolerances"):
        MatchVerifier(mode="numeric", abs_tol=-1)
    with pytest.raises(ValueError, match="'answer'"):
        MatchVerifier().verify({"prompt": "p", "tests": ["assert True"]}, "x")


def test_match_through_registry_and_batch():
    verifier = get_verifier("match", mode="numeric", extract="answer")
    assert isinstance(verifier, MatchVerifier) and verifier.mode == "numeric"
    problems = [{"answer": i} for i in range(200)]
    completions = [f"The answer is {i if i % 3 else i + 1}." for i in range(200)]
    verdicts = verifier.verify_batch(problems, completions, num_workers=2)
    assert [v.correct for v in verdicts] == [i % 3 != 0 for i in range(200)]


# ------------------------------------------------------------------------------------ custom callables


def test_to_verdict_conversions():
    assert to_verdict(True) == Verdict(True, 1.0, "correct")
    assert to_verdict(False) == Verdict(False, 0.0, "incorrect")
    assert to_verdict(0.75) == Verdict(True, 0.75, "score 0.75 >= threshold 0.5")
    assert to_verdict(0.25) == Verdict(False, 0.25, "score 0.25 < threshold 0.5")
    assert to_verdict(0.75, threshold=0.9).correct is False
    assert to_verdict(1) == Verdict(True, 1.0, "score 1 >= threshold 0.5")
    kept = Verdict(False, 0.3, "partial")
    assert to_verdict(kept) is kept
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_verdict(1.5)
    with pytest.raises(ValueError):
        to_verdict(float("nan"))
    with pytest.raises(TypeError, match="Verdict, a bool or a number"):
        to_verdict("yes")


def test_callable_verifier_wraps_functions():
    verifier = CallableVerifier(lambda problem, text: len(text) / 10, threshold=0.3)
    assert verifier.verify({}, "abcd") == Verdict(True, 0.4, "score 0.4 >= threshold 0.3")
    assert not verifier.verify({}, "ab").correct
    # a bad return value becomes an error verdict in safe_verify, not a lost batch
    verdict = CallableVerifier(lambda problem, text: None).safe_verify({}, "x")
    assert not verdict.correct and verdict.reason.startswith("error: TypeError")
    with pytest.raises(TypeError, match="wraps a callable"):
        CallableVerifier("not a function")


def contains_answer(problem, completion):
    """A module-level (so picklable) check function: process-parallel batches can run it."""
    return str(problem["answer"]) in completion


def checked_in_which_process(problem, completion):
    return Verdict(True, 1.0, f"pid {os.getpid()}")


def test_registered_plain_function(registry):
    register_verifier("contains", contains_answer)
    verifier = get_verifier("contains", timeout=2.0)
    assert isinstance(verifier, CallableVerifier) and verifier.name == "contains" and verifier.timeout == 2.0
    assert verifier.verify({"answer": 42}, "it is 42") == Verdict(True, 1.0, "correct")
    assert verifier.verify({"answer": 42}, "it is 41") == Verdict(False, 0.0, "incorrect")
    assert "contains" in registered_verifiers()


def test_register_as_decorator_and_threshold(registry):
    @register_verifier("overlap")
    def overlap(problem, completion):
        words = set(problem["answer"].split())
        return len(words & set(completion.split())) / len(words)

    assert overlap.__name__ == "overlap"  # the decorator hands the function back
    problem = {"answer": "red green blue"}
    assert get_verifier("overlap").verify(problem, "red green").correct  # 2/3 >= 0.5
    assert not get_verifier("overlap", threshold=0.9).verify(problem, "red green").correct


def test_picklable_function_runs_in_worker_processes(registry, caplog):
    register_verifier("pid", checked_in_which_process)
    verifier = get_verifier("pid")
    with caplog.at_level(logging.WARNING):
        verdicts = verifier.verify_batch([{}] * 256, ["x"] * 256, num_workers=2)
    pids = {v.reason for v in verdicts}
    assert f"pid {os.getpid()}" not in pids and 1 <= len(pids) <= 2  # all checked in worker processes
    assert "cannot be pickled" not in caplog.text


def test_lambda_falls_back_to_serial_with_a_warning(registry, caplog):
    register_verifier("lambda", lambda problem, completion: Verdict(True, 1.0, f"pid {os.getpid()}"))
    verifier = get_verifier("lambda")
    with caplog.at_level(logging.WARNING, logger="alignkit.verifiers.base"):
        verdicts = verifier.verify_batch([{}] * 256, ["x"] * 256, num_workers=2)
    assert {v.reason for v in verdicts} == {f"pid {os.getpid()}"}  # all in this process
    assert "cannot be pickled" in caplog.text and "serially" in caplog.text

    def closure_check(problem, completion):  # closures are not picklable either
        return completion == problem["answer"]

    verdicts = CallableVerifier(closure_check).verify_batch([{"answer": "a"}] * 130, ["a", "b"] * 65, num_workers=2)
    assert [v.correct for v in verdicts] == [True, False] * 65


# ------------------------------------------------------------------------------------ registry


def test_builtins_registered():
    names = registered_verifiers()
    assert {"math", "match"} <= set(names)


def test_unknown_verifier_name(registry):
    with pytest.raises(KeyError, match="unknown verifier 'nope'.*registered: .*'match'.*'math'"):
        get_verifier("nope")


class ConstantVerifier(Verifier):
    name = "constant"

    def __init__(self, value: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.value = value

    def verify(self, problem, completion):
        return to_verdict(self.value)


def test_classes_factories_and_instances(registry):
    register_verifier("constant", ConstantVerifier)
    assert get_verifier("constant", value=False).verify({}, "x").correct is False

    register_verifier("factory", lambda **options: ConstantVerifier(**options))
    built = get_verifier("factory", value=True, timeout=1.0)
    assert isinstance(built, ConstantVerifier) and built.timeout == 1.0

    def make(value=True):  # every parameter has a default: a factory, not a check function
        return ConstantVerifier(value=value)

    register_verifier("made", make)
    assert isinstance(get_verifier("made"), ConstantVerifier)

    instance = ConstantVerifier(value=False)
    register_verifier("instance", instance)
    assert get_verifier("instance") is instance
    with pytest.raises(TypeError, match="takes no options"):
        get_verifier("instance", timeout=1.0)

    register_verifier("broken", lambda: "not a verifier")
    with pytest.raises(TypeError, match="returned str, not a Verifier"):
        get_verifier("broken")
    with pytest.raises(TypeError, match="needs a Verifier class"):
        register_verifier("junk", 42)
