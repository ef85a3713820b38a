"""CHAMP: 270 competition math problems with gold answers, step solutions and stored model solutions.

CHAMP (Concept and Hint-Augmented Math Problems; Mao et al., 2024) ships as the MIT-licensed pip
package ``champ-dataset`` (``pip install alignkit[champ]``), with its data inside the package, so
loading needs no network. This module turns it into alignkit records:

* :func:`load_champ_problems`: one problems record per problem (``id``, ``prompt``, ``answer``,
  ``solution``, ``category``), ready for the ``math`` verifier.
* :func:`load_champ_model_solutions`: the solutions GPT-3.5, GPT-4, GPT-4 Turbo and PaLM 2 Medium
  wrote under 18 prompt settings (0-shot, 5-shot, partial solutions, concept and hint variants):
  19,440 in all, each with the model's one-sentence summary of its final answer.

Correctness labels: CHAMP v0 stores **no final-answer correctness label**. What it stores is a
human *first-wrong-step* annotation for 540 of the solutions (every problem, GPT-3.5/GPT-4/GPT-4
Turbo/PaLM 2 Medium, settings "No C w/o H" and "Direct C w/ H"): the annotator marks the first wrong
step, or marks none. It is exposed as ``steps_correct`` (``True``: no wrong step, so the reasoning
and the final answer are right; ``False``: a wrong step was found, though the final answer may still
be right; ``None``: not annotated) and ``first_wrong_step`` (the text of that step).

The gold answers are written for people: some are numbers (``239``), many are expressions
(``n!``, ``x(x-1)(x-2)...(x-2022)``) and some are sentences (``It is not possible``); an automatic
verifier can only judge part of them.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CHAMP_PROMPT", "load_champ_model_solutions", "load_champ_problems"]

#: The instruction CHAMP's own prompts put before a problem (its "0-Shot" setting).
CHAMP_PROMPT = "Solve the following problem. Make sure to show your work before giving the final answer."


def _load_dataset(version: str):
    """The ``champ_dataset.Dataset`` of ``version``, with a clear message when the package is missing."""
    try:
        import champ_dataset
    except ImportError as e:
        raise ImportError(
            "the CHAMP loader needs the champ-dataset package: pip install alignkit[champ]  "
            "(or: pip install champ-dataset)"
        ) from e
    return champ_dataset.load(version)


def load_champ_problems(version: str = "v0") -> list[dict]:
    """CHAMP's problems as problems records, in the dataset's order.

    Each record: ``id`` (``P_Combinatorics_1``, ...), ``prompt`` (the problem statement), ``answer``
    (the gold answer text), ``solution`` (the reference solution, one step a line) and ``category``
    (Combinatorics, Inequality, Number-Theory, Polynomial, Sequence).
    """
    dataset = _load_dataset(version)
    return [
        {
            "id": problem.identifier,
            "prompt": problem.text,
            "answer": problem.answer,
            "solution": "\n".join(step.text for step in problem.solution.steps),
            "category": problem.category,
        }
        for problem in dataset.problems.values()
    ]


def _final_turns(messages) -> tuple[str, str | None, bool]:
    """(solution text, one-sentence summary or None, truncated) from a CHAMP conversation.

    Every conversation ends with the model's solution, the request "Now, summarize the answer above
    in one sentence, ..." and the model's summary. A solution cut off by the length limit carries the
    error ``LENGTH_CURRENT`` and its summary is then missing (``LENGTH_PREVIOUS``).
    """
    solution, summary = messages[-3], messages[-1]
    if not (solution.role.startswith("Model.") and summary.role.startswith("Model.")):
        raise ValueError(f"unexpected CHAMP conversation layout: {[m.role for m in messages]}")
    return solution.text, summary.text, solution.error == "LENGTH_CURRENT"


def load_champ_model_solutions(
    version: str = "v0",
    *,
    models: Iterable[str] | None = None,
    prompt_types: Iterable[str] | None = None,
    annotated_only: bool = False,
) -> list[dict]:
    """CHAMP's stored model-generated solutions, one dict each.

    Each dict: ``problem_id``, ``model`` (``GPT-3.5``, ``GPT-4``, ``GPT-4 Turbo``,
    ``PaLM 2 Medium``), ``prompt_type`` (``0-Shot``, ``5-Shot``, ``No C w/o H``, ...), ``text`` (the
    solution), ``final_answer`` (the model's one-sentence summary of its answer; ``None`` when the
    solution was cut off), ``truncated``, and the human labels ``steps_correct`` and
    ``first_wrong_step`` (see the module docstring: ``None`` where not annotated; there is no
    final-answer label in the dataset).

    ``models`` / ``prompt_types`` keep only those; ``annotated_only`` keeps the 540 solutions with a
    first-wrong-step annotation.
    """
    keep_models = set(models) if models is not None else None
    keep_types = set(prompt_types) if prompt_types is not None else None
    out = []
    for problem in _load_dataset(version).problems.values():
        annotations = problem.fws_annotations or {}
        for key, conversation in problem.conversations.items():
            model, prompt_type = key.split("|")
            if keep_models is not None and model not in keep_models:
                continue
            if keep_types is not None and prompt_type not in keep_types:
                continue
            annotation = annotations.get(key)
            if annotated_only and annotation is None:
                continue
            text, summary, truncated = _final_turns(conversation.messages)
            out.append(
                {
                    "problem_id": problem.identifier,
                    "model": model,
                    "prompt_type": prompt_type,
                    "text": text,
                    "final_answer": summary,
                    "truncated": truncated,
                    "steps_correct": None if annotation is None else annotation.start_idx is None,
                    "first_wrong_step": (
                        None if annotation is None or annotation.start_idx is None else annotation.wrong_step()
                    ),
                }
            )
    return out
