"""Unlearning metrics with TOFU's definitions as open-unlearning computes them.

Sources: TOFU (Maini et al. 2024, arXiv:2401.06121) and open-unlearning's evaluation code
(github.com/locuslab/open-unlearning, ``src/evals/metrics/{memorization,utility,privacy,utils}.py`` and
``configs/eval/tofu_metrics/*.yaml``), whose numbers the TOFU leaderboards report. Every definition
below follows that code, constants included, so that alignkit's numbers can be compared with published ones.

An evaluation item is a question with its answers::

    {"id": ..., "prompt": text or chat messages, "answer": str,
     "paraphrased_answer": str (forget / retain), "perturbed_answer": [str, ...]}

(:func:`alignkit.tasks.synthetic_tofu.eval_items` and :func:`alignkit.tasks.tofu.load_tofu_eval_items`
make them.) Per answer y, P̄(y|x) = exp(−avg_loss) = exp(mean response-token log-prob), the
length-normalised probability of open-unlearning's ``evaluate_probability``.

A split is scored by its role:

================  ==========================================  =================================================
role              probability                                 truth ratio R (per item) and its split score
================  ==========================================  =================================================
``forget``        mean P̄(answer)                              R = P̄_pert / (P̄(paraphrased) + 1e-10);
                                                              mean(min(R, 1 / (R + 1e-10)))  ("closer to 1")
``retain``        mean P̄(answer)                              same R; mean(max(0, 1 − R))    ("true better")
``options``       mean P̄(answer) / (P̄(answer) +             R = P̄_pert / (P̄(answer) + 1e-10);
(real authors,    Σ_i P̄(perturbed_i) + 1e-10)                 mean(max(0, 1 − R))
world facts)      (``probability_w_options``)
================  ==========================================  =================================================

where P̄_pert = exp(mean_i log P̄(perturbed_i)) is the geometric mean over the perturbed answers
(open-unlearning averages their avg_losses). Every role also has

* **ROUGE-L recall** of the greedy answer (up to ``max_new_tokens``, default 200 as open-unlearning's
  generation config) against ``answer``: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"],
  use_stemmer=True).score(answer, generated)["rougeL"].recall``, averaged over the split.

and over splits:

* **Model utility**: the harmonic mean (``statistics.harmonic_mean``; open-unlearning's ``hm_aggregate``
  is ``scipy.stats.hmean``) of the three scores (probability, ROUGE-L recall, truth ratio) of every
  utility split: with TOFU's retain, real-authors and world-facts splits these are its 9 values.
  ``model_utility_splits`` in the summary names the splits it was computed from (the synthetic task
  has a retain split only: 3 values).
* **Forget quality**: ``scipy.stats.ks_2samp(R_model, R_retain_model).pvalue`` over the forget set's
  per-item truth ratios of the evaluated model and of a model never trained on the forget set, read
  from that model's saved results (open-unlearning's ``ks_test``). scipy computes the exact p-value
  while both samples have at most 10,000 items, the asymptotic one beyond. High (e.g. > 0.05):
  indistinguishable from never having seen the data.

The summary also carries the metrics under open-unlearning's names (``forget_Q_A_Prob``,
``forget_Q_A_ROUGE``, ``forget_truth_ratio``, ``forget_quality``, ``model_utility``, ``retain_Q_A_Prob``,
``ra_Q_A_Prob_normalised``, ``wf_Truth_Ratio``, ...) in ``summary["open_unlearning"]``.

:func:`evaluate_unlearning` computes everything and :func:`save_results` writes it as JSON, per item and
summarised. ``alignkit unlearning-eval --help`` runs it on a saved model. ROUGE and the KS test need the
``unlearning`` extra (``pip install 'alignkit[unlearning]'``: rouge-score and scipy).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from functools import lru_cache
from pathlib import Path

import torch

FORGET_SPLITS = ("forget",)
OPTION_SPLITS = ("real_authors", "world_facts")
ROLES = ("forget", "retain", "options")
EPSILON = 1e-10  # open-unlearning's guard in every ratio (truth ratio, probability_w_options)
GENERATION_MAX_NEW_TOKENS = 200  # open-unlearning configs/generation/default.yaml
# open-unlearning's metric names of each split's three scores (configs/eval/tofu_metrics/*.yaml)
_OPEN_UNLEARNING_PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


def _missing_extra(module: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"the TOFU metrics need {module}: pip install 'alignkit[unlearning]' "
                               "(rouge-score and scipy)", name=module)


# ----------------------------------------------------------------------------------------- pure parts


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise _missing_extra("rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` as open-unlearning computes it
    (``eval_text_similarity``): ``rouge_score`` with the Porter stemmer, the prediction stripped."""
    return _rouge_scorer().score(reference, prediction.strip())["rougeL"].recall


def truth_ratio(correct_mean_logp: float, perturbed_mean_logps: list[float]) -> float:
    """R = P̄_pert / (P̄(correct) + 1e-10), P̄_pert = exp(mean_i log P̄(perturbed_i)); the inputs are
    per-token mean log-probs (open-unlearning ``truth_ratio``: ``wrong_prob / (correct_prob + 1e-10)``).
    ``correct`` is the paraphrased answer on forget / retain splits, the answer itself on option splits."""
    wrong = math.exp(sum(perturbed_mean_logps) / len(perturbed_mean_logps))
    return wrong / (math.exp(correct_mean_logp) + EPSILON)


def truth_ratio_score(ratios: list[float], *, forget: bool) -> float:
    """A split's truth-ratio score: ``closer_to_1_better`` mean(min(R, 1/(R + 1e-10))) on a forget split,
    ``true_better`` mean(max(0, 1 − R)) otherwise (open-unlearning's two aggregators)."""
    if not ratios:
        return float("nan")
    if forget:
        return sum(min(r, 1 / (r + EPSILON)) for r in ratios) / len(ratios)
    return sum(max(0.0, 1 - r) for r in ratios) / len(ratios)


def normalised_probability(answer_mean_logp: float, perturbed_mean_logps: list[float]) -> float:
    """P̄(answer) / (P̄(answer) + Σ_i P̄(perturbed_i) + 1e-10): the answer's probability among the options
    (open-unlearning ``probability_w_options``, used on the real-authors and world-facts splits)."""
    correct = math.exp(answer_mean_logp)
    return correct / (correct + sum(math.exp(v) for v in perturbed_mean_logps) + EPSILON)


def model_utility(values: list[float]) -> float:
    """The harmonic mean of the utility scores (0 when any is 0), ``statistics.harmonic_mean``."""
    return float(statistics.harmonic_mean(values)) if values else float("nan")


def ks_2samp(x: list[float], y: list[float]) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test ``(D, p-value)``: ``scipy.stats.ks_2samp`` with its
    default ``method="auto"`` (exact while both samples have <= 10,000 values), as open-unlearning calls it."""
    try:
        from scipy.stats import ks_2samp as scipy_ks_2samp
    except ImportError:
        raise _missing_extra("scipy") from None
    if not len(x) or not len(y):
        raise ValueError("ks_2samp needs two non-empty samples")
    result = scipy_ks_2samp(x, y)
    return float(result.statistic), float(result.pvalue)


def split_role(name: str, forget_splits=FORGET_SPLITS, option_splits=OPTION_SPLITS) -> str:
    """``forget``, ``options`` or ``retain``: how a split of that name is scored."""
    if name in forget_splits:
        return "forget"
    return "options" if name in option_splits else "retain"


def item_metrics(role: str, scores: dict, generated: str | None, answer: str) -> dict:
    """One item's metrics from its per-token mean log-probs ``scores`` (``answer``, ``paraphrased``,
    ``perturbed``: see :func:`answer_mean_logps`) and its greedy answer."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    perturbed = scores.get("perturbed")
    correct = scores["answer"] if role == "options" else scores.get("paraphrased")
    row = {
        "probability": math.exp(scores["answer"]),
        "rouge_l_recall": rouge_l_recall(generated, answer) if generated is not None else None,
        "truth_ratio": truth_ratio(correct, perturbed) if perturbed and correct is not None else None,
    }
    if role == "options":
        if not perturbed:
            raise ValueError("an option split's items need perturbed answers (the other options)")
        row["normalised_probability"] = normalised_probability(scores["answer"], perturbed)
    return row


def split_summary(role: str, rows: list[dict]) -> dict:
    """A split's three scores (probability, ROUGE-L recall, truth ratio) from its item metrics: the
    normalised probability on an option split, the truth ratios by the role's aggregator."""
    n = len(rows)
    probability_key = "normalised_probability" if role == "options" else "probability"
    rouge = [r["rouge_l_recall"] for r in rows]
    ratios = [r["truth_ratio"] for r in rows if r["truth_ratio"] is not None]
    summary = {
        "probability": sum(r[probability_key] for r in rows) / n,
        "rouge_l_recall": sum(rouge) / n if all(v is not None for v in rouge) else None,
        "truth_ratio": truth_ratio_score(ratios, forget=role == "forget") if ratios else None,
        "num_items": n,
    }
    if role == "options":
        summary["answer_probability"] = sum(r["probability"] for r in rows) / n
    return summary


# ----------------------------------------------------------------------------------------- model parts


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _layout(model) -> str:
    """``shared_prompt`` (each prompt forwarded once for all its answers) where the attention takes a
    4D mask, ``padded`` otherwise (flash attention)."""
    from accelerate.utils import extract_model_from_parallel

    attention = getattr(extract_model_from_parallel(model).config, "_attn_implementation", None)
    return "shared_prompt" if attention in ("sdpa", "eager") else "padded"


@torch.no_grad()
def answer_mean_logps(model, tokenizer, items: list[dict], *, batch_size: int = 16,
                      max_length: int | None = None, progress: bool = False) -> list[dict]:
    """Per item, the per-token mean log-probs log P̄ of ``answer``, ``paraphrased_answer`` (``None`` when
    the item has none) and each ``perturbed_answer`` (``None`` when none) given ``prompt``: every answer
    of an item scored in one response group, one batched forward per ``batch_size`` items."""
    from tqdm.auto import tqdm

    from alignkit.data.collate import GroupCollator
    from alignkit.data.tokenize import tokenize_group
    from alignkit.scoring import score_responses

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = GroupCollator(pad, _layout(model))
    was_training = model.training
    model.eval()
    out = []
    try:
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc="answer probabilities", unit="batch", disable=not progress):
            chunk = items[start : start + batch_size]
            layouts, groups = [], []
            for index, item in enumerate(chunk, start=start):
                para = item.get("paraphrased_answer") or None
                perturbed = list(item.get("perturbed_answer") or [])
                responses = [item["answer"], *([para] if para else []), *perturbed]
                layouts.append((bool(para), len(perturbed)))
                groups.append(tokenize_group(tokenizer, item["prompt"], responses, max_length=max_length,
                                             source="<evaluation items>", row=index + 1))
            batch = {k: v.to(_device(model)) for k, v in collate(groups).items()}
            means = score_responses(model, batch).mean_logps().tolist()
            k = 0
            for group, (has_para, num_perturbed) in zip(groups, layouts):
                values = means[k : k + len(group["response_ids"])]
                k += len(group["response_ids"])
                out.append({
                    "answer": values[0],
                    "paraphrased": values[1] if has_para else None,
                    "perturbed": values[1 + has_para :] if num_perturbed else None,
                })
    finally:
        if was_training:
            model.train()
    return out


def greedy_answers(model, tokenizer, prompts: list, *, max_new_tokens: int = GENERATION_MAX_NEW_TOKENS,
                   batch_size: int | None = None, stop: list[str] | None = None, progress: bool = False) -> list[str]:
    """The greedy (temperature 0) completion of each prompt, through the ``hf`` rollout engine (``batch_size``
    rows decoded together; ``None``: chosen from memory)."""
    from alignkit.rollout import make_engine
    from alignkit.rollout.base import SamplingConfig

    engine = make_engine("hf", model, tokenizer, batch_size=batch_size, progress=progress)
    sampling = SamplingConfig(temperature=0, max_new_tokens=max_new_tokens, stop=list(stop or []), logprobs=False)
    return [c[0].text for c in engine.generate(prompts, 1, sampling)]


def _check_items(items: list[dict], role: str) -> None:
    if not items:
        raise ValueError("no evaluation items")
    for index, item in enumerate(items):
        for key in ("prompt", "answer"):
            if not item.get(key):
                raise ValueError(f"evaluation item {index + 1} has no {key!r}")
        if role == "options" and not item.get("perturbed_answer"):
            raise ValueError(f"evaluation item {index + 1} has no 'perturbed_answer' (an option split's items "
                             "need the other options)")


def evaluate_split(model, tokenizer, items: list[dict], *, role: str = "retain", generate: bool = True,
                   max_new_tokens: int = GENERATION_MAX_NEW_TOKENS, batch_size: int = 16,
                   generation_batch_size: int | None = None, stop: list[str] | None = None, progress: bool = False) -> dict:
    """``{"items": [per-item metrics], "summary": {probability, rouge_l_recall, truth_ratio, num_items}}``
    of one split scored as ``role`` (``forget``, ``retain`` or ``options``; see the module docstring)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    _check_items(items, role)
    scores = answer_mean_logps(model, tokenizer, items, batch_size=batch_size, progress=progress)
    generated = (greedy_answers(model, tokenizer, [it["prompt"] for it in items], max_new_tokens=max_new_tokens,
                                batch_size=generation_batch_size, stop=stop, progress=progress)
                 if generate else [None] * len(items))
    rows = []
    for index, (item, score, text) in enumerate(zip(items, scores, generated)):
        rows.append({
            "id": item.get("id", index),
            "answer": item["answer"],
            "generated": text,
            **item_metrics(role, score, text, item["answer"]),
            "answer_mean_logp": score["answer"],
            "paraphrased_mean_logp": score["paraphrased"],
            "perturbed_mean_logps": score["perturbed"],
        })
    return {"items": rows, "summary": {"role": role, **split_summary(role, rows)}}


def forget_quality(truth_ratios: list[float], reference_truth_ratios: list[float]) -> dict:
    """TOFU's forget quality: the KS-test p-value of forget-set truth ratios against a retain-only model's."""
    statistic, pvalue = ks_2samp(truth_ratios, reference_truth_ratios)
    return {"forget_quality": pvalue, "ks_statistic": statistic}


def _reference_truth_ratios(reference, split: str, ids: list) -> list[float]:
    if isinstance(reference, (str, Path)):
        reference = load_results(reference)
    try:
        rows = reference["splits"][split]["items"]
    except KeyError:
        raise ValueError(f"the reference results have no per-item results for split {split!r}") from None
    if sorted(map(str, (r["id"] for r in rows))) != sorted(map(str, ids)):
        raise ValueError(f"the reference results for split {split!r} are on other items than this evaluation "
                         "(forget quality compares the same forget set under both models)")
    return [r["truth_ratio"] for r in rows]


def _open_unlearning_names(summary: dict, splits: dict) -> dict:
    """The summary's metrics under open-unlearning's TOFU metric names."""
    names = {}
    for name, split in splits.items():
        prefix = _OPEN_UNLEARNING_PREFIX.get(name, name)
        s = split["summary"]
        probability = f"{prefix}_Q_A_Prob" + ("_normalised" if s["role"] == "options" else "")
        names[probability] = s["probability"]
        names[f"{prefix}_Q_A_ROUGE"] = s["rouge_l_recall"]
        names[f"{prefix}_truth_ratio" if s["role"] == "forget" else f"{prefix}_Truth_Ratio"] = s["truth_ratio"]
    for key in ("model_utility", "forget_quality"):
        if key in summary:
            names[key] = summary[key]
    return names


def evaluate_unlearning(model, tokenizer, splits: dict[str, list[dict]], *, forget_splits=FORGET_SPLITS,
                        option_splits=OPTION_SPLITS, reference_results=None, generate: bool = True,
                        max_new_tokens: int = GENERATION_MAX_NEW_TOKENS, batch_size: int = 16,
                        generation_batch_size: int | None = None, stop: list[str] | None = None,
                        progress: bool = False) -> dict:
    """TOFU metrics of ``model`` on named splits of evaluation items.

    ``splits`` maps a name to its items; names in ``forget_splits`` are scored as forget sets, names in
    ``option_splits`` (TOFU's ``real_authors`` and ``world_facts``) with option-normalised probabilities,
    the others as retain sets; every non-forget split counts toward model utility. ``reference_results``
    (the results dict, or the path of the JSON :func:`save_results` wrote, of a retain-only model on the
    same forget items) adds forget quality. Returns ``{"summary": {...}, "splits": {name: {"summary",
    "items"}}}``; the top summary holds ``NAME/probability``, ``NAME/rouge_l_recall``, ``NAME/truth_ratio``
    for each split, ``model_utility`` (with ``model_utility_splits``), with a reference ``forget_quality``
    and ``forget_ks_statistic``, and ``open_unlearning``: the same numbers under open-unlearning's names.
    """
    results = {"splits": {}, "summary": {}}
    for name, items in splits.items():
        split = evaluate_split(model, tokenizer, items, role=split_role(name, forget_splits, option_splits),
                               generate=generate, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               generation_batch_size=generation_batch_size, stop=stop, progress=progress)
        results["splits"][name] = split
        for key in ("probability", "rouge_l_recall", "truth_ratio"):
            results["summary"][f"{name}/{key}"] = split["summary"][key]
    summary = results["summary"]
    utility_splits = [name for name in splits if name not in forget_splits]
    utility = [results["splits"][name]["summary"][key] for name in utility_splits
               for key in ("probability", "rouge_l_recall", "truth_ratio")]
    if utility_splits and all(v is not None for v in utility):
        summary["model_utility"] = model_utility(utility)
        summary["model_utility_splits"] = utility_splits
    else:  # a score is missing (no generation, no perturbed answers): no utility rather than a partial one
        summary["model_utility"] = None
    if reference_results is not None:
        for name in splits:
            if name not in forget_splits:
                continue
            rows = results["splits"][name]["items"]
            ratios = [r["truth_ratio"] for r in rows]
            if any(r is None for r in ratios):
                raise ValueError(f"forget quality needs paraphrased and perturbed answers for every {name!r} item")
            fq = forget_quality(ratios, _reference_truth_ratios(reference_results, name, [r["id"] for r in rows]))
            prefix = "" if name == forget_splits[0] else f"{name}/"
            summary[f"{prefix}forget_quality"] = fq["forget_quality"]
            summary[f"{prefix}forget_ks_statistic"] = fq["ks_statistic"]
    summary["open_unlearning"] = _open_unlearning_names(summary, results["splits"])
    return results


def save_results(results: dict, path) -> None:
    """Write ``results`` (from :func:`evaluate_unlearning`) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def load_results(path) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------------- command line


def _items_from(source: str, split: str, num_people: int, seed: int) -> list[dict]:
    if source == "synthetic":
        from alignkit.tasks.synthetic_tofu import SyntheticTofuSpec, eval_items

        return eval_items(split, SyntheticTofuSpec(num_people=num_people, seed=seed))
    from alignkit.tasks.tofu import load_tofu_eval_items

    return load_tofu_eval_items(source, split)


def unlearning_parser(prog: str = "alignkit unlearning-eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="TOFU unlearning metrics of a saved model with open-unlearning's definitions "
        "(forget quality, model utility, probability, ROUGE-L recall, truth ratio), as JSON.")
    parser.add_argument("--model", required=True, help="model path or hub id (full weights), or a LoRA adapter "
                        "directory (its base model is read from adapter_config.json)")
    parser.add_argument("--adapter", help="a LoRA adapter directory on top of --model")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (alignkit.tasks.synthetic_tofu) or a TOFU-format source: a directory of "
                             "<split>.json files or a hub id such as locuslab/TOFU")
    parser.add_argument("--forget_split", default="forget10")
    parser.add_argument("--retain_split", default=None, help="default: retainNN matching the forget split")
    parser.add_argument("--utility_splits", nargs="*", default=None,
                        help="option splits for model utility (default: real_authors world_facts for TOFU data, "
                             "none for synthetic)")
    parser.add_argument("--reference", help="results JSON of the retain-only model (from this command), for "
                        "forget quality")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--max_new_tokens", type=int, default=GENERATION_MAX_NEW_TOKENS,
                        help="greedy answer length for ROUGE (default 200, open-unlearning's)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num_people", type=int, default=40, help="synthetic task size")
    parser.add_argument("--seed", type=int, default=0, help="synthetic task seed")
    return parser


def unlearning_main(argv: list[str] | None = None, prog: str = "alignkit unlearning-eval") -> int:
    parser = unlearning_parser(prog)
    a = parser.parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "num_people"):
        if getattr(a, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    match = re.fullmatch(r"forget(\d+)", a.forget_split)
    if a.retain_split is None and not match:
        parser.error(f"--forget_split must be forgetNN (e.g. forget10) unless --retain_split is given, got {a.forget_split!r}")
    retain_split = a.retain_split or f"retain{100 - int(match.group(1))}"
    option_splits = a.utility_splits if a.utility_splits is not None else (
        [] if a.data == "synthetic" else list(OPTION_SPLITS))
    splits = {"forget": _items_from(a.data, a.forget_split, a.num_people, a.seed),
              "retain": _items_from(a.data, retain_split, a.num_people, a.seed)}
    for name in option_splits:
        splits[name] = _items_from(a.data, name, a.num_people, a.seed)
    _ = _rouge_scorer(), ks_2samp  # a missing extra is reported before the model loads
    from alignkit.modeling import load_for_generation

    model, adapter = a.model, a.adapter
    config = Path(a.model) / "adapter_config.json"
    if adapter is None and config.exists():  # an adapter directory given as the model
        model, adapter = json.loads(config.read_text())["base_model_name_or_path"], a.model
    model, tokenizer = load_for_generation(model, adapter, a.dtype)
    results = evaluate_unlearning(model, tokenizer, splits, option_splits=tuple(option_splits),
                                  reference_results=a.reference, max_new_tokens=a.max_new_tokens,
                                  batch_size=a.batch_size, progress=True)
    save_results(results, a.out)
    print(json.dumps(results["summary"]["open_unlearning"], indent=2))
    print(f"-> {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return unlearning_main(argv, prog="python -m alignkit.evaluation.unlearning")


if __name__ == "__main__":
    raise SystemExit(main())
