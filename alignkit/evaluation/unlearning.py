"""Unlearning metrics with TOFU's definitions (Maini et al. 2024, arXiv:2401.06121, and its code).

An evaluation item is a question with its answers::

    {"id": ..., "prompt": text or chat messages, "answer": str,
     "paraphrased_answer": str (optional), "perturbed_answer": [str, ...] (optional)}

(:func:`alignkit.tasks.synthetic_tofu.eval_items` and :func:`alignkit.tasks.tofu.load_tofu_eval_items` make them.)
Per item, with P̄(y|x) = P(y|x)^(1/|y|) = exp(mean response-token log-prob):

``probability``      P̄(answer | prompt)
``rouge_l_recall``   ROUGE-L recall of the greedy answer against ``answer``: LCS(generated, answer) / |answer|
                     over lower-cased alphanumeric words (TOFU uses ``rouge_score`` with a Porter stemmer;
                     this is the same score without stemming)
``truth_ratio``      R = (Π_i P̄(perturbed_i))^(1/k) / P̄(paraphrased): the geometric mean over the k perturbed
                     (wrong) answers against the paraphrased (right) one; R < 1 when the model prefers the truth

Per split (``summary``): the mean probability, the mean ROUGE-L recall and the truth-ratio score, which
TOFU defines differently for the forget set, mean(min(R, 1/R)), and for the other sets, mean(max(0, 1 − R)).

* **Model utility**: the harmonic mean of the three scores of every non-forget split (TOFU uses the
  retain set, real authors and world facts; here whichever utility splits are given).
* **Forget quality**: the p-value of a two-sample Kolmogorov-Smirnov test between the forget-set truth
  ratios of the evaluated model and those of a model trained without the forget set (retain-only), read
  from that model's saved results. High (e.g. > 0.05): indistinguishable from never having seen the data.

:func:`evaluate_unlearning` computes everything and :func:`save_results` writes it as JSON, per item and
summarised. ``python -m alignkit.evaluation.unlearning --help`` runs it on a saved model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

FORGET_SPLITS = ("forget",)
_WORD = re.compile(r"[a-z0-9]+")


# ----------------------------------------------------------------------------------------- pure parts


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: ``rouge_score``'s default tokenisation, without stemming."""
    return _WORD.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists (O(|a|·|b|) time, O(|b|) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / |reference| over :func:`rouge_tokens` (0 if the reference is empty)."""
    ref = rouge_tokens(reference)
    return lcs_length(rouge_tokens(prediction), ref) / len(ref) if ref else 0.0


def truth_ratio(paraphrased_mean_logp: float, perturbed_mean_logps: list[float]) -> float:
    """R = exp(mean_i log P̄(perturbed_i) − log P̄(paraphrased)), the inputs being per-token mean log-probs."""
    return math.exp(sum(perturbed_mean_logps) / len(perturbed_mean_logps) - paraphrased_mean_logp)


def truth_ratio_score(ratios: list[float], *, forget: bool) -> float:
    """TOFU's split score of truth ratios: mean(min(R, 1/R)) on a forget split, mean(max(0, 1 − R)) otherwise."""
    if not ratios:
        return float("nan")
    if forget:
        return sum(min(r, 1 / r) if r > 0 else 0.0 for r in ratios) / len(ratios)
    return sum(max(0.0, 1 - r) for r in ratios) / len(ratios)


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean (0 if any value is 0, as ``scipy.stats.hmean``); values must be >= 0."""
    if not values:
        return float("nan")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean of negative values: {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def _ks_statistic_numerator(x: list[float], y: list[float]) -> int:
    """max over the pooled values v of |F_x(v) − F_y(v)|·n·m, as an exact integer."""
    n, m = len(x), len(y)
    xs, ys = sorted(x), sorted(y)
    i = j = best = 0
    while i < n or j < m:
        v = min(xs[i] if i < n else math.inf, ys[j] if j < m else math.inf)
        while i < n and xs[i] == v:
            i += 1
        while j < m and ys[j] == v:
            j += 1
        best = max(best, abs(i * m - j * n))
    return best


def _ks_exact_pvalue(n: int, m: int, h: int) -> float:
    """P(D >= h/(n·m)) under the null: 1 − (monotone lattice paths from (0,0) to (n,m) that keep
    |i·m − j·n| < h) / C(n+m, n). Counted with exact integers."""
    if h <= 0:
        return 1.0
    row = [0] * (m + 1)  # row[j]: paths to (i, j)
    for i in range(n + 1):
        for j in range(m + 1):
            if abs(i * m - j * n) >= h:
                row[j] = 0
            elif i == 0 and j == 0:
                row[j] = 1
            else:
                row[j] = row[j] + (row[j - 1] if j > 0 else 0)  # from (i-1, j) and (i, j-1)
    total = math.comb(n + m, n)
    return (total - row[m]) / total  # exact integers: no cancellation for tiny p-values


def _kolmogorov_sf(lam: float) -> float:
    """Q(λ) = 2·Σ_{k≥1} (−1)^(k−1)·exp(−2k²λ²), the limiting distribution of √(nm/(n+m))·D."""
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return max(0.0, min(1.0, 2 * total))


def ks_2samp(x: list[float], y: list[float], *, exact_limit: int = 250_000) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test: ``(D, p-value)``.

    D = sup_v |F_x(v) − F_y(v)|. The p-value is exact (lattice-path count, as ``scipy.stats.ks_2samp``'s
    ``method="exact"``) when n·m <= ``exact_limit``, else the Kolmogorov limit with Stephens' correction,
    Q((√e + 0.12 + 0.11/√e)·D), e = n·m/(n+m).
    """
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("ks_2samp needs two non-empty samples")
    h = _ks_statistic_numerator(x, y)
    d = h / (n * m)
    if n * m <= exact_limit:
        return d, _ks_exact_pvalue(n, m, h)
    e = math.sqrt(n * m / (n + m))
    return d, _kolmogorov_sf((e + 0.12 + 0.11 / e) * d)


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
                      max_length: int | None = None) -> list[dict]:
    """Per item, the per-token mean log-probs log P̄ of ``answer``, ``paraphrased_answer`` and each
    ``perturbed_answer`` given ``prompt`` (one batched forward per ``batch_size`` items)."""
    from alignkit.data.collate import GroupCollator
    from alignkit.data.tokenize import tokenize_group
    from alignkit.scoring import score_responses

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = GroupCollator(pad, _layout(model))
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            layouts, groups = [], []
            for index, item in enumerate(chunk, start=start):
                responses = [item["answer"]]
                has_para = bool(item.get("paraphrased_answer")) and bool(item.get("perturbed_answer"))
                if has_para:
                    responses += [item["paraphrased_answer"], *item["perturbed_answer"]]
                layouts.append(has_para)
                groups.append(tokenize_group(tokenizer, item["prompt"], responses, max_length=max_length,
                                             source="<evaluation items>", row=index + 1))
            batch = {k: v.to(_device(model)) for k, v in collate(groups).items()}
            means = score_responses(model, batch).mean_logps().tolist()
            k = 0
            for group, has_para in zip(groups, layouts):
                values = means[k : k + len(group["response_ids"])]
                k += len(group["response_ids"])
                out.append({
                    "answer": values[0],
                    "paraphrased": values[1] if has_para else None,
                    "perturbed": values[2:] if has_para else None,
                })
    finally:
        if was_training:
            model.train()
    return out


def greedy_answers(model, tokenizer, prompts: list, *, max_new_tokens: int = 64, batch_size: int = 32,
                   stop: list[str] | None = None) -> list[str]:
    """The greedy (temperature 0) completion of each prompt, through the ``hf`` rollout engine."""
    from alignkit.rollout import make_engine
    from alignkit.rollout.base import SamplingConfig

    engine = make_engine("hf", model, tokenizer, batch_size=batch_size, progress=False)
    sampling = SamplingConfig(temperature=0, max_new_tokens=max_new_tokens, stop=list(stop or []), logprobs=False)
    return [c[0].text for c in engine.generate(prompts, 1, sampling)]


def evaluate_split(model, tokenizer, items: list[dict], *, forget: bool, generate: bool = True,
                   max_new_tokens: int = 64, batch_size: int = 16, generation_batch_size: int = 64,
                   stop: list[str] | None = None) -> dict:
    """``{"items": [per-item metrics], "summary": {probability, rouge_l_recall, truth_ratio}}`` of one split."""
    if not items:
        raise ValueError("no evaluation items")
    for index, item in enumerate(items):
        for key in ("prompt", "answer"):
            if not item.get(key):
                raise ValueError(f"evaluation item {index + 1} has no {key!r}")
    scores = answer_mean_logps(model, tokenizer, items, batch_size=batch_size)
    generated = (greedy_answers(model, tokenizer, [it["prompt"] for it in items], max_new_tokens=max_new_tokens,
                                batch_size=generation_batch_size, stop=stop) if generate else [None] * len(items))
    rows = []
    for index, (item, score, text) in enumerate(zip(items, scores, generated)):
        ratio = truth_ratio(score["paraphrased"], score["perturbed"]) if score["paraphrased"] is not None else None
        rows.append({
            "id": item.get("id", index),
            "answer": item["answer"],
            "generated": text,
            "probability": math.exp(score["answer"]),
            "rouge_l_recall": rouge_l_recall(text, item["answer"]) if text is not None else None,
            "truth_ratio": ratio,
            "answer_mean_logp": score["answer"],
            "paraphrased_mean_logp": score["paraphrased"],
            "perturbed_mean_logps": score["perturbed"],
        })
    ratios = [r["truth_ratio"] for r in rows if r["truth_ratio"] is not None]
    summary = {
        "probability": sum(r["probability"] for r in rows) / len(rows),
        "rouge_l_recall": (sum(r["rouge_l_recall"] for r in rows) / len(rows)) if generate else None,
        "truth_ratio": truth_ratio_score(ratios, forget=forget) if ratios else None,
        "num_items": len(rows),
    }
    return {"items": rows, "summary": summary}


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


def evaluate_unlearning(model, tokenizer, splits: dict[str, list[dict]], *, forget_splits=FORGET_SPLITS,
                        reference_results=None, generate: bool = True, max_new_tokens: int = 64,
                        batch_size: int = 16, generation_batch_size: int = 64, stop: list[str] | None = None) -> dict:
    """TOFU metrics of ``model`` on named splits of evaluation items.

    ``splits`` maps a name to its items; names in ``forget_splits`` are scored as forget sets, the
    others count toward model utility. ``reference_results`` (the results dict, or the path of the JSON
    :func:`save_results` wrote, of a retain-only model on the same forget items) adds forget quality.
    Returns ``{"summary": {...}, "splits": {name: {"summary", "items"}}}``; the top summary holds
    ``NAME/probability``, ``NAME/rouge_l_recall``, ``NAME/truth_ratio`` for each split, ``model_utility``
    and, with a reference, ``forget_quality`` and ``forget_ks_statistic``.
    """
    results = {"splits": {}, "summary": {}}
    for name, items in splits.items():
        split = evaluate_split(model, tokenizer, items, forget=name in forget_splits, generate=generate,
                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                               generation_batch_size=generation_batch_size, stop=stop)
        results["splits"][name] = split
        for key in ("probability", "rouge_l_recall", "truth_ratio"):
            results["summary"][f"{name}/{key}"] = split["summary"][key]
    utility = [v for name in splits if name not in forget_splits
               for k, v in results["splits"][name]["summary"].items() if k != "num_items" and v is not None]
    results["summary"]["model_utility"] = harmonic_mean(utility) if utility else None
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
            results["summary"][f"{prefix}forget_quality"] = fq["forget_quality"]
            results["summary"][f"{prefix}forget_ks_statistic"] = fq["ks_statistic"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.evaluation.unlearning",
                                     description="TOFU unlearning metrics of a saved model, as JSON.")
    parser.add_argument("--model", required=True, help="model directory (full weights or a LoRA adapter)")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (alignkit.tasks.synthetic_tofu) or a TOFU-format source: a directory of "
                             "<split>.json files or a hub id such as locuslab/TOFU")
    parser.add_argument("--forget_split", default="forget10")
    parser.add_argument("--retain_split", default=None, help="default: retainNN matching the forget split")
    parser.add_argument("--reference", help="eval JSON of the retain-only model, for forget quality")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_people", type=int, default=40, help="synthetic task size")
    parser.add_argument("--seed", type=int, default=0, help="synthetic task seed")
    a = parser.parse_args(argv)

    from alignkit.modeling import ModelArguments, load_model_and_tokenizer

    if (Path(a.model) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model, tokenizer = AutoPeftModelForCausalLM.from_pretrained(a.model), AutoTokenizer.from_pretrained(a.model)
    else:
        model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=a.model))
    if torch.cuda.is_available():
        model = model.to("cuda")
    retain_split = a.retain_split or "retain" + str(100 - int(re.sub(r"\D", "", a.forget_split)))
    splits = {"forget": _items_from(a.data, a.forget_split, a.num_people, a.seed),
              "retain": _items_from(a.data, retain_split, a.num_people, a.seed)}
    results = evaluate_unlearning(model, tokenizer, splits, reference_results=a.reference,
                                  max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    save_results(results, a.out)
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
