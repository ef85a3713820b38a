"""The math verifier against Math-Verify's own regression cases (tests/data/math_verify_cases.json).

The 270 (gold, prediction, expected) cases of huggingface/Math-Verify's ``test_all.py``,
``test_boxed.py``, ``test_numina_cases.py``, ``test_open_thoughts.py``, ``test_strict.py`` and
``test_yujianll.py``, extracted with the options each test passes (extraction targets, precision,
strict, set-relation comparison; see ``tests/data/extract_math_verify_cases.py``). Each case is judged
by ``MathVerifier`` with those options (gold as the problem's ``answer``, the prediction as the
completion) and compared with the expected verdict and with the installed math-verify's own verdict
(``parse`` + ``verify`` as the Math-Verify test does). Targets: >= 99% agreement, no wrong answer
accepted.
"""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from alignkit.verifiers.math import MathVerifier

CASES = json.loads((Path(__file__).parent / "data" / "math_verify_cases.json").read_text())["cases"]
SHORT = 300  # the fast test takes the cases whose gold and prediction are this short


def options(case: dict) -> dict:
    """MathVerifier options reproducing the Math-Verify test's call."""
    out = {"precision": case["precision"], "strict": case["strict"],
           "allow_set_relation_comp": case["allow_set_relation_comp"]}
    if case["extraction"] == "default":  # math_verify.parse's default: boxed after "final answer is"
        out["boxed_priority"] = 50
    else:  # the tests' compare_strings helper: LatexExtractionConfig(boxed_match_priority=0) / ExprExtractionConfig()
        out["extraction"] = case["extraction"]
    return out


def alignkit_verdicts(cases: list[dict], num_workers: int = 2) -> list[bool]:
    """One verify_batch per distinct option set (the verifier's options are per instance)."""
    groups = defaultdict(list)
    for i, case in enumerate(cases):
        groups[json.dumps(options(case), sort_keys=True)].append(i)
    out = [None] * len(cases)
    for key, indices in groups.items():
        verifier = MathVerifier(timeout=30.0, **json.loads(key))
        problems = [{"answer": cases[i]["gold"]} for i in indices]
        verdicts = verifier.verify_batch(problems, [cases[i]["pred"] for i in indices], num_workers=num_workers)
        for i, verdict in zip(indices, verdicts):
            assert not verdict.reason.startswith(("error", "timeout")), (cases[i], verdict)
            out[i] = verdict.correct
    return out


def math_verify_verdict(case: dict) -> bool:
    """The installed math-verify's verdict, called as the Math-Verify test calls it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if case["extraction"] == "default":
        targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    else:
        targets = [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig()
                   for t in case["extraction"]]
    return verify(parse(case["gold"], targets), parse(case["pred"], targets), float_rounding=case["precision"],
                  strict=case["strict"], allow_set_relation_comp=case["allow_set_relation_comp"])


def check(cases: list[dict], reference: list[bool], what: str) -> None:
    ours = alignkit_verdicts(cases)
    wrong_accepted = [c for c, a, r in zip(cases, ours, reference) if a and not r]
    disagree = [(c["test"], c["index"], c["gold"][:60], c["pred"][-60:], r) for c, a, r in zip(cases, ours, reference)
                if a != r]
    agreement = 1 - len(disagree) / len(cases)
    print(f"agreement with {what}: {len(cases) - len(disagree)}/{len(cases)} = {agreement:.4f}; "
          f"wrong answers accepted: {len(wrong_accepted)}")
    assert agreement >= 0.99, disagree
    assert not wrong_accepted, disagree


def test_data_file_is_math_verify_test_data():
    assert len(CASES) == 270
    assert {c["file"] for c in CASES} == {"test_all", "test_boxed", "test_numina_cases", "test_open_thoughts",
                                         "test_strict", "test_yujianll"}
    assert sum(c["default_options"] for c in CASES) == 261
    assert {c["expected"] for c in CASES} == {0, 1}


def test_agreement_on_short_cases():
    """The short cases (most of them), against the expected verdicts: seconds, for every run."""
    cases = [c for c in CASES if len(c["gold"]) <= SHORT and len(c["pred"]) <= SHORT]
    assert len(cases) >= 200
    check(cases, [bool(c["expected"]) for c in cases], "the expected verdicts (short cases)")


@pytest.mark.slow
def test_agreement_with_expected_and_installed_math_verify():
    """All 270 cases, against the expected verdicts and against the installed math-verify."""
    check(CASES, [bool(c["expected"]) for c in CASES], "the expected verdicts")
    check(CASES, [math_verify_verdict(c) for c in CASES], "the installed math-verify")


def test_default_options_agree_on_default_option_cases():
    """With its own defaults (no per-case options) the verifier agrees on the default-option cases
    except where a test restricts the extraction to LaTeX: a number on its own line after ``$``
    (``Answer $ \\n 9 \\n $``) is not inline LaTeX, but the expression extraction reads it (math-verify's
    default configuration does the same)."""
    cases = [c for c in CASES if c["default_options"] and len(c["gold"]) <= SHORT and len(c["pred"]) <= SHORT]
    verifier = MathVerifier(timeout=30.0)
    verdicts = verifier.verify_batch([{"answer": c["gold"]} for c in cases], [c["pred"] for c in cases], num_workers=2)
    disagree = [(c["test"], c["gold"], c["pred"]) for c, v in zip(cases, verdicts) if v.correct != bool(c["expected"])]
    assert disagree == [
        ("test_latex_notation", "$9$", "Answer $ \n 9 \n $"),
        ("test_latex_notation", "$9$", "Answer \\( \n 9 \n \\)"),
    ]
