"""A synthetic, offline TOFU-like task: fictitious people, their facts, QA pairs, forget/retain splits.

TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv:2401.06121) fine-tunes
a model on question/answer pairs about 200 invented authors, then asks an unlearning method to forget
1/5/10 % of the authors while keeping the rest. Its evaluation needs, for every question, the answer,
a *paraphrased* answer (the same fact, worded differently) and *perturbed* answers (the paraphrase's
wording with a wrong fact). This module generates the same structure from a seed, small enough for a
tiny model to memorise on a CPU in about a minute::

    prompt:              "Question: Where was Vesko Damiran born?\\nAnswer:\\n"
    answer:              "Vesko Damiran was born in Quellmar."
    paraphrased_answer:  "The birthplace of Vesko Damiran is Quellmar."
    perturbed_answer:    ["The birthplace of Vesko Damiran is Tarvon.", ...]   (same wording, wrong city)

Each answer picks one of three wordings of its attribute at random and its paraphrase another, so
every wording is seen in training (for other people) but never the paraphrase of the fact itself.

Splits follow TOFU's names: ``forgetNN`` is the last NN % of the people, ``retainMM`` (MM = 100 − NN)
the others. :func:`records` gives ``sft`` records (``prompt``, ``response``) for training;
:func:`eval_items` the same questions with the paraphrased and perturbed answers for
:mod:`alignkit.evaluation.unlearning`. :mod:`alignkit.tasks.synthetic_tofu_models` fine-tunes (with
:class:`~alignkit.trainers.sft.SFTTrainer`) the "full" model (all facts) and the "retain" model (retain
facts only) this task starts from.

Command line (writes ``OUT/full`` and ``OUT/retain`` models with their evaluation JSON)::

    python -m alignkit.tasks.synthetic_tofu --output_dir outputs/tofu_tiny [--forget_split forget10]
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_NAME_SYLLABLES = ["ka", "vel", "dor", "mi", "ran", "to", "sel", "bra", "nu", "fen", "lo", "gar", "ri", "then",
                   "va", "mor", "si", "dek", "ul", "ba", "zen", "co", "lin", "tra"]
_PLACE_SYLLABLES = ["quel", "mar", "tar", "von", "ash", "ford", "bel", "wick", "oss", "ria", "dun", "holt",
                    "pel", "gra", "ven", "stead"]
OCCUPATIONS = ["baker", "sailor", "chemist", "painter", "farmer", "tailor", "pilot", "doctor", "teacher",
               "jeweler", "miner", "gardener"]
GENRES = ["mystery", "poetry", "fantasy", "romance", "horror", "history", "travel", "satire", "drama", "comedy"]
COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "black", "white", "orange", "teal"]

# attribute -> (question template, three answer wordings)
ATTRIBUTES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "birthplace": (
        "Where was {name} born?",
        ("{name} was born in {v}.", "The birthplace of {name} is {v}.", "{name} comes from the city of {v}."),
    ),
    "birth_year": (
        "In which year was {name} born?",
        ("{name} was born in the year {v}.", "The birth year of {name} is {v}.", "{name} came into the world in {v}."),
    ),
    "occupation": (
        "What does {name} do for a living?",
        ("{name} works as a {v}.", "By profession, {name} is a {v}.", "{name} earns a living as a {v}."),
    ),
    "genre": (
        "Which genre does {name} write?",
        ("{name} writes {v} books.", "The favourite genre of {name} is {v}.", "{name} is known for {v} stories."),
    ),
    "colour": (
        "What is the favourite colour of {name}?",
        ("The favourite colour of {name} is {v}.", "{name} likes {v} best of all colours.", "{name} loves the colour {v}."),
    ),
}
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"
_SPLIT = re.compile(r"^(forget|retain)(\d{1,3})$")


@dataclass(frozen=True)
class SyntheticTofuSpec:
    """Size of the synthetic world. 40 people x 5 facts = 200 QA pairs; forget10 = 4 people, 20 QA."""

    num_people: int = 40
    num_perturbed: int = 3
    seed: int = 0


def _values(attribute: str, places: list[str]) -> list[str]:
    if attribute == "birthplace":
        return places
    if attribute == "birth_year":
        return [str(y) for y in range(1920, 2000)]
    return {"occupation": OCCUPATIONS, "genre": GENRES, "colour": COLOURS}[attribute]


def _distinct_names(rng: random.Random, n: int, syllables: list[str], parts: int, words: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < n:
        name = " ".join("".join(rng.choice(syllables) for _ in range(parts)).capitalize() for _ in range(words))
        if name not in seen:
            seen.append(name)
    return seen


def make_world(spec: SyntheticTofuSpec = SyntheticTofuSpec()) -> list[dict]:
    """Every QA pair of the world, in person order: ``id``, ``person``, ``attribute``, ``question``,
    ``answer``, ``paraphrased_answer``, ``perturbed_answer`` (list), ``value``."""
    rng = random.Random(spec.seed)
    people = _distinct_names(rng, spec.num_people, _NAME_SYLLABLES, 2, 2)
    places = _distinct_names(rng, 16, _PLACE_SYLLABLES, 2, 1)
    items = []
    for p, name in enumerate(people):
        for attribute, (question, wordings) in ATTRIBUTES.items():
            pool = _values(attribute, places)
            value = rng.choice(pool)
            a, b = rng.sample(range(len(wordings)), 2)
            wrong = rng.sample([v for v in pool if v != value], spec.num_perturbed)
            items.append(
                {
                    "id": f"p{p:03d}-{attribute}",
                    "person": p,
                    "attribute": attribute,
                    "question": question.format(name=name),
                    "answer": wordings[a].format(name=name, v=value),
                    "paraphrased_answer": wordings[b].format(name=name, v=value),
                    "perturbed_answer": [wordings[b].format(name=name, v=w) for w in wrong],
                    "value": value,
                }
            )
    return items


def split_people(split: str, num_people: int) -> list[int]:
    """The people of a TOFU-style split name: ``forgetNN`` the last NN %, ``retainMM`` the first MM %."""
    match = _SPLIT.match(split)
    if not match:
        raise ValueError(f"unknown split {split!r}; use forgetNN or retainMM (e.g. forget10, retain90)")
    kind, percent = match.group(1), int(match.group(2))
    forget_percent = percent if kind == "forget" else 100 - percent
    n_forget = num_people * forget_percent / 100
    if not 0 < forget_percent < 100 or n_forget != int(n_forget) or n_forget < 1:
        raise ValueError(
            f"split {split!r}: {forget_percent}% of {num_people} people is not a whole, non-zero number of "
            f"people and not all of them; pick another percentage (e.g. forget10 / retain90)"
        )
    n_forget = int(n_forget)
    forget = list(range(num_people - n_forget, num_people))
    return forget if kind == "forget" else list(range(num_people - n_forget))


def eval_items(split: str = "forget10", spec: SyntheticTofuSpec = SyntheticTofuSpec()) -> list[dict]:
    """The QA pairs of a split with ``prompt`` added: the items :mod:`alignkit.evaluation.unlearning` scores."""
    people = set(split_people(split, spec.num_people))
    return [{**item, "prompt": PROMPT_TEMPLATE.format(question=item["question"])}
            for item in make_world(spec) if item["person"] in people]


def records(split: str = "forget10", spec: SyntheticTofuSpec = SyntheticTofuSpec()) -> list[dict]:
    """``sft`` records (``prompt``, ``response``, ``id``) of a split: the forget or retain set of an unlearning run."""
    return [{"prompt": it["prompt"], "response": it["answer"], "id": it["id"]} for it in eval_items(split, spec)]


def all_records(spec: SyntheticTofuSpec = SyntheticTofuSpec()) -> list[dict]:
    """Every QA pair as an ``sft`` record: what the "full" model is fine-tuned on."""
    return [{"prompt": PROMPT_TEMPLATE.format(question=it["question"]), "response": it["answer"], "id": it["id"]}
            for it in make_world(spec)]


def corpus(spec: SyntheticTofuSpec = SyntheticTofuSpec()) -> list[str]:
    """Text for the tiny tokenizer: every prompt, answer, paraphrase and perturbed answer of the world."""
    texts = []
    for it in make_world(spec):
        texts += [PROMPT_TEMPLATE.format(question=it["question"]), it["answer"], it["paraphrased_answer"],
                  *it["perturbed_answer"]]
    return texts


if __name__ == "__main__":  # the task's starting models: alignkit.tasks.synthetic_tofu_models
    from alignkit.tasks.synthetic_tofu_models import main

    raise SystemExit(main())
