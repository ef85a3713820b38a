"""Negative flips of a model update, with and without the MUSCLE-style compatibility term (CPU).

    python benchmarks/compat_flips.py [--output_dir outputs/bench_compat_flips] [--lambdas 0,1,4]
                                      [--seeds 0] [--update_steps 200] [--update_lr 2e-3]

1. OLD model: a tiny Qwen2 (hidden 128, 4 layers, ~1M parameters) fine-tuned with ``SFTTrainer`` on
   4000 synthetic arithmetic problems (2-3 steps, operands <= 9), batch 32, lr 3e-3 cosine, 600 steps.
   Cached in OUTPUT_DIR/models/old (a rerun reuses it).
2. Compatibility records (:func:`alignkit.compatibility.compat_records`): the old model's own greedy
   answers to 1000 further training-distribution problems, verified, kept where right.
3. UPDATE: the old model fine-tuned on a SHIFTED distribution (3-4 steps, start <= 20, operands <= 19,
   multipliers <= 4; 4000 problems, gold solutions), ``--update_steps`` steps at constant
   ``--update_lr``, batch 32, with the compatibility term λ · KL(π_old ‖ πθ) on compat mini-batches of 16
   for each λ in ``--lambdas`` (λ = 0 is the plain update), and for each update seed in ``--seeds`` (the
   seed changes the update's data sample and order).
4. Each updated model is evaluated greedily (math verifier) on 256 held-out OLD-distribution problems
   against the old model's answers (:func:`alignkit.evaluation.flips.flip_metrics`: NFR, PFR, accuracy
   old/new) and on 256 held-out SHIFTED problems (what the update is for).

Prints the table (mean over seeds, and per seed), the relative NFR change of each λ against λ = 0
(the MUSCLE paper reports up to about −40%), and writes ``results.json`` and ``compat_flips.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

OLD_SPEC = dict(min_steps=2, max_steps=3)
NEW_SPEC = dict(min_steps=3, max_steps=4, max_start=20, max_operand=19, max_multiplier=4)


def _spec(kw):
    from alignkit.tasks.arithmetic import ArithmeticSpec

    return ArithmeticSpec(**kw)


def _config(out, **kw):
    from alignkit.trainers import SFTConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=32, report_to="none", use_cpu=True, max_length=192,
                logging_steps=50, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return SFTConfig(**base)


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(path)


def build_old_model(root: Path, steps: int) -> str:
    """The OLD model (cached): tiny Qwen2 SFT'd on the base arithmetic distribution."""
    from alignkit.modeling import make_tiny_model
    from alignkit.tasks.arithmetic import make_problems
    from alignkit.trainers import SFTTrainer
    from alignkit.trainers.sft import sft_records

    old = root / "old"
    if (old / "done.json").exists() and json.loads((old / "done.json").read_text()).get("steps") == steps:
        return str(old)
    init = make_tiny_model(root / "init", "qwen2", hidden_size=128, num_layers=4)
    model, tokenizer = _load(init)
    records = sft_records(make_problems(4000, seed=1, spec=_spec(OLD_SPEC)))
    config = _config(root / "old_run", learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=20,
                     max_steps=steps, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=records, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(old))
    tokenizer.save_pretrained(str(old))
    (old / "done.json").write_text(json.dumps({"steps": steps}))
    shutil.rmtree(root / "old_run", ignore_errors=True)
    return str(old)


def greedy_correct(model, tokenizer, problems, max_new_tokens: int = 128) -> list[bool]:
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.hf import HFEngine
    from alignkit.verifiers import get_verifier

    engine = HFEngine(model, tokenizer, batch_size=64, progress=False)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, seed=0, logprobs=False)
    texts = [g[0].text for g in engine.generate([p["prompt"] for p in problems], n=1, sampling=sampling)]
    verdicts = get_verifier("math").verify_batch(problems, texts, num_workers=1)
    return [bool(v.correct) for v in verdicts]


def update(old_path: str, out: Path, lam: float, compat, steps: int, lr: float, seed: int):
    from alignkit.compatibility import CompatibilityTerm
    from alignkit.tasks.arithmetic import make_problems
    from alignkit.trainers import SFTTrainer
    from alignkit.trainers.sft import sft_records

    model, tokenizer = _load(old_path)
    records = sft_records(make_problems(4000, seed=100 + seed, spec=_spec(NEW_SPEC)))
    config = _config(out, learning_rate=lr, lr_scheduler_type="constant", max_steps=steps, seed=seed)
    aux = [CompatibilityTerm(compat, weight=lam, batch_size=16)] if lam > 0 else []
    trainer = SFTTrainer(model=model, args=config, train_dataset=records, processing_class=tokenizer, aux_losses=aux)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss/sft" in h]
    return trainer.model.eval(), tokenizer, seconds, logs[-1] if logs else {}


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    lams = [r["lambda"] for r in rows]
    labels = [f"λ={lam:g}" for lam in lams]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [100 * r["nfr"] for r in rows], width=0.4, label="NFR (old items)")
    axes[0].bar([i + 0.2 for i in x], [100 * r["pfr"] for r in rows], width=0.4, label="PFR (old items)")
    for run in results["runs"]:
        i = lams.index(run["lambda"])
        axes[0].plot([i - 0.2], [100 * run["nfr"]], "k.")
        axes[0].plot([i + 0.2], [100 * run["pfr"]], "k.")
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("% of old-distribution eval items")
    axes[0].set_title("flips of the update (dots: seeds)")
    axes[0].legend()
    axes[1].plot(lams, [100 * r["accuracy_new"] for r in rows], "o-", label="updated, old distribution")
    axes[1].plot(lams, [100 * r["shift_accuracy"] for r in rows], "s-", label="updated, shifted distribution")
    axes[1].axhline(100 * results["old"]["accuracy"], color="C0", ls="--", lw=1, label="old model, old distribution")
    axes[1].axhline(100 * results["old"]["shift_accuracy"], color="C1", ls="--", lw=1, label="old model, shifted")
    axes[1].set_xlabel("compatibility weight λ")
    axes[1].set_ylabel("greedy accuracy %")
    axes[1].legend(fontsize=8)
    axes[1].set_title("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/bench_compat_flips")
    parser.add_argument("--lambdas", default="0,1,4")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--old_steps", type=int, default=600)
    parser.add_argument("--update_steps", type=int, default=200)
    parser.add_argument("--update_lr", type=float, default=2e-3)
    parser.add_argument("--eval_items", type=int, default=256)
    parser.add_argument("--compat_items", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from alignkit.compatibility import compat_records
    from alignkit.evaluation.flips import flip_metrics
    from alignkit.rollout.base import SamplingConfig
    from alignkit.rollout.hf import HFEngine
    from alignkit.tasks.arithmetic import make_problems
    from alignkit.verifiers import get_verifier

    wall = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]

    t = time.perf_counter()
    old_path = build_old_model(out / "models", args.old_steps)
    print(f"old model: {old_path} ({time.perf_counter() - t:.0f}s)")
    old_eval = make_problems(args.eval_items, seed=10_000, spec=_spec(OLD_SPEC))
    shift_eval = make_problems(args.eval_items, seed=20_000, spec=_spec(NEW_SPEC))
    old_model, tokenizer = _load(old_path)
    old_correct = greedy_correct(old_model, tokenizer, old_eval)
    old_shift = greedy_correct(old_model, tokenizer, shift_eval)
    compat, rows = compat_records(
        HFEngine(old_model, tokenizer, batch_size=64, progress=False), get_verifier("math", num_workers=1),
        make_problems(args.compat_items, seed=30_000, spec=_spec(OLD_SPEC)),
        sampling=SamplingConfig(temperature=0.0, max_new_tokens=128, seed=0), return_rows=True)
    old = {"accuracy": sum(old_correct) / len(old_correct), "shift_accuracy": sum(old_shift) / len(old_shift),
           "compat_records": len(compat), "compat_items": len(rows)}
    print(f"old model: accuracy {old['accuracy']:.3f} (old distribution), {old['shift_accuracy']:.3f} (shifted); "
          f"{len(compat)}/{len(rows)} compatibility records")
    del old_model

    runs = []
    for seed in seeds:
        for lam in lambdas:
            model, tok, seconds, last = update(old_path, out / f"update_l{lam:g}_s{seed}", lam, compat,
                                               args.update_steps, args.update_lr, seed)
            new_correct = greedy_correct(model, tok, old_eval)
            shift_correct = greedy_correct(model, tok, shift_eval)
            m = flip_metrics(old_correct, new_correct)
            shift = flip_metrics(old_shift, shift_correct)
            run = {"lambda": lam, "seed": seed, "train_seconds": seconds, "accuracy_old": m.accuracy_old,
                   "accuracy_new": m.accuracy_new, "nfr": m.nfr, "pfr": m.pfr, "negative_flips": m.negative_flips,
                   "positive_flips": m.positive_flips, "btc": m.btc, "shift_accuracy": shift.accuracy_new,
                   "shift_nfr": shift.nfr, "last_log": last}
            runs.append(run)
            print(f"seed {seed} λ={lam:g}: acc {m.accuracy_old:.3f} -> {m.accuracy_new:.3f}, NFR {m.nfr:.3f}, "
                  f"PFR {m.pfr:.3f}, shifted acc {shift.accuracy_new:.3f} ({seconds:.0f}s train)", flush=True)
            shutil.rmtree(out / f"update_l{lam:g}_s{seed}", ignore_errors=True)

    def mean(values):
        return sum(values) / len(values)

    base_nfr = {r["seed"]: r["nfr"] for r in runs if r["lambda"] == 0}
    summary = []
    for lam in lambdas:
        mine = [r for r in runs if r["lambda"] == lam]
        rel = [(r["nfr"] - base_nfr[r["seed"]]) / base_nfr[r["seed"]] for r in mine if base_nfr.get(r["seed"])]
        summary.append({
            "lambda": lam, "accuracy_old": mean([r["accuracy_old"] for r in mine]),
            "accuracy_new": mean([r["accuracy_new"] for r in mine]), "nfr": mean([r["nfr"] for r in mine]),
            "pfr": mean([r["pfr"] for r in mine]), "btc": mean([r["btc"] for r in mine]),
            "shift_accuracy": mean([r["shift_accuracy"] for r in mine]),
            "nfr_change": mean(rel) if rel and lam != 0 else None,
            "nfr_change_per_seed": rel if lam != 0 else None,
        })
    header = f"{'λ':>5} | {'acc old':>7} | {'acc new':>7} | {'NFR':>6} | {'PFR':>6} | {'BTC':>6} | {'ΔNFR rel':>9} | {'shifted acc':>11}"
    print(f"\nupdate: SFT on shifted arithmetic, {args.update_steps} steps, lr {args.update_lr:g}; "
          f"{len(old_eval)} old-distribution eval items; mean over seeds {seeds}")
    print(f"old model on the shifted distribution: {old['shift_accuracy']:.3f}")
    print(header)
    print("-" * len(header))
    for s in summary:
        change = "—" if s["nfr_change"] is None else f"{100 * s['nfr_change']:+.0f}%"
        print(f"{s['lambda']:>5g} | {s['accuracy_old']:>7.3f} | {s['accuracy_new']:>7.3f} | {s['nfr']:>6.3f} | "
              f"{s['pfr']:>6.3f} | {s['btc']:>6.3f} | {change:>9} | {s['shift_accuracy']:>11.3f}")
    results = {"args": vars(args), "old": old, "runs": runs, "summary": summary,
               "wall_seconds": time.perf_counter() - wall}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    png = plot(results, out / "compat_flips.png")
    print(f"\nwall time {results['wall_seconds']:.0f}s; wrote {out / 'results.json'}" + (f" and {png}" if png else ""))
    return results


if __name__ == "__main__":
    main()
