"""Unlearning metrics: ROUGE-L recall, the two-sample KS test (against scipy's exact p-values),
truth ratio and its TOFU scores, model utility, and evaluate_unlearning on a tiny model (per-item
values against a direct forward pass, JSON round trip, forget quality against a saved reference)."""

import itertools
import math
import random

import pytest
import torch
from conftest import load_tiny

from alignkit.evaluation.unlearning import (
    evaluate_unlearning,
    harmonic_mean,
    ks_2samp,
    lcs_length,
    load_results,
    rouge_l_recall,
    save_results,
    truth_ratio,
    truth_ratio_score,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute_lcs(a, b):
    best = 0
    for k in range(len(a) + 1):
        for sub in itertools.combinations(a, k):
            it = iter(b)
            if all(x in it for x in sub):
                best = max(best, k)
    return best


def test_lcs_and_rouge_l_recall():
    rng = random.Random(0)
    for _ in range(30):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _brute_lcs(a, b)
    assert rouge_l_recall("Rithen Velnu was born in Riaholt.", "Rithen Velnu was born in Riaholt.") == 1.0
    # reference words: the, cat, sat, on, the, mat (6); LCS with "The cat is on a mat" = the cat on mat (4)
    assert rouge_l_recall("The cat is on a mat!", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert rouge_l_recall("", "anything") == 0.0 and rouge_l_recall("words", "") == 0.0
    assert rouge_l_recall("born in 1971", "was born in 1971") == pytest.approx(3 / 4)  # digits are words


@pytest.mark.parametrize(
    ("x", "y", "statistic", "pvalue"),
    [  # scipy.stats.ks_2samp(x, y, method="exact") 1.17
        ([0.31, 1.2, 0.8, 2.5, 0.05, 1.7, 0.9, 1.1], [0.6, 2.2, 3.1, 1.9, 2.8, 1.4, 2.0], 0.6071428571428571,
         0.08702408702408701),
        ([1, 1, 2, 2, 3], [1, 2, 2, 3, 3, 3], 0.3, 0.8961038961038962),  # ties
        ([0.5, 0.7, 0.2, 0.9, 0.4, 0.6, 0.3, 0.8, 0.1, 0.55, 0.65, 0.75],
         [0.52, 0.71, 0.93, 0.33, 0.44, 0.88, 0.61, 0.27, 0.99, 0.58], 0.21666666666666667, 0.9173133368179808),
    ],
)
def test_ks_2samp_matches_scipy_exact(x, y, statistic, pvalue):
    d, p = ks_2samp(x, y)
    assert d == pytest.approx(statistic, rel=1e-12) and p == pytest.approx(pvalue, rel=1e-9)


def test_ks_2samp_closed_forms_and_asymptotics():
    # complete separation of two samples of n: P(D = 1) = 2 / C(2n, n)
    for n in (3, 5, 30):
        d, p = ks_2samp(list(range(n)), [v + 100 for v in range(n)])
        assert d == 1.0 and p == pytest.approx(2 / math.comb(2 * n, n), rel=1e-9)  # 30: ~1.7e-17, no cancellation
    assert ks_2samp([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)
    rng = random.Random(1)
    x = [rng.gauss(0, 1) for _ in range(300)]
    y = [rng.gauss(0.2, 1) for _ in range(250)]
    d, exact = ks_2samp(x, y)
    _, asymptotic = ks_2samp(x, y, exact_limit=0)
    assert exact == pytest.approx(asymptotic, abs=0.01)


def test_truth_ratio_scores_and_utility():
    # P̄(para) = e^-1, P̄(perturbed) = e^-2 and e^-4 -> geometric mean e^-3 -> R = e^-2
    assert truth_ratio(-1.0, [-2.0, -4.0]) == pytest.approx(math.exp(-2))
    ratios = [0.5, 2.0, 1.0]
    assert truth_ratio_score(ratios, forget=True) == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # min(R, 1/R)
    assert truth_ratio_score(ratios, forget=False) == pytest.approx((0.5 + 0 + 0) / 3)  # max(0, 1 − R)
    assert harmonic_mean([0.5, 1.0, 0.25]) == pytest.approx(3 / (2 + 1 + 4))
    assert harmonic_mean([0.5, 0.0]) == 0.0


def _items(n, offset=0):
    return [
        {"id": f"q{i + offset}", "prompt": f"Start with {i + offset}. Add 2. What is the result?",
         "answer": f"{i + offset} + 2 = {i + offset + 2}\nThe answer is {i + offset + 2}.",
         "paraphrased_answer": f"The answer is {i + offset + 2}.",
         "perturbed_answer": [f"The answer is {i + offset + 3}.", f"The answer is {i + offset + 5}."]}
        for i in range(n)
    ]


def test_evaluate_unlearning_on_a_tiny_model(tiny_model_path, tokenizer, tmp_path):
    from alignkit.data.tokenize import tokenize_group

    model = load_tiny(tiny_model_path).eval()
    splits = {"forget": _items(4), "retain": _items(5, offset=10)}
    results = evaluate_unlearning(model, tokenizer, splits, max_new_tokens=8, batch_size=3)

    item, row = splits["forget"][1], results["splits"]["forget"]["items"][1]
    # probability = exp(mean log-prob of the answer tokens), recomputed by a plain forward pass
    group = tokenize_group(tokenizer, item["prompt"], [item["answer"], item["paraphrased_answer"],
                                                        *item["perturbed_answer"]])
    means = []
    for response in group["response_ids"]:
        ids = torch.tensor([group["prompt_ids"] + response])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        start = len(group["prompt_ids"]) - 1
        means.append(logprobs[start:, :].gather(-1, ids[0, start + 1 :, None]).mean().item())
    assert row["probability"] == pytest.approx(math.exp(means[0]), rel=1e-4)
    assert row["truth_ratio"] == pytest.approx(math.exp((means[2] + means[3]) / 2 - means[1]), rel=1e-4)
    assert isinstance(row["generated"], str) and 0.0 <= row["rouge_l_recall"] <= 1.0

    summary = results["summary"]
    retain = results["splits"]["retain"]["summary"]
    assert summary["retain/probability"] == pytest.approx(
        sum(r["probability"] for r in results["splits"]["retain"]["items"]) / 5)
    assert summary["model_utility"] == pytest.approx(
        harmonic_mean([retain["probability"], retain["rouge_l_recall"], retain["truth_ratio"]]))
    assert "forget_quality" not in summary

    path = tmp_path / "eval.json"
    save_results(results, path)
    assert load_results(path) == results
    # the same model as its own reference: identical truth ratios, KS statistic 0, p-value 1
    again = evaluate_unlearning(model, tokenizer, splits, reference_results=path, generate=False)
    assert again["summary"]["forget_quality"] == 1.0 and again["summary"]["forget_ks_statistic"] == 0.0
    assert again["summary"]["retain/rouge_l_recall"] is None
    with pytest.raises(ValueError, match="other items"):
        evaluate_unlearning(model, tokenizer, {"forget": _items(4, offset=50)}, reference_results=path, generate=False)
