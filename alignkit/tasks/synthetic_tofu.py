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
:mod:`alignkit.evaluation.unlearning`. :func:`finetune` is the small SFT loop that makes the
"full" model (all facts) and the "retain" model (retain facts only) this task starts from.

Command line (writes ``OUT/full`` and ``OUT/retain`` models with their evaluation JSON)::

    python -m alignkit.tasks.synthetic_tofu --output_dir outputs/tofu_tiny [--forget_split forget10]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------------- fine-tuning


def make_task_model(path, spec: SyntheticTofuSpec = SyntheticTofuSpec(), *, hidden_size: int = 128,
                    num_layers: int = 4, seed: int = 0) -> str:
    """A random tiny Qwen2 whose tokenizer is trained on this task's text (see ``make_tiny_model``)."""
    from alignkit.modeling import make_tiny_model

    return make_tiny_model(path, "qwen2", hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                           texts=corpus(spec))


def finetune(model, tokenizer, train_records: list[dict], *, epochs: int = 40, batch_size: int = 16,
             learning_rate: float = 3e-3, warmup_ratio: float = 0.05, seed: int = 0, log_every: int = 0) -> list[float]:
    """Supervised fine-tuning (per-token NLL of the responses) with AdamW and a cosine schedule.

    A plain loop, not a ``Trainer``: it only has to make the starting points of an unlearning run
    (the model that knows every fact, the one that never saw the forget set). Returns the mean loss
    of each epoch.
    """
    import torch

    from alignkit.data.collate import GroupCollator
    from alignkit.data.tokenize import tokenize_group
    from alignkit.scoring import score_responses

    groups = [tokenize_group(tokenizer, r["prompt"], [r["response"]]) for r in train_records]
    collate = GroupCollator(tokenizer.pad_token_id, "padded")
    steps_per_epoch = math.ceil(len(groups) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_ratio * total))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))),
    )
    order = random.Random(seed)
    device = next(model.parameters()).device
    model.train()
    history = []
    for epoch in range(epochs):
        indices = list(range(len(groups)))
        order.shuffle(indices)
        losses = []
        for start in range(0, len(indices), batch_size):
            batch = collate([groups[i] for i in indices[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            scores = score_responses(model, batch)
            loss = -scores.token_logps.mean()  # per-token NLL over the batch
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
        if log_every and (epoch + 1) % log_every == 0:
            logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    model.eval()
    return history


def build_task_models(output_dir, *, forget_split: str = "forget10", spec: SyntheticTofuSpec = SyntheticTofuSpec(),
                      epochs: int = 40, learning_rate: float = 3e-3, hidden_size: int = 128, num_layers: int = 4,
                      evaluate: bool = True) -> dict[str, str]:
    """The two starting points of the synthetic unlearning task, cached in ``output_dir``:

    * ``full``: a tiny model fine-tuned on every fact (the model to unlearn from);
    * ``retain``: the same random initialisation fine-tuned on the retain split only (the model that
      never saw the forget set: the target of forget quality).

    With ``evaluate``, each gets ``eval.json`` (:func:`alignkit.evaluation.unlearning.evaluate_unlearning`
    on the forget and retain splits). A directory already holding a model built with the same settings
    is reused. Returns ``{"base", "full", "retain"}`` paths.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not forget_split.startswith("forget"):
        raise ValueError(f"forget_split must be a forgetNN split, got {forget_split!r}")
    split_people(forget_split, spec.num_people)  # a valid split of this world
    retain_split = "retain" + str(100 - int(forget_split[len("forget") :]))
    out = Path(output_dir)
    base = make_task_model(out / "base", spec, hidden_size=hidden_size, num_layers=num_layers, seed=spec.seed)
    settings = {"spec": vars(spec), "forget_split": forget_split, "epochs": epochs, "learning_rate": learning_rate,
                "hidden_size": hidden_size, "num_layers": num_layers}
    paths = {"base": base}
    for name, train in (("full", all_records(spec)), ("retain", records(retain_split, spec))):
        path = out / name
        stamp = path / "synthetic_tofu.json"
        paths[name] = str(path)
        if stamp.exists() and json.loads(stamp.read_text()).get("settings") == settings:
            continue
        torch.manual_seed(spec.seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        history = finetune(model, tokenizer, train, epochs=epochs, learning_rate=learning_rate, seed=spec.seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        summary = None
        if evaluate:
            from alignkit.evaluation.unlearning import evaluate_unlearning, save_results

            results = evaluate_unlearning(
                model, tokenizer, {"forget": eval_items(forget_split, spec), "retain": eval_items(retain_split, spec)}
            )
            save_results(results, path / "eval.json")
            summary = results["summary"]
        stamp.write_text(json.dumps({"settings": settings, "final_train_loss": history[-1], "summary": summary}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.tasks.synthetic_tofu", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/tofu_tiny")
    parser.add_argument("--forget_split", default="forget10")
    parser.add_argument("--num_people", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    spec = SyntheticTofuSpec(num_people=a.num_people, seed=a.seed)
    paths = build_task_models(a.output_dir, forget_split=a.forget_split, spec=spec, epochs=a.epochs,
                              learning_rate=a.learning_rate)
    for name in ("full", "retain"):
        summary = json.loads((Path(paths[name]) / "synthetic_tofu.json").read_text())["summary"]
        print(f"{name}: {paths[name]}\n  {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
