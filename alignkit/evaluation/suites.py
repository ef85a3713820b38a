"""Evaluation suites: a YAML file says what to ask a model and how to grade it; :func:`run_suite` does it.

A suite (``evals/*.yaml``) is a flat mapping::

    name: arithmetic                       # default: the file name
    description: ...                       # free text
    data: synthetic:arithmetic_problems    # any problems source alignkit.recipes.load_data understands:
                                           #   synthetic:arithmetic_problems, gsm8k:<path or hub id>,
                                           #   champ, a local JSONL / Parquet problems file, a hub id
    split: test                            # hub / GSM8K split
    dataset_config: null                   # hub configuration name (GSM8K: main)
    synthetic_size: 200                    # synthetic sources: items generated
    synthetic_seed: 0
    limit: null                            # only the first N items
    template: null                         # e.g. "Question: {prompt}\\nAnswer:" (str.format over the record)
    chat: auto                             # a text prompt as a user message when the tokenizer has a chat
                                           #   template (true: always, false: raw text)
    system: null                           # with chat: a system message before it
    id_field: id                           # the item id: this field, else the item's index
    reference_field: answer                # what the prediction is graded against
    verifier: math                         # math, match, code or a registered name
    verifier_options: {}                   # e.g. {mode: numeric}
    generation:                            # n = 1 greedy by default
      n: 1
      temperature: 0.0
      max_new_tokens: 256
      stop: []
      seed: 0
      batch_size: null                     # hf engine: rows decoded together; null: chosen from memory

Unknown keys are an error naming the file and the key. A relative ``data`` path is read relative to
the suite file when it exists there.

:func:`run_suite` renders the prompts, samples through a rollout engine (transformers ``generate`` by
default) with :func:`alignkit.negatives.sample_rollouts`, grades with
:func:`alignkit.negatives.verify_rollouts`, and returns one prediction row per item: ``id``,
``reference``, ``prediction``, ``correct``, ``score`` (plus ``reason`` and ``finish_reason``; with
``n > 1`` the first sample is the prediction, ``score`` is the share of correct samples and
``predictions`` lists them all). These rows are the prediction files ``alignkit flips --old/--new``
reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.data.prompts import chat_mode, format_prompt
from alignkit.rollout.base import SamplingConfig

SPECIAL_SOURCES = ("synthetic:", "gsm8k:", "tofu:")


class SuiteError(ValueError):
    """A suite file that cannot be used; ``source`` is the file, ``key`` the offending key (or None)."""

    def __init__(self, source: str, key: str | None, message: str):
        self.source, self.key, self.message = str(source), key, message
        where = f"{self.source}, key {key!r}" if key else self.source
        super().__init__(f"{where}: {message}")


@dataclass
class GenerationSettings(SamplingConfig):
    """How each item is answered: the sampling settings (a :class:`SamplingConfig`, the one sampling type,
    with its range checks; greedy, seed 0 and no log-probs by default), ``n`` samples per item (1) and the
    ``hf`` engine's ``batch_size``."""

    temperature: float = 0.0
    seed: int | None = 0
    logprobs: bool = False
    n: int = 1
    batch_size: int | None = None  # hf engine: rows decoded together; None: chosen from memory

    def sampling(self) -> SamplingConfig:
        """The plain :class:`SamplingConfig` part (without ``n`` and ``batch_size``)."""
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingConfig)})


@dataclass
class EvalSuite:
    """One evaluation suite (see the module docstring for the fields)."""

    name: str
    data: str
    description: str = ""
    split: str = "test"
    dataset_config: str | None = None
    synthetic_size: int = 200
    synthetic_seed: int = 0
    limit: int | None = None
    template: str | None = None
    chat: bool | str = "auto"
    system: str | None = None
    id_field: str = "id"
    reference_field: str = "answer"
    verifier: str = "math"
    verifier_options: dict = field(default_factory=dict)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    path: str | None = None  # the file it was loaded from (not a YAML key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ loading

_SUITE_KEYS = tuple(f.name for f in dataclasses.fields(EvalSuite) if f.name != "path")
_GENERATION_KEYS = tuple(f.name for f in dataclasses.fields(GenerationSettings) if f.name != "logprobs")

_TYPES: dict[str, tuple] = {
    "name": (str,), "data": (str,), "description": (str,), "split": (str,), "dataset_config": (str, type(None)),
    "synthetic_size": (int,), "synthetic_seed": (int,), "limit": (int, type(None)), "template": (str, type(None)),
    "chat": (bool, str), "system": (str, type(None)), "id_field": (str,), "reference_field": (str,),
    "verifier": (str,), "verifier_options": (dict, type(None)), "generation": (dict, type(None)),
    "n": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "max_new_tokens": (int,),
    "stop": (list, str, type(None)), "seed": (int, type(None)), "batch_size": (int, type(None)),
}


def _check_type(source: str, key: str, value, name: str) -> None:
    allowed = _TYPES[name]
    bad_bool = isinstance(value, bool) and bool not in allowed  # True is an int to Python, not to a suite
    if bad_bool or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise SuiteError(source, key, f"expected {names}, got {type(value).__name__} ({value!r})")


def _resolve_data(data: str, base: Path | None) -> str:
    """A relative local path in ``data`` (or in ``gsm8k:<path>``), read relative to the suite file."""
    if base is None:
        return data
    prefix = "gsm8k:" if data.startswith("gsm8k:") else ""
    rest = data[len(prefix):]
    if prefix == "" and (data == "champ" or data.startswith(SPECIAL_SOURCES)):
        return data
    candidate = base / rest
    if not Path(rest).is_absolute() and not Path(rest).exists() and candidate.exists():
        return prefix + str(candidate)
    return data


def suite_from_dict(raw: dict, source: str = "<suite>", *, base: Path | None = None) -> EvalSuite:
    """An :class:`EvalSuite` from a mapping; unknown or ill-typed keys raise :class:`SuiteError`."""
    if not isinstance(raw, dict):
        raise SuiteError(source, None, f"a suite is a mapping of keys to values, got {type(raw).__name__}")
    for key, value in raw.items():
        if key not in _SUITE_KEYS:
            raise SuiteError(source, str(key), f"unknown key; known keys: {', '.join(_SUITE_KEYS)}")
        _check_type(source, key, value, key)
    if "data" not in raw:
        raise SuiteError(source, "data", "missing: where the problems come from (e.g. synthetic:arithmetic_problems)")
    generation = dict(raw.get("generation") or {})
    for key, value in generation.items():
        if key not in _GENERATION_KEYS:
            raise SuiteError(source, f"generation.{key}", f"unknown key; known keys: {', '.join(_GENERATION_KEYS)}")
        _check_type(source, f"generation.{key}", value, key)
    if isinstance(generation.get("stop"), str):
        generation["stop"] = [generation["stop"]]
    if generation.get("stop") is None:
        generation.pop("stop", None)
    values = {k: v for k, v in raw.items() if k != "generation"}
    values["verifier_options"] = dict(values.get("verifier_options") or {})
    values.setdefault("name", Path(source).stem if source != "<suite>" else "suite")
    values["data"] = _resolve_data(values["data"], base)
    try:
        suite = EvalSuite(**values, generation=GenerationSettings(**generation), path=None if source == "<suite>" else source)
        chat_mode(suite.chat)
    except ValueError as e:
        raise SuiteError(source, None, str(e)) from None
    if suite.generation.n < 1:
        raise SuiteError(source, "generation.n", f"must be >= 1, got {suite.generation.n}")
    if suite.limit is not None and suite.limit < 1:
        raise SuiteError(source, "limit", f"must be >= 1, got {suite.limit}")
    return suite


def load_suite(path: str | Path) -> EvalSuite:
    """Read a suite YAML file. Unknown keys (also under ``generation``) raise :class:`SuiteError`
    naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such suite file: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(str(path), None, f"not valid YAML: {e}") from None
    return suite_from_dict(raw or {}, str(path), base=path.parent)


# ------------------------------------------------------------------------------------ problems, prompts


def suite_problems(suite: EvalSuite) -> list[dict]:
    """The suite's problems, each with a stable ``id`` (its ``id_field``, else its index), limited."""
    from alignkit.recipes import DataArguments, load_data

    args = DataArguments(
        eval_data=suite.data, eval_split=suite.split, dataset_config=suite.dataset_config,
        synthetic_eval_size=suite.synthetic_size, synthetic_seed=suite.synthetic_seed,
    )
    data = load_data(suite.data, args, "problems", train=False)
    if isinstance(data, (str, Path)):  # a local file: validated as problems records
        from alignkit.data.loading import load_records

        data = load_records(str(data), "problems")
    records = data.to_list() if hasattr(data, "to_list") else list(data)
    if suite.limit is not None:
        records = records[: suite.limit]
    source = suite.path or suite.name
    out, seen = [], {}
    for index, record in enumerate(records):
        item_id = record.get(suite.id_field)
        item_id = index if item_id is None else item_id
        if item_id in seen:
            raise SuiteError(source, "id_field", f"items {seen[item_id]} and {index} share the id {item_id!r}")
        seen[item_id] = index
        if record.get(suite.reference_field) is None:
            raise SuiteError(source, "reference_field", f"item {index} (id {item_id!r}) has no {suite.reference_field!r}")
        out.append({**record, "id": item_id})
    return out


def render_prompt(suite: EvalSuite, record: dict, tokenizer=None):
    """The prompt sent for ``record``: the template filled from its fields (a chat-list field as its
    text), then wrapped in a user message (after an optional system message) when ``chat`` is on
    (``auto``: when ``tokenizer`` has a chat template; see :mod:`alignkit.data.prompts`)."""
    from alignkit.data.records import is_conversational, message_text

    prompt = record["prompt"]
    if suite.template is not None:
        fields = {k: message_text(v) if is_conversational(v) else v for k, v in record.items()}
        try:
            prompt = suite.template.format(**fields)
        except KeyError as e:
            raise SuiteError(suite.path or suite.name, "template", f"names field {e.args[0]!r}, which item {record.get('id')!r} lacks") from None
        except (IndexError, ValueError) as e:
            raise SuiteError(suite.path or suite.name, "template", f"not a valid format string: {e}") from None
    return format_prompt(prompt, tokenizer, suite.chat, suite.system)


# ------------------------------------------------------------------------------------ running


def run_suite(
    suite: EvalSuite,
    model=None,
    tokenizer=None,
    engine=None,
    *,
    problems: Sequence[dict] | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Per-item predictions of a model on the suite: ``id``, ``reference``, ``prediction``, ``correct``,
    ``score``, ``reason``, ``finish_reason`` (and ``predictions`` when ``generation.n > 1``).

    ``engine`` defaults to ``make_engine("hf", model, tokenizer)``; ``problems`` (from
    :func:`suite_problems`) can be passed to load them once for several models.
    """
    from alignkit.negatives import completion_warnings, sample_rollouts, verify_rollouts
    from alignkit.verifiers import get_verifier

    if engine is None:
        if model is None or tokenizer is None:
            raise ValueError("run_suite needs a rollout engine, or a model and its tokenizer")
        from alignkit.rollout import make_engine

        engine = make_engine("hf", model, tokenizer, batch_size=suite.generation.batch_size, progress=progress)
    verifier = get_verifier(suite.verifier, **suite.verifier_options)
    problems = suite_problems(suite) if problems is None else list(problems)
    rows = [{**p, "prompt": render_prompt(suite, p, tokenizer or getattr(engine, "tokenizer", None))} for p in problems]
    gen = suite.generation
    rows = sample_rollouts(engine, rows, gen.n, gen.sampling(), keep_token_data=False)
    completion_warnings(rows, where=f"suite {suite.name}")
    rows = verify_rollouts(rows, verifier, num_workers=num_workers, source=suite.path or suite.name)
    out = []
    for problem, row in zip(problems, rows):
        completions = row["completions"]
        first = completions[0]
        item: dict[str, Any] = {
            "id": problem["id"],
            "reference": problem[suite.reference_field],
            "prediction": first["text"],
            "correct": bool(first["correct"]),
            "score": float(first["score"]) if gen.n == 1 else sum(bool(c["correct"]) for c in completions) / gen.n,
            "reason": first["reason"],
            "finish_reason": first["finish_reason"],
        }
        if gen.n > 1:
            item["predictions"] = [c["text"] for c in completions]
        out.append(item)
    return out


def accuracy(predictions: Sequence[dict]) -> float:
    """Share of prediction rows marked correct."""
    return sum(bool(p["correct"]) for p in predictions) / len(predictions) if predictions else 0.0


__all__ = [
    "EvalSuite", "GenerationSettings", "SuiteError", "accuracy", "load_suite", "render_prompt", "run_suite",
    "suite_from_dict", "suite_problems",
]
