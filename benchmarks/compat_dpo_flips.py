"""Negative flips of an on-policy DPO update, with and without the compatibility term (CPU).

    python benchmarks/compat_dpo_flips.py [--output_dir outputs/bench_compat_dpo] [--lambdas 0,1] [--seeds 0,1,2]

The MUSCLE setting on alignkit's own pipeline (the quickstart's): an update with negatives that raises
the pressure on wrong answers can break problems the old model solved.

1. OLD model: the quickstart's tiny Qwen2 (hidden 128, 4 layers) after SFT on 4000 synthetic arithmetic
   problems (800 steps). Cached in OUTPUT_DIR/old.
2. On-policy negatives: 4 samples for each of 512 training problems from the old model, verified by the
   math verifier, one (correct, incorrect) pair per problem, the gold solution as chosen when none is
   correct. Cached in OUTPUT_DIR/pairs.jsonl.
3. Compatibility records: the old model's greedy answers on 1000 other training problems, kept where
   right (:func:`alignkit.compatibility.compat_records`).
4. UPDATE: one epoch of plain DPO (β = 0.1, lr 2e-4, batch 32, no NLL term) against the old model, for
   each λ in ``--lambdas`` (λ·KL(π_old ‖ πθ) on compat mini-batches) and each seed in ``--seeds``.
5. Each updated model is evaluated greedily on 200 held-out problems against the old model's answers.

Prints accuracy old/new, NFR and PFR per λ (mean and per seed) and the relative NFR change of each λ
against λ = 0; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _common(output_dir: Path, seed: int) -> dict:
    return dict(output_dir=str(output_dir), per_device_train_batch_size=32, report_to="none", use_cpu=True,
                max_length=256, logging_steps=10, save_strategy="no", disable_tqdm=True, seed=seed)


def build_old_model(out: Path, train: list[dict]) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.modeling import make_tiny_model
    from alignkit.trainers import SFTConfig, SFTTrainer
    from alignkit.trainers.sft import sft_records

    old = out / "old"
    if (old / "model.safetensors").exists():
        return str(old)
    path = make_tiny_model(out / "tiny", "qwen2", hidden_size=128, num_layers=4)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    config = SFTConfig(**_common(old, 0), max_steps=800, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=20)
    trainer = SFTTrainer(model=model, args=config, train_dataset=sft_records(train), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(old))
    return str(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/bench_compat_dpo")
    parser.add_argument("--lambdas", default="0,1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    a = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from alignkit.compatibility import CompatibilityTerm, compat_records
    from alignkit.evaluation.flips import flip_metrics
    from alignkit.negatives import preference_pairs, read_rollouts, sample_rollouts, verify_rollouts, write_jsonl
    from alignkit.quickstart import evaluate_problems
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.hf import HFEngine
    from alignkit.tasks.arithmetic import make_problems
    from alignkit.trainers import DPOConfig, DPOTrainer
    from alignkit.verifiers import get_verifier

    torch.set_num_threads(1)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = make_problems(4200, seed=0)  # the quickstart's split
    train, held_out = problems[:4000], problems[4000:]
    verifier = get_verifier("math", num_workers=1)
    started = time.perf_counter()
    old_path = build_old_model(out, train)
    tokenizer = AutoTokenizer.from_pretrained(old_path)

    def load():
        return AutoModelForCausalLM.from_pretrained(old_path)

    rollouts_path, compat_path = out / "rollouts.jsonl", out / "compat.jsonl"
    if not rollouts_path.exists():
        engine = HFEngine(load(), tokenizer, batch_size=64, progress=False)
        rows = sample_rollouts(engine, train[:512], 4, SamplingConfig(temperature=1.0, max_new_tokens=96, seed=0))
        write_jsonl(verify_rollouts(rows, verifier), rollouts_path)
    if not compat_path.exists():
        engine = HFEngine(load(), tokenizer, batch_size=64, progress=False)
        write_jsonl(compat_records(engine, verifier, train[1000:2000],
                                   sampling=SamplingConfig(temperature=0.0, max_new_tokens=96, seed=0)), compat_path)
    rollouts = read_rollouts(rollouts_path, verified=True)
    old = [p["correct"] for p in evaluate_problems(load(), tokenizer, held_out, verifier)]
    compat_count = sum(1 for _ in open(compat_path))
    print(f"old model: accuracy {sum(old) / len(old):.3f} on {len(old)} held-out problems; "
          f"{compat_count} compatibility records; setup {time.perf_counter() - started:.0f}s")

    runs = []
    for lam in [float(x) for x in a.lambdas.split(",")]:
        for seed in [int(x) for x in a.seeds.split(",")]:
            t0 = time.perf_counter()
            set_seed(seed)
            model = load()
            pairs = preference_pairs(rollouts, pairs_per_prompt=1, fallback="solution", seed=seed)
            config = DPOConfig(**_common(out / f"dpo_l{lam}_s{seed}", seed), learning_rate=a.learning_rate, beta=0.1,
                               num_train_epochs=1)
            aux = [CompatibilityTerm(str(compat_path), weight=lam)] if lam else []
            DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer, aux_losses=aux).train()
            new = [p["correct"] for p in evaluate_problems(model, tokenizer, held_out, verifier)]
            m = flip_metrics(old, new)
            runs.append({"lambda": lam, "seed": seed, "accuracy_old": m.accuracy_old, "accuracy_new": m.accuracy_new,
                         "nfr": m.nfr, "pfr": m.pfr, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"  λ={lam:g} seed={seed}: accuracy {m.accuracy_old:.3f} -> {m.accuracy_new:.3f}, NFR {m.nfr:.3f}, "
                  f"PFR {m.pfr:.3f} ({runs[-1]['seconds']:.0f}s)")

    lambdas = sorted({r["lambda"] for r in runs})
    mean = {lam: {k: sum(r[k] for r in runs if r["lambda"] == lam) / sum(r["lambda"] == lam for r in runs)
                  for k in ("accuracy_old", "accuracy_new", "nfr", "pfr")} for lam in lambdas}
    base = mean.get(0.0, {}).get("nfr")
    print("\n| λ | seeds | accuracy old | accuracy new | NFR | PFR | NFR change vs λ=0 |")
    print("|---|---|---|---|---|---|---|")
    for lam in lambdas:
        m = mean[lam]
        change = f"{(m['nfr'] - base) / base:+.0%}" if base and lam != 0.0 else "—"
        seeds = sum(r["lambda"] == lam for r in runs)
        print(f"| {lam:g} | {seeds} | {m['accuracy_old']:.3f} | {m['accuracy_new']:.3f} | {m['nfr']:.3f} | {m['pfr']:.3f} | {change} |")
    (out / "results.json").write_text(json.dumps({"runs": runs, "mean": {str(k): v for k, v in mean.items()}}, indent=2))
    print(f"\ntotal {time.perf_counter() - started:.0f}s -> {out / 'results.json'}")


if __name__ == "__main__":
    main()
