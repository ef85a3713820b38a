"""TOFU metrics against open-unlearning's definitions on the same inputs (tests/open_unlearning_reference.py
re-implements its code line for line; rouge_score and scipy are called where it calls them): ROUGE-L
recall, truth ratio, option-normalised probability, forget quality, the 9-value model utility; and
evaluate_unlearning on a tiny model against open-unlearning's own probability pass (per-sample
CrossEntropy over labels)."""

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import load_tiny

pytest.importorskip("rouge_score")
pytest.importorskip("scipy")

import open_unlearning_reference as ou  # noqa: E402
import scipy.stats  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402

from alignkit.evaluation.unlearning import (  # noqa: E402
    evaluate_unlearning,
    forget_quality,
    item_metrics,
    ks_2samp,
    load_results,
    model_utility,
    normalised_probability,
    rouge_l_recall,
    save_results,
    split_summary,
    truth_ratio,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-6

WORDS = ("he she wrote writes novel novels about a the dragon dragons born in city cities was is "
         "running ran runs author authors book books 1971 Paris London won award awards").split()


def _sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + rng.choice(("", ".", "!", " "))


def test_rouge_l_recall_is_open_unlearnings_stemmed_rouge():
    # the pair: without stemming 2/7 = 0.286, with the Porter stemmer (open-unlearning) 4/7
    assert rouge_l_recall("He writes novels about dragons", "He wrote a novel about a dragon") == pytest.approx(4 / 7)
    rng = random.Random(0)
    generated = [_sentence(rng) for _ in range(300)] + ["", "   "]
    truths = [_sentence(rng) for _ in range(302)]
    reference = ou.eval_rouge_recall_batch([g.strip() for g in generated], truths)
    ours = [rouge_l_recall(g, t) for g, t in zip(generated, truths)]
    assert max(abs(a - r["rougeL_recall"]) for a, r in zip(ours, reference)) <= TOL
    stemmed_differs = sum(
        abs(rouge_scorer.RougeScorer(["rougeL"]).score(t, g)["rougeL"].recall - a) > 1e-12
        for g, t, a in zip(generated, truths, ours))
    assert stemmed_differs > 10  # the stemmer matters on these inputs


def _random_split(rng, name, n, k=3):
    """Per-item avg_losses (= −mean log-prob) and texts of one split, as both implementations take them."""
    answer = [rng.uniform(0.05, 6.0) for _ in range(n)]
    perturbed = [[rng.uniform(0.05, 6.0) for _ in range(k)] for _ in range(n)]
    paraphrased = [rng.uniform(0.05, 6.0) for _ in range(n)] if name in ("forget", "retain") else None
    if name == "forget":  # a few items whose paraphrase is nearly impossible: the 1e-10 guards matter
        paraphrased[:3] = [30.0, 40.0, 25.0]
    generated = [_sentence(rng) for _ in range(n)]
    truths = [_sentence(rng) for _ in range(n)]
    return {"answer": answer, "paraphrased": paraphrased, "perturbed": perturbed, "generated": generated,
            "ground_truth": truths}


def _alignkit_split(name, s):
    role = {"forget": "forget", "retain": "retain"}.get(name, "options")
    rows = []
    for i in range(len(s["answer"])):
        scores = {"answer": -s["answer"][i], "perturbed": [-v for v in s["perturbed"][i]],
                  "paraphrased": -s["paraphrased"][i] if s["paraphrased"] is not None else None}
        rows.append(item_metrics(role, scores, s["generated"][i], s["ground_truth"][i]))
    return rows, split_summary(role, rows)


def test_truth_ratio_probability_utility_and_forget_quality_equal_open_unlearning():
    rng = random.Random(1)
    splits = {name: _random_split(rng, name, n) for name, n in
              (("forget", 40), ("retain", 60), ("real_authors", 30), ("world_facts", 35))}
    ref_model = _random_split(rng, "forget", 40)
    expected = ou.tofu_metrics(splits, reference_forget_avg_losses=ref_model)

    ours = {name: _alignkit_split(name, s) for name, s in splits.items()}
    prefix = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
    got = {}
    for name, (_, summary) in ours.items():
        p = prefix[name]
        got[f"{p}_Q_A_ROUGE"] = summary["rouge_l_recall"]
        if name in ("forget", "retain"):
            got[f"{p}_Q_A_Prob"] = summary["probability"]
        else:
            got[f"{p}_Q_A_Prob_normalised"] = summary["probability"]
        got["forget_truth_ratio" if name == "forget" else f"{p}_Truth_Ratio"] = summary["truth_ratio"]
    got["model_utility"] = model_utility([ours[n][1][k] for n in ("retain", "real_authors", "world_facts")
                                          for k in ("probability", "rouge_l_recall", "truth_ratio")])
    retain_model_rows, _ = _alignkit_split("forget", ref_model)
    got["forget_quality"] = forget_quality([r["truth_ratio"] for r in ours["forget"][0]],
                                           [r["truth_ratio"] for r in retain_model_rows])["forget_quality"]
    assert set(got) == set(expected)  # the 9 utility inputs, the forget metrics, utility and forget quality
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), abs=TOL), key
    assert 0 < got["forget_quality"] < 1 and 0 < got["model_utility"] < 1


def test_truth_ratio_and_normalised_probability_closed_forms():
    # P̄(para) = e^-1, P̄(perturbed) = e^-2 and e^-4 -> geometric mean e^-3 -> R = e^-3 / (e^-1 + 1e-10)
    assert truth_ratio(-1.0, [-2.0, -4.0]) == pytest.approx(math.exp(-3) / (math.exp(-1) + 1e-10), rel=1e-12)
    assert normalised_probability(math.log(0.5), [math.log(0.25), math.log(0.25)]) == pytest.approx(0.5 / (1 + 1e-10))
    assert model_utility([0.5, 1.0, 0.25]) == pytest.approx(3 / (2 + 1 + 4)) and model_utility([0.5, 0.0]) == 0.0
    assert model_utility([0.3, 0.7, 0.9]) == pytest.approx(scipy.stats.hmean([0.3, 0.7, 0.9]), abs=1e-15)


@pytest.mark.parametrize(("n", "m"), [(8, 7), (600, 700), (10_000, 3)])
def test_forget_quality_is_scipys_ks_2samp(n, m):
    """Including n·m > 250,000, where the old hand-written test switched to the asymptotic formula."""
    rng = np.random.default_rng(n)
    x, y = rng.lognormal(0, 1, n), rng.lognormal(0.1, 1, m)
    d, p = ks_2samp(list(x), list(y))
    reference = scipy.stats.ks_2samp(x, y)
    assert d == pytest.approx(reference.statistic, abs=1e-15) and p == pytest.approx(reference.pvalue, abs=1e-15)
    assert forget_quality(list(x), list(y))["forget_quality"] == p
    ties = ks_2samp([1, 1, 2, 2, 3], [1, 2, 2, 3, 3, 3])
    assert ties == pytest.approx((0.3, 0.8961038961038962), rel=1e-9)  # scipy 1.17, exact


# ------------------------------------------------------------------------------------ on a tiny model


def _items(n, offset=0, paraphrase=True):
    items = []
    for i in range(offset, offset + n):
        item = {"id": f"q{i}", "prompt": f"Start with {i}. Add 2. What is the result?",
                "answer": f"{i} + 2 = {i + 2}\nThe answer is {i + 2}.",
                "perturbed_answer": [f"The answer is {i + 3}.", f"The answer is {i + 5}."]}
        if paraphrase:
            item["paraphrased_answer"] = f"The answer is {i + 2}."
        items.append(item)
    return items


def _open_unlearning_avg_losses(model, tokenizer, item):
    """open-unlearning's evaluate_probability on each answer alone (labels −100 over the prompt)."""
    from alignkit.data.tokenize import tokenize_group

    responses = [item["answer"], *([item["paraphrased_answer"]] if "paraphrased_answer" in item else []),
                 *item["perturbed_answer"]]
    group = tokenize_group(tokenizer, item["prompt"], responses)
    losses = []
    for response in group["response_ids"]:
        ids = torch.tensor([group["prompt_ids"] + response])
        labels = torch.tensor([[ou.IGNORE_INDEX] * len(group["prompt_ids"]) + response])
        losses.append(ou.evaluate_probability(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                      "labels": labels})[0]["avg_loss"])
    has_para = "paraphrased_answer" in item
    return losses[0], (losses[1] if has_para else None), losses[1 + has_para:]


def _reference_inputs(model, tokenizer, items, generated=None):
    answer, para, pert = zip(*(_open_unlearning_avg_losses(model, tokenizer, it) for it in items))
    return {"answer": list(answer), "paraphrased": list(para) if para[0] is not None else None,
            "perturbed": [list(p) for p in pert], "generated": [g.strip() for g in generated or []],
            "ground_truth": [it["answer"] for it in items]}


def test_evaluate_unlearning_equals_open_unlearning_on_a_tiny_model(tiny_model_path, tokenizer, tmp_path):
    model = load_tiny(tiny_model_path).eval()
    retain_model = load_tiny(tiny_model_path).eval()  # "never saw the forget set": other weights
    with torch.no_grad():
        for p in retain_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    splits = {"forget": _items(6), "retain": _items(5, offset=10), "real_authors": _items(4, 30, paraphrase=False),
              "world_facts": _items(4, 40, paraphrase=False)}
    reference_results = evaluate_unlearning(retain_model, tokenizer, {"forget": splits["forget"]}, generate=False)
    save_results(reference_results, tmp_path / "retain.json")
    results = evaluate_unlearning(model, tokenizer, splits, reference_results=tmp_path / "retain.json",
                                  max_new_tokens=8, batch_size=3)

    ref_splits = {name: _reference_inputs(model, tokenizer, items,
                                          [r["generated"] for r in results["splits"][name]["items"]])
                  for name, items in splits.items()}
    expected = ou.tofu_metrics(ref_splits, reference_forget_avg_losses=_reference_inputs(
        retain_model, tokenizer, splits["forget"]))
    got = results["summary"]["open_unlearning"]
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), abs=TOL), key
    assert results["summary"]["model_utility_splits"] == ["retain", "real_authors", "world_facts"]
    assert results["summary"]["forget_quality"] == got["forget_quality"]
    assert results["splits"]["real_authors"]["summary"]["role"] == "options"

    path = tmp_path / "eval.json"
    save_results(results, path)
    assert load_results(path) == json.loads(json.dumps(results))
    again = evaluate_unlearning(model, tokenizer, {"forget": splits["forget"]}, reference_results=path, generate=False)
    assert again["summary"]["forget_quality"] == 1.0 and again["summary"]["forget_ks_statistic"] == 0.0
    assert again["summary"]["model_utility"] is None
    with pytest.raises(ValueError, match="other items"):
        evaluate_unlearning(model, tokenizer, {"forget": _items(4, offset=50)}, reference_results=path, generate=False)
    with pytest.raises(ValueError, match="perturbed_answer"):
        evaluate_unlearning(model, tokenizer, {"world_facts": [{"prompt": "q", "answer": "a"}]}, generate=False)


def test_tofu_option_splits_load(tmp_path):
    from alignkit.tasks.tofu import eval_subset, load_tofu_eval_items

    assert eval_subset("real_authors") == "real_authors_perturbed" and eval_subset("forget05") == "forget05_perturbed"
    rows = [{"question": "Who wrote Hamlet?", "answer": "William Shakespeare",
             "perturbed_answer": ["Charles Dickens", "Jane Austen", "Mark Twain"]}]
    (tmp_path / "real_authors_perturbed.json").write_text("\n".join(json.dumps(r) for r in rows))
    items = load_tofu_eval_items(str(tmp_path), "real_authors")
    assert items == [{"id": "real_authors_perturbed-1", "prompt": [{"role": "user", "content": "Who wrote Hamlet?"}],
                      "answer": "William Shakespeare", "perturbed_answer": rows[0]["perturbed_answer"]}]
