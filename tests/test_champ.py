"""CHAMP loader: record shapes, and the math verifier against CHAMP's human step annotations.

CHAMP stores no final-answer correctness label; its 540 first-wrong-step annotations are the
closest thing (``steps_correct``). A solution with no wrong step has a right final answer, so the
verifier should accept most of those; a solution with a wrong step usually ends wrong too, though
not always (CHAMP's paper: right answers with flawed reasoning are common). Measured with this
verifier (math-verify 0.9, champ-dataset 1.0.0, completion = the model's solution text):

* agreement with ``steps_correct`` over all 540: 0.796 (always saying "wrong" would score 0.822:
  most CHAMP gold answers are sentences or expressions such as "No such values" or "n(n-3)/2");
* no-wrong-step solutions judged correct: 48/96 = 0.50 over all problems, 26/32 = 0.81 over the
  85 problems whose gold answer is a plain number;
* wrong-step solutions judged wrong: 382/444 = 0.86.

Before the verifier followed math-verify's extraction (b2425df, a last-number fallback): agreement 0.817,
but no-wrong-step solutions judged correct only 28/96 (wrong-step judged wrong 413/444).

The floors below sit a few points under those numbers.
"""

import pytest

pytest.importorskip("champ_dataset")

from alignkit.data.records import validate_record
from alignkit.tasks.champ import load_champ_model_solutions, load_champ_problems
from alignkit.verifiers import get_verifier
from alignkit.verifiers.math import parse_number


@pytest.fixture(scope="module")
def problems():
    return load_champ_problems()


@pytest.fixture(scope="module")
def annotated():
    return load_champ_model_solutions(annotated_only=True)


def test_problems_are_problem_records(problems):
    assert len(problems) == 270
    assert len({p["id"] for p in problems}) == 270
    for row, problem in enumerate(problems, 1):
        validate_record(problem, "problems", source="champ", row=row)
        assert set(problem) == {"id", "prompt", "answer", "solution", "category"}
        assert "@@" not in problem["answer"] and "@@" not in problem["prompt"]  # CHAMP's math markers are gone
    first = problems[0]
    assert first["id"] == "P_Combinatorics_1" and first["answer"] == "239"
    assert first["solution"].splitlines()[-1].endswith("70+99+70=239 such strings.")
    assert {p["category"] for p in problems} == {
        "Combinatorics",
        "Inequality",
        "Number-Theory",
        "Polynomial",
        "Sequence",
    }


def test_model_solutions_shape():
    solutions = load_champ_model_solutions(models=["GPT-4"], prompt_types=["0-Shot", "5-Shot"])
    assert len(solutions) == 270 * 2
    assert {s["model"] for s in solutions} == {"GPT-4"}
    assert {s["prompt_type"] for s in solutions} == {"0-Shot", "5-Shot"}
    keys = {
        "problem_id",
        "model",
        "prompt_type",
        "text",
        "final_answer",
        "truncated",
        "steps_correct",
        "first_wrong_step",
    }
    for s in solutions:
        assert set(s) == keys
        assert isinstance(s["text"], str) and s["text"].strip()
        assert s["steps_correct"] is None and s["first_wrong_step"] is None  # these settings are not annotated
        assert (s["final_answer"] is None) == s["truncated"]  # a cut-off solution has no summary


def test_annotated_solutions(annotated):
    assert len(annotated) == 540  # two annotated solutions per problem, one per setting
    assert {s["prompt_type"] for s in annotated} == {"No C w/o H", "Direct C w/ H"}
    labels = [s["steps_correct"] for s in annotated]
    assert labels.count(True) == 96 and labels.count(False) == 444
    for s in annotated:
        if s["steps_correct"]:
            assert s["first_wrong_step"] is None
        else:
            assert s["first_wrong_step"] and s["first_wrong_step"] in s["text"]


def test_math_verifier_agrees_with_step_annotations(problems, annotated):
    by_id = {p["id"]: p for p in problems}
    pairs = [(by_id[s["problem_id"]], s) for s in annotated]
    # the worst solution costs ~0.4 CPU-s; the wall-clock bound leaves room for a loaded machine
    verdicts = get_verifier("math", timeout=10.0).verify_batch(
        [p for p, _ in pairs], [s["text"] for _, s in pairs], num_workers=2
    )
    labels = [s["steps_correct"] for _, s in pairs]
    numeric = [parse_number(p["answer"]) is not None for p, _ in pairs]

    agreement = sum(v.correct == label for v, label in zip(verdicts, labels)) / len(labels)
    clean = [v.correct for v, label in zip(verdicts, labels) if label]
    clean_numeric = [v.correct for v, label, num in zip(verdicts, labels, numeric) if label and num]
    flawed = [not v.correct for v, label in zip(verdicts, labels) if not label]
    report = (
        f"agreement {agreement:.3f}; no-wrong-step judged correct {sum(clean)}/{len(clean)}, "
        f"numeric gold {sum(clean_numeric)}/{len(clean_numeric)}; wrong-step judged wrong {sum(flawed)}/{len(flawed)}"
    )
    print(report)
    assert agreement >= 0.77, report
    assert sum(clean) / len(clean) >= 0.42, report
    assert sum(clean_numeric) / len(clean_numeric) >= 0.75, report
    assert sum(flawed) / len(flawed) >= 0.83, report
    assert not any(v.reason.startswith(("error", "timeout")) for v in verdicts), report


def test_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_champ(name, *args, **kwargs):
        if name == "champ_dataset":
            raise ImportError("No module named 'champ_dataset'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_champ)
    with pytest.raises(ImportError, match=r"pip install alignkit\[champ\]"):
        load_champ_problems()
