"""Does learning from the model's own negatives help a real model? SmolLM2-135M-Instruct on the chat
arithmetic task, side by side, at the same sampling budget:

==========================  =====================================================================
base                        the model as shipped
SFT on gold                 LoRA SFT on the gold step-by-step solutions of the training problems
RFT                         LoRA SFT on the model's own verified-correct samples (rejection sampling)
on-policy DPO               LoRA DPO, a correct vs an incorrect own sample (gold when none is right)
per-step first-pit DPO      LoRA DPO against the wrong samples cut at their first pit (Setlur et al.
                            2024), step values by Monte Carlo continuations (extra sampling, counted)
NPO (own negatives)         LoRA NPO+RT: forget the model's own wrong samples, retain its right ones
==========================  =====================================================================

RFT, DPO, per-step and NPO all start from the same ``--samples`` samples per training problem (one rollout
call, shared); per-step also samples ``--num_rollouts`` continuations per step prefix, reported in the
``sampled tokens`` column. Every trained model gets the same optimizer steps budget (``--epochs`` over its
own records, at most ``--max_steps``). Each is evaluated greedily on held-out problems (a disjoint half of
the problem space) against the base: accuracy with a bootstrap interval, and NFR / PFR (negative / positive
flip rates, MUSCLE) with intervals.

    python benchmarks/real_model_negatives.py                 # defaults below, ~1-2 h on 2 CPU cores
    python benchmarks/real_model_negatives.py --train 64 --eval 100 --methods base,dpo   # a subset

Results are cached per method under ``--out`` (``<method>.json``), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("base", "sft_gold", "rft", "dpo", "perstep", "npo")
LABELS = {"base": "base", "sft_gold": "SFT on gold", "rft": "RFT (own correct samples)",
          "dpo": "on-policy DPO (own negatives)", "perstep": "per-step first-pit DPO", "npo": "NPO+RT (own negatives)"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench_real_model_negatives")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train", type=int, default=256, help="training problems")
    p.add_argument("--eval", type=int, default=200, help="held-out problems (greedy)")
    p.add_argument("--samples", type=int, default=4, help="on-policy samples per training problem")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--num_rollouts", type=int, default=2, help="per-step: continuations per step prefix")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max_steps", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (every method)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def fresh_lora_model(a):
    from peft import get_peft_model

    from alignkit.modeling import ModelArguments, load_model_and_tokenizer, lora_config

    args = ModelArguments(model_name_or_path="smollm2", use_peft=True)
    model, tokenizer = load_model_and_tokenizer(args)
    return get_peft_model(model, lora_config(args)), tokenizer


def train_config(cls, a, out: Path, n_records: int, **kw):
    steps = max(1, min(a.max_steps, int(a.epochs * n_records / a.batch_size)))
    return cls(output_dir=str(out), max_steps=steps, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
               lr_scheduler_type="constant", logging_steps=8, save_strategy="no", report_to="none", use_cpu=True,
               max_length=512, seed=a.seed, disable_tqdm=True, **kw)


def evaluate(model, tokenizer, held_out, verifier, a) -> list[bool]:
    from alignkit.negatives import sample_rollouts, verify_rollouts
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.hf import HFEngine

    rows = sample_rollouts(HFEngine(model, tokenizer, progress=False), held_out, 1,
                           SamplingConfig(temperature=0.0, max_new_tokens=a.max_new_tokens), keep_token_data=False)
    return [bool(r["completions"][0]["correct"]) for r in verify_rollouts(rows, verifier)]


def shared_samples(a, train, verifier, out: Path):
    """The on-policy samples every negatives method starts from (cached)."""
    from alignkit.negatives import read_rollouts, sample_rollouts, verify_rollouts, write_jsonl
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.hf import HFEngine

    path = out / "samples.jsonl"
    if path.exists():
        return read_rollouts(path, verified=True)
    model, tokenizer = fresh_lora_model(a)
    start = time.perf_counter()
    sampling = SamplingConfig(temperature=a.temperature, max_new_tokens=a.max_new_tokens, seed=a.seed)
    rows = verify_rollouts(sample_rollouts(HFEngine(model, tokenizer), train, a.samples, sampling), verifier)
    print(f"  sampled {a.samples} x {len(train)} in {time.perf_counter() - start:.0f}s")
    write_jsonl(rows, path)
    return rows


def sampled_tokens(rows) -> int:
    return sum(len(c.get("token_ids") or []) for r in rows for c in r["completions"])


def run_method(name, a, train, held_out, verifier, out: Path) -> dict:
    from alignkit.negatives import RolloutStats, distinct_completions, negative_records, preference_pairs
    from alignkit.trainers import DPOConfig, DPOTrainer, NPOConfig, NPOTrainer, SFTConfig, SFTTrainer
    from alignkit.trainers.sft import rft_records, sft_records

    model, tokenizer = fresh_lora_model(a)
    info: dict = {"records": 0, "sampled_tokens": 0}
    start = time.perf_counter()
    if name != "base" and name != "sft_gold":
        rows = shared_samples(a, train, verifier, out)
        info["sampled_tokens"] = sampled_tokens(rows)
        info["sampled_accuracy"] = RolloutStats.of(rows).accuracy
    if name == "sft_gold":
        records = sft_records(train)
        trainer = SFTTrainer(model=model, args=train_config(SFTConfig, a, out / name, len(records)),
                             train_dataset=records, processing_class=tokenizer)
    elif name == "rft":
        records = rft_records(rows)
        trainer = SFTTrainer(model=model, args=train_config(SFTConfig, a, out / name, len(records)),
                             train_dataset=records, processing_class=tokenizer)
    elif name == "dpo":
        records = preference_pairs(rows, pairs_per_prompt=1, fallback="solution", seed=a.seed)
        trainer = DPOTrainer(model=model, args=train_config(DPOConfig, a, out / name, len(records), beta=a.beta),
                             train_dataset=records, processing_class=tokenizer)
    elif name == "npo":
        records = [{"prompt": r["prompt"], "response": r["rejected"]} for r in negative_records(rows)]
        retain = [{"prompt": r["prompt"], "response": c["text"]} for r in rows
                  for c in distinct_completions(r["completions"]) if c["correct"]]
        config = train_config(NPOConfig, a, out / name, len(records), loss_type="npo_rt", beta=a.beta)
        trainer = NPOTrainer(model=model, args=config, train_dataset=records, retain_dataset=retain,
                             processing_class=tokenizer)
    elif name == "perstep":
        records, report = perstep_records(a, rows, model, tokenizer, verifier, out)
        info["sampled_tokens"] += report["step_values"]["tokens_generated"]
        from alignkit.trainers import PerStepConfig, PerStepTrainer

        trainer = PerStepTrainer(model, train_config(PerStepConfig, a, out / name, len(records), mode="first_pit_dpo",
                                                     beta=a.beta), train_dataset=records, processing_class=tokenizer)
    if name != "base":
        info["records"] = len(records)
        trainer.train()
        model = trainer.model
        info["train_steps"] = trainer.state.global_step
    info["seconds"] = time.perf_counter() - start
    info["correct"] = evaluate(model, tokenizer, held_out, verifier, a)
    return info


def perstep_records(a, rows, model, tokenizer, verifier, out: Path):
    """First-pit per-step records from the shared samples' wrong answers (step values sampled here)."""
    from alignkit.data.loading import read_json_lines
    from alignkit.negatives import distinct_completions, write_jsonl
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.hf import HFEngine
    from alignkit.steps import estimate_step_values, first_pit

    path = out / "perstep_records.jsonl"
    if path.exists():
        saved = [row for _, row in read_json_lines(path)]
        return saved[:-1], saved[-1]["report"]
    owners, negatives, chosen = [], [], []
    for row in rows:
        distinct = distinct_completions(row["completions"])
        right = [c["text"] for c in distinct if c["correct"]]
        for k, c in enumerate(c for c in distinct if not c["correct"]):
            owners.append(row)
            negatives.append(c["text"])
            chosen.append(right[k % len(right)] if right else row["solution"])
    with torch.no_grad(), model.disable_adapter():  # the starting model's values
        values, cost = estimate_step_values(
            HFEngine(model, tokenizer, progress=False), verifier, owners, negatives, tokenizer=tokenizer,
            num_rollouts=a.num_rollouts, final_values=[0.0] * len(negatives),
            sampling=SamplingConfig(temperature=a.temperature, max_new_tokens=a.max_new_tokens, seed=a.seed + 1))
    records = [{"prompt": row["prompt"], "response": text, "steps": sv.steps, "values": sv.values,
                "first_pit": first_pit(sv.values), "chosen": ch}
               for row, text, sv, ch in zip(owners, negatives, values, chosen)]
    records = [r for r in records if r["first_pit"] is not None]
    report = {"step_values": cost.to_dict(), "negatives": len(negatives), "with_pit": len(records)}
    write_jsonl(records + [{"report": report}], path)
    return records, report


def table(results: dict, base_correct) -> str:
    import numpy as np

    from alignkit.evaluation.flips import flip_count_bootstrap, flip_metrics, rate_ci

    head = ("| method | held-out accuracy [95% CI] | NFR vs base [95% CI] | PFR vs base [95% CI] | records | "
            "sampled tokens | train steps | seconds |")
    lines = [head, "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    old = np.array(base_correct, dtype=bool)
    for name, r in results.items():
        new = np.array(r["correct"], dtype=bool)
        lo, hi = rate_ci(new)
        m = flip_metrics(old, new)
        ci = flip_count_bootstrap(old, new, None)
        lines.append(
            f"| {LABELS[name]} | {new.mean():.3f} [{lo:.3f}, {hi:.3f}] | {m.nfr:.3f} [{ci['nfr'][0]:.3f}, {ci['nfr'][1]:.3f}] "
            f"| {m.pfr:.3f} [{ci['pfr'][0]:.3f}, {ci['pfr'][1]:.3f}] | {r['records']} | {r['sampled_tokens']} | "
            f"{r.get('train_steps', 0)} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    from alignkit.tasks.arithmetic import make_chat_problems
    from alignkit.verifiers import get_verifier

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(vars(a), indent=2))
    train = make_chat_problems(a.train, seed=a.seed)
    held_out = make_chat_problems(a.eval, seed=a.seed, split="heldout")
    verifier = get_verifier("math", num_workers=1)
    methods = ["base"] + [m for m in a.methods.split(",") if m and m != "base"]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; available: {', '.join(METHODS)}")
    results = {}
    for name in methods:
        path = out / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        print(f"[{name}] {LABELS[name]}", flush=True)
        torch.manual_seed(a.seed)
        results[name] = run_method(name, a, train, held_out, verifier, out)
        path.write_text(json.dumps(results[name]))
        print(f"  accuracy {sum(results[name]['correct']) / len(held_out):.3f} in {results[name]['seconds']:.0f}s",
              flush=True)
    print(f"\nSmolLM2-135M-Instruct, chat arithmetic: {a.train} training problems, {a.samples} samples each at T="
          f"{a.temperature}, {a.eval} held-out problems (greedy); LoRA lr {a.lr}, {a.epochs} epochs (<= {a.max_steps} "
          f"steps) of batch {a.batch_size}\n")
    print(table(results, results["base"]["correct"]))


if __name__ == "__main__":
    main()
