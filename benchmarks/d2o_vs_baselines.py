"""D²O vs DPO with noisy positives vs gradient ascent, on the negative-class task (CPU, a few minutes).

    python benchmarks/d2o_vs_baselines.py [--output_dir outputs/d2o_vs_baselines] [--steps 60] [--seeds 0,1,2] [--all]

Task (:mod:`alignkit.tasks.negative_class`): a tiny Qwen2 fine-tuned to answer "what does the <animal>
eat?" correctly, but rudely ("..., idiot.") about 35 % of the time. Alignment data: 2 labelled rude
answers per training prompt (48 prompts, 96 negatives records); no positives. Every method trains from
the same reference model on the same negatives for the same number of optimizer steps and batch size:

* **D²O**: K = 11 responses per prompt sampled once from the reference (temperature 1), α = β = 0.1;
* **D²O, samples under instruction**: the same, sampled under the task's instruction prefix
  ("Be polite.\n", ``D2OConfig.instruction_prefix``), which the reference answers rudely far less often;
* **DPO (noisy positives)**: each negative paired with one of those reference samples as "chosen"
  (unlabelled, so rude about a third of the time), β = 0.1; and the same with positives sampled under
  the instruction (the fair counterpart of the previous line);
* **GA**: gradient ascent on the negatives (``NPOTrainer`` with ``loss_type='ga'``, sequence-summed);
* **NPO**: for reference, the bounded GA of Zhang et al. 2024 (β = 0.1).

Each method runs over a learning-rate grid. The learning rate reported per method is chosen on the
*training* prompts by the useful-answer rate (rude and broken answers both count against it); the
table shows the held-out prompts (other animals; same rude class) for that choice, and ``--all`` prints
every run. Metrics: negative-class rate and useful-answer rate of 16 samples per prompt at temperature
1, and gold log-likelihood per token of the correct answers. A PNG plots negative rate against
useful rate for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

METHODS = ("d2o", "dpo", "d2o_prefix", "dpo_prefix", "ga", "npo")
LABELS = {
    "reference": "reference (SFT)",
    "d2o": "D²O",
    "dpo": "DPO, noisy positive",
    "d2o_prefix": "D²O, samples under instruction",
    "dpo_prefix": "DPO, positive sampled under instruction",
    "ga": "gradient ascent",
    "npo": "NPO",
}
DEFAULT_LRS = {
    "d2o": "1e-5,3e-5,5e-5,1e-4,2e-4",
    "dpo": "1e-5,3e-5,5e-5,1e-4,2e-4",
    "d2o_prefix": "1e-5,3e-5,5e-5,1e-4,2e-4",
    "dpo_prefix": "1e-5,3e-5,5e-5,1e-4,2e-4",
    "ga": "3e-6,1e-5,2e-5,3e-5,5e-5",
    "npo": "1e-5,2e-5,3e-5,5e-5,1e-4",
}


def _common_config(output_dir: str, args, lr: float, seed: int) -> dict:
    return dict(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, report_to="none", use_cpu=True,
                save_strategy="no", logging_steps=args.steps, seed=seed, max_length=128, disable_tqdm=True,
                reference="model")


def train_one(method: str, lr: float, seed: int, reference_path: str, records: list[dict], args) -> torch.nn.Module:
    """Train one method from the reference; ``records`` carry ``samples`` (the reference samples to use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    tokenizer = AutoTokenizer.from_pretrained(reference_path)
    model = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32, attn_implementation="sdpa")
    out = os.path.join(args.output_dir, "runs", f"{method}-lr{lr:g}-s{seed}")
    common = _common_config(out, args, lr, seed)
    if method.startswith("d2o"):
        from alignkit.trainers.d2o import D2OConfig, D2OTrainer

        trainer = D2OTrainer(model=model, args=D2OConfig(num_samples=args.k, beta=args.beta, alpha=args.alpha, **common),
                             train_dataset=records, processing_class=tokenizer)
    elif method.startswith("dpo"):
        from alignkit.trainers.dpo import DPOConfig, DPOTrainer

        pairs = [{"prompt": r["prompt"], "chosen": r["samples"][i % args.k], "rejected": r["rejected"]}
                 for i, r in enumerate(records)]
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=args.beta, **common), train_dataset=pairs,
                             processing_class=tokenizer)
    else:
        from alignkit.trainers.npo import NPOConfig, NPOTrainer

        forget = [{"prompt": r["prompt"], "response": r["rejected"]} for r in records]  # the same negatives
        beta = {"beta": args.beta} if method == "npo" else {}
        trainer = NPOTrainer(model=model, args=NPOConfig(loss_type=method, **beta, **common), train_dataset=forget,
                             processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # no per-run log lines
    trainer.train()
    return trainer.model


def evaluate(model, tokenizer, items, args) -> dict:
    from alignkit.tasks.negative_class import evaluate_model

    return {split: evaluate_model(model, tokenizer, its, num_samples=args.eval_samples, seed=1234)
            for split, its in items.items()}


def plot(results: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = {"d2o": "tab:blue", "dpo": "tab:orange", "d2o_prefix": "tab:cyan", "dpo_prefix": "tab:olive",
              "ga": "tab:red", "npo": "tab:purple"}
    for ax, split in zip(axes, ("train", "heldout")):
        ax.scatter([reference[split]["negative_rate"]], [reference[split]["useful_rate"]], marker="*", s=220,
                   color="black", label=LABELS["reference"], zorder=3)
        for method in METHODS:
            runs = [r for r in results if r["method"] == method]
            if not runs:
                continue
            ax.scatter([r[split]["negative_rate"] for r in runs], [r[split]["useful_rate"] for r in runs],
                       color=colors[method], alpha=0.35, s=30)
            chosen = [r for r in runs if r.get("selected")]
            ax.scatter([r[split]["negative_rate"] for r in chosen], [r[split]["useful_rate"] for r in chosen],
                       color=colors[method], s=110, edgecolor="black", label=LABELS[method], zorder=3)
        ax.set_xlabel("negative-class rate (lower is better)")
        ax.set_ylabel("useful-answer rate (higher is better)")
        ax.set_title(f"{split} prompts")
        ax.set_xlim(-0.02, 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Negative-class task: small = one run of the lr grid, large = lr chosen on training prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/d2o_vs_baselines")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=11)
    parser.add_argument("--beta", type=float, default=0.1, help="β of D²O, DPO and NPO")
    parser.add_argument("--alpha", type=float, default=0.1, help="α of D²O")
    parser.add_argument("--seeds", default="0,1,2",
                        help="seeds of the sample pool and of training (comma-separated); metrics are averaged")
    parser.add_argument("--eval_samples", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    for method in METHODS:
        parser.add_argument(f"--{method}_lrs", default=DEFAULT_LRS[method])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--all", action="store_true", help="print every run of the grid")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.reference_samples import sample_texts
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.hf import HFEngine
    from alignkit.tasks import negative_class as task

    start = time.perf_counter()
    out = Path(args.output_dir)
    spec = task.NegativeClassSpec()
    reference_path = task.build_reference_model(out / "task", spec)
    tokenizer = AutoTokenizer.from_pretrained(reference_path)
    reference_model = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32)
    items = task.prompt_items(spec)
    reference = evaluate(reference_model, tokenizer, items, args)

    # K reference samples per training prompt (per seed), plain and under the task's instruction prefix,
    # drawn once and shared: D²O uses all K, DPO one per negative
    records = task.negative_records(spec, per_prompt=2)
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    engine = HFEngine(reference_model, tokenizer, batch_size=256, progress=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    pools = {}
    for seed in seeds:
        for prefix in (None, task.INSTRUCTION_PREFIX):
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=seed, logprobs=False)
            texts = sample_texts(engine, prompts, args.k, sampling, instruction_prefix=prefix)
            pools[seed, prefix is not None] = dict(zip(prompts, texts))

    def sample_rate(prefixed):
        texts = [t for seed in seeds for ts in pools[seed, prefixed].values() for t in ts]
        return sum(task.is_negative(t) for t in texts) / len(texts)

    print(f"reference model {reference_path}; {len(records)} negatives records on {len(prompts)} prompts; "
          f"{args.k} reference samples per prompt, in the negative class: {sample_rate(False):.1%} "
          f"(plain), {sample_rate(True):.1%} (under the instruction prefix); {args.steps} steps x {args.batch} records; "
          f"seeds {seeds}", flush=True)

    results = []
    for method in args.methods.split(","):
        for lr in [float(x) for x in getattr(args, f"{method}_lrs").split(",")]:
            per_seed = []
            for seed in seeds:
                pool = pools[seed, method.endswith("_prefix")]
                with_samples = [{**r, "samples": pool[r["prompt"]]} for r in records]
                model = train_one(method, lr, seed, reference_path, with_samples, args)
                per_seed.append(evaluate(model, tokenizer, items, args))
            metrics = {split: {k: statistics.mean(m[split][k] for m in per_seed) for k in per_seed[0][split]}
                       for split in items}
            spread = {split: {k: statistics.pstdev(m[split][k] for m in per_seed) for k in per_seed[0][split]}
                      for split in items}
            results.append({"method": method, "lr": lr, **metrics, "std": spread, "per_seed": per_seed})
            t, h = metrics["train"], metrics["heldout"]
            print(f"  {method:4s} lr {lr:<7g} train: neg {t['negative_rate']:.3f} useful {t['useful_rate']:.3f} "
                  f"gold {t['gold_logp']:.3f} | heldout: neg {h['negative_rate']:.3f} useful {h['useful_rate']:.3f} "
                  f"gold {h['gold_logp']:.3f}  ({time.perf_counter() - start:.0f}s)", flush=True)
        runs = [r for r in results if r["method"] == method]
        max(runs, key=lambda r: (r["train"]["useful_rate"], -r["train"]["negative_rate"]))["selected"] = True

    def row(name, r, lr="—"):
        t, h = r["train"], r["heldout"]
        sd = r.get("std", {}).get("heldout")

        def pm(key):
            return f"{h[key]:.3f}" + (f" ± {sd[key]:.3f}" if sd and len(seeds) > 1 else "")

        return (f"| {name} | {lr} | {t['negative_rate']:.3f} | {t['useful_rate']:.3f} | {pm('negative_rate')} | "
                f"{pm('useful_rate')} | {h['other_rate']:.3f} | {h['gold_logp']:.3f} |")

    print()
    print(f"mean over seeds {seeds}" + (" (± population std over seeds)" if len(seeds) > 1 else ""))
    header = ("| method | lr | train neg. rate | train useful | held-out neg. rate | held-out useful | "
              "held-out other | held-out gold log-p/token |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    print(row(LABELS["reference"], reference))
    for r in results:
        if r.get("selected") or args.all:
            print(row(LABELS[r["method"]] + ("" if r.get("selected") else " (grid)"), r, f"{r['lr']:g}"))
    png = out / "d2o_vs_baselines.png"
    plot(results, reference, png)
    (out / "results.json").write_text(json.dumps({"reference": reference, "runs": results, "args": vars(args)},
                                                 indent=2))
    print(f"\nplot: {png}; {len(results) * len(seeds)} training runs in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
