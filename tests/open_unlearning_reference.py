"""open-unlearning's TOFU metric code, re-implemented line for line for the agreement tests.

Source: github.com/locuslab/open-unlearning at commit d3d7cf9 ("fix: complete the eval metrics
Truth_Ratio calculation mentioned in the paper (#163)"):

* ``src/evals/metrics/utils.py``: ``aggregate_to_1D``, ``evaluate_probability`` (per-sample avg_loss with
  ``nn.CrossEntropyLoss(ignore_index=-100, reduction="none")`` over the shifted labels) and
  ``eval_text_similarity``'s ``eval_rouge_recall_batch`` (``RougeScorer(["rouge1", "rougeL"],
  use_stemmer=True)``, ``scorer.score(gt, gen)``);
* ``src/evals/metrics/memorization.py``: ``probability`` (mean of ``prob``), ``probability_w_options``,
  ``rouge`` (mean of ``rougeL_recall``) and ``truth_ratio`` with its aggregators ``closer_to_1_better`` and
  ``true_better``;
* ``src/evals/metrics/utility.py``: ``hm_aggregate`` (``scipy.stats.hmean``);
* ``src/evals/metrics/privacy.py``: ``ks_test`` (``scipy.stats.ks_2samp(forget, retain).pvalue`` over the
  truth-ratio ``score`` values);
* ``configs/eval/tofu_metrics/*.yaml``: which answers are ``correct`` and ``wrong`` for each truth ratio
  (forget / retain: the paraphrased answer vs the perturbed ones; real authors / world facts: the answer vs
  the perturbed ones) and the 9 inputs of ``model_utility``.

Only the pieces that take a model and a dataloader are left out: the functions below take what those
produce (per-sample avg_loss values, generated texts), so that alignkit and this code see the same inputs.
"""

import numpy as np
import scipy as sc
import torch
from rouge_score import rouge_scorer
from torch import nn

IGNORE_INDEX = -100


def aggregate_to_1D(x):
    return np.mean(x, axis=tuple(range(1, x.ndim)))


def evaluate_probability(model, batch):
    """utils.py ``evaluate_probability`` (one batch with ``input_ids``, ``attention_mask``, ``labels``)."""
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = output.logits
    labels = batch["labels"]
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
    losses = loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)
    num_token_gt = (batch["labels"] != IGNORE_INDEX).sum(-1)
    avg_losses = losses / num_token_gt
    normalized_probs = torch.exp(-avg_losses)
    return [{"prob": p, "avg_loss": a} for p, a in zip(normalized_probs.tolist(), avg_losses.tolist())]


def eval_rouge_recall_batch(gen_outputs, ground_truths):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    evals = []
    for gen, gt in zip(gen_outputs, ground_truths):
        rouge_scores = scorer.score(gt, gen)
        evals.append({
            "rouge1_recall": rouge_scores["rouge1"].recall,
            "rougeL_f1": rouge_scores["rougeL"].fmeasure,
            "rougeL_recall": rouge_scores["rougeL"].recall,
        })
    return evals


def probability(value_by_index):
    prob_values = np.array([evals["prob"] for evals in value_by_index.values() if evals["prob"] is not None])
    prob_values = aggregate_to_1D(prob_values)
    return {"agg_value": np.mean(prob_values), "value_by_index": value_by_index}


def probability_w_options(correct_answer_results, wrong_answer_results):
    correct_indices = list(correct_answer_results.keys())
    wrong_indices = list(wrong_answer_results.keys())
    assert correct_indices == wrong_indices
    filtered_indices = [idx for idx in correct_indices
                        if correct_answer_results[idx] is not None and wrong_answer_results[idx] is not None]
    correct = np.array([correct_answer_results[idx]["prob"] for idx in filtered_indices])
    all_wrong = np.array([wrong_answer_results[idx]["prob"] for idx in filtered_indices])
    wrong = np.sum(all_wrong, axis=tuple(range(1, all_wrong.ndim)))
    probs = correct / (correct + wrong + 1e-10)
    value_by_index = dict(zip(correct_indices, [{"prob": val} for val in probs]))
    return {"agg_value": np.mean(probs), "value_by_index": value_by_index}


def rouge(value_by_index, rouge_type="rougeL_recall"):
    rouge_values = np.array([evals[rouge_type] for evals in value_by_index.values() if evals[rouge_type] is not None])
    rouge_values = aggregate_to_1D(rouge_values)
    return {"agg_value": np.mean(rouge_values), "value_by_index": value_by_index}


def truth_ratio(correct_answer_results, wrong_answer_results, aggregator):
    def closer_to_1_better(arr):
        return np.mean(np.minimum(arr, 1 / (arr + 1e-10)))

    def true_better(arr):
        return np.mean(np.maximum(0, 1 - arr))

    aggregate = {"closer_to_1_better": closer_to_1_better, "true_better": true_better}[aggregator]
    correct_indices = list(correct_answer_results.keys())
    wrong_indices = list(wrong_answer_results.keys())
    assert correct_indices == wrong_indices
    filtered_indices = [idx for idx in correct_indices
                        if correct_answer_results[idx] is not None and wrong_answer_results[idx] is not None]
    correct_avg_losses = [correct_answer_results[idx]["avg_loss"] for idx in filtered_indices]
    wrong_avg_losses = [wrong_answer_results[idx]["avg_loss"] for idx in filtered_indices]
    correct_avg_losses = aggregate_to_1D(np.array(correct_avg_losses))
    wrong_avg_losses = aggregate_to_1D(np.array(wrong_avg_losses))
    correct_prob = np.exp(-correct_avg_losses)
    wrong_prob = np.exp(-wrong_avg_losses)
    truth_ratios = wrong_prob / (correct_prob + 1e-10)
    value_by_index = dict(zip(correct_indices, [{"score": val} for val in truth_ratios]))
    truth_ratio_stats = np.array([evals["score"] for evals in value_by_index.values()])
    return {"agg_value": aggregate(truth_ratio_stats), "value_by_index": value_by_index}


def hm_aggregate(pre_compute):
    values = [result["agg_value"] for _, result in pre_compute.items()]
    return {"agg_value": sc.stats.hmean(values)}


def ks_test(forget_truth_ratio, retain_model_forget_truth_ratio):
    forget_tr_stats = np.array([evals["score"] for evals in forget_truth_ratio["value_by_index"].values()])
    retain_tr_stats = np.array([evals["score"] for evals in retain_model_forget_truth_ratio["value_by_index"].values()])
    return {"agg_value": sc.stats.ks_2samp(forget_tr_stats, retain_tr_stats).pvalue}


# ------------------------------------------------------------------------ the TOFU metric set (tofu.yaml)


def _by_index(values):
    return dict(enumerate(values))


def tofu_metrics(splits, reference_forget_avg_losses=None):
    """open-unlearning's TOFU numbers from per-item avg_losses and generations.

    ``splits``: ``{name: {"answer": [avg_loss], "paraphrased": [avg_loss] or None, "perturbed":
    [[avg_loss, ...]], "generated": [text], "ground_truth": [text]}}`` with names ``forget``, ``retain``,
    ``real_authors``, ``world_facts`` (any subset with ``forget``). Returns the metric names of
    configs/eval/tofu_metrics."""
    prefix = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
    out, utility = {}, {}
    for name, s in splits.items():
        p = prefix[name]
        answer = _by_index([{"prob": float(np.exp(-a)), "avg_loss": a} for a in s["answer"]])
        wrong = _by_index([{"prob": list(np.exp(-np.array(w))), "avg_loss": list(w)} for w in s["perturbed"]])
        rouge_result = rouge(_by_index(eval_rouge_recall_batch(s["generated"], s["ground_truth"])))
        out[f"{p}_Q_A_ROUGE"] = rouge_result["agg_value"]
        if name in ("forget", "retain"):
            out[f"{p}_Q_A_Prob"] = probability(answer)["agg_value"]
            para = _by_index([{"prob": float(np.exp(-a)), "avg_loss": a} for a in s["paraphrased"]])
            aggregator = "closer_to_1_better" if name == "forget" else "true_better"
            tr = truth_ratio(para, wrong, aggregator)
            key = "forget_truth_ratio" if name == "forget" else f"{p}_Truth_Ratio"
            out[key] = tr["agg_value"]
            if name == "forget":
                out["_forget_tr"] = tr
            else:
                utility.update({f"{p}_Q_A_Prob": {"agg_value": out[f"{p}_Q_A_Prob"]},
                                f"{p}_Q_A_ROUGE": rouge_result, f"{p}_Truth_Ratio": tr})
        else:
            normalised = probability_w_options(answer, wrong)
            tr = truth_ratio(answer, wrong, "true_better")
            out[f"{p}_Q_A_Prob_normalised"] = normalised["agg_value"]
            out[f"{p}_Truth_Ratio"] = tr["agg_value"]
            utility.update({f"{p}_Q_A_Prob_normalised": normalised, f"{p}_Q_A_ROUGE": rouge_result,
                            f"{p}_Truth_Ratio": tr})
    out["model_utility"] = hm_aggregate(utility)["agg_value"]
    if reference_forget_avg_losses is not None:
        ref = reference_forget_avg_losses
        ref_tr = truth_ratio(_by_index([{"avg_loss": a} for a in ref["paraphrased"]]),
                             _by_index([{"avg_loss": list(w)} for w in ref["perturbed"]]), "closer_to_1_better")
        out["forget_quality"] = ks_test(out["_forget_tr"], ref_tr)["agg_value"]
    out.pop("_forget_tr", None)
    return out
